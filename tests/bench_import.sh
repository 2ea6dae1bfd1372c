#!/usr/bin/env bash
# Import benchmark in headless Chromium (a dedicated worker, as the page runs it): a single-file
# SDXL checkpoint of over 2 GB (stable-diffusion.cpp's Q4_0 GGUF of the real base UNet and VAE, text
# encoders at their real widths but 2 layers) handed to the engine as a Blob, as a picked File is,
# imported into IndexedDB at q4 and loaded to the GPU. Prints one JSON object (throughput, wasm heap).
# Usage: tests/bench_import.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
export CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner
export CHROMEDRIVER="${CHROMEDRIVER:-/usr/bin/chromedriver}" WASM_BINDGEN_TEST_TIMEOUT=3600
(cd crate && cargo test --locked --release --target wasm32-unknown-unknown --test import_bench -- --nocapture) >target/bench-import.log 2>&1 ||
  { tail -30 target/bench-import.log >&2; exit 1; }
sed -n 's/.*IMPORT_BENCH //p' target/bench-import.log
