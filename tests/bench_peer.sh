#!/usr/bin/env bash
# Peer benchmark: our `sdxl generate` against stable-diffusion.cpp's Vulkan backend (the PyPI wheel
# cyllama-vulkan, which bundles sd.cpp + ggml-vulkan; `python -m cyllama.sd`) on the same Vulkan
# adapter, the same random-weight FULL-SIZE SDXL 1.0 base (crate/configs/sdxl-base), the same size,
# steps, guidance, sampler (Euler, linearly spaced timesteps), seed and prompt. Prints ONE JSON
# object: per engine load, text-encoder, first and steady UNet step, VAE, wall time and peak RSS,
# plus the settings. How each figure is obtained: tests/bench_peer_helper.py (derive_ours,
# derive_peer).
#
# Usage: tests/bench_peer.sh [--smoke] [--size N] [--steps S] [--cfg C] [--weights f16|q8_0|q4_0]
#                            [--seed N] [--prompt TEXT] [--negative TEXT] [--json FILE]
#                            [--lavapipe backports|system] [--peer-attempts N]
#   --smoke    64x64, 2 steps (a first and a steady step), f16 weights, on lavapipe from Mesa 25
#              (--lavapipe backports): 8.5 min on 2 CPU cores shared with other work (more when
#              the model is not cached yet: +2.5 min to write it)
#   defaults   --size 1024 --steps 30 --cfg 5 --weights f16 --seed 42 (SDXL's own recipe; hours
#              on a CPU driver, meant for a real GPU)
#   --weights  f16: one SGM-layout .safetensors (sd_xl_base_1.0's layout) both engines read;
#              q8_0 / q4_0: a GGUF made from it by sd.cpp's own converter (`cyllama.sd convert`),
#              read by both (ours keeps GGUF blocks as stored).
#   --lavapipe backports: both engines on lavapipe (CPU Vulkan) from Debian bookworm-backports'
#              Mesa 25 (mesa-vulkan-drivers + libdrm, fetched once with apt-get download into
#              target/peer-mesa, selected by VK_ICD_FILENAMES + LD_LIBRARY_PATH; nothing is
#              installed). Debian 12's own lavapipe (Mesa 22.3.6, --lavapipe system) crashes the
#              peer: SIGSEGV in libvulkan_lvp.so on lavapipe's queue thread while ggml-vulkan waits
#              for a fence, at a different point each time (text encoder, UNet, VAE), in 4 of 4
#              smoke runs, with GGML_VK_DISABLE_ASYNC=1 too; on Mesa 25.0.7 it ran through.
#   --peer-attempts N: the peer is run again (up to N runs in all, default 2) when a signal
#              kills it; the crashed runs are kept in the JSON (peer.failed_attempts).
# Environment: without --lavapipe, VK_ICD_FILENAMES etc. pick the adapter as usual (a real GPU);
#   GGML_VK_VISIBLE_DEVICES (default 0) makes ggml use a CPU-type Vulkan device at all.
#   BENCH_PEER_TARGET: cargo target dir for our binary (default /tmp/peer-target, so this build
#   does not lock the developer's target/).
# Cached between runs: target/peer-venv (the peer), target/peer-model (the ~6.5 GiB model and its
# GGUFs). Logs, images and per-run JSON: target/peer-bench/.
set -euo pipefail
cd "$(dirname "$0")/.."
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"

