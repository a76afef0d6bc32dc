#!/usr/bin/env bash
# The GPU figure of the batched benchmark (batched vs sequential local training, N = 100 clients)
# on a machine whose Python already has a CUDA build of torch but cannot install packages (such
# as a lent GPU machine with no network). Two steps:
#
#   bash benchmarks/gpu.sh fetch    # here, with pip and a package index: wheels of what simkit
#                                   # imports beyond such an image (simpy, pydantic and its parts),
#                                   # for CPython 3.12 on x86-64 Linux, into .whl/ (git-ignored)
#   bash benchmarks/gpu.sh check    # there, from the repository root, with .whl/ beside it:
#                                   # installs them into /tmp/site, then runs
#                                   # python3 -m benchmarks.batched --device-only cuda
#
# `check` writes the log and {"cuda_n100": speed-up} to $OUT (or ./gpu-out when OUT is unset).
# DEVICE=cpu bash benchmarks/gpu.sh check is a dry run of the same code on the CPU. PYTHON names
# the interpreter (default python3); PYVER the wheels' Python version for `fetch` (default 3.12).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

case "${1:-}" in
fetch)
    # the versions installed here, so both sides run the same simkit dependencies
    pkgs=$("$PYTHON" - <<'EOF'
import importlib.metadata as md
print(" ".join(f"{d}=={md.version(d)}" for d in
               ["simpy", "pydantic", "pydantic_core", "annotated-types", "typing-inspection"]))
EOF
)
    mkdir -p .whl
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "${PYVER:-3.12}" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl $pkgs
    ls -l .whl
    ;;
check)
    out=${OUT:-gpu-out}
    mkdir -p "$out"
    if compgen -G ".whl/*.whl" > /dev/null; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
    fi
    export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
    (command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv) || true
    "$PYTHON" -m benchmarks.batched --device-only "${DEVICE:-cuda}" --json "$out/${DEVICE:-cuda}.json" \
        2>&1 | tee "$out/batched-${DEVICE:-cuda}.log"
    ;;
*)
    sed -n '2,14p' "$0"
    exit 2
    ;;
esac
