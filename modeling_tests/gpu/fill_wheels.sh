#!/usr/bin/env bash
# Fill the GPU suite's wheel folder on a machine with network (any OS): the packages the GPU image lacks or has too
# old, as wheels for CPython 3.12 on manylinux x86-64. The image has PyTorch 2.11 with CUDA, transformers 5.17 and
# huggingface_hub 1.33, and no TRL or datasets; everything else the package needs is there. Versions are the ones the
# package is tested with. The folder is git-ignored; carry it to the GPU machine with the repository.
#
#   bash modeling_tests/gpu/fill_wheels.sh [FOLDER]        (default modeling_tests/gpu/wheels; must stay <= 50 MiB)
set -euo pipefail
cd "$(dirname "$0")/../.."
FOLDER=${1:-modeling_tests/gpu/wheels}
PYTHON=${PYTHON:-python3}
PACKAGES=(
    transformers==5.25.0 huggingface-hub==2.4.0 kernels==0.19.1 tomlkit==0.15.3 hf-xet==1.8.0 click==8.5.1
    httpx2==2.17.0 httpcore2==2.17.0 truststore==0.10.5 anyio==4.16.0 idna==3.21 h11==0.16.0
    typing-extensions==4.16.0
    trl==1.16.0 peft==0.21.2
    datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
)
mkdir -p "$FOLDER"
rm -f "$FOLDER"/*.whl
"$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$FOLDER" "${PACKAGES[@]}"
size_kib=$(du -sk "$FOLDER" | cut -f1)
echo "$(ls "$FOLDER"/*.whl | wc -l) wheels, $((size_kib / 1024)) MiB in $FOLDER"
if ((size_kib > 50 * 1024)); then
    echo "the wheel folder is over 50 MiB" >&2
    exit 1
fi
