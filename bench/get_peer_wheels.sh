#!/usr/bin/env bash
# bench/get_peer_wheels.sh [DIR]: downloads the wheels bench/compare_decode.py installs on a GPU
# machine without network (flashinfer-python 0.6.13 and apache-tvm-ffi 0.1.x for Pythons 3.10-3.13, about 27 MB,
# --no-deps), into DIR (default build/wheels, which git ignores). Run it on a machine with PyPI
# access, then carry DIR to the GPU machine and pass it as --wheels.
set -euo pipefail
DIR=${1:-build/wheels}
mkdir -p "$DIR"
python3 -m pip download --no-deps --only-binary=:all: --dest "$DIR" "flashinfer-python==0.6.13"
# apache-tvm-ffi is built per Python version, and the GPU machine's Python need not be this one's:
# one wheel for each of 3.10 to 3.13 (about 3.3 MB each); compare_decode.py's pip picks its own.
for v in 3.10 3.11 3.12 3.13; do
  python3 -m pip download --no-deps --only-binary=:all: --python-version "$v" \
    --platform manylinux_2_28_x86_64 --dest "$DIR" "apache-tvm-ffi>=0.1,<0.2"
done
ls -la "$DIR"
