//! Wire formats of PROTOCOL §4–§7: decoding and validating tasks and
//! commands, encoding acks, replies and status reports.
//!
//! Everything that crosses MQTT is defined here and nowhere else. Decoding is
//! pure (no clock, no store): the engine decides what a valid task *means*
//! (duplicate, expired, superseded); this module only decides whether the
//! bytes are a well-formed task, and if not, which field breaks which rule.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

pub mod method;

pub use method::Method;

pub use crate::ids::{
    is_tag_char, is_valid_client_id, MAX_CLIENT_ID, MAX_TAG_ID, MAX_TASK_ID, MAX_TOPIC,
};

/// A task that passed every syntactic rule of PROTOCOL §4.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub task_id: String,
    pub tag_id: String,
    pub seq: u64,
    pub issued_at: u64,
    /// `None`: use `tasks.default_ttl_ms`.
    pub ttl_ms: Option<u64>,
    /// Canonical JSON of `content` (keys sorted, no whitespace).
    pub content: String,
    pub content_hash: String,
    pub reply_to: Option<String>,
}

/// Why a task payload was rejected. `task_id`/`reply_to` are whatever could
/// be read, so the `rejected` ack can still be addressed and correlated.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub task_id: Option<String>,
    pub tag_id: Option<String>,
    pub reply_to: Option<String>,
    /// Names the field and the rule, e.g. `issued_at: required`.
    pub detail: String,
}

/// Decodes and validates one task payload (PROTOCOL §4, rule 2).
pub fn decode_task(payload: &[u8], max_payload: usize) -> Result<Task, Rejection> {
    task_from_object(&parse_object(payload, max_payload)?)
}

/// The envelope rules of a task payload: size, UTF-8, one JSON object. The
/// object is what a signature check looks at before [`task_from_object`].
pub fn parse_object(payload: &[u8], max_payload: usize) -> Result<Map<String, Value>, Rejection> {
    // Nothing can be read from a message that fails here.
    let reject = |detail: String| {
        Err(Rejection {
            task_id: None,
            tag_id: None,
            reply_to: None,
            detail,
        })
    };
    if payload.len() > max_payload {
        // PROTOCOL §4 rule 2 still names the task when it can: a payload a
        // little over the limit is whole in memory (the link passes up to
        // OVER_LIMIT_READ more, and turns larger ones into stand-ins), so
        // its `task_id` is read; nothing else is.
        let task_id = (payload.len() <= max_payload.saturating_add(OVER_LIMIT_READ))
            .then(|| parse_strict(payload).ok())
            .flatten()
            .and_then(|v| match v {
                Value::Object(o) => readable_task_id(&o),
                _ => None,
            });
        return Err(Rejection {
            task_id,
            tag_id: None,
            reply_to: None,
            detail: format!(
                "payload: {} bytes is over the limit of {max_payload} bytes",
                payload.len()
            ),
        });
    }
    let text = match std::str::from_utf8(payload) {
        Ok(t) => t,
        Err(e) => {
            return reject(format!(
                "payload: not valid UTF-8 (at byte {})",
                e.valid_up_to()
            ))
        }
    };
    let value: Value = match parse_strict(text.as_bytes()) {
        Ok(v) => v,
        Err(e) => return reject(format!("payload: not valid JSON ({e})")),
    };
    let Value::Object(obj) = value else {
        return reject("payload: must be a JSON object".into());
    };
    Ok(obj)
}

/// How far over `limits.max_payload` a payload is still parsed for its
/// `task_id` (the link's own room above the limit, `broker_io`).
pub const OVER_LIMIT_READ: usize = 4 * 1024;

/// Longest `task_id` a `rejected` ack echoes (PROTOCOL §4 rule 2): longer
/// than any valid id, short enough that an ack stays small.
pub const MAX_ECHOED_TASK_ID: usize = 256;

/// The `task_id` a `rejected` ack carries (PROTOCOL §4 rule 2): the received
/// one when it is a JSON string of at most [`MAX_ECHOED_TASK_ID`]
/// characters, even if it breaks the id rule (so the back end can tell which
/// task was refused); `None` when absent, not a string, or longer. For
/// correlation only: nothing else is read.
pub fn readable_task_id(obj: &Map<String, Value>) -> Option<String> {
    match obj.get("task_id") {
        Some(Value::String(id)) if id.chars().count() <= MAX_ECHOED_TASK_ID => Some(id.clone()),
        _ => None,
    }
}

