#!/usr/bin/env bash
# The seed scenario on a local Kubernetes control plane (`run.sh --kubernetes`): etcd,
# kube-apiserver, kube-controller-manager and kube-scheduler built from their Go modules
# (scripts/kube-tools.sh), two simulated nodes in two network zones, one spiderpool-agent per
# node on `--datastore kubernetes`, and the seed's manifests applied with the real kubectl: the
# DaemonSet's pods are created by the real DaemonSet controller, placed by the real scheduler,
# and attached by Debian's macvlan with "ipam": {"type": "spiderpool"}.
#
#   router (netns spk-router)      10.6.0.1/16 on to-cn1, 10.7.0.1/16 on to-wn1, forwarding on
#     | veth                          | veth
#   controller-node-1 (netns       worker-node-1 (netns         node-subnet=subnet-6 / subnet-7
#     spk-cn1)                        spk-wn1)
#     ens192 = macvlan master         ens192 = macvlan master
#
# Only kubelet and the container runtime are simulated: spiderpool-sim-cluster (test
# infrastructure from crates/spiderpool-testkit, not shipped) runs the control plane, and per
# node a node simulator, which gives each pod bound to its node a network namespace and runs the
# pod's CNI chain there as a runtime would (the pod's `nginx` stands in as an HTTP responder on
# its containerPort 80, answering with the pod's name), and a real kube-proxy (iptables mode)
# inside the node's namespace.
#
# Every manifest is applied unchanged, the NetworkAttachmentDefinition too: it chains macvlan
# with "ipam": {"type": "spiderpool"} and then `veth` (this project's coordinator plugin under
# that name), which gives each pod a veth pair to its node with routes to the node and to the
# Service CIDR through it. Each node has an address in its zone (10.6.0.2, 10.7.0.2) and
# forwarding on. The run ends as the seed's document does, with the pods of the two zones
# talking by Pod IP, clusterIP and nodePort: the pod on controller-node-1 asks a NodePort
# Service whose only endpoint is the pod on worker-node-1, by its ClusterIP and through the
# NodePort of each node.
#
# Needs root, iproute2, iputils-ping, iptables, curl, containernetworking-plugins, util-linux,
# openssl, Go (for
# the first build of the control plane, ~7 minutes on 2 cores, cached after) and the built
# binaries (SPIDERPOOL_BIN_DIR, default target/release). Removes everything it made on exit.
#
# With --smc the network is the SpiderMultusConfig of smc/04-macvlan-smc.yaml instead of the
# seed's NAD: the controller generates the NAD (macvlan, spiderpool, then the `coordinator`
# plugin, whose Service CIDR is the SpiderCoordinator `default`'s status), with the same
# outputs.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
manifests=${SPIDERPOOL_SEED_MANIFESTS:-$repo/examples/seed-zones/manifests}
bin_dir=${SPIDERPOOL_BIN_DIR:-$repo/target/release}
cni_plugins=${CNI_PLUGINS_DIR:-/usr/lib/cni}

die() { echo "error: $*" >&2; exit 1; }
smc=
case "${1:-}" in
  --smc) smc=1 ;;
  "") ;;
  *) die "usage: $0 [--smc]" ;;
esac
[ "$(id -u)" = 0 ] || die "run as root: the scenario creates network namespaces"
for b in spiderpool veth coordinator spiderpool-agent spiderpool-controller spiderpool-sim-cluster; do
  [ -x "$bin_dir/$b" ] || die "$bin_dir/$b not found: build with 'cargo build --release' or set SPIDERPOOL_BIN_DIR"
done
[ -x "$cni_plugins/macvlan" ] || die "$cni_plugins/macvlan not found: apt-get install containernetworking-plugins"
command -v ping >/dev/null || die "ping not found: apt-get install iputils-ping"
command -v iptables >/dev/null || die "iptables not found (kube-proxy needs it): apt-get install iptables"
command -v curl >/dev/null || die "curl not found: apt-get install curl"

echo "## control plane binaries (scripts/kube-tools.sh; built once, then cached)"
kube_bin=${SPIDERPOOL_KUBE_BIN:-$("$repo/scripts/kube-tools.sh" | tail -1)}
[ -x "$kube_bin/kubectl" ] || die "no kubectl in $kube_bin"
echo "$kube_bin"

work=$(mktemp -d /tmp/spiderpool-seed-kube.XXXXXX)
router=spk-router
nodes=(controller-node-1 worker-node-1)
declare -A zone=([controller-node-1]=subnet-6 [worker-node-1]=subnet-7)
declare -A gw=([controller-node-1]=10.6.0.1/16 [worker-node-1]=10.7.0.1/16)
declare -A node_ip=([controller-node-1]=10.6.0.2/16 [worker-node-1]=10.7.0.2/16)
declare -A uplink=([controller-node-1]=to-cn1 [worker-node-1]=to-wn1)
# The network namespace standing in for each node's host.
declare -A host=([controller-node-1]=spk-cn1 [worker-node-1]=spk-wn1)
agent_pids=()
cluster_pid=
netns_before=$(ip netns list | awk '{print $1}' | sort)

