#!/usr/bin/env bash
# Store benchmark in headless Chromium (a dedicated worker, as the page runs it): a synthetic
# incompressible pack (default 1088 MiB) is downloaded from a local server into IndexedDB and
# loaded to the GPU. Prints one JSON object. Usage: tests/bench_store.sh [MiB]
set -euo pipefail
cd "$(dirname "$0")/.."
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
dir=target/bench-pack
[ -f "$dir/manifest.json" ] && [ -z "${1:-}" ] || python3 tests/make_bench_pack.py "$dir" --mib "${1:-1088}" >&2
python3 tests/server.py --mount /bench="$dir" >target/bench-server.url &
server=$!
trap 'kill $server 2>/dev/null' EXIT
for _ in $(seq 100); do [ -s target/bench-server.url ] && break; sleep 0.1; done
export SDXL_TEST_SERVER="$(head -n1 target/bench-server.url)"
export CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner
export CHROMEDRIVER="${CHROMEDRIVER:-/usr/bin/chromedriver}" WASM_BINDGEN_TEST_TIMEOUT=1800
(cd crate && cargo test --locked --target wasm32-unknown-unknown --test store_bench -- --nocapture) >target/bench-store.log 2>&1 ||
  { tail -30 target/bench-store.log >&2; exit 1; }
sed -n 's/.*STORE_BENCH //p' target/bench-store.log
