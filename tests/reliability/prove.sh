#!/usr/bin/env bash
# The whole reliability proof of issue 3 in one command: the reliability
# suite with its long runs (60 SIGKILLs in each session mode, 40 power cuts
# of the store's disk in each session mode (issue 13), link faults, hostile
# input, a full disk), then every fuzz target for FUZZ_SECONDS each.
# Prints the figures; exits non-zero if anything fails.
#
#   tests/reliability/prove.sh            # fuzz 60 s per target
#   tests/reliability/prove.sh 300        # fuzz 5 min per target
#   ESL_PROVE_PROFILE=dev tests/reliability/prove.sh   # skip the release build (~16 min on 2 cores)
#   ESL_RELIABILITY_SEED=123 tests/reliability/prove.sh   # repeat a schedule
#   ESL_POWER_CUTS=200 tests/reliability/prove.sh        # more power cuts per mode
#   ESL_POWER_TASKS_PER_S=100 tests/reliability/prove.sh # their load (default 25)
#
# Needs Mosquitto (apt-get install mosquitto), root for the full-disk and
# power-cut runs (they mount a tmpfs and a FUSE file system on /dev/fuse;
# skipped with a message otherwise), and for the fuzz part the nightly
# toolchain and cargo-fuzz (cargo install cargo-fuzz).
set -euo pipefail
cd "$(dirname "$0")/../.."
FUZZ_SECONDS="${1:-60}"
PROFILE="${ESL_PROVE_PROFILE:-release}"
log="$(mktemp /tmp/esl-reliability-XXXXXX.log)"

echo "=== reliability suite ($PROFILE build; full output in $log)"
start=$(date +%s)
set +e
cargo test -p esl-agent --profile "$PROFILE" --test reliability -- \
  --include-ignored --nocapture --test-threads 1 >"$log" 2>&1
suite=$?
set -e
grep -E '^\[|^test |^test result|SKIPPED' "$log" || true
echo "=== reliability suite: exit $suite after $(( $(date +%s) - start )) s"
if [ "$suite" -ne 0 ]; then
  grep -E 'panicked|assertion' -A6 "$log" | head -60 >&2
fi

echo "=== fuzzing, ${FUZZ_SECONDS} s per target"
set +e
fuzz/run.sh "$FUZZ_SECONDS"
fuzz=$?
set -e
echo "=== done: reliability suite exit $suite, fuzzing exit $fuzz"
[ "$suite" -eq 0 ] && [ "$fuzz" -eq 0 ]
