#!/usr/bin/env bash
# Builds helm (the release pinned below) from its Go module into a cache outside the checkout,
# for the chart's tests (`helm lint`, `helm template`); no prebuilt helm can be downloaded on the
# project's machines. Idempotent: a cached build is reused. Prints the bin directory as its last
# line.
#   scripts/helm-tool.sh            # cache in ${SPIDERPOOL_HELM_CACHE:-~/.cache/spiderpool-helm}
set -euo pipefail
version=v4.3.2
export GOTOOLCHAIN=local CGO_ENABLED=0
export PATH="$PATH:/usr/local/go/bin"
cache=${SPIDERPOOL_HELM_CACHE:-$HOME/.cache/spiderpool-helm}
bin="$cache/$version/bin"
if [ ! -x "$bin/helm" ]; then
  echo "building helm $version into $bin (cold: a few minutes on 2 cores)" >&2
  mkdir -p "$bin"
  # Go's build and module caches go with the build (nothing reads them again).
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  export GOCACHE="$tmp/go-build" GOMODCACHE="$tmp/go-mod" GOFLAGS=-modcacherw
  GOBIN="$bin" go install -trimpath \
    -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=$version" \
    "helm.sh/helm/v4/cmd/helm@$version"
fi
echo "$bin"
