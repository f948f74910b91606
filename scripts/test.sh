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
cargo test --workspace --locked