kubectl() { "$kube_bin/kubectl" --kubeconfig "$work/admin.kubeconfig" "$@"; }

cleanup() {
  local rc=$?
  set +e
  if [ $rc -ne 0 ]; then
    echo "--- agent, plugin and control-plane logs ---" >&2
    tail -n 20 "$work"/*.log "$work"/*/*.log >&2 2>/dev/null
  fi
  for pid in "${agent_pids[@]}"; do kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; done
  if [ -n "$cluster_pid" ]; then kill "$cluster_pid" 2>/dev/null; wait "$cluster_pid" 2>/dev/null; fi
  # Pod namespaces a node simulator made and no DEL removed (a failed run).
  comm -13 <(echo "$netns_before") <(ip netns list | awk '{print $1}' | sort) | grep '^sim-' |
    while read -r ns; do ip netns del "$ns"; done
  for n in "${nodes[@]}"; do ip netns del "${host[$n]}" 2>/dev/null; done
  ip netns del "$router" 2>/dev/null
  rm -rf "$work"
  exit $rc
}
trap cleanup EXIT

mkdir -p "$work/cni-bin"
ln -s "$cni_plugins/macvlan" "$work/cni-bin/macvlan"
ln -s "$bin_dir/spiderpool" "$work/cni-bin/spiderpool"
ln -s "$bin_dir/veth" "$work/cni-bin/veth"
ln -s "$bin_dir/coordinator" "$work/cni-bin/coordinator"

echo "## network: router $router, nodes ${nodes[*]}"
ip netns add "$router"
ip -n "$router" link set lo up
ip netns exec "$router" sysctl -qw net.ipv4.ip_forward=1
for n in "${nodes[@]}"; do
  h=${host[$n]}
  ip netns add "$h"
  ip -n "$h" link set lo up
  ip netns exec "$h" sysctl -qw net.ipv4.ip_forward=1
  ip link add ens192 netns "$h" type veth peer name "${uplink[$n]}" netns "$router"
  ip -n "$h" link set ens192 up
  ip -n "$h" addr add "${node_ip[$n]}" dev ens192
  ip -n "$h" route add default via "${gw[$n]%/*}"
  ip -n "$router" addr add "${gw[$n]}" dev "${uplink[$n]}"
  ip -n "$router" link set "${uplink[$n]}" up
done

echo "## control plane, simulated nodes and a kube-proxy per node"
node_args=()
for n in "${nodes[@]}"; do node_args+=(--node "$n,${host[$n]},node-subnet=${zone[$n]}"); done
"$bin_dir/spiderpool-sim-cluster" --kube-bin "$kube_bin" --dir "$work" --cni-path "$work/cni-bin" \
  "${node_args[@]}" >"$work/cluster.out" 2>"$work/cluster.log" &
cluster_pid=$!
for _ in $(seq 600); do
  grep -q ready "$work/cluster.out" 2>/dev/null && break
  kill -0 "$cluster_pid" 2>/dev/null || die "the control plane did not start: $(tail -n 20 "$work/cluster.log")"
  sleep 0.2
done
grep -q ready "$work/cluster.out" || die "the control plane did not start in time"
kubectl get nodes -L node-subnet

echo "## agents (--datastore kubernetes)"
for n in "${nodes[@]}"; do
  "$bin_dir/spiderpool-agent" --node-name "$n" --datastore kubernetes \
    --kubeconfig "$work/admin.kubeconfig" --socket "$work/$n/spiderpool.sock" 2>"$work/$n/agent.log" &
  agent_pids+=($!)
done
for n in "${nodes[@]}"; do
  for _ in $(seq 200); do [ -S "$work/$n/spiderpool.sock" ] && break; sleep 0.05; done
  [ -S "$work/$n/spiderpool.sock" ] || die "agent of $n did not start: $(cat "$work/$n/agent.log")"
  echo "spiderpool-agent serving $n"
done

echo "## spiderpool-controller (webhooks, finalizers, reclaim)"
# With --smc the coordinator plugin needs the SpiderCoordinator `default` (upstream's install
# creates it too); its status gives the Service CIDR.
coordinator_args=()
[ -z "$smc" ] || coordinator_args=(--default-coordinator '{"podCIDRType": "none"}')
# Outside the cluster the API server reaches its webhooks on loopback.
"$bin_dir/spiderpool-controller" --kubeconfig "$work/admin.kubeconfig" --namespace kube-system \
  --pod-name spiderpool-controller-0 --health-addr 127.0.0.1:9720 \
  --webhook-addr 127.0.0.1:9722 --webhook-url https://127.0.0.1:9722 \
  "${coordinator_args[@]}" 2>"$work/controller.log" &
agent_pids+=($!)
controller_ready() {
  (exec 3<>/dev/tcp/127.0.0.1/9720 && printf 'GET /readyz HTTP/1.0\r\n\r\n' >&3 && head -n 1 <&3 | grep -q ' 200') 2>/dev/null
}
for _ in $(seq 300); do controller_ready && break; sleep 0.1; done
controller_ready || die "the controller is not ready: $(tail -n 20 "$work/controller.log")"
echo "spiderpool-controller ready"

