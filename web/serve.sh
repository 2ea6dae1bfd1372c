#!/usr/bin/env bash
# The main job: builds the wasm engine and serves the page on http://127.0.0.1:${PORT:-8080}/ with
# the tiny demo model (random weights, SDXL's structure) under /models/, so a fresh checkout shows a
# working generator. The real SDXL presets download from the Hugging Face hub in the browser.
# Installs what the build needs first (the wasm32 target, wasm-bindgen-cli; python3 to serve).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/install.sh --for serve
bash web/build.sh
echo "serving the page; open the URL below in Chrome or Edge (WebGPU)"
exec python3 tests/server.py --port "${PORT:-8080}" --mount /=web \
  --mount /models/tiny-sdxl-base=tests/fixtures/tiny-sdxl-base --mount /models/tiny-sdxl-refiner=tests/fixtures/tiny-sdxl-refiner \
  --mount /models/tiny-sdxl-inpaint=tests/fixtures/tiny-sdxl-inpaint --mount /models/tiny-taesdxl=tests/fixtures/tiny-taesdxl
