#!/usr/bin/env bash
# Proves that building the workspace uses no Debian package beyond what a fresh machine image
# has (scripts/base-image-packages.txt) and what scripts/setup-debian.sh installs, with the
# packages those depend on. A package that a build script or the linker only finds because it
# happens to be on this machine (libprotobuf-dev, say, once pulled in as a Recommends) fails
# the check by name.
#
#   scripts/check-build-packages.sh [CARGO BUILD ARGS]   (default: --workspace --all-targets)
#
# It builds from scratch, in a temporary target directory so every build script and link
# really runs, under `strace -f` (execve and open calls only, filtered in the kernel), then
# maps each file executed or opened outside the Rust toolchain, the workspace and the
# temporary directories to its package with `dpkg -S`. The whole workspace, all targets, is
# built (about 90-130 s of a 2-core machine, against some 35 s for only the crates whose build
# scripts call C tools, etcd-client and libsqlite3-sys): the final links are where a library a
# build script asks for is looked up, and a new crate with a build script is covered without
# editing this file.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd -P)
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TERM_COLOR=never
./scripts/setup-debian.sh # strace among them
[ $# -gt 0 ] || set -- --workspace --all-targets

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/tmp"
cargo fetch --locked --quiet # downloads stay out of the trace

start=$SECONDS
# -y prints each opened descriptor's resolved path; -z keeps successful calls only.
CARGO_TARGET_DIR="$work/target" TMPDIR="$work/tmp" \
  strace -f --seccomp-bpf -qq -z -y -e signal=none -o "$work/trace" \
  -e trace=execve,execveat,open,openat,openat2 \
  cargo build --locked --quiet "$@"
echo "traced cargo build $*: $((SECONDS - start)) s, $(wc -l <"$work/trace") calls"

# Files: what execve ran (as named) and what open returned (already resolved by -y), leaving
# out directories; each as "named<TAB>resolved", kept when the resolved one is outside the
# toolchain, the workspace and the temporary and virtual file systems.
skip="^($root|$work|${CARGO_HOME:-$HOME/.cargo}|${RUSTUP_HOME:-$HOME/.rustup}|/tmp|/var/tmp|/proc|/sys|/dev|/run)(/|$)"
{
  sed -nE 's/^[0-9]+ +execve(at)?\((AT_FDCWD<[^>]*>, )?"([^"]+)".*/\3/p' "$work/trace"
  grep -v O_DIRECTORY "$work/trace" | sed -nE 's/^[0-9]+ +open(at2?)?\(.* = [0-9]+<([^>]+)>$/\2/p'
} | grep '^/' | sort -u | while IFS= read -r f; do
  r=$(realpath -e -- "$f" 2>/dev/null) || continue
  [ -d "$r" ] || [[ $r =~ $skip ]] || printf '%s\t%s\n' "$f" "$r"
done >"$work/files"

# Debian 12 registers many files under /bin, /sbin and /lib although they live in /usr: each
# path is asked in both spellings.
usr_alias() { sed -E 's#^/usr/(bin|sbin|lib|lib32|lib64|libx32)/#/\1/#'; }
{ cut -f1 "$work/files"; cut -f2 "$work/files"; } | sort -u >"$work/paths"
usr_alias <"$work/paths" | cat - "$work/paths" | sort -u |
  xargs -r -d '\n' dpkg -S -- 2>/dev/null | grep -v '^diversion by' |
  sed -E 's/^(.*): (\/.*)$/\2\t\1/' >"$work/owned" || true

# "package<TAB>file" for every package a file belongs to (by its name, its resolved path or
# their /usr spellings); "-<TAB>file" for a file of no package.
awk -F'\t' '
  function alias(p) { return p ~ /^\/usr\/(bin|sbin|lib|lib32|lib64|libx32)\// ? substr(p, 5) : p }
  NR == FNR { owner[$1] = $2; next }
  {
    pkgs = ""
    for (i = 1; i <= 2; i++) {
      if ($i in owner) pkgs = pkgs ", " owner[$i]
      if (alias($i) in owner) pkgs = pkgs ", " owner[alias($i)]
    }
    if (pkgs == "") { print "-\t" $2; next }
    n = split(substr(pkgs, 3), p, ", ")
    for (j = 1; j <= n; j++) { sub(/:[a-z0-9]+$/, "", p[j]); print p[j] "\t" $2 }
  }' "$work/owned" "$work/files" | sort -u >"$work/used"
grep -v $'^-\t' "$work/used" | sort -u -t$'\t' -k1,1 >"$work/packages" || true
grep $'^-\t' "$work/used" | cut -f2 >"$work/unowned" || true

# Allowed: the image's packages, and the setup script's with everything they depend on.
grep -v '^#' scripts/base-image-packages.txt | sort -u >"$work/base"
mapfile -t setup < <(./scripts/setup-debian.sh --list)
apt-cache depends --recurse --installed --no-recommends --no-suggests --no-conflicts \
  --no-breaks --no-replaces --no-enhances "${setup[@]}" | grep -E '^[a-z0-9]' | sed 's/:[a-z0-9]*$//' |
  cat - <(printf '%s\n' "${setup[@]}") | sort -u >"$work/setup"

echo "packages the build used ($(wc -l <"$work/packages")), each with a file of it:"
bad=()
while IFS=$'\t' read -r pkg file; do
  if grep -qxF "$pkg" "$work/base"; then
    from="base image"
  elif grep -qxF "$pkg" "$work/setup"; then
    from="scripts/setup-debian.sh"
  else
    from="NEITHER"
    bad+=("$pkg")
  fi
  printf '  %-28s %-24s %s\n' "$pkg" "$from" "$file"
done <"$work/packages"
# A file of no package is fine where the machine makes it (/etc: caches, certificates,
# settings; home directories); a program or library of no package was installed by hand.
echo "files of no package:"
while IFS= read -r f; do
  case $f in
  /etc/* | "$HOME"/*) printf '  %s (made on the machine)\n' "$f" ;;
  *)
    printf '  %s INSTALLED BY HAND\n' "$f"
    bad+=("$f")
    ;;
  esac
done <"$work/unowned"
if [ ${#bad[@]} -gt 0 ]; then
  echo "FAIL: the build uses what neither the base image has nor scripts/setup-debian.sh installs: ${bad[*]}" >&2
  exit 1
fi
echo "OK: every package the build uses is in the base image or installed by scripts/setup-debian.sh"
