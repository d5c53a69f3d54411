#!/usr/bin/env bash
# Replays the committed inputs of every fuzz target, then fuzzes each in turn.
#
#   Fuzz/run.sh [--seconds N | --total N | --replay] [TARGET...]
#
#   --seconds N   fuzz each target N seconds (default 15)
#   --total N     split N seconds evenly across the targets
#   --replay      only run Fuzz/regressions/<target>/ and Fuzz/corpus/<target>/
#
# Builds first (Fuzz/build.sh). Inputs the fuzzer finds interesting are kept
# in .build-fuzz/corpus/<target>/ (not committed). A crash, a failed check,
# a memory error, a leak, an input slower than 10 s or over 2 GiB stops that
# target; its input is written to .build-fuzz/artifacts/<target>/ and the run
# exits non-zero after the remaining targets. Make the input a regression
# with Fuzz/README.md, "When a target crashes".
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${FUZZ_BUILD_DIR:-$ROOT/.build-fuzz}"
seconds=15
total=""
replay_only=0
targets=()
while [ $# -gt 0 ]; do
    case "$1" in
        --seconds) seconds=$2; shift 2 ;;
        --total) total=$2; shift 2 ;;
        --replay) replay_only=1; shift ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        -*) echo "fuzz: unknown option $1" >&2; exit 2 ;;
        *) targets+=("$1"); shift ;;
    esac
done

"$ROOT/Fuzz/build.sh" "${targets[@]}" || exit 1

if [ ${#targets[@]} -eq 0 ]; then
    for f in "$ROOT"/Fuzz/*/fuzz.swift; do
        t="$(basename "$(dirname "$f")")"
        [ -x "$OUT/bin/$t" ] && targets+=("$t")
    done
fi
if [ -n "$total" ]; then
    seconds=$(( total / ${#targets[@]} ))
    [ "$seconds" -ge 1 ] || seconds=1
fi

# The Swift runtime's own crash reporter would race AddressSanitizer's.
export SWIFT_BACKTRACE=enable=no
export ASAN_OPTIONS="${ASAN_OPTIONS:-abort_on_error=0:detect_leaks=1:allocator_may_return_null=1}"
FLAGS=(-rss_limit_mb=2048 -timeout=10 -max_len=65536 -print_final_stats=0)

# What went wrong, from a libFuzzer log: the message, the first frames in
# Tapio's code, the input.
summarize() {
    grep -E "Fatal error|runtime failure|ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)" "$1" | head -n 3 >&2
    grep -E "^ +#[0-9]+ .*(/Sources/|/Fuzz/)" "$1" | head -n 4 >&2
    grep -E "Test unit written|^Running: " "$1" | head -n 2 >&2
}

failed=()
for t in "${targets[@]}"; do
    bin="$OUT/bin/$t"
    if [ ! -x "$bin" ]; then echo "fuzz: $t was not built" >&2; failed+=("$t"); continue; fi
    mkdir -p "$ROOT/Fuzz/corpus/$t" "$ROOT/Fuzz/regressions/$t" "$OUT/corpus/$t" "$OUT/artifacts/$t"
    log="$OUT/artifacts/$t/last.log"
    dict=()
    [ -f "$ROOT/Fuzz/$t/fuzz.dict" ] && dict=(-dict="$ROOT/Fuzz/$t/fuzz.dict")

    # Every committed input once: a regression that crashes again fails here.
    inputs=$(find "$ROOT/Fuzz/regressions/$t" "$ROOT/Fuzz/corpus/$t" -type f ! -name README.md | wc -l)
    if ! "$bin" "${FLAGS[@]}" -runs=0 -artifact_prefix="$OUT/artifacts/$t/" \
            "$ROOT/Fuzz/regressions/$t" "$ROOT/Fuzz/corpus/$t" >"$log" 2>&1; then
        echo "fuzz: $t FAILED replaying its committed inputs (log: $log)" >&2
        summarize "$log"
        failed+=("$t")
        continue
    fi
    if [ "$replay_only" = 1 ]; then
        echo "fuzz: $t replayed $inputs inputs"
        continue
    fi

    # Fuzz, starting from the committed inputs and what earlier runs kept.
    if "$bin" "${FLAGS[@]}" "${dict[@]}" -max_total_time="$seconds" -artifact_prefix="$OUT/artifacts/$t/" \
            "$OUT/corpus/$t" "$ROOT/Fuzz/corpus/$t" "$ROOT/Fuzz/regressions/$t" >"$log" 2>&1; then
        runs=$(grep -oE "^Done [0-9]+ runs" "$log" | grep -oE "[0-9]+" || echo "?")
        cov=$(grep -oE "cov: [0-9]+" "$log" | tail -n 1 | grep -oE "[0-9]+" || echo "?")
        echo "fuzz: $t ok: $inputs committed inputs, ${seconds} s, $runs runs, coverage $cov"
    else
        echo "fuzz: $t FAILED after fuzzing (log: $log)" >&2
        summarize "$log"
        failed+=("$t")
    fi
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: failed: ${failed[*]} (inputs in $OUT/artifacts/<target>/; see Fuzz/README.md)" >&2
    exit 1
fi
