#!/usr/bin/env bash
# Lays out the root filesystem of each Tapio image from release binaries built
# with the Swift runtime linked in (`make static`):
#
#   OUT/<program>/usr/local/bin/<program>   the binary, debug info stripped
#   OUT/<program>/lib/..., /lib64/...       the shared libraries it still links
#                                           (glibc, OpenSSL, libbpf, ...) and the
#                                           dynamic loader, copied from this
#                                           machine at the paths `ldd` names
#   OUT/<program>/etc/passwd, group         root (0) and nonroot (65532)
#   OUT/<program>/etc/nsswitch.conf         files, then DNS
#   OUT/<program>/tmp                       1777
#
# Nothing else: no shell, no package manager, no CA bundle (every connection
# is mutual TLS under Tapio's own CA). The same script runs in
# deploy/docker/Dockerfile's build stage and under `make images`, so both
# recipes give the same files.
#
# Usage:
#   deploy/scripts/image-rootfs.sh BIN_DIR OUT [PROGRAM...]
#
# PROGRAM defaults to tapio, tapio-agent and tapio-server. Fails when a binary
# still links a Swift runtime library (it was not built with
# --static-swift-stdlib) or `ldd` cannot find a library.
set -euo pipefail

[ $# -ge 2 ] || { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2; exit 2; }
bin_dir=$1
out=$2
shift 2
programs=("$@")
[ ${#programs[@]} -gt 0 ] || programs=(tapio tapio-agent tapio-server)

# The libraries a binary loads, one absolute path a line, with the loader.
closure() {
	local listing
	listing=$(ldd "$1") || { echo "ldd $1 failed" >&2; return 1; }
	if grep -q 'not found' <<<"$listing"; then
		echo "$1: missing libraries:" >&2; grep 'not found' <<<"$listing" >&2; return 1
	fi
	awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' <<<"$listing" | sort -u
}

for p in "${programs[@]}"; do
	src="$bin_dir/$p"
	[ -x "$src" ] || { echo "no binary $src (run make static)" >&2; exit 1; }
	libs=$(closure "$src")
	if grep -E '/(libswift|libFoundation|lib_Foundation|libdispatch|libBlocksRuntime)[^/]*$' <<<"$libs" >&2; then
		echo "$src links the Swift runtime dynamically: build it with --static-swift-stdlib (make static)" >&2
		exit 1
	fi

	root="$out/$p"
	rm -rf "$root"
	mkdir -p "$root/usr/local/bin" "$root/etc" "$root/tmp"
	chmod 1777 "$root/tmp"
	# Debug info only: the symbol table stays, for the backtraces Swift prints.
	strip --strip-debug -o "$root/usr/local/bin/$p" "$src"
	# -L: the file a symlink names, stored under the name the loader asks for.
	while read -r lib; do
		mkdir -p "$root$(dirname "$lib")"
		cp -L "$lib" "$root$lib"
	done <<<"$libs"

	cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
	cat >"$root/etc/group" <<'EOF'
root:x:0:
nonroot:x:65532:
EOF
	cat >"$root/etc/nsswitch.conf" <<'EOF'
passwd: files
group: files
hosts: files dns
EOF
	echo "$p: $(du -sh "$root" | cut -f1) in $root ($(wc -l <<<"$libs") shared objects: $(xargs -n1 basename <<<"$libs" | tr '\n' ' '))" >&2
done
