#!/usr/bin/env bash
# Builds hack/kstatus (kstatus's verdict on one object, for tests/e2e/test_conditions.py) from
# the Go module proxy at the sigs.k8s.io/cli-utils version pinned in hack/kstatus/go.mod, into a
# cache outside the repo keyed by that version. Prints the binary's path. Does nothing when cached.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
version=$(sed -n 's#^require sigs.k8s.io/cli-utils \(v[^ ]*\)$#\1#p' "$here/kstatus/go.mod")
[ -n "$version" ] || { echo "build-kstatus: no cli-utils version in $here/kstatus/go.mod" >&2; exit 1; }

cache_root=${NOVALET_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/novalet}
bin="$cache_root/kstatus-$version/kstatus"
if [ -x "$bin" ]; then echo "$bin"; exit 0; fi

[ -x /usr/local/go/bin/go ] && export PATH=/usr/local/go/bin:$PATH
command -v go >/dev/null || { echo "build-kstatus: Go is required (https://go.dev/dl)" >&2; exit 1; }
# a copy: -mod=mod completes go.mod and writes go.sum there, never in the repo
work=$(mktemp -d "${TMPDIR:-/tmp}/novalet-kstatus.XXXXXX")
trap 'rm -rf "$work" "$bin.partial.$$"' EXIT
cp "$here/kstatus/go.mod" "$here/kstatus/main.go" "$work/"
export GOFLAGS="-mod=mod -buildvcs=false" CGO_ENABLED=0 GOTOOLCHAIN=local
start=$(date +%s)
mkdir -p "$(dirname "$bin")"
(cd "$work" && go build -trimpath -ldflags "-s -w" -o "$bin.partial.$$" .)  # one per build: xdist workers may race
mv "$bin.partial.$$" "$bin"
echo "build-kstatus: built in $(( $(date +%s) - start ))s into $bin" >&2
echo "$bin"
