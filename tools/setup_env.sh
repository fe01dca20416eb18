#!/usr/bin/env bash
# Sets up a fresh Debian/Ubuntu machine with Python 3.10+ for keras_seltransfer:
# the Fashion-MNIST Debian package (the offline source data set), a virtual
# environment in .venv and the package with its extras (default: cpu,data,dev).
# Safe to rerun: each step is skipped when already done.
#
#   bash tools/setup_env.sh            # CPU TensorFlow, data and test tools
#   bash tools/setup_env.sh gpu,data   # CUDA TensorFlow instead
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-cpu,data,dev}"
python="${PYTHON:-python3}"

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi
}

packages=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || packages+=(dataset-fashion-mnist)
"$python" -c "import venv, ensurepip" 2>/dev/null || packages+=(python3-venv)
if [ ${#packages[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${packages[*]}"
  if ! { as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null; }; then
    echo "setup: warning: could not install ${packages[*]} (needs root or sudo)." >&2
    echo "setup: Fashion-MNIST will then be downloaded through TensorFlow Datasets on first use." >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$python" -m venv .venv
fi
echo "setup: installing keras_seltransfer[$extras] into .venv (first time: a few minutes)"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[$extras]"
if [[ ",$extras," == *",dev,"* ]] && ! .venv/bin/python -c "import keras_hub" 2>/dev/null; then
  # KerasHub for the backbone tests, without tensorflow-text (text models
  # only), which would install the full tensorflow package over tensorflow-cpu.
  echo "setup: installing keras-hub (image backbones only) into .venv"
  if ! { .venv/bin/python -m pip install -q --no-deps "keras-hub>=0.32" &&
         .venv/bin/python -m pip install -q regex rich "kagglehub!=1.0.1" "kagglesdk==0.1.28" \
           sentencepiece tokenizers packaging; }; then
    echo "setup: warning: keras-hub could not be installed; its tests will be skipped." >&2
  fi
fi
echo "setup: done"
