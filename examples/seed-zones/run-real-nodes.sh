#!/usr/bin/env bash
# The seed scenario on real nodes (`run.sh --real-nodes`): the local control plane and two real
# nodes — kubelet, Debian's containerd and runc, and kube-proxy, each node in its own network and
# mount namespaces on its zone's segment — with the project installed the way a user installs
# it: its image (scripts/image.sh, no docker) imported into each node's containerd, then
# `helm install` of deploy/helm/spiderpool. The agent DaemonSet's init container puts
# `spiderpool`, `coordinator` and `veth` into each node's /opt/cni/bin; the controller's webhooks
# are reached through its Service. The seed's manifests are applied unchanged; the
# DaemonSet's `nginx` is a busybox HTTP server answering with its pod's name (imported as
# docker.io/library/nginx:latest).
#
#   root netns: etcd, kube-apiserver, controller-manager, scheduler   (172.30.0.1)
#     | veth
#   router (sprc-r)                10.6.0.1/16, 10.7.0.1/16, forwarding on
#     | veth                          | veth
#   controller-node-1 (10.6.0.2)   worker-node-1 (10.7.0.2)       node-subnet=subnet-6 / -7
#     ens192 = macvlan master         ens192 = macvlan master
#     containerd, kubelet, kube-proxy containerd, kubelet, kube-proxy
#
# Multus is not to be had here: each node's CNI network (/etc/cni/net.d) is the NAD's chain,
# macvlan with "ipam": {"type": "spiderpool"} then `veth`, which is what Multus would delegate to
# for `v1.multus-cni.io/default-network: kube-system/macvlan-conf`.
#
# Needs root, containerd, runc, busybox-static, iproute2, iptables, util-linux, openssl, Go (the
# first build of the control plane with kubelet and of helm, cached after) and the built
# binaries (SPIDERPOOL_BIN_DIR, default target/release; spiderpool-real-cluster is test
# infrastructure from crates/spiderpool-testkit). Removes everything it made on exit.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
manifests=${SPIDERPOOL_SEED_MANIFESTS:-$repo/examples/seed-zones/manifests}
bin_dir=${SPIDERPOOL_BIN_DIR:-$repo/target/release}

die() { echo "error: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root: the scenario creates network namespaces and real nodes"
for b in spiderpool-agent spiderpool-controller spiderpoolctl spiderpool-real-cluster; do
  [ -x "$bin_dir/$b" ] || die "$bin_dir/$b not found: build with 'cargo build --release' or set SPIDERPOOL_BIN_DIR"
done
for t in containerd runc ctr nsenter unshare iptables; do
  command -v "$t" >/dev/null || die "$t not found: run scripts/setup-debian.sh"
done
[ -x /bin/busybox ] || die "/bin/busybox not found: apt-get install busybox-static"

echo "## control plane binaries with kubelet, and helm (built once, then cached)"
SPIDERPOOL_KUBE_BIN=${SPIDERPOOL_KUBE_BIN:-$("$repo/scripts/kube-tools.sh" | tail -1)}
export SPIDERPOOL_KUBE_BIN
[ -x "$SPIDERPOOL_KUBE_BIN/kubelet" ] || die "no kubelet in $SPIDERPOOL_KUBE_BIN: rerun scripts/kube-tools.sh"
helm_bin=${SPIDERPOOL_HELM_BIN:-$("$repo/scripts/helm-tool.sh" | tail -1)}
echo "$SPIDERPOOL_KUBE_BIN"

work=$(mktemp -d /tmp/spiderpool-seed-real.XXXXXX)
cluster_pid=

kubectl() { "$SPIDERPOOL_KUBE_BIN/kubectl" --kubeconfig "$work/admin.kubeconfig" "$@"; }
helm() { "$helm_bin/helm" --kubeconfig "$work/admin.kubeconfig" "$@"; }

cleanup() {
  local rc=$?
  set +e
  if [ $rc -ne 0 ]; then
    echo "--- cluster log ---" >&2
    tail -n 30 "$work/cluster.log" >&2 2>/dev/null
    kubectl get pods -A -o wide >&2 2>/dev/null
    kubectl -n kube-system logs -l app.kubernetes.io/name=spiderpool --all-containers --prefix --tail=20 >&2 2>/dev/null
    kubectl -n kube-system logs -l app.kubernetes.io/component=spiderpool-agent --all-containers --prefix --tail=20 >&2 2>/dev/null
  fi
  if [ -n "$cluster_pid" ]; then kill "$cluster_pid" 2>/dev/null; wait "$cluster_pid" 2>/dev/null; fi
  rm -rf "$work"
  exit $rc
}
trap cleanup EXIT

echo "## images (scripts/image.sh: OCI archives, no docker or registry)"
profile=release; case "$bin_dir" in */debug) profile=dev ;; esac
"$repo/scripts/image.sh" --bin-dir "$bin_dir" --profile "$profile" \
  --name ghcr.io/spiderpool-rs/spiderpool:seed --out "$work/spiderpool.tar" >/dev/null
