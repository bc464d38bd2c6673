#!/usr/bin/env bash
# bench/get_peer_wheels.sh [DIR]: downloads the wheels bench/compare_decode.py installs on a GPU
# machine without network (flashinfer-python 0.6.13 and apache-tvm-ffi 0.1.x, about 17.5 MB,
# --no-deps), into DIR (default build/wheels, which git ignores). Run it on a machine with PyPI
# access, then carry DIR to the GPU machine and pass it as --wheels.
set -euo pipefail
DIR=${1:-build/wheels}
mkdir -p "$DIR"
python3 -m pip download --no-deps --only-binary=:all: --dest "$DIR" "flashinfer-python==0.6.13" "apache-tvm-ffi>=0.1,<0.2"
ls -la "$DIR"
