#!/usr/bin/env bash
# Installs the system packages the build, examples and tests use on Debian 12: protoc (the etcd
# client's build needs it), the reference CNI plugins (/usr/lib/cni), iproute2 for network
# namespaces, ping, and etcd (the tests start their own servers on loopback ports).
set -euo pipefail
packages=(protobuf-compiler containernetworking-plugins iproute2 iputils-ping etcd-server)
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
