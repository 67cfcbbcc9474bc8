#!/bin/sh
# Builds the tcpwait container image from a built binary, pulling nothing (FROM scratch).
#
#   deploy/container/build-image.sh BINARY TAG
#   e.g. deploy/container/build-image.sh target/release/tcpwait registry.example.com/tcpwait:0.1.0
#
# `cargo xtask image` builds the release binary and runs this. The image holds the binary at
# /usr/local/bin/tcpwait, the shared libraries `ldd` names for it (copied from this host, at
# the paths the binary's loader looks for them) and this host's CA bundle
# (/etc/ssl/certs/ca-certificates.crt, for https:// receivers). TOOL=buildah uses buildah
# instead of podman. Push with `podman push TAG`.
set -eu
if [ $# -ne 2 ]; then
	echo "usage: $0 BINARY TAG" >&2
	exit 2
fi
bin=$1
tag=$2
tool=${TOOL:-podman}
here=$(cd "$(dirname "$0")" && pwd)
command -v "$tool" >/dev/null || {
	echo "$0: $tool not found: apt-get install $tool (or TOOL=buildah)" >&2
	exit 1
}
[ -x "$bin" ] || {
	echo "$0: $bin is not an executable: build it first (cargo build --release)" >&2
	exit 1
}
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
root=$ctx/rootfs
install -D -m 0755 "$bin" "$root/usr/local/bin/tcpwait"
# `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)` and the loader's own line
# `/lib64/ld-linux-x86-64.so.2 (0x…)`; linux-vdso has no file.
ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' |
	while read -r lib; do
		install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
	done
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
	install -D -m 0644 /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
else
	echo "$0: warning: no /etc/ssl/certs/ca-certificates.crt (Debian package ca-certificates): https:// receivers need their ca_file" >&2
fi
version=$("$bin" --version | awk '{ print $2 }')
cp "$here/Containerfile" "$ctx/Containerfile"
case $tool in
buildah) build="buildah bud" ;;
*) build="$tool build" ;;
esac
$build --quiet \
	--label org.opencontainers.image.title=tcpwait \
	--label "org.opencontainers.image.version=$version" \
	--label "org.opencontainers.image.description=which process holds which CLOSE_WAIT sockets, and for how long" \
	-f "$ctx/Containerfile" -t "$tag" "$ctx" >/dev/null
echo "$tag"
