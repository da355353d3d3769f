//! Reliability proof (issue 3): "nothing accepted is ever lost, nothing is
//! applied twice, bad input never hurts", measured against the real
//! `esl-agent` binary, a real Mosquitto and simulated tags that journal
//! what they display. docs/RELIABILITY.md states the guarantees and how
//! each is tested.
//!
//! Run the short version (part of `cargo test --workspace`, and CI):
//!
//! ```sh
//! cargo test -p esl-agent --test reliability -- --nocapture
//! ```
//!
//! The whole proof, long runs included (50+ SIGKILLs per session mode),
//! printing the figures: `tests/reliability/prove.sh` (or
//! `cargo test -p esl-agent --release --test reliability -- --include-ignored --nocapture --test-threads 1`).
//! `ESL_RELIABILITY_SEED=n` repeats a run's random schedule (every run
//! prints its seed).
//!
//! Files:
//! - `load.rs`: [`load::Load`], the back end of every run: a steady stream
//!   of tasks, the acks and status reports it gets back, optional retries,
//!   the end-of-run invariants and figures.
//! - `crash_loop.rs`: SIGKILL at random moments, both `clean_session` modes;
//!   also with power cuts of the store's disk (issue 13).
//! - `powerfs.rs`: [`powerfs::PowerFs`], the FUSE file system of the power
//!   cuts: writes stay volatile until fsync of their file (needs root).
//! - `proxy.rs`: [`proxy::FaultProxy`], a loopback TCP proxy that drops,
//!   stalls, delays and cuts the agent's broker connection, and records
//!   which tasks the agent PUBACKed.
//! - `link_faults.rs`: a load run through the proxy, plus a broker restart.
//! - `hostile.rs`: 40+ malformed task and command payloads in a load run.
//! - `store_fault.rs`: a full disk (tmpfs, needs root) under load.
//!
//! The processes, broker and journal come from the end-to-end harness in
//! `tests/e2e/harness*`, shared, not copied.

#[path = "../e2e"]
mod e2e {
    // The suite here uses only part of the shared harness.
    #[allow(dead_code, unused_imports)]
    pub mod harness;
}
use e2e::harness;

mod crash_loop;
mod hostile;
mod link_faults;
mod load;
mod powerfs;
mod proxy;
mod store_fault;
