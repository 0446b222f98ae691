#!/usr/bin/env bash
# The device check: unit tests on CUDA, a throughput/MFU calibration, zoo:scale-base, and as many chapters at the
# scale profile as fit — one command of at most ~9 minutes (benchmarks/device_check.py says what each step does).
#
#   benchmarks/device_check.sh OUT_DIR          on a GPU machine
#   benchmarks/device_check.sh --cpu OUT_DIR    the dry run here: the same steps at smoke sizes on the CPU
#
# What it needs beside the repository (the lent GPU machine has no network): the Python wheels it lacks in .whl/
# (the list: /work/shared/gpu/wheels-for-the-h200.txt; installed with --no-index --no-deps into a target folder), and
# the prepared third-party corpora in .ftbook-data/ (a copy of $FTBOOK_HOME/data: `ftbook data prepare` needs PyPI).
# Both are optional: a machine with the lock's packages and prepared corpora needs neither. PYTHON picks the
# interpreter (default python3), FTBOOK_HOME the caches (default /tmp/ftbook-device-home), FTBOOK_DATA the corpora.
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
args=()
for arg in "$@"; do args+=("$arg"); done
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ftbook-site \
    .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/ftbook-site${PYTHONPATH:+:$PYTHONPATH}
fi
export FTBOOK_HOME=${FTBOOK_HOME:-/tmp/ftbook-device-home}
DATA=${FTBOOK_DATA:-.ftbook-data}   # prepared corpora to copy in (default: carried beside the repository)
if [ -d "$DATA" ]; then
  mkdir -p "$FTBOOK_HOME/data" && cp -r "$DATA"/. "$FTBOOK_HOME/data/"
fi
exec "$PYTHON" benchmarks/device_check.py "${args[@]}"
