#!/usr/bin/env bash
# Sets everything up (Debian packages, .venv, the Go-built control plane) and runs the whole
# test suite against the real stack. Extra arguments go to pytest.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
bash hack/setup.sh
exec .venv/bin/pytest "$@"