/// The field rules of PROTOCOL §4 on a parsed task object.
pub fn task_from_object(obj: &Map<String, Value>) -> Result<Task, Rejection> {
    let mut rejection = Rejection {
        task_id: None,
        tag_id: None,
        reply_to: None,
        detail: String::new(),
    };
    let reject = |mut r: Rejection, detail: String| {
        r.detail = detail;
        Err(r)
    };

    // Read the correlation fields first, leniently, so even a rejection of
    // another field can name the task and reach the right back end.
    rejection.task_id = readable_task_id(obj);
    if let Some(Value::String(id)) = obj.get("tag_id") {
        if valid_tag_like(id, MAX_TAG_ID) {
            rejection.tag_id = Some(id.clone());
        }
    }
    if let Some(Value::String(r)) = obj.get("reply_to") {
        if is_valid_client_id(r) {
            rejection.reply_to = Some(r.clone());
        }
    }

    match obj.get("v") {
        None => return reject(rejection, "v: required (must be 1)".into()),
        Some(v) if v.as_u64() == Some(1) => {}
        Some(v) => return reject(rejection, format!("v: must be 1, got {}", brief(v))),
    }
    let task_id = match tag_like_field(obj, "task_id", MAX_TASK_ID) {
        Ok(id) => id,
        Err(d) => return reject(rejection, d),
    };
    let tag_id = match tag_like_field(obj, "tag_id", MAX_TAG_ID) {
        Ok(id) => id,
        Err(d) => return reject(rejection, d),
    };
    let issued_at = match u64_field(obj, "issued_at") {
        Ok(Some(t)) => t,
        Ok(None) => {
            return reject(
                rejection,
                "issued_at: required (ms since the Unix epoch)".into(),
            )
        }
        Err(d) => return reject(rejection, d),
    };
    let seq = match u64_field(obj, "seq") {
        Ok(s) => s.unwrap_or(issued_at),
        Err(d) => return reject(rejection, d),
    };
    let ttl_ms = match u64_field(obj, "ttl_ms") {
        Ok(t) => t,
        Err(d) => return reject(rejection, d),
    };
    let content = match obj.get("content") {
        Some(c @ Value::Object(_)) => c,
        Some(other) => {
            return reject(
                rejection,
                format!("content: must be a JSON object, got {}", type_name(other)),
            )
        }
        None => return reject(rejection, "content: required (a JSON object)".into()),
    };
    let reply_to = match obj.get("reply_to") {
        None | Some(Value::Null) => None,
        Some(Value::String(r)) if is_valid_client_id(r) => Some(r.clone()),
        Some(Value::String(r)) => {
            return reject(
                rejection,
                format!(
                    "reply_to: {:?} must be a client id GROUP@@@DEVICE of letters, digits, '_' and '-', at most {MAX_CLIENT_ID} characters",
                    truncate(r, 80)
                ),
            )
        }
        Some(other) => {
            return reject(
                rejection,
                format!("reply_to: must be a string, got {}", type_name(other)),
            )
        }
    };
    let canonical = canonical_json(content);
    let content_hash = content_hash(canonical.as_bytes());
    Ok(Task {
        task_id,
        tag_id,
        seq,
        issued_at,
        ttl_ms,
        content: canonical,
        content_hash,
        reply_to,
    })
}

/// Parses JSON like `serde_json::from_slice::<Value>`, but refuses an
/// object with the same key twice, at any depth. RFC 8259 leaves duplicate
/// keys to the parser, so two parsers may read different `task_id`s (or
/// contents, and so content hashes) from one message; a hostile sender could
/// use that to make the agent and the back end disagree. Refused, such a
/// message gets a `rejected` ack naming the key. Nesting depth stays bounded
/// by serde_json's recursion limit (128).
fn parse_strict(bytes: &[u8]) -> Result<Value, serde_json::Error> {
    serde_json::from_slice::<StrictValue>(bytes).map(|v| v.0)
}

