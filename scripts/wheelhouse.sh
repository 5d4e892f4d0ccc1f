#!/usr/bin/env bash
# Builds .whl/ in the project root: the wheels scripts/gpu_run.sh installs on a GPU machine without network.
#
#   scripts/wheelhouse.sh            then name .whl in the device call's carry (about 10 MB)
#
# The GPU image (Python 3.12, torch 2.11, triton 3.6, pandas, typer, rich, pytest, pyyaml, pillow, tabulate,
# tqdm, portalocker, narwhals, timm, ...) lacks fvcore and plotly and what they need beyond it: iopath, yacs,
# termcolor. All five are pure Python (fvcore ships a source archive only, built into a py3-none-any wheel
# here), so the wheels built on any Python 3.10+ install on the image's 3.12. The versions are the ones the
# CPU test environment runs. .whl/ is in .gitignore: it never enters a commit.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
mkdir -p .whl
"$PYTHON" -m pip wheel -q --no-deps -w .whl \
    "fvcore==0.1.5.post20221221" "iopath==0.1.10" "yacs==0.1.8" "termcolor==3.3.0" "plotly==7.1.0" "$@"
# Every wheel must be pure Python: a binary one built here would not load on the image.
for w in .whl/*.whl; do
    case "$w" in
        *-py3-none-any.whl | *-py2.py3-none-any.whl) ;;
        *) echo "error: $w is not a pure-Python wheel; download it for cp312 manylinux instead" >&2; exit 1 ;;
    esac
done
ls -1 .whl
du -sh .whl
