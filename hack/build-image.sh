#!/usr/bin/env bash
# Builds the container image localhost/novalet:dev from Debian's packages and PyPI only (no
# registry is needed, none is reachable on the project's machines):
#   1. a bookworm root file system made by mmdebstrap (python3, python3-libvirt, qemu-utils),
#      imported into podman as localhost/novalet-base:<hash of its recipe> (kept: built once);
#   2. a wheelhouse of novalet and its Python dependencies (pip, on this machine);
#   3. localhost/novalet:dev: a venv that sees Debian's libvirt bindings, novalet installed from
#      the wheelhouse, built with no network.
#   4. localhost/novalet-pause:dev, the pod sandbox image, from Kubernetes' pause.c;
#   5. both loaded into the local node's containerd when it runs (`novalet dev up --kubelet`).
# Caches live outside the repo, in <novalet cache>/image (NOVALET_CACHE, default ~/.cache/novalet).
# Prints the image's name. Runs podman with runc (crun refuses this machine's cgroup layout).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
say() { echo "build-image: $*" >&2; }

image=${NOVALET_IMAGE:-localhost/novalet:dev}
cache=${NOVALET_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/novalet}/image
mirror=${NOVALET_DEBIAN_MIRROR:-http://deb.debian.org/debian}
security=${NOVALET_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
packages=python3,python3-venv,python3-libvirt,qemu-utils,ca-certificates
podman=(podman --runtime /usr/sbin/runc)
mkdir -p "$cache/debs" "$cache/wheelhouse"
# one build at a time: parallel test workers share the wheelhouse and the tags
exec 9>"$cache/build.lock"
flock 9

# --- 1. the base: Debian's packages, built once per recipe ---------------------------------
recipe="bookworm $packages $mirror $security v1"
base="localhost/novalet-base:$(printf '%s' "$recipe" | sha256sum | cut -c1-12)"
if ! "${podman[@]}" image exists "$base"; then
  say "making the Debian root file system ($packages)"
  rootfs=$(mktemp "$cache/rootfs.XXXXXX.tar")
  trap 'rm -f "$rootfs"' EXIT
  mmdebstrap --quiet --variant=minbase --include="$packages" \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --skip=essential/unlink --setup-hook='mkdir -p "$1"/var/cache/apt/archives/' \
    --setup-hook="sync-in $cache/debs /var/cache/apt/archives/" \
    --customize-hook="sync-out /var/cache/apt/archives $cache/debs" \
    --customize-hook='rm -f "$1"/var/cache/apt/archives/*.deb' \
    bookworm "$rootfs" "deb $mirror bookworm main" "deb $mirror bookworm-updates main" \
    "deb $security bookworm-security main" >&2
  "${podman[@]}" import --quiet "$rootfs" "$base" >/dev/null
  rm -f "$rootfs"
  trap - EXIT
fi

# --- 2. the wheelhouse: novalet and its dependencies but libvirt-python (Debian's is in the base)
wheels="$cache/wheelhouse"
rm -f "$wheels"/novalet-*.whl
source=$(mktemp -d "$cache/source.XXXXXX")  # setuptools writes build/ beside the sources: not in the repo
cp -r "$repo/pyproject.toml" "$repo/README.md" "$repo/operator" "$source/"
"$repo/.venv/bin/pip" wheel --quiet --no-deps --wheel-dir "$wheels" "$source" >&2
rm -rf "$source"
deps=$("$repo/.venv/bin/python" - "$repo/pyproject.toml" <<'EOF'
import sys, tomllib
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
print("\n".join(d.split("#")[0].strip() for d in deps if not d.startswith("libvirt-python")))
EOF
)
mapfile -t deps <<<"$deps"
"$repo/.venv/bin/pip" download --quiet --dest "$wheels" --only-binary=:all: --python-version 3.11 \
  --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 --platform linux_x86_64 --platform any "${deps[@]}" >&2

# --- 3. the image -----------------------------------------------------------------------------
context=$(mktemp -d "$cache/context.XXXXXX")
trap 'rm -rf "$context"' EXIT
cp -r "$wheels" "$context/wheelhouse"
cat >"$context/Containerfile" <<EOF
FROM $base
COPY wheelhouse /tmp/wheelhouse
# --system-site-packages: Debian's python3-libvirt (libvirt-python 9.0, matching the host's libvirtd)
# the chart's non-root user (runAsUser 65532) needs a name: kopf asks for it (getpass.getuser)
RUN useradd --system --uid 65532 --user-group --no-create-home --home-dir /nonexistent \\
      --shell /usr/sbin/nologin novalet \\
 && python3 -m venv --system-site-packages /opt/novalet \\
 && /opt/novalet/bin/pip install --quiet --no-index --find-links /tmp/wheelhouse --no-cache-dir novalet \\
 && rm -rf /tmp/wheelhouse
ENV PATH=/opt/novalet/bin:/usr/sbin:/usr/bin:/sbin:/bin PYTHONUNBUFFERED=1
ENTRYPOINT ["novalet"]
EOF
say "building $image on $base"
before=$("${podman[@]}" image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)
"${podman[@]}" build --quiet --network none --tag "$image" "$context" >/dev/null
# the image the tag named before (a new wheel makes a new image): removed unless a container uses it
if [ -n "$before" ] && [ "$before" != "$("${podman[@]}" image inspect --format '{{.Id}}' "$image")" ]; then
  "${podman[@]}" rmi "$before" >/dev/null 2>&1 || true
fi

# --- 4. the pod sandbox image a kubelet node needs (registry.k8s.io/pause, built here) ------------
# Kubernetes' own pause.c at the control plane's pinned version, linked statically, alone in the image.
source "$here/versions.env"
pause_image=localhost/novalet-pause:dev
pause_label="novalet.io/pause-source=kubernetes-$KUBERNETES_VERSION"
if [ "$("${podman[@]}" image inspect --format '{{index .Labels "novalet.io/pause-source"}}' "$pause_image" 2>/dev/null)" \
     != "kubernetes-$KUBERNETES_VERSION" ]; then
  k8s_source=$(GOFLAGS=-mod=mod go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
  pause_context=$(mktemp -d "$cache/pause.XXXXXX")
  gcc -Os -static -Wall -Werror -DVERSION="kubernetes-$KUBERNETES_VERSION" -o "$pause_context/pause" \
    "$k8s_source/build/pause/linux/pause.c"
  printf 'FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n' >"$pause_context/Containerfile"
  say "building $pause_image"
  "${podman[@]}" build --quiet --network none --label "$pause_label" --tag "$pause_image" "$pause_context" >/dev/null
  rm -rf "$pause_context"
fi

# --- 5. into the local node's containerd, when one runs (`novalet dev up --kubelet`) -------------
"$repo/.venv/bin/novalet" dev load-images "$image" "$pause_image" >&2
echo "$image"