size=1024 steps=30 cfg=5 weights=f16 seed=42 json_out="" peer_attempts=2 lavapipe=""
prompt="a lighthouse on a cliff at dawn, oil painting"
# Not empty, so both engines do the same work: with an empty one ours uses zero embeddings
# (force_zeros_for_empty_prompt, as diffusers) while sd.cpp 0.2.18 still runs its encoders on "".
negative="blurry, low quality"
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) size=64 steps=2 weights=f16 lavapipe=backports ;;
    --lavapipe) lavapipe="$2"; shift ;;
    --size) size="$2"; shift ;;
    --steps) steps="$2"; shift ;;
    --cfg) cfg="$2"; shift ;;
    --weights) weights="$2"; shift ;;
    --seed) seed="$2"; shift ;;
    --prompt) prompt="$2"; shift ;;
    --negative) negative="$2"; shift ;;
    --json) json_out="$2"; shift ;;
    --peer-attempts) peer_attempts="$2"; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench_peer.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$weights" in f16|q8_0|q4_0) ;; *) echo "--weights must be f16, q8_0 or q4_0" >&2; exit 2 ;; esac
case "$lavapipe" in ""|backports|system) ;; *) echo "--lavapipe must be backports or system" >&2; exit 2 ;; esac
# Two steps at least: the first step carries one-off costs (pipeline compiles, allocations), so
# the steady step is measured from the second on.
[ "$steps" -ge 2 ] || { echo "--steps must be at least 2" >&2; exit 2; }

# Everything heavy runs at the lowest priority: these benchmarks share the machine's cores with
# other work, and must not starve it (the figures are then upper bounds on a loaded machine).
NICE=(nice -n 19)
log() { echo "bench_peer: $*" >&2; }
venv=target/peer-venv py=target/peer-venv/bin/python helper=tests/bench_peer_helper.py
out=target/peer-bench
mkdir -p "$out" target/peer-model

# --- The peer: cyllama-vulkan from PyPI, in its own venv (the wheel is cp311 only) ----------
if ! "$py" -c 'import cyllama.sd, numpy' 2>/dev/null; then
  if command -v python3.11 >/dev/null; then
    log "creating $venv with $(command -v python3.11)"
    python3.11 -m venv "$venv"
  else
    # No system 3.11: uv (from PyPI) fetches a standalone CPython 3.11 and makes the venv.
    log "no python3.11: creating $venv with uv"
    python3 -m venv target/peer-uv && target/peer-uv/bin/pip install -q uv
    target/peer-uv/bin/uv venv --seed --python 3.11 "$venv"
  fi
  "${NICE[@]}" "$py" -m pip install -q "cyllama-vulkan==0.2.18" numpy
fi

