#!/usr/bin/env bash
# Builds the three images with buildah from deploy/docker/Dockerfile without a
# Docker daemon or a registry (`make images`, docs/operations.md "Container
# images"): the root filesystems are laid out here from the static binaries
# (deploy/scripts/image-rootfs.sh) and given to the Dockerfile as its `build`
# stage, so only the Dockerfile's FROM-scratch image stages run:
#
#   localhost/tapio-server:VERSION   target server
#   localhost/tapio-agent:VERSION    target agent
#   localhost/tapio-cli:VERSION      target cli
#
# in the local containers storage (`buildah images`, `podman images`), and each
# also as an OCI archive OUT/tapio-<name>-VERSION.oci.tar, to copy to a
# registry or a node (`skopeo copy oci-archive:... docker://...`).
#
# Usage: deploy/scripts/images.sh BIN_DIR OUT VERSION
set -euo pipefail
cd "$(dirname "$0")/../.."

[ $# -eq 3 ] || { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2; exit 2; }
bin_dir=$1
out=$2
version=$3

deploy/scripts/image-rootfs.sh "$bin_dir" "$out/stage/out" tapio tapio-agent tapio-server
# The image stages take nothing from the build context: an empty one.
rm -rf "$out/context"
mkdir -p "$out/context"
for target in server agent cli; do
	name=tapio-$target
	previous=$(buildah images --quiet --noheading "localhost/$name:$version" 2>/dev/null || true)
	buildah bud --quiet --layers=false -f deploy/docker/Dockerfile --target "$target" \
		--build-context "build=$out/stage" --build-arg "VERSION=$version" \
		-t "localhost/$name:$version" "$out/context" >/dev/null
	# The image this tag named before, now untagged: removed, unless in use.
	if [ -n "$previous" ] && [ "$previous" != "$(buildah images --quiet --noheading "localhost/$name:$version")" ]; then
		buildah rmi "$previous" >/dev/null 2>&1 || true
	fi
	rm -f "$out/$name-$version.oci.tar"
	buildah push --quiet "localhost/$name:$version" "oci-archive:$out/$name-$version.oci.tar:$name:$version"
	echo "localhost/$name:$version  $(buildah images --noheading --format '{{.Size}}' "localhost/$name:$version")  $out/$name-$version.oci.tar"
done