echo "## kubectl apply: the seed's manifests"
kubectl apply -f "$manifests/02-subnets.yaml"
kubectl apply -f "$manifests/03-ippools.yaml"
if [ -n "$smc" ]; then
  kubectl apply -f "$here/smc/04-macvlan-smc.yaml"
  for _ in $(seq 300); do
    kubectl get network-attachment-definitions.k8s.cni.cncf.io -n kube-system macvlan-conf >/dev/null 2>&1 && break
    sleep 0.1
  done
  echo "## kubectl get spidermultusconfig -n kube-system"
  kubectl get spidermultusconfig -n kube-system
  echo "## the generated NAD's config"
  kubectl get network-attachment-definitions.k8s.cni.cncf.io -n kube-system macvlan-conf -o jsonpath='{.spec.config}'
  echo
  for _ in $(seq 300); do
    [ "$(kubectl get spidercoordinator default -o jsonpath='{.status.phase}' 2>/dev/null)" = Synced ] && break
    sleep 0.1
  done
  echo "## kubectl get spidercoordinator"
  kubectl get spidercoordinator
else
  kubectl apply -f "$manifests/04-macvlan-nad.yaml"
fi
kubectl apply -f "$manifests/05-daemonset.yaml"

echo "## waiting for the DaemonSet's pods"
for _ in $(seq 300); do
  running=$(kubectl get pods -l app=test-app -o jsonpath='{range .items[*]}{.status.phase}{"\n"}{end}' | grep -c '^Running$' || true)
  [ "$running" = 2 ] && break
  sleep 0.2
done
[ "$running" = 2 ] || { kubectl get pods -o wide; die "the DaemonSet's pods are not running"; }

echo "## kubectl get spidersubnet"
kubectl get spidersubnet
echo "## kubectl get spiderippool"
kubectl get spiderippool
echo "## kubectl get pod -o wide"
kubectl get pod -o wide
echo "## kubectl get spiderendpoint"
kubectl get spiderendpoint

pod_on() { kubectl get pods -l app=test-app --field-selector "spec.nodeName=$1" -o jsonpath="{.items[0].$2}"; }
a=controller-node-1 b=worker-node-1
pa=$(pod_on $a metadata.name) pb=$(pod_on $b metadata.name)
ipa=$(pod_on $a status.podIP) ipb=$(pod_on $b status.podIP)
uid=$(pod_on $a metadata.uid)
netns_a="sim-$(echo "$uid" | tr -d - | cut -c1-12)"
echo "## ping from $pa ($ipa) to $pb ($ipb)"
ip netns exec "$netns_a" ping -c 2 -W 2 "$ipb"
echo "## routes in $pa (veth0 leads to its node)"
ip -n "$netns_a" route
echo "## ping from $pa to its node (${node_ip[$a]%/*}) through veth0"
ip netns exec "$netns_a" ping -c 2 -W 2 "${node_ip[$a]%/*}"

echo "## Service test-app-worker (NodePort) selecting only $pb"
kubectl label pod "$pb" serve=worker
kubectl apply -f - <<'EOF'
apiVersion: v1
kind: Service
metadata:
  name: test-app-worker
  namespace: default
spec:
  type: NodePort
  selector:
    app: test-app
    serve: worker
  ports:
  - name: http
    port: 80
    targetPort: http
EOF
for _ in $(seq 300); do
  eps=$(kubectl get endpointslices -l kubernetes.io/service-name=test-app-worker \
    -o jsonpath='{.items[*].endpoints[*].addresses[*]}')
  [ "$eps" = "$ipb" ] && break
  sleep 0.2
done
[ "$eps" = "$ipb" ] || die "the Service's EndpointSlice does not name $ipb: '$eps'"
kubectl get endpointslices -l kubernetes.io/service-name=test-app-worker
cluster_ip=$(kubectl get service test-app-worker -o jsonpath='{.spec.clusterIP}')
node_port=$(kubectl get service test-app-worker -o jsonpath='{.spec.ports[0].nodePort}')
# kube-proxy writes its rules within a second or two of the EndpointSlice: a few tries.
get() { ip netns exec "$netns_a" curl -sS --max-time 3 --retry 10 --retry-all-errors --retry-delay 1 "$1"; }
echo "## curl from $pa to the ClusterIP http://$cluster_ip/"
get "http://$cluster_ip/"
for n in "${nodes[@]}"; do
  echo "## curl from $pa to the NodePort of $n http://${node_ip[$n]%/*}:$node_port/"
  get "http://${node_ip[$n]%/*}:$node_port/"
done
echo "## kubectl delete service test-app-worker"
kubectl delete service test-app-worker

echo "## kubectl delete daemonset test-app"
kubectl delete daemonset test-app
for _ in $(seq 300); do
  left=$(kubectl get pods -l app=test-app -o name | wc -l)
  [ "$left" = 0 ] && break
  sleep 0.2
done
[ "$left" = 0 ] || die "the DaemonSet's pods did not go away"
echo "## kubectl get spiderippool (after the DaemonSet is gone)"
kubectl get spiderippool
echo "## done"
