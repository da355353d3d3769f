//! End-to-end tests: a real Mosquitto broker, the real `esl-agent` binary
//! (`esl-agent run --config …` with simulated tags) and a back end built on
//! rumqttc, all on loopback. They check the wire contract in
//! `PROTOCOL.md` from the outside, the way a store back end sees the agent.
//!
//! Run: `cargo test -p esl-agent --test e2e` (one test: add its name; live
//! output: `-- --nocapture`).
//!
//! Requirements: Mosquitto at `/usr/sbin/mosquitto` (Debian/Ubuntu:
//! `apt-get install mosquitto`). Without it every test FAILS with a message
//! saying so; none is skipped silently.
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
//! `ble.rs` (the BLE radio on fake ESL tags).

mod ble;
mod commands;
mod harness;
mod operator;
mod resilience;
mod status;
mod tasks;
