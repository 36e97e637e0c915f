#!/usr/bin/env bash
# The federation runtime's and the serving tests on a loaded machine: the same tests while `stress-ng --cpu 2`
# keeps two CPU hogs running (Debian: apt-get install stress-ng). Tests wait on events with generous ceilings,
# never on how fast the machine is, so they must pass here too. Not part of `make test`: it takes minutes.
#
#   bench/under_load.sh                 # the runtime, recovery, serving and MLflow-auth tests under 2 hogs
#   HOGS=4 bench/under_load.sh -x       # more hogs; extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
command -v stress-ng >/dev/null || { echo "stress-ng is missing: apt-get install stress-ng" >&2; exit 2; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's code, whatever the venv points at
stress-ng --cpu "${HOGS:-2}" --timeout 0 --quiet &
hogs=$!
trap 'kill "$hogs" 2>/dev/null || true; wait "$hogs" 2>/dev/null || true' EXIT
echo "under load: stress-ng --cpu ${HOGS:-2} (pid $hogs), load average $(cut -d' ' -f1-3 /proc/loadavg)"
start=$(date +%s)
status=0
.venv/bin/pytest -q -p no:cacheprovider \
    tests/test_federation_runtime.py tests/test_federation_recovery.py \
    tests/test_serving.py tests/test_serving_protocol.py tests/test_serving_hardening.py tests/test_serving_infra.py \
    tests/test_serving_registry.py \
    "tests/test_infra_manifests.py::test_mlflow_basic_auth_scripts_run" \
    "$@" || status=$?
echo "under load: pytest exit status $status after $(( $(date +%s) - start )) s; load average $(cut -d' ' -f1-3 /proc/loadavg)"
exit "$status"
