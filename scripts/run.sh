#!/usr/bin/env bash
# One entry point for the README's commands:
#     bash scripts/run.sh demo [demo args...]    e.g. bash scripts/run.sh demo --ckpt google/siglip2-base-patch16-naflex
#     bash scripts/run.sh test [pytest args...]  e.g. bash scripts/run.sh test -k packing
#     bash scripts/run.sh lint                   ruff check and ruff format --check (pyproject.toml's [tool.ruff])
# It creates .venv in the repository root (once), installs torch and packvit into it, then runs.
# torch comes from, in order: the venv itself; the python running this script (a CUDA build you
# already have is reused through --system-site-packages); a local CPU wheel in
# ${PACKVIT_TORCH_WHEELS:-/opt/wheels}; otherwise `pip install torch` from your index.
set -euo pipefail

usage() { echo "usage: bash scripts/run.sh {demo|test|lint} [args...]" >&2; exit 2; }
[[ $# -ge 1 ]] || usage
cmd=$1; shift
[[ ${1:-} == "--" ]] && shift  # allow `run.sh demo -- --ckpt ...`
case $cmd in demo|test|lint) ;; *) usage ;; esac

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
VENV=$ROOT/.venv
VPY=$VENV/bin/python
WHEELS=${PACKVIT_TORCH_WHEELS:-/opt/wheels}
say() { echo "[packvit] $*" >&2; }

if [[ ! -x $VPY ]]; then
    if "$PY" -c "import torch" >/dev/null 2>&1; then
        say "creating .venv (reusing torch $("$PY" -c 'import torch; print(torch.__version__)') from $PY via --system-site-packages)"
        "$PY" -m venv --system-site-packages "$VENV"
        if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
            # $PY is itself a venv (its packages are not "system" ones): point .venv at torch's folder.
            site=$("$VPY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
            "$PY" -W ignore -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))" > "$site/_packvit_torch.pth"
        fi
    else
        say "creating .venv with $PY"
        "$PY" -m venv "$VENV"
    fi
    "$VPY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
fi

if "$VPY" -c "import torch" >/dev/null 2>&1; then
    :
else
    shopt -s nullglob
    wheels=("$WHEELS"/torch-2.13.0+cpu*.whl)
    shopt -u nullglob
    if [[ ${#wheels[@]} -gt 0 ]]; then
        say "installing torch from ${wheels[0]}"
        "$VPY" -m pip install -q "${wheels[0]}"
    else
        say "installing torch from your package index (pip install torch)"
        "$VPY" -m pip install -q torch
    fi
fi

# Install packvit (editable) with its test/demo extras; redo only when pyproject.toml changes.
stamp=$VENV/.packvit-installed
want=$(cksum < pyproject.toml)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]] || ! "$VPY" -c "import packvit, transformers, pytest, ruff" >/dev/null 2>&1; then
    say "installing packvit and its test/demo dependencies into .venv"
    constraints=$(mktemp)
    # Pin the torch already there so pip never swaps it for another build.
    "$VPY" -W ignore -c "import torch; print('torch==' + torch.__version__)" > "$constraints"
    "$VPY" -m pip install -q -c "$constraints" -e ".[test]" || { rm -f "$constraints"; exit 1; }
    rm -f "$constraints"
    echo "$want" > "$stamp"
fi

# The tests compare packvit's torchvision preprocessing backend with transformers' torchvision
# processors. Where torchvision is not installed, the tests get the release matching torch in a
# folder only the test command puts on the path: beside a CPU torch wheel, PyPI's torchvision
# cannot load its compiled ops (tests/torchvision_shim.py bridges that for the tests), and the
# demo must not import it. Without it those comparisons skip.
overlay=$VENV/torchvision-for-tests
if [[ $cmd == test ]] && ! "$VPY" -c "import torchvision" >/dev/null 2>&1; then
    if [[ ! -f $overlay/.installed ]]; then
        tv=$("$VPY" -W ignore -c "import torch; m = int(torch.__version__.split('.')[1]); print(f'0.{m + 15}.*')")
        say "installing torchvision $tv for the tests into $overlay"
        if "$VPY" -m pip install -q --no-deps --target "$overlay" "torchvision==$tv" >/dev/null 2>&1; then
            touch "$overlay/.installed"
        else
            say "no torchvision $tv could be installed: the torchvision comparisons will skip"
        fi
    fi
    [[ -f $overlay/.installed ]] && export PYTHONPATH=$overlay${PYTHONPATH:+:$PYTHONPATH}
fi

say "torch $("$VPY" -W ignore -c 'import torch; print(torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")')"
case $cmd in
    demo) say "running the demo"; exec "$VPY" -m packvit.demo "$@" ;;
    test) say "running the tests"; exec env HF_HUB_OFFLINE=1 "$VPY" -m pytest -q "$@" ;;
    lint) say "ruff check, then ruff format --check"
          "$VPY" -m ruff check . && exec "$VPY" -m ruff format --check . ;;
esac
