#!/usr/bin/env bash
# The GPU benchmark (bench.py) on a machine without network, as one command: install the wheels
# `make gpu-wheels` put in .whl/ (carried beside the repository; README: GPU), then run every
# section; results in $OUT (default benchmarks/results/<date>/): gpu.json, gpu.md, gpu.log,
# nvidia-smi.txt, packages.txt. Arguments go to bench.py (--sections, --budget-s, ...).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-benchmarks/results/$(date +%Y-%m-%d)}
WHEELS=${FTFLOW_WHEELS:-.whl}
SITE=${FTFLOW_WHEEL_SITE:-/tmp/ftflow-site}
mkdir -p "$OUT"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  # --no-deps: the folder holds exactly what the machine lacks (benchmarks/gpu/wheels.txt)
  # a failed install is recorded and the run goes on: each section then records what it could not import
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHEELS"/*.whl >"$OUT/gpu.log" 2>&1 || echo "run.sh: installing $WHEELS failed (above)" | tee -a "$OUT/gpu.log"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
python3 -m pip list --format=freeze >"$OUT/packages.txt" 2>/dev/null || true
exec python3 benchmarks/gpu/bench.py --out "$OUT" "$@"
