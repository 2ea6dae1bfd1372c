#!/usr/bin/env bash
# Installs what is missing on a fresh Debian/Ubuntu machine with Rust (rustup) on it; checks each
# tool first, so it takes about a second when everything is there. Shared by .ci/run and web/serve.sh.
#   bash tests/install.sh               everything the tests need (tests/run.sh)
#   bash tests/install.sh --for serve   only what web/serve.sh needs: the wasm32 target,
#                                       wasm-bindgen-cli and python3
set -euo pipefail
cd "$(dirname "$0")/.."

purpose=test
case "$*" in
  "" | "--for test") ;;
  "--for serve") purpose=serve ;;
  *) echo "usage: bash tests/install.sh [--for test|serve]" >&2; exit 2 ;;
esac

command -v cargo >/dev/null && command -v rustup >/dev/null ||
  { echo "Rust is missing: install it with rustup (https://rustup.rs), then run this again" >&2; exit 1; }

need_apt=()
command -v python3 >/dev/null || need_apt+=(python3)
if [ "$purpose" = test ]; then
  ls /usr/share/vulkan/icd.d/lvp_icd* >/dev/null 2>&1 || need_apt+=(mesa-vulkan-drivers)
  command -v chromium >/dev/null || need_apt+=(chromium)
  command -v chromedriver >/dev/null || need_apt+=(chromium-driver)
  command -v npm >/dev/null || need_apt+=(nodejs npm)
fi
if ((${#need_apt[@]})); then
  command -v apt-get >/dev/null ||
    { echo "missing: ${need_apt[*]} (no apt-get here: install them with this system's package manager)" >&2; exit 1; }
  sudo=()
  [ "$(id -u)" = 0 ] || sudo=(sudo)
  echo "installing ${need_apt[*]}"
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

rustup target list --installed | grep -qx wasm32-unknown-unknown || rustup target add wasm32-unknown-unknown

# wasm-bindgen (and its test runner) must match the wasm-bindgen crate in Cargo.lock exactly.
wb_version=$(awk '/^name = "wasm-bindgen"$/ {getline; gsub(/version = |"/, ""); print}' Cargo.lock)
if [ "$(wasm-bindgen --version 2>/dev/null | awk '{print $2}')" != "$wb_version" ]; then
  echo "installing wasm-bindgen-cli $wb_version (about 7 minutes on 2 cores)"
  # Without --locked: with it, its webpki-roots dependency fails to resolve.
  cargo install wasm-bindgen-cli --version "$wb_version"
fi

if [ "$purpose" = test ]; then
  # The end-to-end tests use import.meta.dirname and fetch: Node.js 20 or newer.
  node_major=$(node -p 'process.versions.node.split(".")[0]')
  ((node_major >= 20)) || { echo "Node.js $(node --version) is too old: the end-to-end tests need 20 or newer" >&2; exit 1; }
  # playwright-core and typescript as tests/e2e/package-lock.json pins them.
  npm ls --prefix tests/e2e --all >/dev/null 2>&1 || npm ci --prefix tests/e2e --no-audit --no-fund
fi
