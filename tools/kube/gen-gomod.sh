#!/usr/bin/env bash
# Regenerates go.mod/go.sum for a Kubernetes release: requires k8s.io/kubernetes at that tag and
# replaces every staging module it lists with the published v0.MINOR.PATCH tag (Go ignores the
# replace lines of a dependency, so a consumer must repeat them). Run by hand when moving to
# another release; scripts/kube-tools.sh only builds what is committed.
#   tools/kube/gen-gomod.sh v1.36.3
set -euo pipefail
cd "$(dirname "$0")"
k8s="$1"; staging="v0.${k8s#v1.}"
export GOTOOLCHAIN=local
rm -f go.mod go.sum
go mod init github.com/spiderpool-rs/tools/kube >/dev/null 2>&1
modfile=$(go mod download -json "k8s.io/kubernetes@${k8s}" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')
go mod edit -go=1.26.0 -require="k8s.io/kubernetes@${k8s}"
sed -n 's#^[[:space:]]*\(k8s\.io/[A-Za-z0-9._-]*\)[[:space:]]*=>[[:space:]]*\./staging/.*#\1#p' "$modfile" \
  | sort -u | while read -r m; do go mod edit -replace="${m}=${m}@${staging}"; done
go mod tidy
