//! End-to-end tests: a real Mosquitto broker, the real `esl-agent` binary
//! (`esl-agent run --config …` with simulated tags) and a back end built on
//! rumqttc, all on loopback. They check the wire contract in
//! `PROTOCOL.md` from the outside, the way a store back end sees the agent.
//!
//! Run: `cargo test -p esl-agent --test e2e` (one test: add its name; live
//! output: `-- --nocapture`).
//!
//! Requirements: Mosquitto at `/usr/sbin/mosquitto` (Debian/Ubuntu:
//! `apt-get install mosquitto`, which also brings `mosquitto_passwd`); the
//! security tests also run `python3` and `/usr/bin/openssl`, the docs tests
//! `mosquitto_pub`/`mosquitto_sub` (`mosquitto-clients`) and `runuser`. Without them
//! the tests that need them FAIL with a message saying so; none is skipped
//! silently.
//!
//! Each test owns a temp dir, a broker on a free port and its agent, so the
//! tests run in parallel. When a test fails it prints the tail of the agent
//! and broker logs and keeps its temp dir (path printed); set
//! `ESL_E2E_KEEP=1` to keep the dirs of passing tests too.
//!
//! Files: `harness.rs` (processes, back end, journal, shared checks),
//! `tasks.rs` (task handling, PROTOCOL §4–5), `status.rs` (§6),
//! `resilience.rs` (restarts of the agent and the broker), `commands.rs`
//! (§7 remote commands), `operator.rs` (the local `status|tags|tasks` CLI),
//! `security.rs` (TLS, logins, ACL, signed tasks, secrets kept out of
//! logs), `systemd.rs` (readiness, watchdog and stopping notifications),
//! `docs.rs` (the docs' quick start, openssl recipe and config examples run
//! as printed; CLI behaviours the docs promise),
//! `zigbee.rs` (faults of the ZigBee adapter; the agent drives a fake ZNP
//! coordinator on a PTY), `ble.rs` (the BLE radio on fake ESL tags). Scenarios that reach the radio run on both the
//! simulated and the ZigBee radio (`NAME::sim`, `NAME::zigbee`).
//!
//! Another agent binary: `ESL_E2E_AGENT_BIN=/path/to/esl-agent` runs that
//! one instead of the one cargo built, and `ESL_E2E_AGENT_RUNNER=qemu-aarch64`
//! runs it through an emulator (CI's aarch64 round trip, `.ci/deploy`).

mod ble;
mod commands;
mod docs;
mod harness;
mod operator;
mod resilience;
mod security;
mod status;
mod systemd;
mod tasks;
mod zigbee;
