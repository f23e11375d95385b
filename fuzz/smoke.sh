#!/usr/bin/env bash
# CI smoke run of the fuzz targets: each for a short bounded time (default 20 s).
#   fuzz/smoke.sh [SECONDS]        FUZZ_SANITIZER=address fuzz/smoke.sh   (default: none)
# cargo-fuzz needs nightly-only flags (-Zsanitizer, -Cpasses=sancov-module); on the stable
# toolchain RUSTC_BOOTSTRAP=1 unlocks them. The first build compiles every dependency with
# coverage instrumentation into fuzz/target (several minutes on 2 cores); later runs reuse it.
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-20}"
sanitizer="${FUZZ_SANITIZER:-none}"
export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
status=0
for target in $(cargo fuzz list); do
    mkdir -p "corpus/$target" "artifacts/$target"
    echo "== fuzzing $target for ${secs}s (sanitizer: $sanitizer)"
    # corpus/ grows (git-ignored); seeds/ holds the checked-in starting inputs.
    if ! cargo fuzz run --sanitizer "$sanitizer" "$target" "corpus/$target" "seeds/$target" -- \
        -max_total_time="$secs" -max_len=4096 -timeout=10 -rss_limit_mb=2048 \
        -artifact_prefix="artifacts/$target/"; then
        echo "== $target FAILED: see fuzz/artifacts/$target/" >&2
        status=1
    fi
done
exit "$status"
