#!/usr/bin/env bash
# Runs every test: native (wgpu on Vulkan; lavapipe on machines without a GPU) and in headless
# Chromium on WebGPU (wasm-bindgen-test; SwiftShader without a GPU), then the page and the JS API end to end
# (tests/e2e/, playwright-core). Needs what .ci/run installs.
set -euo pipefail
cd "$(dirname "$0")/.."
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"

echo "== native tests"
cargo run --locked -q -- info
cargo test --locked

echo "== browser tests (headless Chromium, WebGPU; the store tests on IndexedDB against a local HTTP server)"
fixtures=target/store-fixtures
SDXL=target/debug/sdxl bash tests/store_fixtures.sh "$fixtures"
python3 tests/server.py --mount /diffusers=tests/fixtures/tiny-sdxl-base --mount /pack="$fixtures/pack" \
  --mount /expected="$fixtures/expected" >"$fixtures/server.url" &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -s "$fixtures/server.url" ] && break; sleep 0.1; done
export SDXL_TEST_SERVER="$(head -n1 "$fixtures/server.url")"
export CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner
export CHROMEDRIVER="${CHROMEDRIVER:-/usr/bin/chromedriver}"
# The text-encoder parity test uploads two 49408-row embedding tables through SwiftShader.
export WASM_BINDGEN_TEST_TIMEOUT="${WASM_BINDGEN_TEST_TIMEOUT:-600}"
(cd crate && cargo test --locked --target wasm32-unknown-unknown --test kernels --test text_parity --test unet --test vae --test taesd --test quant --test store --test panic_hook)

echo "== end-to-end tests (the page and the JS API in headless Chromium; the TypeScript declarations)"
kill $server 2>/dev/null || true
bash web/build.sh
[ -x tests/e2e/node_modules/.bin/tsc ] || npm ci --prefix tests/e2e --no-audit --no-fund
tests/e2e/node_modules/.bin/tsc -p tests/e2e/tsconfig.json
SDXL=target/debug/sdxl node tests/e2e/e2e.mjs target/e2e