mkdir -p "$work/nginx-root/tmp"
"$repo/scripts/image.sh" --root "$work/nginx-root" --busybox --name docker.io/library/nginx:latest \
  --cmd '["/bin/sh","-c","mkdir -p /www && hostname > /www/index.html && exec httpd -f -p 80 -h /www"]' \
  --out "$work/nginx.tar" >/dev/null
ls -1 "$work"/*.tar

# The NAD's chain, from its manifest: every node's CNI network.
awk '/config: \|-/{on=1; next} on{sub(/^    /, ""); print}' "$manifests/04-macvlan-nad.yaml" >"$work/node.conflist"

echo "## control plane and real nodes (kubelet, containerd, runc, kube-proxy)"
"$bin_dir/spiderpool-real-cluster" --dir "$work" --cni-conf "$work/node.conflist" \
  --image "$work/spiderpool.tar" --image "$work/nginx.tar" \
  --node controller-node-1,10.6.0.1/16,node-subnet=subnet-6 \
  --node worker-node-1,10.7.0.1/16,node-subnet=subnet-7 >"$work/cluster.out" 2>"$work/cluster.log" &
cluster_pid=$!
for _ in $(seq 900); do
  grep -q ready "$work/cluster.out" 2>/dev/null && break
  kill -0 "$cluster_pid" 2>/dev/null || die "the nodes did not start: $(tail -n 30 "$work/cluster.log")"
  sleep 0.2
done
grep -q ready "$work/cluster.out" || die "the nodes did not start in time"
kubectl get nodes -o wide -L node-subnet

echo "## helm install spiderpool"
helm install spiderpool "$repo/deploy/helm/spiderpool" --namespace kube-system \
  --set image.repository=ghcr.io/spiderpool-rs/spiderpool --set image.tag=seed
kubectl -n kube-system rollout status daemonset/spiderpool-agent --timeout=300s
kubectl -n kube-system rollout status deployment/spiderpool-controller --timeout=300s
for _ in $(seq 300); do
  phase=$(kubectl get spidercoordinator default -o jsonpath='{.status.phase}' 2>/dev/null || true)
  [ "$phase" = Synced ] && break
  sleep 0.2
done
[ "$phase" = Synced ] || die "the SpiderCoordinator default is not Synced: $(kubectl get spidercoordinator -o yaml)"
kubectl -n kube-system get pods -o wide
echo "## the plugins the agent's init container installed on controller-node-1"
kubectl -n kube-system exec daemonset/spiderpool-agent -c agent -- ls /host/opt/cni/bin | grep -E '^(spiderpool|coordinator|veth)$'

echo "## kubectl apply: the seed's manifests"
kubectl apply -f "$manifests/02-subnets.yaml"
kubectl apply -f "$manifests/03-ippools.yaml"
kubectl apply -f "$manifests/04-macvlan-nad.yaml"
kubectl apply -f "$manifests/05-daemonset.yaml"

echo "## waiting for the DaemonSet's pods"
kubectl rollout status daemonset/test-app --timeout=300s

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
echo "## kubectl exec $pa -- ping $pb ($ipb) from $ipa"
kubectl exec "$pa" -- ping -c 2 -W 2 "$ipb"

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
cluster_ip=$(kubectl get service test-app-worker -o jsonpath='{.spec.clusterIP}')
node_port=$(kubectl get service test-app-worker -o jsonpath='{.spec.ports[0].nodePort}')
# kube-proxy writes its rules within a second or two of the EndpointSlice: a few tries.
get() {
  local i
  for i in $(seq 15); do
    kubectl exec "$pa" -- timeout 5 wget -qO- "$1" 2>/dev/null && return 0
    sleep 1
  done
  die "no answer from $1"
}
echo "## wget from $pa to the ClusterIP http://$cluster_ip/"
get "http://$cluster_ip/"
for n in controller-node-1:10.6.0.2 worker-node-1:10.7.0.2; do
  echo "## wget from $pa to the NodePort of ${n%%:*} http://${n#*:}:$node_port/"
  get "http://${n#*:}:$node_port/"
done

echo "## kubectl delete service test-app-worker, daemonset test-app"
kubectl delete service test-app-worker
kubectl delete daemonset test-app --wait=true
for _ in $(seq 300); do
  left=$(kubectl get pods -l app=test-app -o name | wc -l)
  [ "$left" = 0 ] && break
  sleep 0.2
done
[ "$left" = 0 ] || die "the DaemonSet's pods did not go away"
for _ in $(seq 100); do
  used=$(kubectl get spiderippool -o jsonpath='{range .items[*]}{.status.allocatedIPCount}{"\n"}{end}' | sort -u | tr -d '\n')
  [ "$used" = 0 ] && break
  sleep 0.2
done
echo "## kubectl get spiderippool (after the DaemonSet is gone)"
kubectl get spiderippool

echo "## helm uninstall spiderpool"
helm uninstall spiderpool --namespace kube-system --wait --timeout 300s
for _ in $(seq 300); do
  left=$(kubectl -n kube-system get pods -l app.kubernetes.io/component=spiderpool-agent -o name | wc -l)
  [ "$left" = 0 ] && break
  sleep 0.2
done
echo "## done"
