#!/usr/bin/env bash
# Builds the test control plane's binaries — etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kube-proxy and kubectl of the Kubernetes release pinned in tools/kube/go.mod —
# from their Go modules into a cache outside the checkout, keyed by that release and the
# recipe's contents.
# Idempotent: a cached build is reused. Prints the bin directory as its last line.
#   scripts/kube-tools.sh            # cache in ${SPIDERPOOL_KUBE_CACHE:-~/.cache/spiderpool-kube}
set -euo pipefail
cd "$(dirname "$0")/../tools/kube"
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=readonly
k8s=$(sed -n 's#^[[:space:]]*k8s.io/kubernetes v\(1\.[0-9.]*\).*#v\1#p' go.mod | head -n 1)
[ -n "$k8s" ] || { echo "tools/kube/go.mod requires no k8s.io/kubernetes release" >&2; exit 1; }
key=$(cat go.mod go.sum main.go | sha256sum | cut -c1-16)
cache=${SPIDERPOOL_KUBE_CACHE:-$HOME/.cache/spiderpool-kube}
bin="$cache/$k8s-$key/bin"
components=(etcd kube-apiserver kube-controller-manager kube-scheduler kube-proxy kubelet kubectl)
if [ ! -x "$bin/kube-plane" ]; then
  echo "building the control plane of Kubernetes $k8s into $bin (cold: tens of minutes on 2 cores)" >&2
  minor=${k8s#v1.}; minor=${minor%%.*}
  date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  ld="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld="$ld -X $p.gitVersion=$k8s -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean -X $p.buildDate=$date"
  done
  tmp="$cache/.build-$$"
  mkdir -p "$tmp"
  trap 'rm -rf "$tmp"' EXIT
  # Go's build and module caches go with the build (gigabytes that nothing reads again).
  export GOCACHE="$tmp/go-build" GOMODCACHE="$tmp/go-mod" GOFLAGS="$GOFLAGS -modcacherw"
  go build -trimpath -ldflags "$ld" -o "$tmp/kube-plane" .
  mkdir -p "$bin"
  mv "$tmp/kube-plane" "$bin/kube-plane"
fi
for c in "${components[@]}"; do
  ln -sfn kube-plane "$bin/$c"
done
echo "$bin"
