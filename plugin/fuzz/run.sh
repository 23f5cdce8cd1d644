#!/usr/bin/env bash
# Runs every fuzz target (the plugin's here, the harness's in ../../harness/fuzz) for a while each,
# starting from a copy of the committed corpus so the repository is not modified. Fails as soon as a
# target crashes, times out, or goes over the memory limit; the input that did it is left under
# $FUZZ_WORK/<target>/artifacts/.
#
#   ./run.sh [seconds per target]      default 10; FUZZ_SECONDS works too
#   FUZZ_TARGETS="authority_h2 v1_cipher" ./run.sh 600
#   FUZZ_WORK=/tmp/kleidi-fuzz         where corpora grow (default: a fresh temp dir, removed on success)
#
# cargo-fuzz needs nightly-only rustc flags; on a stable toolchain RUSTC_BOOTSTRAP=1 allows them.
set -euo pipefail

seconds="${1:-${FUZZ_SECONDS:-10}}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
crates=("$here" "$here/../../harness/fuzz")
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz not found; installing it" >&2
    cargo install --locked cargo-fuzz
fi

work="${FUZZ_WORK:-}"
if [[ -z "$work" ]]; then
    work="$(mktemp -d -t kleidi-fuzz.XXXXXX)"
    cleanup=1
fi

for crate in "${crates[@]}"; do
    (cd "$crate" && cargo fuzz build)
done

for crate in "${crates[@]}"; do
    for target in $(cd "$crate" && cargo fuzz list); do
        if [[ -n "${FUZZ_TARGETS:-}" && " $FUZZ_TARGETS " != *" $target "* ]]; then
            continue
        fi
        corpus="$work/$target/corpus"
        artifacts="$work/$target/artifacts/"
        mkdir -p "$corpus" "$artifacts"
        if [[ -d "$crate/corpus/$target" ]]; then
            cp -R "$crate/corpus/$target/." "$corpus/"
        fi
        echo "== $target: ${seconds}s" >&2
        if ! (cd "$crate" && cargo fuzz run "$target" "$corpus" -- \
            -max_total_time="$seconds" -rss_limit_mb=512 -timeout=10 \
            -artifact_prefix="$artifacts" -print_final_stats=1 2>"$work/$target/log"); then
            tail -n 40 "$work/$target/log" >&2
            echo "FAILED: $target (input and log under $work/$target)" >&2
            exit 1
        fi
        grep -E '^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)' "$work/$target/log" \
            | sed "s/^/  $target /" >&2 || true
    done
done

if [[ -n "${cleanup:-}" ]]; then
    rm -rf "$work"
fi
echo "all fuzz targets ran ${seconds}s each without a failure" >&2
