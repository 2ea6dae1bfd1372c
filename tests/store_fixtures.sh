#!/usr/bin/env bash
# Builds what the store tests serve over HTTP, with the native CLI ($SDXL, default: cargo run):
#   OUT/pack/       the tiny base as a q8 model pack of 1 MiB records (many records to resume and repair)
#   OUT/expected/   the CLI's image of that pack (f32), which a download → load → generate must give
# The tiny base folder itself is served as the diffusers case. Usage: tests/store_fixtures.sh OUT
set -euo pipefail
cd "$(dirname "$0")/.."
out=$1
sdxl=${SDXL:-"cargo run --locked -q --"}
rm -rf "$out/pack" "$out/expected"
mkdir -p "$out/expected"
$sdxl convert --from tests/fixtures/tiny-sdxl-base --quant q8 --out "$out/pack" --shard-bytes 1048576 2>/dev/null
$sdxl generate --model "$out/pack" --prompt "a red fox in the snow" --width 64 --height 64 --steps 4 --guidance 5 \
  --seed 7 --precision f32 --out "$out/expected/image.png" --tensors-out "$out/expected/image.safetensors" 2>/dev/null
