# shellcheck shell=bash
# Helpers shared by the .ci scripts (sourced, not run).

started=$SECONDS
# step NAME: a heading with the time since the script started.
step() { printf '\n=== %s: %s (%s, +%d s)\n' "$CI_SCRIPT" "$1" "$(date -u +%H:%M:%S)" $((SECONDS - started)); }
die() { echo "$CI_SCRIPT: FAILED: $*" >&2; exit 1; }
# expect "what must hold" command...: runs the command, fails with the text.
expect() {
    local what="$1"
    shift
    "$@" || die "$what"
    echo "ok: $what"
}
size() { printf '%s: %s bytes (%s KiB)\n' "$1" "$(stat -c %s "$1")" $(($(stat -c %s "$1") / 1024)); }
# apt_need PACKAGE...: installs those not installed yet (one apt run).
# Without recommends, so every package a step needs must be named: a fresh
# machine has nothing else (issue 18; .ci/fresh proves it). Waits for the
# dpkg lock if another apt run holds it.
apt_need() {
    local need=() p
    for p in "$@"; do
        [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" = installed ] || need+=("$p")
    done
    if [ ${#need[@]} -gt 0 ]; then
        echo "installing: ${need[*]}"
        apt-get update -qq -o DPkg::Lock::Timeout=600
        apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=600 "${need[@]}" >/dev/null
    fi
}
# version NAME COMMAND...: prints the first line COMMAND writes (to stdout
# or stderr), so that a failure names the environment it happened in.
version() {
    local name="$1" out
    shift
    out="$("$@" 2>&1 | head -1)" || true
    printf '  %-22s %s\n' "$name" "${out:-(no output: $*)}"
}
# The e2e tests that make a round trip: tasks in, `applied` acks out, also
# across an agent restart.
# shellcheck disable=SC2034 # used by the scripts that source this file
ROUND_TRIP_TESTS=(happy_path_fifty_tasks_over_eight_tags restart_with_pending_tasks_applies_them)

# Build profile of the deployment checks. CI proves that the packages install
# and the binaries run, which a dev-profile build shows as well as a release
# one, at a fraction of the compile time (the release profile's LTO and single
# codegen unit cost minutes on 2 cores). Release artefacts and the sizes in
# docs/INSTALL.md come from `ESL_DEPLOY_PROFILE=release` (the default outside
# CI).
if [ -z "${ESL_DEPLOY_PROFILE:-}" ]; then
    if [ "${CI:-}" = true ]; then ESL_DEPLOY_PROFILE=dev; else ESL_DEPLOY_PROFILE=release; fi
fi
# shellcheck disable=SC2034 # used by the scripts that source this file
case "$ESL_DEPLOY_PROFILE" in
    dev) PROFILE_DIR=debug ;;
    *) PROFILE_DIR="$ESL_DEPLOY_PROFILE" ;;
esac
