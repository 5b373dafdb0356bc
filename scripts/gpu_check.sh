#!/usr/bin/env bash
# The device checks of a session that is lent a GPU machine (see the device tool): tests/gpu and the
# CUDA benchmark, in one call. Run from the repository root on that machine:
#
#   bash scripts/gpu_check.sh            # writes logs, JSON and Markdown under $OUT (or ./gpu-out)
#
# That machine has its own python3 with torch and CUDA but no registry: tasd's missing dependencies
# travel as wheels in .whl/ (pydantic and its parts; nvidia-resiliency-ext and its missing needs for
# the peer rows), downloaded on the development machine for Python 3.12 (see the device tool's notes).
# tasd itself runs from the source tree, laid out as an install lays it out (managers/ and adapters/
# inside tasd/), so nothing is built there. Each stage has its own time limit so that one slow stage
# leaves the results of the others.
set -u
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
cp -r managers tasd/managers && cp -r adapters tasd/adapters || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 - <<'EOF' 2>&1 | tee "$OUT/machine.txt"
import torch, platform
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory >> 20, "MiB")
EOF
nvidia-smi -L 2>&1 | tee -a "$OUT/machine.txt"
df -h /tmp /dev/shm 2>&1 | tee -a "$OUT/machine.txt"

stage() {  # stage NAME LIMIT_S COMMAND...: run with a time limit, log to $OUT/NAME.log
    local name=$1 limit=$2; shift 2
    echo "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "=== $name: rc $rc in $((SECONDS - t0))s"
    tail -n 60 "$OUT/$name.log"
}

stage gpu_tests "${GPU_TESTS_S:-150}" python3 -m pytest -q -p no:cacheprovider tests/gpu
stage save_phases "${SAVE_PHASES_S:-90}" python3 benchmarks/save_phases.py --tensors 10032
stage save_phases_32 "${SAVE_PHASES_S:-90}" python3 benchmarks/save_phases.py --tensors 32
stage bench_stall "${BENCH_STALL_S:-150}" python3 -m tasd bench --scenario limits save_stall \
    --json "$OUT/bench_stall.json" --markdown "$OUT/bench_stall.md"
stage bench_restart "${BENCH_RESTART_S:-240}" python3 -m tasd bench --scenario restart restart_warm recovery tensor_sweep \
    --json "$OUT/bench_restart.json" --markdown "$OUT/bench_restart.md"