struct StrictValue(Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
        Ok(Value::Bool(b))
    }

    fn visit_i64<E>(self, n: i64) -> Result<Value, E> {
        Ok(n.into())
    }

    fn visit_u64<E>(self, n: u64) -> Result<Value, E> {
        Ok(n.into())
    }

    fn visit_f64<E>(self, n: f64) -> Result<Value, E> {
        // As serde_json's own `Value`: JSON text cannot hold NaN or infinity.
        Ok(serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, s: &str) -> Result<Value, E> {
        Ok(Value::String(s.to_owned()))
    }

    fn visit_string<E>(self, s: String) -> Result<Value, E> {
        Ok(Value::String(s))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        StrictValue::deserialize(d).map(|v| v.0)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(StrictValue(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut obj = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if obj.contains_key(&key) {
                return Err(serde::de::Error::custom(format_args!(
                    "duplicate key {:?}",
                    truncate(&key, 40)
                )));
            }
            let StrictValue(value) = map.next_value()?;
            obj.insert(key, value);
        }
        Ok(Value::Object(obj))
    }
}

fn valid_tag_like(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && s.chars().all(is_tag_char)
}

fn tag_like_field(obj: &Map<String, Value>, key: &str, max: usize) -> Result<String, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Err(format!("{key}: required")),
        Some(Value::String(s)) if s.is_empty() => Err(format!("{key}: must not be empty")),
        Some(Value::String(s)) if s.chars().count() > max => Err(format!(
            "{key}: {} characters is over the limit of {max}",
            s.chars().count()
        )),
        Some(Value::String(s)) if !s.chars().all(is_tag_char) => Err(format!(
            "{key}: {:?} may contain only letters, digits, '_', '.', ':' and '-'",
            truncate(s, 80)
        )),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!("{key}: must be a string, got {}", type_name(other))),
    }
}

/// An optional non-negative integer field. `Ok(None)` when absent or null.
fn u64_field(obj: &Map<String, Value>, key: &str) -> Result<Option<u64>, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(v) => Ok(Some(v)),
            None => Err(format!(
                "{key}: must be a non-negative integer below 2^64, got {n}"
            )),
        },
        Some(other) => Err(format!(
            "{key}: must be a non-negative integer, got {}",
            type_name(other)
        )),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A short rendering of a value for error messages (never the whole payload).
fn brief(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{:?}", truncate(s, 40)),
        Value::Number(n) => n.to_string(),
        other => type_name(other).to_owned(),
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let cut: String = s.chars().take(max).collect();
        format!("{cut}…")
    }
}

/// Canonical form of a JSON value: keys sorted (serde_json's default map is
/// ordered), no insignificant whitespace. Two APs given the same content
/// produce the same bytes and so the same hash.
pub fn canonical_json(v: &Value) -> String {
    // Serialising a `Value` to a string cannot fail: it has no non-string keys
    // and no I/O is involved.
    serde_json::to_string(v).expect("a JSON value serialises")
}

/// `content_hash` of PROTOCOL §5: first 8 bytes of SHA-256, as 16 hex digits.
pub fn content_hash(canonical: &[u8]) -> String {
    let digest = Sha256::digest(canonical);
    hex::encode(&digest[..8])
}

/// Final and progress states of a task as they appear on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AckStatus {
    Accepted,
    Applied,
    Failed,
    Expired,
    Superseded,
    Rejected,
}

impl AckStatus {
    const ALL: [AckStatus; 6] = [
        AckStatus::Accepted,
        AckStatus::Applied,
        AckStatus::Failed,
        AckStatus::Expired,
        AckStatus::Superseded,
        AckStatus::Rejected,
    ];

