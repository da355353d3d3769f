#!/usr/bin/env bash
# Checks the unit's SystemCallFilter= against what the agent really does:
# runs BINARY under strace through a task round trip (Mosquitto on loopback,
# simulated tags, SIGTERM at the end) and fails if it made a system call the
# filter would deny. CI has no systemd as PID 1 to enforce the filter, so
# this is how a seccomp kill is caught before it happens on an AP.
#
#   systemd/check-syscalls.sh BINARY [UNIT]
#
# Needs strace, mosquitto, mosquitto-clients and procps (pgrep).
set -euo pipefail

bin="$(realpath "${1:?usage: check-syscalls.sh BINARY [UNIT]}")"
unit="${2:-$(dirname "$0")/esl-agent.service}"
work="$(mktemp -d)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
die() { echo "check-syscalls: $*" >&2; exit 1; }
# wait_for SECONDS DESCRIPTION COMMAND...: polls until COMMAND succeeds.
wait_for() {
    local deadline=$((SECONDS + $1)) what="$2"
    shift 2
    until "$@"; do
        [ $SECONDS -lt $deadline ] || die "timed out waiting for $what"
        sleep 0.1
    done
}

# The syscalls a filter expression allows, with @groups expanded (nested).
expand() {
    local item
    for item in "$@"; do
        # shellcheck disable=SC2046 # one syscall or group name per word
        case "$item" in
        @*) expand $(systemd-analyze syscall-filter "$item" | sed -E 's/^ +//; /^#/d; /^$/d' | tail -n +2) ;;
        *) echo "$item" ;;
        esac
    done
}
allow_list="$(sed -n 's/^SystemCallFilter=\([^~].*\)/\1/p' "$unit")"
deny_list="$(sed -n 's/^SystemCallFilter=~\(.*\)/\1/p' "$unit")"
[ -n "$allow_list" ] || die "no SystemCallFilter= allow list in $unit"
# shellcheck disable=SC2086 # word splitting of the lists is intended
expand $allow_list | sort -u >"$work/allowed"
# shellcheck disable=SC2086
expand $deny_list | sort -u >"$work/denied"

# A broker on a free port (another try if the random port is taken). Its
# debug log shows when the ack subscriber below is subscribed.
broker_up() { grep -q ' running' "$work/mosquitto.log" || ! kill -0 "$broker" 2>/dev/null; }
for _ in 1 2 3 4 5; do
    port=$((20000 + RANDOM % 40000))
    printf 'listener %s 127.0.0.1\nallow_anonymous true\nlog_dest stderr\nlog_type all\n' "$port" >"$work/mosquitto.conf"
    /usr/sbin/mosquitto -c "$work/mosquitto.conf" >"$work/mosquitto.log" 2>&1 &
    broker=$!
    pids+=("$broker")
    wait_for 10 "mosquitto to start" broker_up
    kill -0 "$broker" 2>/dev/null && break
done
kill -0 "$broker" 2>/dev/null || die "mosquitto did not start: $(cat "$work/mosquitto.log")"

# The agent runs as the unit's User=, as under systemd: what it does as
# root differs (SQLite gives a new WAL the database file's owner with
# fchown only when it runs as root, a call the unit's deny list has and
# that cannot happen under the unit).
user="$(sed -n 's/^User=//p' "$unit")"
[ -n "$user" ] || die "no User= in $unit"
id "$user" >/dev/null 2>&1 || die "the unit's user $user does not exist (install the package first)"
chmod 0711 "$work"
install -d -o "$user" -m 0700 "$work/agent"
cat >"$work/agent/agent.toml" <<EOF
[mqtt]
host = "127.0.0.1"
port = $port
group_id = "GID_test"
device_id = "dev1"
ack_to = "GID_backend@@@be1"
[store]
path = "$work/agent/store"
[radio.sim]
tags = 4
checkin_interval_ms = 100
EOF
chmod 0644 "$work/agent/agent.toml"
strace -f -qq -u "$user" -o "$work/trace" -- "$bin" run --config "$work/agent/agent.toml" >"$work/agent.log" 2>&1 &
tracer=$!
pids+=("$tracer")
wait_for 20 "the agent to subscribe" grep -q "subscribed to the task and command topics" "$work/agent.log"

tasks=4
mosquitto_sub -p "$port" -i syscheck-acks -q 1 -t 'esl_ack/#' -C "$tasks" -W 30 >"$work/acks" &
sub=$!
pids+=("$sub")
wait_for 10 "the ack subscriber" grep -q "Sending SUBACK to syscheck-acks" "$work/mosquitto.log"
now="$(date +%s%3N)"
for i in $(seq 0 $((tasks - 1))); do
    mosquitto_pub -p "$port" -q 1 -t 'esl_task/p2p/GID_test@@@dev1' \
        -m "{\"v\":1,\"task_id\":\"t$i\",\"tag_id\":\"SIM00000$i\",\"issued_at\":$now,\"content\":{\"price\":\"$i.90\"}}"
done
wait "$sub" || die "not every task got its ack within 30 s: $(cat "$work/acks")"
applied="$(grep -c '"status":"applied"' "$work/acks" || true)"
[ "$applied" -eq "$tasks" ] || die "$applied of $tasks tasks applied: $(cat "$work/acks")"

agent="$(pgrep -P "$tracer" || true)"
[ -n "$agent" ] || die "the agent is not running under strace"
kill -TERM "$agent"
wait "$tracer" || die "the agent did not exit cleanly after SIGTERM: $(tail -5 "$work/agent.log")"

sed -E -n 's/^[0-9]+ +([a-z_0-9]+)\(.*/\1/p' "$work/trace" | sort -u >"$work/used"
echo "system calls used in a round trip: $(wc -l <"$work/used")"
missing="$(comm -23 "$work/used" "$work/allowed")"
denied="$(comm -12 "$work/used" "$work/denied")"
[ -z "$missing" ] || die "not in the unit's allow list: $missing"
[ -z "$denied" ] || die "in the unit's deny list: $denied"
echo "ok: every system call is allowed by SystemCallFilter= of $(basename "$unit")"
