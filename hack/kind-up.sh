#!/usr/bin/env bash
# A kind cluster on this machine with no registry and no network outside a namespace of its own.
#   hack/kind-up.sh        build what is missing, then `kind create cluster` (one control-plane node)
#   hack/kind-up.sh down   delete the cluster, its podman network and volumes, and the namespace
#   hack/kind-up.sh env    print the environment to use the cluster (`eval "$(hack/kind-up.sh env)"`
#                          then `kind-ns kubectl get nodes`, `kind-ns kind load image-archive ...`)
# What it builds (cache: <novalet cache>/kind, outside the repo):
#   - kind itself (sigs.k8s.io/kind, Go module proxy), kubeadm and kube-proxy at the pinned
#     Kubernetes version (the other binaries: hack/build-controlplane.sh);
#   - the node image localhost/novalet-kind-node:<version>: Debian bookworm by mmdebstrap (systemd,
#     containerd 1.6, runc, the CNI plugins, iptables) + kind's own entrypoint and units + the
#     Kubernetes binaries; the images kubeadm wants (registry.k8s.io/... names) built FROM scratch
#     (kube-proxy: FROM the Debian root fs, for iptables) from the same binaries, pause from
#     pause.c, imported into the node's containerd at boot.
#   - no CoreDNS (kubeadm phase skipped), no kindnetd (Debian's CNI bridge plugin); kube-proxy
#     (iptables mode) in an image on the same Debian root fs.
# NOVALET_KIND_MOUNTS="dir ..." binds host directories into the node at the same paths (see below);
# changing them needs `down` then up.
# Where it runs: every podman and kind command in a network namespace bound to
# <cache>/run/net with no route out; podman with a private storage, CNI config directory and
# containers.conf (runc, cgroupfs, nofile/nproc under this machine's hard limits). The node's
# /proc/sys is read-only but for net.*, with the values the kubelet wants bound over its entries:
# the machine's kernel settings stay as they were. kind mounts /lib/modules into the node: this
# machine has none, so an empty one is made (and removed by `down`).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
kind_version=${NOVALET_KIND_VERSION:-v0.33.0}
cache=${NOVALET_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/novalet}/kind
run=$cache/run
ns=$run/net
name=${NOVALET_KIND_NAME:-novalet}
# bump node_rev when what goes into the node image changes (a cached image is used as it is)
node_rev=3
image=localhost/novalet-kind-node:$KUBERNETES_VERSION-r$node_rev
say() { echo "kind-up: $*" >&2; }
mkdir -p "$cache/bin" "$run" "$cache/podman/net.d"

cat >"$cache/podman/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "$run/libpod-tmp"
[engine.runtimes]
runc = ["/usr/sbin/runc"]
[network]
network_backend = "cni"
network_config_dir = "$cache/podman/net.d"
cni_plugin_dirs = ["/usr/lib/cni"]
EOF
printf '[storage]\ndriver = "overlay"\ngraphroot = "%s"\nrunroot = "%s"\n' \
  "$cache/podman/storage" "$run/runroot" >"$cache/podman/storage.conf"
cat >"$cache/bin/kind-ns" <<EOF
#!/usr/bin/env bash
# runs a command in the kind cluster's network namespace, with its podman configuration
export CONTAINERS_CONF=$cache/podman/containers.conf CONTAINERS_STORAGE_CONF=$cache/podman/storage.conf
export KIND_EXPERIMENTAL_PROVIDER=podman KUBECONFIG=$cache/kubeconfig PATH=$cache/bin:\$PATH
exec nsenter --net=$ns -- "\$@"
EOF
chmod +x "$cache/bin/kind-ns"
kns=("$cache/bin/kind-ns")

ns_exists() { [ -e "$ns" ] && [ "$(stat -c %d "$ns")" = "$(stat -L -c %d /proc/self/ns/net)" ]; }

case ${1:-up} in
env)
  echo "export PATH=$cache/bin:\$PATH KUBECONFIG=$cache/kubeconfig"; exit 0;;
down)
  if ns_exists; then
    "${kns[@]}" kind delete cluster --name "$name" >&2 || true
    "${kns[@]}" podman network rm -f kind >/dev/null 2>&1 || true
    "${kns[@]}" podman volume prune -f >/dev/null 2>&1 || true
    umount "$ns"
  fi
  rm -f "$ns" "$cache/kind.yaml.new"
  if [ -f "$run/made-lib-modules" ]; then rmdir /lib/modules 2>/dev/null || true; rm -f "$run/made-lib-modules"; fi
  # podman's CNI keeps its IPAM leases and results in the machine's /var/lib/cni
  rm -rf /var/lib/cni/networks/kind
  if [ -f "$run/made-var-lib-cni" ]; then
    rmdir /var/lib/cni/networks /var/lib/cni/results /var/lib/cni 2>/dev/null || true; rm -f "$run/made-var-lib-cni"
  fi
  say "down"; exit 0;;