    /// The wire name (what serde writes; the store keeps the same text).
    pub fn as_str(self) -> &'static str {
        match self {
            AckStatus::Accepted => "accepted",
            AckStatus::Applied => "applied",
            AckStatus::Failed => "failed",
            AckStatus::Expired => "expired",
            AckStatus::Superseded => "superseded",
            AckStatus::Rejected => "rejected",
        }
    }

    /// The status with this wire name.
    pub fn from_name(name: &str) -> Option<AckStatus> {
        AckStatus::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

/// PROTOCOL §5 ack.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ack {
    pub v: u8,
    #[serde(rename = "type")]
    pub kind: String,
    pub task_id: Option<String>,
    pub tag_id: Option<String>,
    pub status: AckStatus,
    pub agent: String,
    pub at: u64,
    pub attempts: u32,
    pub content_hash: Option<String>,
    pub detail: Option<String>,
    pub duplicate: bool,
    /// For a message whose signature failed: the `task_id` it claimed.
    /// `task_id` stays null, so a forged message can never produce an ack
    /// that names (and seems to settle) a real task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unverified_task_id: Option<String>,
    /// Where the ack goes (`reply_to` or `ack_to`); not sent on the wire
    /// separately from the topic, but kept so a duplicate can be re-addressed.
    #[serde(skip)]
    pub target: String,
}

impl Ack {
    pub fn to_json(&self) -> Vec<u8> {
        // Plain data with string keys: serialisation cannot fail.
        serde_json::to_vec(self).expect("an ack serialises")
    }
}

/// PROTOCOL §7 command request, as far as the agent needs to read it.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    pub req_id: Option<String>,
    pub method: String,
    pub params: Value,
    pub reply: bool,
    pub reply_to: Option<String>,
}

/// A command that could not be read; answered with an error reply when a
/// `reply_to` could be found.
#[derive(Debug, Clone, PartialEq)]
pub struct BadCommand {
    pub req_id: Option<String>,
    pub reply_to: Option<String>,
    /// False when the request said `"reply": false` (PROTOCOL §7: then no
    /// reply at all, also for a bad request).
    pub wants_reply: bool,
    pub message: String,
}

pub fn decode_command(payload: &[u8], max_payload: usize) -> Result<Command, BadCommand> {
    let obj = parse_object(payload, max_payload).map_err(|r| BadCommand {
        req_id: None,
        reply_to: None,
        wants_reply: true,
        message: r.detail,
    })?;
    command_from_object(&obj)
}

/// The field rules of PROTOCOL §7 on a parsed command object.
pub fn command_from_object(obj: &Map<String, Value>) -> Result<Command, BadCommand> {
    let mut bad = BadCommand {
        req_id: None,
        reply_to: None,
        wants_reply: obj.get("reply") != Some(&Value::Bool(false)),
        message: String::new(),
    };
    if let Some(Value::String(r)) = obj.get("req_id") {
        if r.len() <= MAX_TASK_ID {
            bad.req_id = Some(r.clone());
        }
    }
    if let Some(Value::String(r)) = obj.get("reply_to") {
        if is_valid_client_id(r) {
            bad.reply_to = Some(r.clone());
        }
    }
    if obj.get("v").and_then(Value::as_u64) != Some(1) {
        bad.message = "v: must be 1".into();
        return Err(bad);
    }
    let method = match obj.get("method") {
        Some(Value::String(m)) if !m.is_empty() && m.len() <= 64 => m.clone(),
        _ => {
            bad.message = "method: required (a string of at most 64 characters)".into();
            return Err(bad);
        }
    };
    let reply = match obj.get("reply") {
        None => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            bad.message = "reply: must be a boolean".into();
            return Err(bad);
        }
    };
    match obj.get("reply_to") {
        None | Some(Value::Null) => {}
        Some(Value::String(r)) if is_valid_client_id(r) => {}
        Some(_) => {
            bad.message = "reply_to: must be a client id GROUP@@@DEVICE".into();
            return Err(bad);
        }
    }
    Ok(Command {
        req_id: bad.req_id,
        method,
        params: obj.get("params").cloned().unwrap_or(Value::Null),
        reply,
        reply_to: bad.reply_to,
    })
}

/// Stable error codes of command replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    UnknownMethod,
    BadParams,
    NotFound,
    InvalidState,
    Internal,
    /// The method exists but `security.allowed_methods` leaves it out.
    Forbidden,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplyError {
    pub code: ErrorCode,
    pub message: String,
}

/// PROTOCOL §7 reply.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Reply {
    pub v: u8,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub req_id: Option<String>,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ReplyError>,
    pub agent: String,
}

