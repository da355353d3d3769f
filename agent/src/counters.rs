//! Process-wide counters: what happened since start, for status reports,
//! `agent.status` and the demo summary.
//!
//! Plain relaxed atomics: every task may bump them, nothing synchronises on
//! them, and a report that is a few increments stale is fine. A radio
//! backend's own counters (bad frames, timeouts) are attached once at start
//! and listed after these.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use esl_hal::RadioCounters;

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        #[derive(Debug, Default)]
        pub struct Counters {
            $($(#[$doc])* pub $name: AtomicU64,)*
            /// The radio backend's counters, if it keeps any.
            radio: OnceLock<Arc<dyn RadioCounters>>,
        }

        impl Counters {
            /// Current values by name, in declaration order, then the
            /// radio's.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                let mut all = vec![$((stringify!($name), self.$name.load(Ordering::Relaxed)),)*];
                if let Some(radio) = self.radio.get() {
                    all.extend(radio.snapshot());
                }
                all
            }
        }
    };
}

counters! {
    /// Task messages received (any content, including bad ones).
    tasks_received,
    /// Tasks stored as pending.
    tasks_accepted,
    /// Final acks by status.
    tasks_applied,
    tasks_failed,
    tasks_expired,
    tasks_superseded,
    tasks_rejected,
    /// Task messages whose `task_id` was already known.
    tasks_duplicate,
    /// Task messages rejected for a missing or wrong signature (also counted
    /// in `tasks_rejected`).
    tasks_bad_signature,
    /// Command messages received, and those that could not be read.
    commands_received,
    commands_bad,
    /// Commands dropped for a missing or wrong signature, and commands for
    /// a method `security.allowed_methods` leaves out.
    commands_bad_signature,
    commands_forbidden,
    /// Commands whose `reply_to` is outside `security.reply_to_allowed`:
    /// run, but not answered.
    commands_reply_to_refused,
    /// Command replies and `rejected` acks dropped by the
    /// limit on them (`limiter`): over the rate, or the outbox share full.
    replies_dropped,
    /// PUBLISH packets over the link's size limit, read and discarded
    /// without holding them (`link::oversize`), each answered `rejected`
    /// (tasks) or counted in `commands_bad` (commands).
    messages_oversized,
    /// Delivery attempts handed to the radio, and those that failed.
    deliveries,
    delivery_failures,
    /// Tag check-ins reported by the radio.
    checkins,
    /// Messages the broker delivered that the agent did not expect
    /// (unknown topic, QoS 0 task).
    mqtt_unexpected,
    /// MQTT connections made, and connection errors.
    mqtt_connects,
    mqtt_errors,
    /// PUBACKs for received tasks and commands handed to the MQTT client,
    /// each after the flush that made its message durable (the benchmark's
    /// ingest rate, docs/BENCHMARKS.md).
    mqtt_pubacks,
    /// Acks and replies the broker PUBACKed, and those published again after
    /// a PUBACK timeout.
    outbox_sent,
    outbox_resent,
    /// Store flushes, and flushes or writes that failed.
    store_flushes,
    store_errors,
}

impl Counters {
    /// The snapshot as a JSON object, as status reports and `agent.status`
    /// carry it.
    pub fn to_json(&self) -> serde_json::Value {
        let map: serde_json::Map<String, serde_json::Value> = self
            .snapshot()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.into()))
            .collect();
        serde_json::Value::Object(map)
    }

    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Lists `radio`'s counters in every snapshot from now on. One radio per
    /// agent: a second call changes nothing.
    pub fn attach_radio(&self, radio: Arc<dyn RadioCounters>) {
        let _ = self.radio.set(radio);
    }
}
