#!/usr/bin/env bash
# Sets everything up and runs novalet on this machine: the node agent (`novalet run`) and the
# cluster controller (`novalet controller`: admission webhook + agent heartbeats).
#   KUBECONFIG unset: against the embedded local stack (`novalet dev up`: etcd, kube-apiserver,
#                     kube-controller-manager on loopback, plus a private libvirtd).
#   KUBECONFIG set:   against that cluster (CRDs applied there); libvirtd is still the private one.
# Ctrl-C stops the agent and controller; `.venv/bin/novalet dev down` stops the stack.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
bash hack/setup.sh
novalet=$repo/.venv/bin/novalet
bin=$(hack/build-controlplane.sh)
state=${NOVALET_STATE_DIR:-$repo/.novalet-dev}
pool=$state/images
node=${NOVALET_NODE_NAME:-$(hostname | tr '[:upper:]_' '[:lower:]-' | cut -c1-63)}

user_kubeconfig=${KUBECONFIG:-}
if [ -n "$user_kubeconfig" ]; then
  "$novalet" dev up --no-kube
  "$bin/kubectl" apply --server-side -f crds/
  webhook=()   # a remote apiserver cannot call a webhook on this machine's loopback
else
  "$novalet" dev up
  webhook=(--webhook-port "${NOVALET_WEBHOOK_PORT:-9443}" --remove-webhook-on-exit)
fi
eval "$("$novalet" dev env)"
if [ -n "$user_kubeconfig" ]; then
  export KUBECONFIG=$user_kubeconfig
  # preloaded into this node's pool: a ClusterVirtualImage served from this machine's loopback
  # would be a dead URL for every other node of that cluster
  "$novalet" dev image --pool "$pool" --name tiny
  images="the image tiny preloaded in $pool"
else
  # the ClusterVirtualImage tiny, served by the stack's loopback image server; the agent fetches
  # it into $pool/catalog/ on first use (directly: Python's urllib would hand 127.0.0.1 to a proxy)
  "$novalet" dev image --name tiny
  export no_proxy="127.0.0.1,localhost${no_proxy:+,$no_proxy}" NO_PROXY="127.0.0.1,localhost${NO_PROXY:+,$NO_PROXY}"
  images="ClusterVirtualImage tiny published; agent pool $pool"
fi

"$novalet" controller --state-dir "$state" "${webhook[@]}" &
controller=$!
trap 'kill "$controller" 2>/dev/null && wait "$controller" 2>/dev/null || true' EXIT

cat <<MSG

novalet is running on node "$node" ($images).
In another shell:
  eval "\$($novalet dev env)"$( [ -n "$user_kubeconfig" ] && echo "; export KUBECONFIG=$user_kubeconfig")
  kubectl apply -f examples/tiny.yaml        # a real tiny Linux guest
  kubectl get vinst -w
MSG
# a development machine has few cores: let the scheduler place 4 vCPUs per core (Nova's initial
# cpu_allocation_ratio; the agent's default is 1.0, no overcommit), memory not overcommitted
"$novalet" run --node-name "$node" --libvirt-uri "$LIBVIRT_DEFAULT_URI" --image-pool "$pool" \
  --state-dir "$state/agent" --cpu-allocation-ratio 4
