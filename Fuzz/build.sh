#!/usr/bin/env bash
# Builds the libFuzzer targets of Fuzz/ with swiftc and clang directly, no
# SwiftPM: the protobuf-c code, TapioWire and TapioAttribution are compiled
# once each as instrumented modules (coverage + AddressSanitizer), then every
# Fuzz/<target>/fuzz.swift is linked against them into OUT/bin/<target>.
#
#   Fuzz/build.sh [TARGET...]      (default: every Fuzz/*/fuzz.swift)
#
# OUT is .build-fuzz/ at the repository root unless FUZZ_BUILD_DIR says
# otherwise. A step is skipped when its output is newer than all its inputs.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${FUZZ_BUILD_DIR:-$ROOT/.build-fuzz}"
TOOLS="${SWIFT_TOOLCHAIN_BIN:-/opt/swift/usr/bin}"
SWIFTC="${SWIFTC:-$TOOLS/swiftc}"
CLANG="${FUZZ_CLANG:-$TOOLS/clang}"
SWIFT_FLAGS=(-O -g -parse-as-library -sanitize=fuzzer,address -swift-version 6 -suppress-warnings)
# lld: gold warns about every ASan helper symbol.
LINK_FLAGS=(-use-ld=lld)

mkdir -p "$OUT/include" "$OUT/modules" "$OUT/obj" "$OUT/bin"

# True when $1 is missing or older than any of the remaining files.
stale() {
    local out=$1; shift
    [ -e "$out" ] || return 0
    local f
    for f in "$@"; do [ "$f" -nt "$out" ] && return 0; done
    return 1
}

step() { printf 'fuzz build: %s\n' "$*" >&2; }

# The generated protobuf-c code, imported into Swift through a module map.
PROTO_H="$ROOT/Sources/CTapioProto/include/tapio.pb-c.h"
PROTO_C="$ROOT/Sources/CTapioProto/tapio.pb-c.c"
cat > "$OUT/include/module.modulemap.new" <<MAP
module CTapioProto {
    header "$PROTO_H"
    link "protobuf-c"
    export *
}
MAP
if cmp -s "$OUT/include/module.modulemap.new" "$OUT/include/module.modulemap"; then
    rm "$OUT/include/module.modulemap.new"
else
    mv "$OUT/include/module.modulemap.new" "$OUT/include/module.modulemap"
fi
if stale "$OUT/obj/tapio.pb-c.o" "$PROTO_C" "$PROTO_H"; then
    step "CTapioProto"
    "$CLANG" -c -O1 -g -fsanitize=fuzzer-no-link,address -I "$ROOT/Sources/CTapioProto/include" \
        "$PROTO_C" -o "$OUT/obj/tapio.pb-c.o"
fi

# module NAME [DEPENDENCY OBJECTS...]: Sources/NAME/*.swift as one module.
module() {
    local name=$1; shift
    local sources=("$ROOT"/Sources/"$name"/*.swift)
    if stale "$OUT/obj/$name.o" "${sources[@]}" "$@" "$OUT/include/module.modulemap"; then
        step "$name"
        "$SWIFTC" "${SWIFT_FLAGS[@]}" -module-name "$name" -wmo \
            -I "$OUT/include" -I "$OUT/modules" \
            -emit-module -emit-module-path "$OUT/modules/$name.swiftmodule" \
            -c "${sources[@]}" -o "$OUT/obj/$name.o"
        # swiftc leaves an unchanged object untouched: mark it as built now.
        touch "$OUT/obj/$name.o"
    fi
}
module TapioWire "$OUT/obj/tapio.pb-c.o"
module TapioAttribution "$OUT/obj/TapioWire.o"

# The agent's spool record reader, once it exists: one file, its own module.
SPOOL="$ROOT/Sources/TapioAgent/SpoolRecord.swift"
if [ -f "$SPOOL" ]; then
    if stale "$OUT/obj/TapioSpoolRecord.o" "$SPOOL" "$OUT/obj/TapioWire.o"; then
        step "SpoolRecord"
        "$SWIFTC" "${SWIFT_FLAGS[@]}" -module-name TapioSpoolRecord -wmo \
            -I "$OUT/include" -I "$OUT/modules" \
            -emit-module -emit-module-path "$OUT/modules/TapioSpoolRecord.swiftmodule" \
            -c "$SPOOL" -o "$OUT/obj/TapioSpoolRecord.o"
        touch "$OUT/obj/TapioSpoolRecord.o"
    fi
fi

OBJECTS=("$OUT/obj/tapio.pb-c.o" "$OUT/obj/TapioWire.o" "$OUT/obj/TapioAttribution.o")
[ -f "$OUT/obj/TapioSpoolRecord.o" ] && OBJECTS+=("$OUT/obj/TapioSpoolRecord.o")

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    for f in "$ROOT"/Fuzz/*/fuzz.swift; do targets+=("$(basename "$(dirname "$f")")"); done
fi
for t in "${targets[@]}"; do
    src="$ROOT/Fuzz/$t/fuzz.swift"
    support="$ROOT/Fuzz/Support.swift"
    [ -f "$src" ] || { echo "fuzz build: no target $t ($src)" >&2; exit 2; }
    if [ "$t" = spool_record ] && [ ! -f "$SPOOL" ]; then
        step "$t skipped: Sources/TapioAgent/SpoolRecord.swift does not exist"
        continue
    fi
    if stale "$OUT/bin/$t" "$src" "$support" "${OBJECTS[@]}"; then
        step "$t"
        "$SWIFTC" "${SWIFT_FLAGS[@]}" -module-name "fuzz_$t" -I "$OUT/include" -I "$OUT/modules" \
            "${LINK_FLAGS[@]}" "$src" "$support" "${OBJECTS[@]}" -lprotobuf-c -o "$OUT/bin/$t"
    fi
done