impl Reply {
    pub fn to_json(&self) -> Vec<u8> {
        // Plain data and `Value`s: serialisation cannot fail.
        serde_json::to_vec(self).expect("a reply serialises")
    }
}

/// The radio's part of `agent.status` and the status reports: its state,
/// and its firmware once the backend named it.
pub fn radio_json(radio: &esl_hal::RadioState, details: &esl_hal::RadioDetails) -> Value {
    let mut v = match radio {
        esl_hal::RadioState::Up => serde_json::json!({"state": "up"}),
        esl_hal::RadioState::Down { reason } => {
            serde_json::json!({"state": "down", "reason": reason})
        }
    };
    if let Some(firmware) = &details.firmware {
        v["firmware"] = serde_json::json!(firmware);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_status_names_are_the_serde_names() {
        for status in AckStatus::ALL {
            assert_eq!(serde_json::to_value(status).unwrap(), status.as_str());
            assert_eq!(AckStatus::from_name(status.as_str()), Some(status));
        }
        assert_eq!(AckStatus::from_name("pending"), None);
    }

    fn good() -> Value {
        serde_json::json!({
            "v": 1, "task_id": "t-1", "tag_id": "SIM000001", "seq": 5,
            "issued_at": 1000, "ttl_ms": 60000,
            "content": {"price": "9.90", "name": "Milk"},
            "reply_to": "GID_backend@@@be1"
        })
    }

    fn decode(v: &Value) -> Result<Task, Rejection> {
        decode_task(v.to_string().as_bytes(), 65536)
    }

    fn with(key: &str, value: Value) -> Value {
        let mut v = good();
        v[key] = value;
        v
    }

    fn without(key: &str) -> Value {
        let mut v = good();
        v.as_object_mut().unwrap().remove(key);
        v
    }

    /// Regression (issue 3): with duplicate keys the last one won, so one
    /// message could carry two task ids (or two contents) depending on the
    /// parser that reads it.
    #[test]
    fn duplicate_keys_are_rejected_at_any_depth() {
        let top = br#"{"v":1,"task_id":"a","task_id":"b","tag_id":"T","issued_at":1,"content":{}}"#;
        let r = decode_task(top, 65536).unwrap_err();
        assert!(
            r.detail.contains("duplicate key \"task_id\""),
            "{}",
            r.detail
        );
        let nested =
            br#"{"v":1,"task_id":"a","tag_id":"T","issued_at":1,"content":{"p":{"x":1,"x":2}}}"#;
        let r = decode_task(nested, 65536).unwrap_err();
        assert!(r.detail.contains("duplicate key \"x\""), "{}", r.detail);
        let cmd = br#"{"v":1,"method":"agent.status","method":"task.cancel"}"#;
        let bad = decode_command(cmd, 65536).unwrap_err();
        assert!(bad.message.contains("duplicate key"), "{}", bad.message);
        // Equal keys in different objects are fine.
        let ok = br#"{"v":1,"task_id":"a","tag_id":"T","issued_at":1,"content":{"p":{"v":1},"q":{"v":1}}}"#;
        assert!(decode_task(ok, 65536).is_ok());
    }

    /// Regression (issue 3, found by the `decode_task` fuzz target):
    /// serde_json's default float parser is not correctly rounded, so the
    /// canonical form of a content with a long number parsed back to a
    /// different number, and "the same content, the same hash" (PROTOCOL §5)
    /// did not hold between the agent and any exact parser, or between two
    /// passes of the agent's own canonicalisation.
    #[test]
    fn canonical_content_is_a_fixed_point_for_long_numbers() {
        // The fuzzer's number: 115 digits, beyond u64, parsed as a float.
        let long = format!("11642304000{}00", "5".repeat(102));
        assert_eq!(long.len(), 115);
        for number in [
            long.as_str(),
            "0.1",
            "9.90",
            "1e-7",
            "2.2250738585072014e-308",
            "360.00",
        ] {
            let payload = format!(
                r#"{{"v":1,"task_id":"a","tag_id":"T","issued_at":1,"content":{{"x":{number}}}}}"#
            );
            let task = decode_task(payload.as_bytes(), 65536).unwrap();
            let again: Value = serde_json::from_str(&task.content).unwrap();
            assert_eq!(
                canonical_json(&again),
                task.content,
                "content with {number}"
            );
        }
    }

    #[test]
    fn deep_nesting_and_odd_numbers_are_rejected_not_fatal() {
        let deep = format!(
            r#"{{"v":1,"task_id":"a","tag_id":"T","issued_at":1,"content":{{"x":{}1{}}}}}"#,
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        let r = decode_task(deep.as_bytes(), 1 << 20).unwrap_err();
        assert!(r.detail.starts_with("payload:"), "{}", r.detail);
        for (field, value) in [
            ("issued_at", "1e400"),
            ("issued_at", "18446744073709551616"),
            ("seq", "-1"),
            ("ttl_ms", "1.5"),
        ] {
            let text = format!(
                r#"{{"v":1,"task_id":"a","tag_id":"T","issued_at":1,"content":{{}},"{field}":{value}}}"#
            );
            let text = text.replacen(r#""issued_at":1,"#, "", usize::from(field == "issued_at"));
            assert!(decode_task(text.as_bytes(), 65536).is_err(), "{text}");
        }
    }

    #[test]
    fn a_good_task_decodes() {
        let t = decode(&good()).unwrap();
        assert_eq!(t.task_id, "t-1");
        assert_eq!(t.tag_id, "SIM000001");
        assert_eq!(t.seq, 5);
        assert_eq!(t.ttl_ms, Some(60000));
        assert_eq!(t.content, r#"{"name":"Milk","price":"9.90"}"#);
        assert_eq!(t.reply_to.as_deref(), Some("GID_backend@@@be1"));
    }

    #[test]
    fn seq_defaults_to_issued_at_and_unknown_fields_are_ignored() {
        let mut v = without("seq");
        v["future_field"] = serde_json::json!({"x": 1});
        let t = decode(&v).unwrap();
        assert_eq!(t.seq, 1000);
    }

    #[test]
    fn content_hash_ignores_key_order_and_whitespace() {
        let a = decode_task(
            br#"{"v":1,"task_id":"a","tag_id":"t","issued_at":1,"content":{"a":1,"b":[1,2]}}"#,
            65536,
        )
        .unwrap();
        let b = decode_task(
            br#"{ "v":1, "task_id":"b", "tag_id":"t", "issued_at":1, "content": { "b": [1, 2], "a": 1 } }"#,
            65536,
        )
        .unwrap();
        assert_eq!(a.content_hash, b.content_hash);
        assert_eq!(a.content_hash.len(), 16);
        // Independently known: sha256("test") starts with 9f86d081884c7d65.
        assert_eq!(content_hash(b"test"), "9f86d081884c7d65");
    }

    #[test]
    fn every_rejection_names_its_field() {
        let cases: Vec<(Value, &str)> = vec![
            (with("v", 2.into()), "v:"),
            (without("v"), "v:"),
            (without("task_id"), "task_id:"),
            (with("task_id", "".into()), "task_id:"),
            (with("task_id", "a".repeat(65).into()), "task_id:"),
            (with("task_id", "bad id".into()), "task_id:"),
            (with("task_id", 7.into()), "task_id:"),
            (without("tag_id"), "tag_id:"),
            (with("tag_id", "x".repeat(33).into()), "tag_id:"),
            (with("tag_id", "a/b".into()), "tag_id:"),
            (without("issued_at"), "issued_at:"),
            (with("issued_at", (-1).into()), "issued_at:"),
            (with("issued_at", "1000".into()), "issued_at:"),
            (with("issued_at", 1.5.into()), "issued_at:"),
            (with("seq", "x".into()), "seq:"),
            (with("ttl_ms", (-5).into()), "ttl_ms:"),
            (without("content"), "content:"),
            (with("content", "text".into()), "content:"),
            (with("content", serde_json::json!([1])), "content:"),
            (with("reply_to", "nobody".into()), "reply_to:"),
            (with("reply_to", "GID_a@@@b/c".into()), "reply_to:"),
            (with("reply_to", 3.into()), "reply_to:"),
        ];
        for (v, field) in cases {
            let r = decode(&v).unwrap_err();
            assert!(
                r.detail.starts_with(field),
                "payload {v} gave detail {:?}, wanted field {field}",
                r.detail
            );
        }
    }

    #[test]
    fn rejections_keep_the_readable_task_id() {
        let r = decode(&without("issued_at")).unwrap_err();
        assert_eq!(r.task_id.as_deref(), Some("t-1"));
        assert_eq!(r.reply_to.as_deref(), Some("GID_backend@@@be1"));
        let r = decode(&without("task_id")).unwrap_err();
        assert_eq!(r.task_id, None);
        let r = decode(&with("task_id", 7.into())).unwrap_err();
        assert_eq!(r.task_id, None, "not a string");
    }

    /// Issue 14 item 2: an id that breaks the rule is still echoed (up to
    /// 256 characters), so the back end can tell which task was refused.
    #[test]
    fn rejections_echo_a_rule_breaking_task_id_up_to_256_characters() {
        for id in ["a".repeat(65), "bad id".into(), "".into(), "ü".repeat(256)] {
            let r = decode(&with("task_id", id.clone().into())).unwrap_err();
            assert!(r.detail.starts_with("task_id:"), "{}", r.detail);
            assert_eq!(r.task_id.as_deref(), Some(id.as_str()));
        }
        let r = decode(&with("task_id", "a".repeat(257).into())).unwrap_err();
        assert_eq!(r.task_id, None, "longer than 256: null");
        // Another field's rejection echoes a rule-breaking id as well.
        let mut v = with("task_id", "has space".into());
        v.as_object_mut().unwrap().remove("issued_at");
        assert_eq!(
            decode(&v).unwrap_err().task_id.as_deref(),
            Some("has space")
        );
    }

    #[test]
    fn envelope_failures_are_rejections_without_task_id() {
        for payload in [
            &b""[..],
            b"not json",
            b"\xff\xfe\x00",
            b"[1,2,3]",
            b"\"string\"",
            b"{\"v\":1",
        ] {
            let r = decode_task(payload, 65536).unwrap_err();
            assert_eq!(r.task_id, None);
            assert!(r.detail.starts_with("payload:"), "{}", r.detail);
        }
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        let r = decode_task(deep.as_bytes(), 65536).unwrap_err();
        assert!(r.detail.starts_with("payload:"));
    }

    #[test]
    fn payload_over_the_limit_is_rejected_naming_its_task_when_readable() {
        let mut task = good();
        task["content"]["padding"] = "x".repeat(2 * OVER_LIMIT_READ).into();
        let big = task.to_string();
        let r = decode_task(big.as_bytes(), big.len() - 10).unwrap_err();
        assert!(r.detail.contains("over the limit"), "{}", r.detail);
        assert_eq!(r.task_id.as_deref(), task["task_id"].as_str(), "rule 2");
        let far = decode_task(big.as_bytes(), big.len() - OVER_LIMIT_READ - 1).unwrap_err();
        assert!(far.detail.contains("over the limit"), "{}", far.detail);
        assert_eq!(far.task_id, None, "far over the limit: not parsed");
    }

    #[test]
    fn client_id_rules() {
        assert!(is_valid_client_id("GID_a@@@b-1"));
        assert!(!is_valid_client_id("GID_a@@b"));
        assert!(!is_valid_client_id("@@@b"));
        assert!(!is_valid_client_id("GID_a@@@"));
        assert!(!is_valid_client_id("GID_a@@@b@@@c"));
        assert!(!is_valid_client_id(&format!("GID_a@@@{}", "d".repeat(60))));
    }

    #[test]
    fn commands_decode_and_name_their_faults() {
        let c = decode_command(
            br#"{"v":1,"req_id":"r-1","method":"tags.list","params":{},"reply":true,"reply_to":"GID_c@@@c1"}"#,
            65536,
        )
        .unwrap();
        assert_eq!(c.method, "tags.list");
        assert!(c.reply);
        let bad = decode_command(br#"{"v":1,"req_id":"r-2","reply_to":"GID_c@@@c1"}"#, 65536)
            .unwrap_err();
        assert_eq!(bad.req_id.as_deref(), Some("r-2"));
        assert_eq!(bad.reply_to.as_deref(), Some("GID_c@@@c1"));
        assert!(bad.message.starts_with("method:"));
    }
}
