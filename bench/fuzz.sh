#!/usr/bin/env bash
# Coverage-guided fuzzing with atheris (libFuzzer for Python), bounded in time:
#     bash bench/fuzz.sh SECONDS [TARGET...]   # TARGET: stun, turn, turn-sequences, dataplane
#                                               # [default: all]
# dataplane is the native data plane (relay/net/dataplane.c) under libFuzzer itself, built with
# clang and AddressSanitizer + UndefinedBehaviorSanitizer (bench/fuzz_dataplane.c).
# Each target runs SECONDS seconds on one core; its corpus is kept in ~/.cache/turnrelay-fuzz
# (so a later run starts where this one stopped) and a crashing input is written to
# bench/crash-TARGET-* and makes the script exit non-zero.  Not part of the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:?usage: bench/fuzz.sh SECONDS [stun|turn|turn-sequences]...}"
shift
targets=("$@")
[ "${#targets[@]}" -gt 0 ] || targets=(stun turn turn-sequences dataplane)

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -c "import atheris, hypothesis" 2>/dev/null \
    || .venv/bin/python -m pip install -q atheris 'hypothesis>=6.80' -e '.[test]' \
        --config-settings editable_mode=compat

cache="${TURNRELAY_FUZZ_CACHE:-$HOME/.cache/turnrelay-fuzz}"
status=0
for target in "${targets[@]}"; do
    corpus="$cache/$target"
    mkdir -p "$corpus"
    case "$target" in
        turn-sequences) ;;
        dataplane) .venv/bin/python bench/fuzz_dataplane_seeds.py "$corpus" ;;
        *) .venv/bin/python bench/fuzz_stun.py --write-seeds "$corpus" 2>/dev/null ;;
    esac
    log="$cache/$target.log"
    # Hypothesis needs a few KB of choices for a sequence of requests: long inputs from the start.
    case "$target" in
        stun) script=bench/fuzz_stun.py; extra=() ;;
        turn) script=bench/fuzz_turn.py; extra=() ;;
        turn-sequences) script=bench/fuzz_turn.py; extra=(--sequences -max_len=8192 -len_control=0) ;;
        dataplane)
            script="$cache/fuzz_dataplane"
            clang -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
                -I relay/net bench/fuzz_dataplane.c -o "$script" -lpthread
            extra=(-max_len=4096) ;;
        *) echo "unknown target $target" >&2; exit 2 ;;
    esac
    echo "fuzzing $target for $seconds s (corpus $corpus, log $log)"
    runner=(.venv/bin/python "$script")
    [ "$target" != dataplane ] || runner=("$script")
    if "${runner[@]}" "$corpus" -max_total_time="$seconds" \
            -timeout=30 -rss_limit_mb=2048 -print_final_stats=1 \
            -artifact_prefix="bench/crash-$target-" "${extra[@]}" >"$log" 2>&1; then
        result="no crash"
    else
        result="CRASH (see $log and bench/crash-$target-*)"
        status=1
    fi
    # libFuzzer's last status line ("#N DONE cov: C ft: F corp: ...") and its final stats.
    grep -E "^#[0-9]+\s+(DONE|pulse|NEW|REDUCE)" "$log" | tail -1 || true
    grep -E "^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)" "$log" || true
    echo "$target: $result"
done
exit "$status"
