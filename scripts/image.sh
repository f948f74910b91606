#!/usr/bin/env bash
# Builds an OCI image archive without docker or a registry: `ctr -n k8s.io images import FILE`
# loads it into containerd, `skopeo copy oci-archive:FILE docker://REGISTRY/REF` pushes it,
# `docker load -i FILE` (docker 25+) loads it.
#
# The project's image (the layout the Dockerfile makes too):
#   scripts/image.sh [--bin-dir DIR] [--profile release|dev] [--name REF] [--out FILE]
#     /usr/local/bin/spiderpool-agent, spiderpool-controller, spiderpoolctl  from --bin-dir
#         (default target/release), with the shared libraries they load (from ldd)
#     /usr/local/bin/spiderpool, coordinator, veth   the CNI plugins, built here statically
#         (glibc, +crt-static) so that the copies the agent's init container installs on a
#         node run whatever that node's libc is
#     /bin/busybox and its applets (sh, install, ping, wget, …)  from Debian's busybox-static
#   REF defaults to ghcr.io/spiderpool-rs/spiderpool:0.1.0, FILE to target/spiderpool-image.tar.
#
# Any root filesystem as a one-layer image (the tests' pause and HTTP images):
#   scripts/image.sh --root DIR --name REF --out FILE [--cmd JSON-ARRAY] [--busybox]
#     --busybox adds /bin/busybox and its applets to the root first.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

name=ghcr.io/spiderpool-rs/spiderpool:0.1.0
out=$repo/target/spiderpool-image.tar
bin_dir=$repo/target/release
profile=release
root=""
cmd='[]'
busybox=false
while [ $# -gt 0 ]; do
  case "$1" in
    --name) name=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --bin-dir) bin_dir=$2; shift 2 ;;
    --profile) profile=$2; shift 2 ;;
    --root) root=$2; shift 2 ;;
    --cmd) cmd=$2; shift 2 ;;
    --busybox) busybox=true; shift ;;
    *) echo "image.sh: unknown argument $1 (see the comment at the top)" >&2; exit 2 ;;
  esac
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Copies FILE to the same path under $1, and the shared libraries it loads.
with_libs() {
  local dest=$1 file=$2
  ldd "$file" 2>/dev/null | awk '/=> \//{print $3} /^[ \t]*\//{print $1}' | while read -r lib; do
    mkdir -p "$dest$(dirname "$lib")"
    cp -L "$lib" "$dest$lib"
  done
}

add_busybox() {
  local dest=$1 bb=/bin/busybox
  [ -x "$bb" ] && ! ldd "$bb" >/dev/null 2>&1 || {
    echo "image.sh: a static /bin/busybox is needed (apt-get install busybox-static)" >&2; exit 1; }
  mkdir -p "$dest/bin"
  cp "$bb" "$dest/bin/busybox"
  for applet in $("$bb" --list); do
    [ -e "$dest/bin/$applet" ] || ln -s busybox "$dest/bin/$applet"
  done
}

if [ -z "$root" ]; then
  root=$work/root
  mkdir -p "$root/usr/local/bin" "$root/tmp"
  chmod 1777 "$root/tmp"
  for b in spiderpool-agent spiderpool-controller spiderpoolctl; do
    [ -x "$bin_dir/$b" ] || { echo "image.sh: $bin_dir/$b not found: cargo build --release (or --bin-dir)" >&2; exit 1; }
    cp "$bin_dir/$b" "$root/usr/local/bin/"
    # Debug information stays out of the image (a debug build's binaries are mostly that).
    if command -v strip >/dev/null; then strip --strip-debug "$root/usr/local/bin/$b"; fi
    with_libs "$root" "$bin_dir/$b"
  done
  # The plugins, static: they run on the node, not in the image.
  flag=--release; [ "$profile" = release ] || flag=""
  dir=$repo/target/static
  RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR=$dir \
    cargo build --locked --quiet $flag -p spiderpool-cni --bins --target x86_64-unknown-linux-gnu
  sub=debug; [ "$profile" = release ] && sub=release
  for p in spiderpool coordinator veth; do
    cp "$dir/x86_64-unknown-linux-gnu/$sub/$p" "$root/usr/local/bin/"
    if command -v strip >/dev/null; then strip --strip-debug "$root/usr/local/bin/$p"; fi
  done
  add_busybox "$root"
  cmd='["/usr/local/bin/spiderpool-agent"]'
elif $busybox; then
  cp -a "$root" "$work/root"
  root=$work/root
  add_busybox "$root"
fi

blobs=$work/layout/blobs/sha256
mkdir -p "$blobs"
digest() { sha256sum "$1" | cut -d' ' -f1; }
# One layer: the root, owned by root, in a stable order.
tar --numeric-owner --owner=0 --group=0 --sort=name --mtime=@0 -C "$root" -cf "$work/layer.tar" .
diff_id=$(digest "$work/layer.tar")
gzip -n -c "$work/layer.tar" > "$work/layer.tar.gz"
layer=$(digest "$work/layer.tar.gz")
layer_size=$(stat -c %s "$work/layer.tar.gz")
mv "$work/layer.tar.gz" "$blobs/$layer"

printf '{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/local/bin:/usr/bin:/bin"],"Cmd":%s,"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]},"history":[{"created_by":"scripts/image.sh"}]}' \
  "$cmd" "$diff_id" > "$work/config.json"
config=$(digest "$work/config.json")
config_size=$(stat -c %s "$work/config.json")
mv "$work/config.json" "$blobs/$config"

printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:%s","size":%s}]}' \
  "$config" "$config_size" "$layer" "$layer_size" > "$work/manifest.json"
manifest=$(digest "$work/manifest.json")
manifest_size=$(stat -c %s "$work/manifest.json")
mv "$work/manifest.json" "$blobs/$manifest"

tag=${name##*:}
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"%s"}}]}' \
  "$manifest" "$manifest_size" "$name" "$tag" > "$work/layout/index.json"
printf '{"imageLayoutVersion":"1.0.0"}' > "$work/layout/oci-layout"

mkdir -p "$(dirname "$out")"
tar --numeric-owner --owner=0 --group=0 --sort=name --mtime=@0 -C "$work/layout" -cf "$out.tmp" .
mv "$out.tmp" "$out"
echo "$out"
