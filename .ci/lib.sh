# shellcheck shell=bash
# Helpers shared by .ci/deploy and .ci/cross-aarch64 (sourced, not run).

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
apt_need() {
    local need=() p
    for p in "$@"; do
        dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
    done
    if [ ${#need[@]} -gt 0 ]; then
        echo "installing: ${need[*]}"
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    fi
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
