#!/usr/bin/env bash
# Fuzzes what strangers feed Spiderpool (fuzz/fuzz_targets: the CNI call's environment and
# stdin, pod and namespace annotations, manifests) with cargo-fuzz and libFuzzer, each target
# for SECONDS (default 60), and fails if any of them crashes, panics, leaks past 2 GB or takes
# more than 10 s on one input.
#
#   scripts/fuzz.sh [SECONDS]
#
# Each run starts from the committed corpus (fuzz/corpus/<target>, read only) and from what
# earlier runs on this machine found (fuzz/target/corpus/<target>, where new inputs go). A
# failing input is kept in fuzz/artifacts/<target>/ and its log in fuzz/target/logs/<target>.log;
# replay it with `cd fuzz && cargo +nightly fuzz run <target> <file>`. To grow the committed
# corpus, copy inputs in and minimise: `cargo +nightly fuzz cmin <target>`.
set -euo pipefail
seconds=${1:-60}
cargo_fuzz_version=0.13.2
cd "$(dirname "$0")/../fuzz"
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TERM_COLOR=never

rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
if [ "$(cargo +nightly fuzz --version 2>/dev/null)" != "cargo-fuzz $cargo_fuzz_version" ]; then
  cargo +nightly install --locked cargo-fuzz --version "$cargo_fuzz_version"
fi
# cargo fuzz has no --locked: check the committed lock file is complete before it is used.
if ! cargo +nightly metadata --locked --format-version 1 >/dev/null; then
  echo "fuzz/Cargo.lock is out of date: run 'cargo +nightly fetch' in fuzz/ and commit it" >&2
  exit 1
fi

# Release with debug assertions (overflow checks) and AddressSanitizer, as cargo fuzz defaults.
build=(-O --debug-assertions)
cargo +nightly fuzz build "${build[@]}"

mkdir -p target/logs
failed=()
for t in $(cargo +nightly fuzz list); do
  mkdir -p "target/corpus/$t"
  log="target/logs/$t.log"
  echo "== fuzz $t for ${seconds}s"
  if cargo +nightly fuzz run "${build[@]}" "$t" "target/corpus/$t" "corpus/$t" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    >"$log" 2>&1; then
    grep -E '^(Done|stat::number_of_executed_units|stat::peak_rss_mb)' "$log" || true
  else
    echo "!! $t failed; the end of $log:" >&2
    tail -n 60 "$log" >&2
    failed+=("$t")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz targets failed: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
  exit 1
fi
