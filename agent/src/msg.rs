//! The messages the tasks send each other, in one place below every task:
//! the link and the engine, the status and systemd tasks and the control
//! server all speak these, and none of them has to import another task for
//! its types. (Channel capacities stay with the task that owns the
//! receiving end.)

use bytes::Bytes;
use esl_hal::RadioState;
use tokio::sync::oneshot;

// ---- link → engine: messages to decide, and the PUBACKs that may follow ----

/// Identifies one received MQTT message, so the link can PUBACK it once the
/// engine says it is durable. `epoch` is the link's connection number: a
/// PUBACK for an older connection must not be sent (its packet id belongs to
/// a connection that no longer exists).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AckToken {
    pub epoch: u64,
    pub pkid: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InboundKind {
    Task,
    Command,
}

/// One QoS 1 message for the engine.
#[derive(Debug)]
pub(crate) struct Inbound {
    pub kind: InboundKind,
    pub payload: Bytes,
    pub token: AckToken,
    /// The message was over the link's size limit and was discarded unread
    /// (`oversize`); this is its payload size, and `payload` is empty.
    pub oversized: Option<usize>,
}

/// A question to the engine from another task.
#[derive(Debug)]
pub(crate) enum Query {
    Snapshot(oneshot::Sender<Snapshot>),
    /// A command from the local control socket (same JSON as PROTOCOL §7).
    /// The reply is sent once whatever the command changed is durable.
    Command {
        payload: Bytes,
        reply: oneshot::Sender<Vec<u8>>,
    },
    /// Answered at once: proves the engine loop is turning (the systemd
    /// watchdog pings only after an answer).
    Ping(oneshot::Sender<()>),
}

/// What status reports need to know.
#[derive(Debug, Clone)]
pub(crate) struct Snapshot {
    pub pending: usize,
    pub outbox: u64,
    pub radio: RadioState,
    pub radio_details: esl_hal::RadioDetails,
    pub store_fault: Option<String>,
    pub tags: Vec<TagView>,
}

/// A tag as reported in status and `tags.list`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub(crate) struct TagView {
    pub tag_id: String,
    pub battery_mv: Option<u16>,
    pub rssi: Option<i16>,
    pub content_hash: Option<String>,
    pub last_seen: Option<u64>,
    pub online: bool,
    pub pending_task: Option<String>,
    /// What the radio told about the tag besides its check-ins
    /// ([`esl_hal::TagDetails`]): in `tag.get` and `tags.list`, not in the
    /// status reports (which stay small).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub radio: Option<Box<serde_json::Map<String, serde_json::Value>>>,
}

// ---- link → status, engine: the connection; status → link: reports ----

/// Connection state, published on a watch channel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkState {
    pub connected: bool,
    /// Number of the current (or last) connection; 0 before the first.
    pub epoch: u64,
}

/// A status payload to publish (QoS 1, not durable).
#[derive(Debug, Clone)]
pub(crate) struct Report {
    pub topic: String,
    pub payload: Vec<u8>,
}

// ---- engine → radio: requests that are not deliveries ----

/// Requests to the radio that are not deliveries (remote commands and the
/// local CLI ask for them through the engine).
#[derive(Debug)]
pub(crate) enum RadioControl {
    /// Open the network for joining for `seconds` (0 closes it). The
    /// outcome is logged: commands answer when the request is handed over.
    PermitJoin { seconds: u8 },
    /// Move the radio's network to `channel` (ZigBee 11..=26). The outcome
    /// is logged, as for `PermitJoin`.
    ChangeChannel { channel: u8 },
}
