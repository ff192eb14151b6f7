#!/usr/bin/env bash
# Builds etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kubectl and
# helm from the Go module proxy at the versions pinned in hack/versions.env, into a cache
# outside the repo keyed by those versions. Prints the bin directory. Builds only what is
# missing there; does nothing when all are cached.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"

cache_root=${NOVALET_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/novalet}
key="k8s-${KUBERNETES_VERSION}_etcd-${ETCD_VERSION}_helm-${HELM_VERSION}"
bin="$cache_root/controlplane/$key/bin"
kube_tools=(kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl)
tools=(etcd helm "${kube_tools[@]}")

missing() { local t; for t in "$@"; do [ -x "$bin/$t" ] || echo "$t"; done; }
if [ -z "$(missing "${tools[@]}")" ]; then echo "$bin"; exit 0; fi

command -v go >/dev/null || { echo "build-controlplane: Go is required (https://go.dev/dl)" >&2; exit 1; }
work=$(mktemp -d "${TMPDIR:-/tmp}/novalet-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
# one build at a time (parallel test workers may all ask); a waiter finds the tools built
mkdir -p "$(dirname "$bin")"
exec 9>"$bin.lock"
flock 9
if [ -z "$(missing "${tools[@]}")" ]; then echo "$bin"; exit 0; fi
rm -rf "$bin.partial" && mkdir -p "$bin.partial"
export GOFLAGS="-mod=mod -buildvcs=false" CGO_ENABLED=0 GOTOOLCHAIN=local
log() { echo "build-controlplane: $*" >&2; }

build_kubernetes() {
  local v=$KUBERNETES_VERSION staging=v0.${KUBERNETES_VERSION#v1.}
  local minor=${v#v1.}; minor=${minor%%.*}
  mkdir -p "$work/k8s" && cd "$work/k8s"
  go mod init novalet.local/k8s-build >/dev/null 2>&1
  go mod edit -require="k8s.io/kubernetes@$v"
  # k8s.io/kubernetes replaces its staging modules with ./staging paths; a wrapper
  # module must replace each with its published v0.x.y instead.
  local modfile
  modfile=$(go mod download -json "k8s.io/kubernetes@$v" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\1#p' "$modfile" | while read -r m; do
    go mod edit -replace="$m=$m@$staging"
  done
  local date pkg ldflags=""
  date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$v -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$date"
  done
  for t in $(missing "${kube_tools[@]}"); do
    log "building $t $v"
    go build -trimpath -ldflags "-s -w $ldflags" -o "$bin.partial/$t" "k8s.io/kubernetes/cmd/$t"
  done
}

build_etcd() {
  mkdir -p "$work/etcd" && cd "$work/etcd"
  go mod init novalet.local/etcd-build >/dev/null 2>&1
  go mod edit -require="go.etcd.io/etcd/server/v3@$ETCD_VERSION"
  log "building etcd $ETCD_VERSION"
  go build -trimpath -ldflags "-s -w" -o "$bin.partial/etcd" go.etcd.io/etcd/server/v3
}

build_helm() {
  local k8s_minor=${KUBERNETES_VERSION#v1.}; k8s_minor=${k8s_minor%%.*}
  mkdir -p "$work/helm" && cd "$work/helm"
  go mod init novalet.local/helm-build >/dev/null 2>&1
  go mod edit -require="helm.sh/helm/v3@$HELM_VERSION"
  local ldflags="-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  for p in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
    ldflags+=" -X $p.k8sVersionMajor=1 -X $p.k8sVersionMinor=$k8s_minor"
  done
  log "building helm $HELM_VERSION"
  go build -trimpath -ldflags "-s -w $ldflags" -o "$bin.partial/helm" helm.sh/helm/v3/cmd/helm
}

start=$(date +%s)
[ -n "$(missing etcd)" ] && build_etcd
[ -n "$(missing helm)" ] && build_helm
[ -n "$(missing "${kube_tools[@]}")" ] && build_kubernetes
# each tool moved in on its own: a stack running from $bin keeps its binaries
mkdir -p "$bin"
for t in "$bin.partial"/*; do mv -f "$t" "$bin/"; done
rmdir "$bin.partial"
log "built in $(( $(date +%s) - start ))s into $bin"
echo "$bin"
