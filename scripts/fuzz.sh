#!/usr/bin/env bash
# Portcullis: run the cargo-fuzz targets of fuzz/ with libFuzzer (docs/fuzzing.md).
#
# Usage: scripts/fuzz.sh [TARGET...]        (default: every target of fuzz/Cargo.toml)
#
# Installs cargo-fuzz (pinned) when missing, builds every target once, then runs each for
# FUZZ_SECONDS with its corpus in fuzz/corpus/<target> (the committed seeds plus whatever
# libFuzzer keeps; only the seeds are in git). Fails on the first crash, panic or broken
# invariant and prints the input that caused it (fuzz/artifacts/<target>/crash-*), which
# `cargo fuzz run <target> <file>` replays.
#
# Works on stable Rust: cargo-fuzz passes nightly-only -Z flags, which RUSTC_BOOTSTRAP=1 lets a
# stable compiler accept; libFuzzer itself is C++ built by libfuzzer-sys with the system
# compiler (g++ is installed when missing).
#
# Environment knobs:
#   FUZZ_SECONDS    seconds per target (default 10: the CI smoke; e.g. 600 for a real run)
#   FUZZ_JOBS       targets run at once (default: the number of CPUs, at most 2)
#   FUZZ_SANITIZER  none (default) or address (AddressSanitizer; slower, builds separately)
#   FUZZ_BUILD      release (default: optimised, with debug assertions) or dev (unoptimised:
#                   builds faster, runs slower; the CI smoke's choice)
#   FUZZ_RSS_MB     libFuzzer's memory limit per target (default 2048)
#   CARGO_TARGET_DIR  the fuzz build goes to "$CARGO_TARGET_DIR/fuzz" (default target/fuzz):
#                   beside the workspace's build, apart from it (other compiler flags)
set -euo pipefail

CARGO_FUZZ_VERSION=0.13.2

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

info() { printf '[fuzz.sh] %s\n' "$*"; }
die() {
    printf '[fuzz.sh] FATAL: %s\n' "$*" >&2
    exit 1
}

FUZZ_SECONDS=${FUZZ_SECONDS:-10}
FUZZ_SANITIZER=${FUZZ_SANITIZER:-none}
FUZZ_BUILD=${FUZZ_BUILD:-release}
FUZZ_RSS_MB=${FUZZ_RSS_MB:-2048}
cpus=$(nproc 2>/dev/null || echo 1)
FUZZ_JOBS=${FUZZ_JOBS:-$((cpus < 2 ? cpus : 2))}
[[ "$FUZZ_SECONDS" =~ ^[0-9]+$ && "$FUZZ_SECONDS" -gt 0 ]] || die "FUZZ_SECONDS must be a positive number"
[[ "$FUZZ_JOBS" =~ ^[0-9]+$ && "$FUZZ_JOBS" -gt 0 ]] || die "FUZZ_JOBS must be a positive number"
case "$FUZZ_SANITIZER" in none | address) ;; *) die "FUZZ_SANITIZER must be none or address" ;; esac

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}/fuzz"
export RUSTC_BOOTSTRAP=1

# ---- tools ------------------------------------------------------------------------------------

if ! command -v c++ >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || die "no C++ compiler (libFuzzer needs one) and no apt-get"
    info "apt-get install g++"
    apt-get update -qq </dev/null >/dev/null && apt-get install -y -qq --no-install-recommends g++ </dev/null >/dev/null \
        || die "apt-get install g++ failed"
fi
if [[ "$(cargo fuzz --version 2>/dev/null)" != "cargo-fuzz $CARGO_FUZZ_VERSION" ]]; then
    info "cargo install --locked cargo-fuzz@$CARGO_FUZZ_VERSION"
    cargo install --locked --quiet "cargo-fuzz@$CARGO_FUZZ_VERSION" </dev/null || die "installing cargo-fuzz failed"
fi

# ---- targets ----------------------------------------------------------------------------------

if [[ $# -gt 0 ]]; then
    targets=("$@")
else
    mapfile -t targets < <(sed -n 's/^name = "\([a-z0-9_]*\)"$/\1/p' fuzz/Cargo.toml | grep -vx portcullis-fuzz)
fi
[[ ${#targets[@]} -gt 0 ]] || die "no fuzz targets found in fuzz/Cargo.toml"

case "$FUZZ_BUILD" in
    release) flags=(--sanitizer "$FUZZ_SANITIZER" --release --debug-assertions) ;;
    dev) flags=(--sanitizer "$FUZZ_SANITIZER" --dev) ;;
    *) die "FUZZ_BUILD must be release or dev, not $FUZZ_BUILD" ;;
esac

start=$SECONDS
info "building ${#targets[@]} targets (sanitizer: $FUZZ_SANITIZER, target dir: $CARGO_TARGET_DIR)"
(cd fuzz && cargo fuzz build "${flags[@]}" </dev/null) || die "building the fuzz targets failed"
info "built in $((SECONDS - start)) s"

# ---- runs -------------------------------------------------------------------------------------

logs=$(mktemp -d /tmp/portcullis-fuzz.XXXXXX)
trap 'rm -rf -- "$logs"' EXIT

run_target() { # run_target NAME: one libFuzzer run; its log in $logs/NAME.log, status in .rc
    local t=$1 corpus=fuzz/corpus/$1 rc=0
    mkdir -p "$corpus" "fuzz/artifacts/$t"
    (cd fuzz && cargo fuzz run "${flags[@]}" "$t" "corpus/$t" -- \
        -max_total_time="$FUZZ_SECONDS" -rss_limit_mb="$FUZZ_RSS_MB" -timeout=30 -print_final_stats=1 \
        </dev/null >"$logs/$t.log" 2>&1) || rc=$?
    echo "$rc" >"$logs/$t.rc"
}

info "running each target for $FUZZ_SECONDS s, $FUZZ_JOBS at a time"
running=0
for t in "${targets[@]}"; do
    run_target "$t" &
    running=$((running + 1))
    if [[ $running -ge $FUZZ_JOBS ]]; then
        wait -n || true
        running=$((running - 1))
    fi
done
wait || true

failed=0
for t in "${targets[@]}"; do
    rc=$(cat "$logs/$t.rc" 2>/dev/null || echo 1)
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$logs/$t.log" | tail -n 1)
    if [[ "$rc" == 0 ]]; then
        info "ok    $t (${runs:-?} runs)"
        continue
    fi
    failed=1
    info "FAIL  $t (exit $rc)"
    grep -E "panicked at|^SUMMARY|ERROR: libFuzzer|==ERROR" "$logs/$t.log" | head -n 5 | sed 's/^/          /' || true
    sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$logs/$t.log" | while read -r f; do
        info "      crash input: $f"
        info "      replay: cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run ${flags[*]} $t $f"
    done
    tail -n 40 "$logs/$t.log" | sed 's/^/    | /'
done
info "finished in $((SECONDS - start)) s"
exit "$failed"
