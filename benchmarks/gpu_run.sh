#!/usr/bin/env bash
# The one script to run on a lent GPU machine (no internet): install from benchmarks/wheelhouse/
# offline, print versions, run benchmarks/gpu_suite.py, and always leave the results in $OUT.
#
#   OUT=/some/folder bash benchmarks/gpu_run.sh            # whole suite, budget 430 s
#   SUITE_BUDGET_S=300 SUITE_ONLY=train OUT=… bash benchmarks/gpu_run.sh
#   SUITE_ARGS=--smoke SUITE_ONLY=eval OUT=/tmp/r bash benchmarks/gpu_run.sh   # a check of this script on a CPU
#
# Build the wheelhouse first, on a machine with a package index: bash benchmarks/gpu_wheels.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-results}
mkdir -p "$OUT"
WH=benchmarks/wheelhouse
BUDGET=${SUITE_BUDGET_S:-430}
ONLY=${SUITE_ONLY:-serve,eval,train}
PY=${PYTHON:-python}
exec > >(tee "$OUT/gpu_run.log") 2>&1
echo "== gpu_run $(date -u +%FT%TZ) on $(hostname)"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
unset PIP_FIND_LINKS PIP_EXTRA_INDEX_URL PIP_INDEX_URL

# Install what is missing, offline. Packages already there are kept (no --upgrade); if the resolver
# wants something the wheelhouse lacks, fall back to the wheels one by one without dependencies.
if [ -d "$WH" ]; then
  need=$("$PY" - <<'PY'
import importlib.util
mods = {"typer": "typer>=0.29,<0.30", "rich": "rich", "fastapi": "fastapi", "uvicorn": "uvicorn",
        "httpx": "httpx", "multipart": "python-multipart", "yaml": "pyyaml", "jinja2": "jinja2",
        "requests": "requests", "PIL": "pillow", "deepspeed": "deepspeed"}
need = [req for mod, req in mods.items() if importlib.util.find_spec(mod) is None]
try:  # the CLI needs Typer 0.29 (a typer-slim that came with other packages may be older)
    import typer
    if not typer.__version__.startswith("0.29."):
        need.append("typer>=0.29,<0.30")
except ImportError:
    pass
print(" ".join(f"'{req}'" for req in dict.fromkeys(need)))
PY
)
  t0=$(date +%s)
  if [ -n "$need" ]; then
    echo "== installing from $WH: $need"
    if ! eval "$PY -m pip install -q --no-index --find-links $WH $need"; then
      echo "== resolver failed; installing the wheels one by one without dependencies"
      for w in "$WH"/*.whl; do
        dist=$(basename "$w" | cut -d- -f1)
        if "$PY" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$dist" 2>/dev/null; then
          continue  # installed already: keep the machine's version
        fi
        "$PY" -m pip install -q --no-index --no-deps "$w" || echo "   (could not install $w)"
      done
    fi
  fi
  # Build isolation takes setuptools and wheel from the wheelhouse too. Without the install the suite
  # still runs: it puts the repository on PYTHONPATH for its parts.
  "$PY" -m pip install -q --no-index --find-links "$WH" --no-deps -e . || echo "== WARNING: pip install -e . failed (the suite uses PYTHONPATH)"
  echo "== install took $(( $(date +%s) - t0 )) s"
else
  echo "== no $WH: using the machine's packages as they are"
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . || true
fi

"$PY" - <<'PY'
import importlib, platform
print("python", platform.python_version())
for m in ("torch", "transformers", "accelerate", "peft", "deepspeed", "bitsandbytes", "fastapi", "uvicorn",
          "httpx", "typer", "rich"):
    try:
        mod = importlib.import_module(m)
        print(f"{m:13s}", getattr(mod, "__version__", "?"))
    except Exception as exc:  # noqa: BLE001 - a version report, nothing depends on it
        print(f"{m:13s} not importable ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})")
import torch
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
else:
    print("gpu none")
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

"$PY" benchmarks/gpu_suite.py --out "$OUT" --budget-s "$BUDGET" --only "$ONLY" ${SUITE_ARGS:-}
rc=$?
echo "== gpu_suite exit $rc; results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit 0
