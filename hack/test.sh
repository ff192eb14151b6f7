#!/usr/bin/env bash
# Sets everything up (Debian packages, .venv, the Go-built control plane) and runs the whole
# test suite against the real stack. Extra arguments go to pytest.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
bash hack/setup.sh
# pytest-xdist: NOVALET_TEST_WORKERS worker processes (default 3: the end-to-end tests mostly
# wait on guests, agents and the apiserver, so three fit two cores), each with a session stack of
# its own (control plane, libvirtd, tiny-guest pool: novalet_dev.testing); --dist worksteal
# evens out the long tests. NOVALET_TEST_WORKERS=0 runs everything in this one process.
exec .venv/bin/pytest -n "${NOVALET_TEST_WORKERS:-3}" --dist worksteal "$@"
