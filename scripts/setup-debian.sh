#!/usr/bin/env bash
# Installs the system packages the build, examples and tests use on Debian 12, each named here
# (nothing comes in as a Recommends: apt runs with --no-install-recommends):
#   protobuf-compiler, libprotobuf-dev  the etcd client's build script runs protoc, which reads
#                                       google/protobuf/*.proto from libprotobuf-dev
#   containernetworking-plugins         the reference CNI plugins (/usr/lib/cni)
#   iproute2, iputils-ping              network namespaces and ping for the examples and tests
#   openssl                             the test control plane's certificates
#   iptables                            kube-proxy's iptables mode on the simulated nodes
#   curl                                the Kubernetes example's requests to its Service
#   util-linux                          setpriv: the tests run the plugin as an untrusted user
#   strace                              scripts/check-build-packages.sh traces the build with it
#   containerd, runc                    the real nodes' container runtime (one containerd per node,
#                                       started by the tests; the package's own service is not used)
#   conntrack                           kube-proxy clears UDP conntrack entries with it
#   busybox-static                      the image's shell and tools (sh, install, ping, wget,
#                                       httpd), static so it runs in any image
# Idempotent: installs only what is missing. `--list` prints the names and installs nothing
# (scripts/check-build-packages.sh reads them).
set -euo pipefail
packages=(
  protobuf-compiler
  libprotobuf-dev
  containernetworking-plugins
  iproute2
  iputils-ping
  openssl
  iptables
  curl
  util-linux
  strace
  containerd
  runc
  conntrack
  busybox-static
)
if [ "${1:-}" = --list ]; then
  printf '%s\n' "${packages[@]}"
  exit 0
fi
sudo=""
[ "$(id -u)" = 0 ] || sudo=sudo
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  $sudo apt-get update
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends "${missing[@]}"
fi
