#!/usr/bin/env bash
# Create (or reuse) .venv and install polymerge with everything the tests, the zoo and the demo
# need. torch is pinned first: an unpinned torch would pull several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
pip_q() { pip install --disable-pip-version-check -q "$@"; }
python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null \
    || pip_q torch==2.13.0
pip_q -e '.[hf,plot,test,zoo,serve,sweep]'
if [ -s scripts/zoo-nodeps.txt ]; then
    pip_q --no-deps -r scripts/zoo-nodeps.txt
fi
python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
