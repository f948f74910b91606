#!/usr/bin/env bash
# The seed scenario on one machine: two nodes in two network zones, one pod per node attached by
# the seed NAD's chain, Debian's real macvlan plugin with "ipam": {"type": "spiderpool"} and then
# `veth` (the coordinator: a veth pair to the node, routes to the node and the Service CIDR
# through it), each pod getting an address from the pool that matches its node, and a ping
# across the zones through a router and to the pod's own node.
#
#   router (netns sp-router)       10.6.0.1/16 on to-cn1, 10.7.0.1/16 on to-wn1, forwarding on
#     | veth                          | veth
#   controller-node-1 (netns)      worker-node-1 (netns)        node-subnet=subnet-6 / subnet-7
#     ens192 = macvlan master         ens192 = macvlan master     one spiderpool-agent each
#     pod test-app-j9ftl (netns)      pod test-app-nkq5h (netns)
#
# Needs root, iproute2, iputils-ping, containernetworking-plugins and the built binaries
# (SPIDERPOOL_BIN_DIR, default target/release). Removes everything it made on exit.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# `run.sh --kubernetes`: the same scenario on a local Kubernetes control plane (simulated
# nodes); `run.sh --real-nodes`: on real nodes (kubelet, containerd, runc), installed by helm.
# `run.sh --kubernetes --smc`: the NAD generated from a SpiderMultusConfig (smc/).
if [ "${1:-}" = --kubernetes ]; then exec "$here/run-kubernetes.sh" "${@:2}"; fi
if [ "${1:-}" = --real-nodes ]; then exec "$here/run-real-nodes.sh"; fi
[ $# = 0 ] || { echo "usage: $0 [--kubernetes [--smc] | --real-nodes]" >&2; exit 2; }
repo=$(cd "$here/../.." && pwd)
manifests=${SPIDERPOOL_SEED_MANIFESTS:-$repo/examples/seed-zones/manifests}
bin_dir=${SPIDERPOOL_BIN_DIR:-$repo/target/release}
cni_plugins=${CNI_PLUGINS_DIR:-/usr/lib/cni}

die() { echo "error: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root: the scenario creates network namespaces"
for b in spiderpool veth spiderpool-agent spiderpoolctl; do
  [ -x "$bin_dir/$b" ] || die "$bin_dir/$b not found: build with 'cargo build --release' or set SPIDERPOOL_BIN_DIR"
done
[ -x "$cni_plugins/macvlan" ] || die "$cni_plugins/macvlan not found: apt-get install containernetworking-plugins"
command -v ping >/dev/null || die "ping not found: apt-get install iputils-ping"

work=$(mktemp -d /tmp/spiderpool-seed.XXXXXX)
datastore="sqlite://$work/spiderpool.db"
router=sp-router
nodes=(controller-node-1 worker-node-1)
declare -A zone=([controller-node-1]=subnet-6 [worker-node-1]=subnet-7)
declare -A gw=([controller-node-1]=10.6.0.1/16 [worker-node-1]=10.7.0.1/16)
declare -A uplink=([controller-node-1]=to-cn1 [worker-node-1]=to-wn1)
declare -A node_ip=([controller-node-1]=10.6.168.71/16 [worker-node-1]=10.7.168.73/16)
# Pod names as the seed document shows them (a DaemonSet controller would pick such suffixes).
declare -A pod=([controller-node-1]=test-app-j9ftl [worker-node-1]=test-app-nkq5h)
declare -A added=()
agent_pids=()

ctl() { "$bin_dir/spiderpoolctl" --datastore "$datastore" "$@"; }

cni_conf() { # the NAD's macvlan plugin, master and agent socket filled in for this node
  cat <<EOF
{"cniVersion": "0.3.1", "name": "macvlan-conf", "type": "macvlan", "master": "ens192", "mode": "bridge",
 "ipam": {"type": "spiderpool", "ipam_unix_socket_path": "$work/$1.sock", "log_file_path": "$work/cni-$1.log"}}
EOF
}

veth_conf() { # the NAD's veth plugin, the agent socket filled in, the result before it given
  cat <<EOF
{"cniVersion": "0.3.1", "name": "macvlan-conf", "type": "veth", "service_cidr": ["10.233.0.0/18"],
 "ipam_unix_socket_path": "$work/$1.sock", "prevResult": ${2:-null}}
EOF
}

plugin() { # plugin COMMAND NODE PROGRAM < config, as a runtime calls it for the node's pod
  local cmd=$1 node=$2 p=${pod[$2]}
  ip netns exec "$node" env -i PATH="$PATH" \
    CNI_COMMAND="$cmd" CNI_CONTAINERID="ctr-$p" CNI_NETNS="/var/run/netns/$p" CNI_IFNAME=eth0 \
    CNI_PATH="$work/cni-bin" CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=$p;K8S_POD_UID=uid-$p" \
    "$3"
}

cni() { # cni COMMAND NODE: the NAD's chain, ADD in order (each given the result before), DEL in reverse
  local cmd=$1 node=$2 result
  if [ "$cmd" = ADD ]; then
    result=$(cni_conf "$node" | plugin ADD "$node" "$cni_plugins/macvlan") || { echo "$result"; return 1; }
    veth_conf "$node" "$result" | plugin ADD "$node" "$work/cni-bin/veth"
  else
    veth_conf "$node" | plugin "$cmd" "$node" "$work/cni-bin/veth" || return 1
    cni_conf "$node" | plugin "$cmd" "$node" "$cni_plugins/macvlan"
  fi
}

cleanup() {
  local rc=$?
  set +e
  for n in "${!added[@]}"; do cni DEL "$n" >/dev/null 2>&1; done
  for pid in "${agent_pids[@]}"; do kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; done
  for n in "${nodes[@]}"; do ip netns del "${pod[$n]}" 2>/dev/null; ip netns del "$n" 2>/dev/null; done
  ip netns del "$router" 2>/dev/null
  if [ $rc -ne 0 ]; then
    echo "--- agent and plugin logs ---" >&2
    tail -n 20 "$work"/*.log >&2 2>/dev/null
  fi
  rm -rf "$work"
  exit $rc
}
trap cleanup EXIT

mkdir -p "$work/cni-bin"
ln -s "$cni_plugins/macvlan" "$work/cni-bin/macvlan"
ln -s "$bin_dir/spiderpool" "$work/cni-bin/spiderpool"
ln -s "$bin_dir/veth" "$work/cni-bin/veth"

echo "## network: router $router, nodes ${nodes[*]}"
ip netns add "$router"
ip -n "$router" link set lo up
ip netns exec "$router" sysctl -qw net.ipv4.ip_forward=1
for n in "${nodes[@]}"; do
  ip netns add "$n"
  ip -n "$n" link set lo up
  ip link add ens192 netns "$n" type veth peer name "${uplink[$n]}" netns "$router"
  ip -n "$n" addr add "${node_ip[$n]}" dev ens192
  ip -n "$n" link set ens192 up
  ip -n "$router" addr add "${gw[$n]}" dev "${uplink[$n]}"
  ip -n "$router" link set "${uplink[$n]}" up
  ip netns add "${pod[$n]}"
  ip -n "${pod[$n]}" link set lo up
done

echo "## objects: the seed manifests, unchanged"
for f in "$manifests"/0*.yaml; do ctl apply -f "$f"; done
for n in "${nodes[@]}"; do
  # The pods the DaemonSet controller would create, one per node, from its template.
  ctl apply -f - <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: ${pod[$n]}
  namespace: default
  uid: uid-${pod[$n]}
  labels: {app: test-app}
  annotations:
    ipam.spidernet.io/ippool: |-
      {
        "ipv4": ["test-ippool-6", "test-ippool-7"]
      }
    v1.multus-cni.io/default-network: kube-system/macvlan-conf
  ownerReferences:
  - {apiVersion: apps/v1, kind: DaemonSet, name: test-app, uid: uid-test-app, controller: true}
spec:
  nodeName: $n
  containers: [{name: test-app, image: nginx}]
EOF
done

echo "## agents"
for n in "${nodes[@]}"; do
  ip netns exec "$n" "$bin_dir/spiderpool-agent" --node-name "$n" --node-labels "node-subnet=${zone[$n]}" \
    --socket "$work/$n.sock" --datastore "$datastore" 2>"$work/agent-$n.log" &
  agent_pids+=($!)
done
for n in "${nodes[@]}"; do
  for _ in $(seq 100); do [ -S "$work/$n.sock" ] && break; sleep 0.05; done
  [ -S "$work/$n.sock" ] || die "agent of $n did not start: $(cat "$work/agent-$n.log")"
  echo "spiderpool-agent serving $n on $work/$n.sock"
done

echo "## pods: ADD through /usr/lib/cni/macvlan with ipam spiderpool, then veth"
declare -A ip=()
for n in "${nodes[@]}"; do
  result=$(cni ADD "$n") || die "ADD for ${pod[$n]} failed: $result"
  added[$n]=1
  ip[$n]=$(ip -n "${pod[$n]}" -4 -o addr show dev eth0 | awk '{split($4, a, "/"); print a[1]}')
  ip -n "${pod[$n]}" route show default | grep -q . || die "${pod[$n]} has no default route"
done
printf '%-16s %-14s %s\n' NAME IP NODE
for n in "${nodes[@]}"; do printf '%-16s %-14s %s\n' "${pod[$n]}" "${ip[$n]}" "$n"; done

echo "## spiderpoolctl get spidersubnet"
ctl get subnet
echo "## spiderpoolctl get spiderippool"
ctl get ippool
echo "## spiderpoolctl get spiderendpoint"
ctl get endpoint

a=controller-node-1 b=worker-node-1
echo "## ping from ${pod[$a]} (${ip[$a]}) to ${pod[$b]} (${ip[$b]})"
ip netns exec "${pod[$a]}" ping -c 2 -W 2 "${ip[$b]}"
echo "## routes in ${pod[$a]} (veth0 leads to its node)"
ip -n "${pod[$a]}" route
echo "## ping from ${pod[$a]} to its node (${node_ip[$a]%/*}) through veth0"
ip netns exec "${pod[$a]}" ping -c 2 -W 2 "${node_ip[$a]%/*}"

echo "## pods: DEL"
for n in "${nodes[@]}"; do
  cni DEL "$n" || die "DEL for ${pod[$n]} failed"
  unset "added[$n]"
done
echo "## spiderpoolctl get spiderippool (after DEL)"
ctl get ippool
echo "## done"
