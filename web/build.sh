#!/usr/bin/env bash
# Builds the engine for the browser into web/pkg/ (sdxl.js, sdxl_bg.wasm): what
# web/worker.js imports. Needs the wasm32 target and wasm-bindgen-cli (tests/install.sh installs both).
# Run it again after editing web/: the service worker serves the files of the build it was made for.
set -euo pipefail
cd "$(dirname "$0")/.."
# Whole-program optimisation: 3.9 MB → 3.2 MB of wasm (1.16 MB gzipped); native builds keep the plain release profile.
CARGO_PROFILE_RELEASE_LTO=true CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1 cargo build --locked --release --target wasm32-unknown-unknown --lib
rm -rf web/pkg
wasm-bindgen --target web --no-typescript --out-dir web/pkg target/wasm32-unknown-unknown/release/sdxl.wasm
# The build's manifest for the service worker (sw.js imports it): every file of the app shell and of
# pkg/ (the snippet folder is named by a hash) with its sha256, and an id made of those. The service
# worker caches exactly these bytes under the id, so a page never pairs one build's JS with another's
# wasm; a new build changes this file, which makes the browser install a new service worker.
(cd web && python3 - <<'EOF'
import hashlib, json, pathlib
shell = ['index.html', 'app.js', 'style.css', 'sdxl.js', 'worker.js', 'examples/embed.html']
pkg = sorted(str(p) for p in pathlib.Path('pkg').rglob('*') if p.is_file())
files = {name: hashlib.sha256(pathlib.Path(name).read_bytes()).hexdigest() for name in shell + pkg}
files['./'] = files['index.html']  # the page's own URL
build = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]
manifest = json.dumps({'id': build, 'files': files}, indent=1, sort_keys=True)
pathlib.Path('pkg/build.js').write_text(f'// Written by web/build.sh: the files of build {build} (see sw.js).\nself.BUILD = {manifest};\n')
EOF
)
