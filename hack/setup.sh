#!/usr/bin/env bash
# Idempotent set-up of a Debian 12 machine for developing and testing novalet:
#   - Debian packages for libvirtd + QEMU + building libvirt-python (apt-get only when missing)
#   - the system user libvirt-qemu (Debian's libvirtd refuses to start without it)
#   - a check that Go >= 1.26 is there (for hack/build-controlplane.sh)
#   - .venv with `pip install -e '.[dev]'` (again only when pyproject.toml changed)
#   - the control-plane binaries (hack/build-controlplane.sh; cached outside the repo)
#   - the kstatus checker the tests run (hack/build-kstatus.sh; cached outside the repo)
#   (the container image, hack/build-image.sh, is built by the test that runs it: about 90 s cold)
# Run as root, or as a user with sudo (used for apt-get and useradd).
# Quiet and fast (about a second) when everything is already in place.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)

say() { echo "setup: $*" >&2; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# --- Debian packages ------------------------------------------------------------------
packages=(
  libvirt-daemon libvirt-daemon-driver-qemu qemu-system-x86 qemu-utils  # the private libvirtd
  busybox-static cpio                                                   # the tiny test guest
  libvirt-dev pkg-config gcc python3-dev python3-venv                   # building libvirt-python
  util-linux mount passwd ca-certificates curl git                      # unshare/mount, useradd, downloads
  lua5.1                                                                # runs the chart's Argo CD health check in tests
  dnsmasq-base iproute2 iptables nftables                               # libvirt network driver; nft: tests read host rules
  podman runc mmdebstrap                                                # hack/build-image.sh: the image, from Debian's packages
  containerd containernetworking-plugins socat libc6-dev                # `novalet dev up --kubelet`: the node, its pods, its forwarders
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
done
# the tiny test guest runs `apt-get download linux-image-amd64`: it needs package lists
if [ ${#missing[@]} -gt 0 ] || ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
  as_root apt-get update -qq
fi
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- libvirt-qemu user ---------------------------------------------------------------------
if ! getent passwd libvirt-qemu >/dev/null; then
  say "creating system user libvirt-qemu"
  as_root useradd --system --no-create-home --home-dir /var/lib/libvirt --shell /usr/sbin/nologin libvirt-qemu
fi

# --- Go --------------------------------------------------------------------------------
# hack/build-controlplane.sh builds Kubernetes 1.37 from the Go module proxy: it needs Go >= 1.26
# (Debian 12's golang package is too old). Install it from your usual source; we don't fetch it.
[ -x /usr/local/go/bin/go ] && export PATH=/usr/local/go/bin:$PATH
if ! command -v go >/dev/null; then
  say "Go >= 1.26 is required to build the control plane (see https://go.dev/doc/install)"
  exit 1
fi

# --- Python venv -----------------------------------------------------------------------
venv=$repo/.venv
stamp=$venv/.novalet-setup-stamp
want_stamp=$(sha256sum "$repo/pyproject.toml" | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ]; then
  say "creating $venv"
  python3 -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want_stamp" ] || ! "$venv/bin/python" -c 'import novalet, libvirt, kopf' 2>/dev/null; then
  say "pip install -e '.[dev]'"
  (cd "$repo" && "$venv/bin/pip" install -q -e '.[dev]')
  echo "$want_stamp" >"$stamp"
fi

# --- control-plane binaries ----------------------------------------------------------------
# prints the bin dir; builds (15-30 minutes) only when not cached
if ! bin=$("$here/build-controlplane.sh"); then
  say "hack/build-controlplane.sh failed"
  exit 1
fi
[ -x "$bin/kube-apiserver" ] || { say "no kube-apiserver in $bin"; exit 1; }

# --- kstatus checker (tests/e2e/test_conditions.py) -------------------------------------------
# prints the binary's path; builds (about a minute) only when not cached
if ! kstatus=$("$here/build-kstatus.sh"); then
  say "hack/build-kstatus.sh failed"
  exit 1
fi
[ -x "$kstatus" ] || { say "no kstatus checker at $kstatus"; exit 1; }
