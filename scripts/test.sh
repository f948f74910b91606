#!/usr/bin/env bash
# Runs the whole test suite: installs its system packages, builds every binary, and runs unit,
# conformance, CNI and end-to-end tests. Run as root so the network-namespace tests run too.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-debian.sh
if [ "$(id -u)" = 0 ]; then
  # As root nothing may skip: a missing prerequisite fails the run.
  export SPIDERPOOL_E2E_REQUIRED=1
fi
# The control plane of the Kubernetes-mode tests, and the etcd 3.6 of the etcd-mode tests, built
# from their Go modules (cached outside the checkout after the first build).
SPIDERPOOL_KUBE_BIN=$(./scripts/kube-tools.sh | tail -n 1)
export SPIDERPOOL_KUBE_BIN
# helm, for the chart's tests, likewise.
SPIDERPOOL_HELM_BIN=$(./scripts/helm-tool.sh | tail -n 1)
export SPIDERPOOL_HELM_BIN
# The tests drive the real binaries: build them all first (cargo test alone builds only the
# binaries of packages that have integration tests).
cargo build --workspace --bins --locked
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$log"
# The suites built on sandboxes (allocation rules, agents, CNI, CLI) once more, every sandbox on
# an etcd of its own: the agents then follow a watch instead of checking SQLite's revision. And
# once more with every sandbox on a Kubernetes control plane of its own (etcd and
# kube-apiserver, the CRDs installed): pools, endpoints and pods are API objects, the agents
# read and write them through the API server. One `--workspace` invocation each, so the
# features resolve as in the run above and nothing is built again.
suites=(--test rulebook --test agents --test cni --test coordinator --test ctl)
for datastore in etcd kubernetes; do
  SPIDERPOOL_TEST_DATASTORE=$datastore cargo test --workspace --locked --no-fail-fast "${suites[@]}" 2>&1 | tee -a "$log"
done
# One closing line for the whole run (cargo prints one per test binary, the last often empty).
awk '/^test result:/ { p += $4; f += $6 } END { printf "%d passed, %d failed\n", p, f }' "$log"