up) ;;
*) echo "usage: $0 [up|down|env]" >&2; exit 2;;
esac

t0=$(date +%s)
export GOFLAGS="-mod=mod -buildvcs=false" CGO_ENABLED=0 GOTOOLCHAIN=local
# --- binaries ---------------------------------------------------------------------------------
cpbin=$("$here/build-controlplane.sh")
if [ ! -x "$cache/bin/kind" ]; then
  say "building kind $kind_version"; GOBIN=$cache/bin go install "sigs.k8s.io/kind@$kind_version"
fi
if [ ! -x "$cache/bin/kubeadm" ] || [ ! -x "$cache/bin/kube-proxy" ]; then
  b=$cache/k8s-build; mkdir -p "$b"; (
    cd "$b"; v=$KUBERNETES_VERSION staging=v0.${KUBERNETES_VERSION#v1.}
    minor=${v#v1.}; minor=${minor%%.*}
    [ -f go.mod ] || go mod init novalet.local/k8s-build >/dev/null 2>&1
    go mod edit -require="k8s.io/kubernetes@$v"
    modfile=$(go mod download -json "k8s.io/kubernetes@$v" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
    sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\1#p' "$modfile" | while read -r m; do
      go mod edit -replace="$m=$m@$staging"; done
    date=$(date -u +%Y-%m-%dT%H:%M:%SZ); ldflags=""
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
      ldflags+=" -X $pkg.gitVersion=$v -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
      ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$date"; done
    for t in kubeadm kube-proxy; do
      say "building $t $v"
      go build -trimpath -ldflags "-s -w $ldflags" -o "$cache/bin/$t" "k8s.io/kubernetes/cmd/$t"; done
  )
fi
kindsrc=$(go mod download -json "sigs.k8s.io/kind@$kind_version" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')/images/base/files

# --- the namespace ----------------------------------------------------------------------------
if ! ns_exists; then
  rm -f "$ns"; touch "$ns"; unshare --net="$ns" -- ip link set lo up
fi
if [ ! -e /lib/modules ]; then mkdir /lib/modules; touch "$run/made-lib-modules"; fi
[ -e /var/lib/cni ] || touch "$run/made-var-lib-cni"
podman=("${kns[@]}" podman)

# --- the node image ---------------------------------------------------------------------------
if ! "${podman[@]}" image exists "$image"; then
  ctx=$(mktemp -d "$cache/ctx.XXXXXX"); trap 'rm -rf "$ctx"' EXIT
  mkdir -p "$ctx/kind/images" "$ctx/bin" "$ctx/usr/local/bin" "$ctx/etc/containerd" \
    "$ctx/etc/systemd/system" "$ctx/etc/cni/net.d"
  img() { # name tag binary: FROM scratch, the static binary in /usr/local/bin
    local d; d=$(mktemp -d "$cache/img.XXXXXX"); cp "$3" "$d/"
    printf 'FROM scratch\nCOPY %s /usr/local/bin/\nENV PATH=/usr/local/bin:/usr/bin:/bin\n' "$(basename "$3")" >"$d/Containerfile"
    "${podman[@]}" build --quiet --network none --tag "registry.k8s.io/$1:$2" "$d" >/dev/null
    "${podman[@]}" save --quiet --format docker-archive -o "$ctx/kind/images/${1//\//_}.tar" "registry.k8s.io/$1:$2"
    rm -rf "$d"
  }
  say "building the Kubernetes images"
  for t in kube-apiserver kube-controller-manager kube-scheduler; do img "$t" "$KUBERNETES_VERSION" "$cpbin/$t"; done
  img etcd "${ETCD_VERSION#v}-0" "$cpbin/etcd"
  k8s=$(go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
  pd=$(mktemp -d "$cache/pause.XXXXXX")
  gcc -Os -static -Wall -Werror -DVERSION="kubernetes-$KUBERNETES_VERSION" -o "$pd/pause" "$k8s/build/pause/linux/pause.c"
  printf 'FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n' >"$pd/Containerfile"
  pause=$("$cache/bin/kubeadm" config images list --kubernetes-version "$KUBERNETES_VERSION" | grep /pause:)
  "${podman[@]}" build --quiet --network none --tag "$pause" "$pd" >/dev/null
  "${podman[@]}" save --quiet --format docker-archive -o "$ctx/kind/images/pause.tar" "$pause"
  rm -rf "$pd"

  packages=systemd,systemd-sysv,containerd,runc,containernetworking-plugins,iptables,nftables,iproute2,conntrack,ethtool,socat,util-linux,mount,kmod,procps,ca-certificates,bash,libseccomp2,e2fsprogs,jq
  base=localhost/novalet-kind-base:$(printf '%s' "bookworm $packages v1" | sha256sum | cut -c1-12)
  if ! "${podman[@]}" image exists "$base"; then
    say "making the Debian root file system"
    mirror=${NOVALET_DEBIAN_MIRROR:-http://deb.debian.org/debian}
    mkdir -p "$cache/debs"
    mmdebstrap --quiet --variant=minbase --include="$packages" \
      --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
      --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/locale/*' \
      --skip=essential/unlink --setup-hook='mkdir -p "$1"/var/cache/apt/archives/' \
      --setup-hook="sync-in $cache/debs /var/cache/apt/archives/" \
      --customize-hook="sync-out /var/cache/apt/archives $cache/debs" \
      --customize-hook='rm -f "$1"/var/cache/apt/archives/*.deb' \
      bookworm "$ctx/rootfs.tar" "deb $mirror bookworm main" "deb $mirror bookworm-updates main" \
      "deb ${NOVALET_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security} bookworm-security main" >&2
    "${podman[@]}" import --quiet "$ctx/rootfs.tar" "$base" >/dev/null
    rm -f "$ctx/rootfs.tar"
  fi
  # kube-proxy wants iptables (Debian's: iptables-nft), conntrack: the node's own Debian root fs
  pd=$(mktemp -d "$cache/proxy.XXXXXX"); cp "$cache/bin/kube-proxy" "$pd/"
  printf 'FROM %s\nCOPY kube-proxy /usr/local/bin/\nENTRYPOINT ["/usr/local/bin/kube-proxy"]\n' "$base" >"$pd/Containerfile"
  "${podman[@]}" build --quiet --network none --tag "registry.k8s.io/kube-proxy:$KUBERNETES_VERSION" "$pd" >/dev/null
  "${podman[@]}" save --quiet --format docker-archive -o "$ctx/kind/images/kube-proxy.tar" \
    "registry.k8s.io/kube-proxy:$KUBERNETES_VERSION"
  rm -rf "$pd"

  cp -r "$kindsrc/kind/." "$ctx/kind/"; cp -r "$kindsrc/etc/." "$ctx/etc/"; cp -r "$kindsrc/usr/." "$ctx/usr/"
  echo "$KUBERNETES_VERSION" >"$ctx/kind/version"
  cp "$cache/bin/kubeadm" "$cpbin/kubelet" "$cpbin/kubectl" "$ctx/bin/"
  cat >"$ctx/usr/local/bin/novalet-guard" <<'EOF'
#!/bin/bash
# Runs before kind's entrypoint. A privileged node sees the machine's /proc/sys, all of it but net.*
# (per network namespace); the kubelet would write some (setupKernelTunables). Bind files holding
# the values it wants over those entries and make the rest read-only, net.* excepted.
set -euo pipefail
mkdir -p /kind/sysctl
mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys
mount --bind /proc/sys/net /proc/sys/net && mount -o remount,bind,rw /proc/sys/net
for kv in vm.overcommit_memory=1 vm.panic_on_oom=0 kernel.panic=10 kernel.panic_on_oops=1 \
          kernel.keys.root_maxkeys=1000000 kernel.keys.root_maxbytes=25000000; do
  k=${kv%%=*}; echo "${kv#*=}" >"/kind/sysctl/$k"; mount --bind "/kind/sysctl/$k" "/proc/sys/${k//.//}"
done
# kind's sysctl.d (systemd-sysctl is masked: it would apply Debian's kernel.* defaults machine-wide)
sysctl -q -w net.ipv4.conf.all.route_localnet=1 net.ipv4.conf.all.arp_ignore=0 \
  net.ipv4.conf.default.rp_filter=1 net.ipv4.conf.all.rp_filter=1 net.ipv4.ip_forward=1 || true
exec "$@"
EOF
  cat >"$ctx/etc/containerd/config.toml" <<EOF
version = 2
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$pause"
  tolerate_missing_hugepages_controller = true
  # this machine refuses to lower oom_score_adj (no CAP_SYS_RESOURCE)
  restrict_oom_score_adj = true
[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
  SystemdCgroup = true
  BinaryName = "/usr/sbin/runc"
[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = "/usr/lib/cni"
  conf_dir = "/etc/cni/net.d"
EOF
  cat >"$ctx/etc/systemd/system/containerd.service" <<'EOF'
[Unit]
Description=containerd container runtime (Debian's)
After=network.target local-fs.target
StartLimitIntervalSec=0
[Service]
ExecStart=/usr/bin/containerd
Type=notify
Delegate=yes
KillMode=process
Restart=always
RestartSec=1
LimitNPROC=infinity
LimitCORE=infinity
TasksMax=infinity
[Install]
WantedBy=multi-user.target
EOF
  cat >"$ctx/etc/systemd/system/kind-images.service" <<'EOF'
[Unit]
Description=Import the node's images (built locally, no registry) into containerd
After=containerd.service
Requires=containerd.service
Before=kubelet.service
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/bin/novalet-import-images
[Install]
WantedBy=multi-user.target
EOF
  cat >"$ctx/usr/local/bin/novalet-import-images" <<'EOF'
#!/bin/sh
set -e
for t in /kind/images/*.tar; do ctr --namespace k8s.io images import "$t"; done
EOF
  # the pods' subnet lives on cni0 inside the node container, itself inside the namespace above:
  # no route to it exists in the machine's own namespace
  cat >"$ctx/etc/cni/net.d/10-bridge.conflist" <<'EOF'
{"cniVersion": "1.0.0", "name": "kind-pods",
 "plugins": [{"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false,
              "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.0.0/24"}]],
                       "routes": [{"dst": "0.0.0.0/0"}]}},
             {"type": "portmap", "capabilities": {"portMappings": true}}]}
EOF
  cat >"$ctx/Containerfile" <<EOF
FROM $base
COPY bin/ /usr/bin/
COPY usr/ /usr/
COPY kind/ /kind/
COPY etc/ /etc/
RUN chmod 755 /usr/local/bin/* /kind/bin/* \\
 && find /lib/systemd/system/sysinit.target.wants/ -name systemd-tmpfiles-setup.service -delete \\
 && rm -f /lib/systemd/system/multi-user.target.wants/* /etc/systemd/system/*.wants/* \\
          /lib/systemd/system/local-fs.target.wants/* /lib/systemd/system/sockets.target.wants/*udev* \\
          /lib/systemd/system/sockets.target.wants/*initctl* /lib/systemd/system/basic.target.wants/* \\
 && echo ReadKMsg=no >>/etc/systemd/journald.conf \\
 && systemctl enable kubelet.service containerd.service undo-mount-hacks.service kind-images.service \\
 && systemctl mask systemd-binfmt.service systemd-sysctl.service systemd-modules-load.service \\
 && mkdir -p /etc/kubernetes/manifests
ENV container=docker
STOPSIGNAL SIGRTMIN+3
ENTRYPOINT ["/usr/local/bin/novalet-guard", "/usr/local/bin/entrypoint", "/sbin/init"]
EOF
  say "building $image"
  "${podman[@]}" build --quiet --network none --tag "$image" "$ctx" >/dev/null
  rm -rf "$ctx"; trap - EXIT
fi

# --- the cluster ------------------------------------------------------------------------------
# NOVALET_KIND_MOUNTS="path ...": each host path bound into the node at the same path (a libvirtd's
# socket directory, the agent's directories: the chart's hostPath volumes then are the host's)
mounts=""
for m in ${NOVALET_KIND_MOUNTS:-}; do
  m=$(realpath -m "$m"); mkdir -p "$m"
  mounts+="    - {hostPath: \"$m\", containerPath: \"$m\", propagation: None}"$'\n'
done
{
  cat <<'EOF'
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
networking: {ipFamily: ipv4, disableDefaultCNI: true, kubeProxyMode: iptables}
kubeadmConfigPatches:
- |
  kind: InitConfiguration
  skipPhases: [preflight, addon/coredns]
# kube-proxy in the node: the apiserver (host network) reaches a webhook's Service by its ClusterIP
- |
  kind: KubeletConfiguration
  failCgroupV1: false
- |
  kind: KubeProxyConfiguration
  conntrack: {maxPerCore: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
nodes:
- role: control-plane
EOF
  [ -z "$mounts" ] || printf '  extraMounts:\n%s' "$mounts"
} >"$cache/kind.yaml.new"
if ! "${kns[@]}" kind get clusters 2>/dev/null | grep -qx "$name"; then
  mv "$cache/kind.yaml.new" "$cache/kind.yaml"
  "${kns[@]}" kind create cluster --name "$name" --image "$image" --config "$cache/kind.yaml" \
    --kubeconfig "$cache/kubeconfig" >&2
elif ! cmp -s "$cache/kind.yaml.new" "$cache/kind.yaml"; then
  say "warning: the running cluster was made with another configuration (NOVALET_KIND_MOUNTS?):"
  say "  $0 down, then up again, to apply $cache/kind.yaml.new"
fi
"${kns[@]}" "$cpbin/kubectl" wait --for=condition=Ready node --all --timeout=120s >&2
say "ready in $(( $(date +%s) - t0 ))s; eval \"\$($0 env)\"; kind-ns kubectl get nodes"