# --- The adapter: lavapipe from Mesa 25 (bookworm-backports) for both engines, if asked ---------
driver="$(dpkg-query -W -f='mesa-vulkan-drivers ${Version} (system)' mesa-vulkan-drivers 2>/dev/null || echo unknown)"
if [ "$lavapipe" = backports ]; then
  mesa="$PWD/target/peer-mesa"
  if [ ! -f "$mesa/lvp_icd.json" ]; then
    # apt-get with a private sources list and state under target/: downloads, installs nothing.
    log "fetching lavapipe from Debian bookworm-backports into $mesa"
    mkdir -p "$mesa/apt/lists/partial" "$mesa/apt/cache/archives/partial" "$mesa/debs" "$mesa/root"
    echo "deb http://deb.debian.org/debian bookworm-backports main" >"$mesa/apt/sources.list"
    apt=(-o Dir::Etc::SourceList="$mesa/apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
      -o Dir::State::Lists="$mesa/apt/lists" -o Dir::Cache="$mesa/apt/cache" -o APT::Sandbox::User=root)
    apt-get "${apt[@]}" -qq update
    (cd "$mesa/debs" && apt-get "${apt[@]}" -qq download mesa-vulkan-drivers/bookworm-backports \
      libdrm2/bookworm-backports libdrm-amdgpu1/bookworm-backports)
    for deb in "$mesa"/debs/*.deb; do dpkg-deb -x "$deb" "$mesa/root"; done
    # The ICD manifest names the library by an absolute path, so this lavapipe and no other loads.
    sed "s#\"library_path\": *\"[^\"]*\"#\"library_path\": \"$mesa/root/usr/lib/x86_64-linux-gnu/libvulkan_lvp.so\"#" \
      "$mesa/root/usr/share/vulkan/icd.d/lvp_icd.json" >"$mesa/lvp_icd.json"
  fi
  export VK_ICD_FILENAMES="$mesa/lvp_icd.json"
  export LD_LIBRARY_PATH="$mesa/root/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  driver="mesa-vulkan-drivers $(dpkg-deb -f "$mesa"/debs/mesa-vulkan-drivers_*.deb Version) (bookworm-backports, $mesa)"
elif [ "$lavapipe" = system ]; then
  export VK_ICD_FILENAMES=/usr/share/vulkan/icd.d/lvp_icd.x86_64.json
fi

# --- Our engine, built in a target dir of its own ---------------------------------------------
ours_target="${BENCH_PEER_TARGET:-/tmp/peer-target}"
log "building sdxl (release) in $ours_target"
CARGO_TARGET_DIR="$ours_target" "${NICE[@]}" cargo build --release --locked -q
sdxl="$ours_target/release/sdxl"

# --- The model: random weights, full size, cached ----------------------------------------------
# The layout writer is first checked against the committed tiny single-file fixture (same code,
# tiny configs): names and shapes must match sd_xl_base_1.0's SGM layout exactly.
"$py" "$helper" check --config tests/fixtures/tiny-sdxl-base --against tests/fixtures/single-file/tiny-sdxl-base.safetensors >&2
f16_model=target/peer-model/sdxl-base-random-f16.safetensors
if [ ! -f "$f16_model" ]; then
  log "writing $f16_model (~6.5 GiB, streamed)"
  "${NICE[@]}" "$py" "$helper" model --config crate/configs/sdxl-base --out "$f16_model" --seed 0
fi
model="$f16_model"
if [ "$weights" != f16 ]; then
  model="target/peer-model/sdxl-base-random-$weights.gguf"
  if [ ! -f "$model" ]; then
    # sd.cpp's own converter, as peers' SDXL GGUFs are made: it block-quantizes the weight
    # matrices it chooses (q4_0 here: 1370 of 2513 tensors, the VAE's 1x1 attention convolutions
    # included) and keeps the rest f16; the peer's log lists them ("weight type stat").
    # A rule matching no tensor: without any, cyllama 0.2.18 hands sd.cpp a null string and it
    # aborts (std::logic_error "basic_string: construction from null").
    log "converting to $model with sd.cpp"
    GGML_VK_VISIBLE_DEVICES="${GGML_VK_VISIBLE_DEVICES:-0}" "${NICE[@]}" "$py" -m cyllama.sd convert \
      --input "$f16_model" --output "$model.partial.gguf" --type "$weights" \
      --tensor-type-rules '^no-tensor-is-named-so$=f16' >"$out/convert-$weights.log" 2>&1 ||
      { tail -20 "$out/convert-$weights.log" >&2; exit 1; }
    mv "$model.partial.gguf" "$model"
  fi
fi

# A timed run (see the helper's `run`): stamped log and JSON under $out. Returns the command's
# exit status (128 + N when signal N killed it) after showing the log's tail.
timed() {
  local name="$1" rc=0; shift
  log "running $name: $*"
  "${NICE[@]}" "$py" "$helper" run --log "$out/$name.log" --out "$out/$name.json" -- "$@" || rc=$?
  if [ "$rc" -ne 0 ]; then
    tail -5 "$out/$name.log" | cut -c1-300 >&2
    log "$name failed with status $rc (log: $out/$name.log)"
  fi
  return "$rc"
}

# --- Runs, one at a time (each holds the whole model in host memory: lavapipe's GPU memory is
# the process's own) ------------------------------------------------------------------------------
# The peer first (a failure shows early), verbose (its own phase timings), with per-step
# progress. --rng cpu: torch's CPU generator, as ours, so one seed gives both the same noise.
# A run killed by a signal (lavapipe crashes, see --lavapipe) is retried up to --peer-attempts.
rm -f "$out"/peer.attempt*.log "$out"/peer.attempt*.json
peer_status=0 attempt=1
while :; do
  peer_status=0
  timed peer env GGML_VK_VISIBLE_DEVICES="${GGML_VK_VISIBLE_DEVICES:-0}" PYTHONUNBUFFERED=1 "$py" -m cyllama.sd txt2img --model "$model" --prompt "$prompt" --negative "$negative" \
    -W "$size" -H "$size" --steps "$steps" --cfg-scale "$cfg" --seed "$seed" --sampler euler --scheduler discrete \
    --rng cpu --sampler-rng cpu --verbose --progress --output "$out/peer.png" || peer_status=$?
  [ "$peer_status" -gt 128 ] && [ "$attempt" -lt "$peer_attempts" ] || break
  mv "$out/peer.log" "$out/peer.attempt$attempt.log"
  mv "$out/peer.json" "$out/peer.attempt$attempt.json"
  attempt=$((attempt + 1))
  log "retrying the peer (attempt $attempt of $peer_attempts)"
done
# Ours: Euler (diffusers' EulerDiscreteScheduler) with linspace timestep spacing, which is the
# schedule of sd.cpp's euler + discrete scheduler (t from 999 down to 0 in equal steps).
timed ours-generate "$sdxl" generate --model "$model" --prompt "$prompt" --width "$size" --height "$size" \
  --negative "$negative" --steps "$steps" --guidance "$cfg" --seed "$seed" --scheduler euler \
  --timestep-spacing linspace --out "$out/ours.png" || exit 1
# Our text encoders are not synchronised separately inside generate: time them alone.
timed ours-encode "$sdxl" encode --model "$model" --prompt "$prompt" --negative "$negative" \
  --out "$out/ours-encode.safetensors" || exit 1

# --- Report -------------------------------------------------------------------------------------
# Settings go to Python through the environment (a prompt may hold any character).
export B_WEIGHTS="$weights" B_MODEL="$model" B_SIZE="$size" B_STEPS="$steps" B_CFG="$cfg" B_SEED="$seed" B_PROMPT="$prompt" B_NEGATIVE="$negative"
B_DRIVER="$driver"
export B_DRIVER B_CORES="$(nproc)" B_ICD="${VK_ICD_FILENAMES:-}"
"$py" - "$out/settings.json" <<'EOF'
import json, os, sys
e = os.environ
json.dump({
    "model": "SDXL 1.0 base, full size (2.57 B-parameter UNet), random weights (crate/configs/sdxl-base)",
    "weights": e["B_WEIGHTS"], "model_file": e["B_MODEL"], "width": int(e["B_SIZE"]), "height": int(e["B_SIZE"]),
    "steps": int(e["B_STEPS"]), "cfg": float(e["B_CFG"]), "seed": int(e["B_SEED"]), "prompt": e["B_PROMPT"],
    "negative_prompt": e["B_NEGATIVE"],
    "sampler": "euler, linearly spaced timesteps (ours: --scheduler euler --timestep-spacing linspace; "
               "sd.cpp: --sampler euler --scheduler discrete)",
    "vulkan_driver": e["B_DRIVER"], "vk_icd_filenames": e["B_ICD"] or None, "cpu_cores": int(e["B_CORES"]),
    "nice": 19, "peer_package": "cyllama-vulkan==0.2.18",
}, open(sys.argv[1], "w"))
EOF
failed=()
for f in "$out"/peer.attempt*.json; do [ -e "$f" ] && failed+=("${f%.json}"); done
report="$("$py" "$helper" report --ours-gen "$out/ours-generate" --ours-enc "$out/ours-encode" --peer "$out/peer" \
  --peer-failed "${failed[@]}" --settings "$out/settings.json")"
echo "$report"
if [ -n "$json_out" ]; then echo "$report" >"$json_out"; fi
# The JSON is printed either way; a peer that never finished makes the benchmark fail.
exit $((peer_status != 0))
