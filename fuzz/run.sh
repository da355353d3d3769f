#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 60) with cargo-fuzz on the
# nightly toolchain, starting from the committed seed corpus in
# fuzz/corpus/<target>/. New inputs that grow coverage land in a scratch
# corpus (not committed); crashes land in fuzz/artifacts/<target>/ and fail
# the run. Prints one line per target: executions, coverage, corpus size.
#
#   fuzz/run.sh 300            # five minutes per target
#   FUZZ_TARGETS=decode_task fuzz/run.sh 60
set -euo pipefail
cd "$(dirname "$0")"
SECONDS_PER_TARGET="${1:-60}"
TARGETS="${FUZZ_TARGETS:-decode_task decode_command config_toml}"

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "cargo-fuzz is missing: cargo install cargo-fuzz (needs the nightly toolchain)" >&2
  exit 2
fi

cargo +nightly fuzz build -O >/dev/null
status=0
for target in $TARGETS; do
  scratch="$(mktemp -d "/tmp/esl-fuzz-${target}-XXXXXX")"
  log="$scratch/fuzz.log"
  # Seeds are read from the committed corpus; new finds go to the scratch dir
  # (the first corpus dir given is the one libFuzzer writes to).
  if cargo +nightly fuzz run -O "$target" "$scratch" "corpus/$target" -- \
      -max_total_time="$SECONDS_PER_TARGET" -max_len=1100000 -timeout=10 \
      -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
    result=ok
  else
    result=FAILED
    status=1
  fi
  execs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')"
  cov="$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*' || echo '?')"
  found="$(find "$scratch" -type f ! -name fuzz.log | wc -l)"
  printf '%-16s %-6s %ss  execs=%s  cov=%s  new_corpus=%s  log=%s\n' \
    "$target" "$result" "$SECONDS_PER_TARGET" "$execs" "$cov" "$found" "$log"
  if [ "$result" = FAILED ]; then
    tail -40 "$log" >&2
  fi
done
exit $status
