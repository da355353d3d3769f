#!/bin/sh
# Tests the procd init script (packaging/openwrt/esl-agent/files/esl-agent.init)
# without OpenWrt: procd's shell API, chown/chgrp/logger and the store
# owner are stubbed and record their calls; the real esl-agent binary reads
# a real config. Covers the runtime directory of the control socket and the
# refusal of a store owned by another user. Runs under
# dash, which is close to OpenWrt's busybox ash. Also checks that the
# package Makefile agrees with the shared config and the workspace version
# (the Makefile itself needs the SDK to run).
#
#   packaging/openwrt/test-init.sh PATH/TO/esl-agent
set -eu

here="$(cd "$(dirname "$0")" && pwd)"
bin="$(cd "$(dirname "${1:?usage: test-init.sh PATH/TO/esl-agent}")" && pwd)/$(basename "$1")"
init="$here/esl-agent/files/esl-agent.init"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
failures=0

fail() {
	echo "FAIL: $*" >&2
	failures=$((failures + 1))
}

expect_call() {
	grep -qxF -- "$1" "$work/calls" || fail "expected call \`$1\`; got:
$(cat "$work/calls")"
}

# Runs start_service of the init script with CONFIG=$1; calls go to
# $work/calls, stderr to $work/stderr. The store's owner (chown is a stub)
# is $OWNER, the agent's user unless set.
run_start_service() (
	: >"$work/calls"
	procd_open_instance() { echo "open_instance" >>"$work/calls"; }
	procd_close_instance() { echo "close_instance" >>"$work/calls"; }
	procd_set_param() { echo "$*" >>"$work/calls"; }
	chown() { echo "chown $*" >>"$work/calls"; }
	chgrp() { echo "chgrp $*" >>"$work/calls"; }
	logger() { echo "logger $*" >>"$work/calls"; }
	# The init script's shebang makes /etc/rc.common source it; here it is
	# sourced directly, then pointed at the binary and config under test.
	. "$init"
	owner_of() { echo "${OWNER:-esl-agent}"; }
	PROG="$bin"
	CONFIG="$1"
	start_service 2>"$work/stderr" || echo "start_service failed" >>"$work/calls"
)

# A valid config: the store directory is created and handed to the user.
cat >"$work/agent.toml" <<EOF
[mqtt]
group_id = "GID_test"
device_id = "dev1"

[store]
path = "$work/flash/store"
EOF
run_start_service "$work/agent.toml"
[ -d "$work/flash/store" ] || fail "the store directory was not created"
expect_call "chown esl-agent:esl-agent $work/flash/store"
expect_call "chgrp esl-agent $work/agent.toml"
expect_call "command $bin run --config $work/agent.toml"
expect_call "user esl-agent"
expect_call "file $work/agent.toml"
expect_call "respawn 3600 5 5"
expect_call "stdout 1"
expect_call "stderr 1"
expect_call "close_instance"

# Issue 14 item 8: the control socket lives in a runtime directory made for
# the agent's user (on OpenWrt /var/run/esl-agent), not in root's config
# directory.
cat >"$work/agent-run.toml" <<EOF
[mqtt]
group_id = "GID_test"
device_id = "dev1"

[store]
path = "$work/flash/store"

[control]
socket = "$work/run/esl-agent/control.sock"
EOF
run_start_service "$work/agent-run.toml"
[ -d "$work/run/esl-agent" ] || fail "the runtime directory was not created"
expect_call "chown esl-agent:esl-agent $work/run/esl-agent"
expect_call "close_instance"

# A store owned by another user (left by a run as root) is refused with
# the command that fixes it, and the agent is not started.
OWNER=root run_start_service "$work/agent-run.toml"
expect_call "start_service failed"
if grep -q '^close_instance' "$work/calls"; then fail "started with a store owned by root"; fi
grep -qF "chown -R esl-agent:esl-agent $work/flash/store" "$work/stderr" ||
	fail "no fix named for a store owned by root: $(cat "$work/stderr")"

# The package puts the socket under /var/run/esl-agent: the Makefile adds
# the [control] table, which the shared config must not have already.
grep -qF 'socket = "/var/run/esl-agent/control.sock"' "$here/esl-agent/Makefile" ||
	fail "the OpenWrt Makefile no longer puts the control socket under /var/run/esl-agent"
if grep -q '^\[control\]' "$here/../agent.toml"; then
	fail "packaging/agent.toml has a [control] table: the OpenWrt Makefile would add a second one"
fi

# The shipped config (group_id still unset) does not validate: no store is
# created, but the instance is still registered so the agent can log why it
# refuses to start.
cp "$here/../agent.toml" "$work/shipped.toml"
run_start_service "$work/shipped.toml"
if grep -q '^chown' "$work/calls"; then fail "chown without a valid config"; fi
expect_call "command $bin run --config $work/shipped.toml"

# The OpenWrt Makefile moves the store off the tmpfs /var by rewriting
# this exact line of the shared config.
grep -qxF 'path = "/var/lib/esl-agent/store"' "$here/../agent.toml" ||
	fail "packaging/agent.toml lost the store path line the OpenWrt Makefile rewrites"
grep -qF 's|^path = "/var/lib/esl-agent/store"|path = "/etc/esl-agent/store"|' "$here/esl-agent/Makefile" ||
	fail "the OpenWrt Makefile no longer rewrites the store path"

# The package version follows the workspace's (the .deb reads it from there).
cargo_version="$(sed -n '/^\[workspace.package\]/,/^\[/ s/^version *= *"\(.*\)"/\1/p' "$here/../../Cargo.toml")"
grep -qxF "PKG_VERSION:=$cargo_version" "$here/esl-agent/Makefile" ||
	fail "PKG_VERSION in the OpenWrt Makefile is not the workspace version $cargo_version"

if [ "$failures" -gt 0 ]; then
	echo "openwrt init script: $failures failure(s)" >&2
	exit 1
fi
echo "openwrt init script: ok"
