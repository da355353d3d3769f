#!/bin/sh
# Send your first task (README.md, "Send your first task"): runs one agent
# by hand with simulated tags against the Mosquitto broker on this machine,
# sends it one task as the back end would and reads the ack. Needs
# esl-agent, mosquitto_pub and mosquitto_sub on the PATH; writes only into
# ./first-task. CI runs this file (tests/docs: quickstart_runs_as_documented).
set -eu
BROKER_PORT="${BROKER_PORT:-1883}"
mkdir -p first-task && cd first-task

# 1. A config: the local broker, simulated tags, a fixed device id.
cat >agent.toml <<CONFIG
[mqtt]
host = "127.0.0.1"
port = $BROKER_PORT
group_id = "GID_esl"
device_id = "ap-first"
ack_to = "GID_backend@@@pricing-1"

[store]
path = "./store"

[radio]
kind = "sim"
[radio.sim]
tags = 4
CONFIG
esl-agent check-config --config agent.toml

# 2. The back end's subscriptions, kept by the broker (-c: persistent
#    session) so nothing is missed between the commands below: acks, and
#    the agent's status reports (first without -c, which drops reports an
#    earlier run may have left queued).
mosquitto_sub -p "$BROKER_PORT" -q 1 -c -i 'GID_backend@@@pricing-1' -t 'esl_ack/p2p/GID_backend@@@pricing-1' -E
mosquitto_sub -p "$BROKER_PORT" -q 1 -i 'GID_backend@@@watch' -t 'esl_status/GID_esl@@@ap-first' -E
mosquitto_sub -p "$BROKER_PORT" -q 1 -c -i 'GID_backend@@@watch' -t 'esl_status/GID_esl@@@ap-first' -E

# 3. Start the agent and wait for its "hello" status report: it has
#    subscribed to its task topic before sending it.
esl-agent run --config agent.toml 2>agent.log &
agent=$!
mosquitto_sub -p "$BROKER_PORT" -q 1 -c -i 'GID_backend@@@watch' -t 'esl_status/GID_esl@@@ap-first' -C 1 -W 30 >/dev/null

# 4. One task: tag SIM000001 shows a new price.
mosquitto_pub -p "$BROKER_PORT" -q 1 -i 'GID_backend@@@pricing-1' -t 'esl_task/p2p/GID_esl@@@ap-first' \
    -m "{\"v\":1,\"task_id\":\"t-1\",\"tag_id\":\"SIM000001\",\"issued_at\":$(date +%s)000,\"content\":{\"name\":\"Milk 1L\",\"price\":\"9.90\"}}"

# 5. Its ack, once the tag has checked in and shows the content.
mosquitto_sub -p "$BROKER_PORT" -q 1 -c -i 'GID_backend@@@pricing-1' -t 'esl_ack/p2p/GID_backend@@@pricing-1' -C 1 -W 30

# 6. What the agent knows about its tags, and stop it.
esl-agent tags --config agent.toml
kill "$agent" && wait "$agent"
