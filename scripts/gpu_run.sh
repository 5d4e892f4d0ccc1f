#!/usr/bin/env bash
# The GPU numbers of attnbench in one command, on a bare GPU machine without network:
#
#   scripts/gpu_run.sh OUTDIR [--pack FILE.tar.gz] [--tiny]    the phased run (5 minutes on an H100/H200)
#   scripts/gpu_run.sh OUTDIR --dry-run                        every phase on the CPU, tiny grid, and the plan
#   scripts/gpu_run.sh OUTDIR --plan                           the plan only: points and estimated GPU time
#
# First it installs the wheels in .whl/ (scripts/wheelhouse.sh builds them; carry .whl to the machine) into
# a site folder of its own, without an index and without dependencies (the image has the rest), and puts it
# and this checkout on PYTHONPATH: nothing is installed into the machine's Python. Then scripts/gpu_run.py
# runs the phases, each with its own budget and log, none stopping the next (see its docstring):
#   install 20 s | env 5 | parity 54 | full 22 | quadtree 32 | windowed 82 | biased 53 | peers 18 | report 14
# Everything goes to OUTDIR as it is made: phases.jsonl (status, budget, estimate and wall time per phase),
# <phase>.log, env/ (nvidia-smi at start and end, env.json, packages), parity/junit.xml, one run directory per
# sweep phase, report.html and summary.md. No `set -e`: a failing step is recorded and the run goes on.
set -uo pipefail

if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: scripts/gpu_run.sh OUTDIR [--dry-run | --plan | --tiny] [--pack FILE.tar.gz]" >&2
    exit 2
fi
OUT=$1
shift
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
start=$(date +%s)

SITE=${ATTNBENCH_SITE:-/tmp/attnbench-site}
shopt -s nullglob
wheels=("$ROOT"/.whl/*.whl)
if [ ${#wheels[@]} -gt 0 ]; then
    echo "install: ${#wheels[@]} wheels from .whl/ into $SITE (no index, no dependencies)" | tee "$OUT/install.log"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "${wheels[@]}" >>"$OUT/install.log" 2>&1 || echo "install: pip failed (see install.log); going on" | tee -a "$OUT/install.log"
    export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "install: no .whl/ here; using the packages this Python has" | tee "$OUT/install.log"
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
# Where the packages the phases use come from (found, not imported: a missing one fails only its phases).
"$PYTHON" - >>"$OUT/install.log" 2>&1 <<'PY'
import importlib.metadata, importlib.util
for name, dist in [("torch", "torch"), ("triton", "triton"), ("fvcore", "fvcore"), ("plotly", "plotly"),
                   ("pandas", "pandas"), ("typer", "typer"), ("rich", "rich"), ("yaml", "pyyaml"),
                   ("pytest", "pytest"), ("timm", "timm")]:
    spec = importlib.util.find_spec(name)
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        version = "?"
    print(f"{name:<8} {version:<24} {spec.origin if spec else 'MISSING'}")
PY
tail -n +2 "$OUT/install.log"

exec "$PYTHON" "$ROOT/scripts/gpu_run.py" "$OUT" --elapsed "$(($(date +%s) - start))" "$@"
