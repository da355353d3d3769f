//! Remote commands (PROTOCOL §7): decode, dispatch, reply through the
//! outbox.
//!
//! Runs inside the engine task (commands read and change the engine's
//! state), so it owns no channel. Every request that asks for a reply gets
//! one, also for unknown methods and bad params: at its `reply_to`, or at
//! `mqtt.ack_to` when it names none (PROTOCOL §3/§7); a request with
//! `"reply": false` gets none. Replies go through the durable outbox like
//! acks, within the limit of [`crate::engine::limiter`]. Listings are paged so that
//! a reply always fits `limits.max_payload`.
//!
//! Least privilege: only methods in `security.allowed_methods` run (others
//! get a `forbidden` error); methods that change state ([`Method::mutating`]) run
//! only from signed commands unless `security.allow_unsigned_methods` names
//! them. With `security.require_signed_commands`, a command without a valid
//! signature gets no reply at all: its `reply_to` is not trusted, so it may
//! not choose where the agent publishes. A `reply_to` is always a client id
//! (`GROUP@@@DEVICE` of `[A-Za-z0-9_-]`), so no message can steer a reply
//! outside `{reply_parent}/p2p/`, and it must match
//! `security.reply_to_allowed`, so the AP cannot be made to send replies to
//! a stranger (an amplifier). The local control socket is trusted by its
//! file mode and may call every method.

use serde_json::{json, Value};
use tracing::{debug, warn};

use crate::counters::Counters;
use crate::engine::State;
use crate::msg::TagView;
use crate::security::signing::{Purpose, Verdict};
use crate::store::{Change, OutboxEntry, StoreError, TaskRecord, TaskState};
use crate::wire::{self, ErrorCode, Method, Reply, ReplyError};

/// Page size of listings when the request names none.
const DEFAULT_LIMIT: usize = 50;
/// Largest page a request may ask for.
const MAX_LIMIT: usize = 500;

/// Why a method gave no result: an error reply for the caller, or a store
/// failure, which answers nobody: the engine holds the command's PUBACK
/// and runs it again once the store is back.
#[derive(Debug)]
enum MethodError {
    Reply(ReplyError),
    Store(StoreError),
}

impl From<ReplyError> for MethodError {
    fn from(e: ReplyError) -> Self {
        MethodError::Reply(e)
    }
}

impl From<StoreError> for MethodError {
    fn from(e: StoreError) -> Self {
        MethodError::Store(e)
    }
}

type MethodResult = Result<Value, MethodError>;

fn error(code: ErrorCode, message: impl Into<String>) -> ReplyError {
    ReplyError {
        code,
        message: message.into(),
    }
}

/// A decoded request and the reply it earned.
struct Answered {
    reply_to: Option<String>,
    wants_reply: bool,
    reply: Reply,
}

/// Who asked: remote requests are subject to `security.allowed_methods`
/// and, for [`Method::mutating`] methods, to a signature; the local socket (file
/// permissions already restrict it to the agent's user and root) may call
/// every method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller {
    Remote { signed: bool },
    Local,
}

/// Whether `client_id` matches `pattern`, where `*` stands for any run of
/// characters (also none) and everything else for itself.
pub(crate) fn matches_pattern(pattern: &str, client_id: &str) -> bool {
    let mut parts = pattern.split('*');
    // `split` yields at least one part.
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = client_id.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty(); // no `*`: an exact match
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

fn reply(state: &State, req_id: Option<String>, outcome: Result<Value, ReplyError>) -> Reply {
    let (ok, result, error) = match outcome {
        Ok(result) => (true, Some(result), None),
        Err(e) => (false, None, Some(e)),
    };
    Reply {
        v: 1,
        kind: "reply",
        req_id,
        ok,
        result,
        error,
        agent: state.identity().client_id.clone(),
    }
}

/// Executes one request read as a JSON object; every request gets a
/// [`Reply`], which the caller sends or drops.
fn answer(
    state: &mut State,
    object: &serde_json::Map<String, Value>,
    caller: Caller,
    now: u64,
    change: &mut Change,
) -> Result<Answered, StoreError> {
    let (req_id, reply_to, wants_reply, outcome) = match wire::command_from_object(object) {
        Ok(cmd) => {
            debug!(method = %cmd.method, req_id = ?cmd.req_id, ?caller, "command");
            let outcome = match dispatch(state, &cmd.method, &cmd.params, caller, now, change) {
                Ok(value) => Ok(value),
                Err(MethodError::Reply(e)) => Err(e),
                // Nobody is answered: the engine holds the PUBACK and runs
                // the command again once the store is back.
                Err(MethodError::Store(e)) => return Err(e),
            };
            (cmd.req_id, cmd.reply_to, cmd.reply, outcome)
        }
        Err(bad) => {
            Counters::bump(&state.counters().commands_bad);
            debug!(message = %bad.message, "bad command");
            (
                bad.req_id,
                bad.reply_to,
                bad.wants_reply,
                Err(error(ErrorCode::BadRequest, bad.message)),
            )
        }
    };
    Ok(Answered {
        reply_to,
        wants_reply,
        reply: reply(state, req_id, outcome),
    })
}

/// Handles one command that came over MQTT: the reply goes into the outbox
/// for `reply_to` (or `mqtt.ack_to` without one), unless the request said
/// `"reply": false`.
pub(crate) fn handle(
    state: &mut State,
    payload: &[u8],
    now: u64,
    change: &mut Change,
) -> Result<(), StoreError> {
    Counters::bump(&state.counters().commands_received);
    let object = match wire::parse_object(payload, state.settings().max_payload) {
        Ok(o) => o,
        Err(r) => {
            // Not a JSON object: nothing (no `req_id`) to answer.
            Counters::bump(&state.counters().commands_bad);
            debug!(message = %r.detail, "bad command");
            return Ok(());
        }
    };
    let signed = match state.verifier().check(Purpose::Command, &object) {
        Ok(verdict) => matches!(verdict, Verdict::Verified { .. }),
        Err(e) => {
            Counters::bump(&state.counters().commands_bad_signature);
            warn!(reason = %e, "command with a bad signature dropped without a reply");
            return Ok(());
        }
    };
    let answered = answer(state, &object, Caller::Remote { signed }, now, change)?;
    if !answered.wants_reply {
        return Ok(());
    }
    let target = match (&answered.reply_to, object.get("reply_to")) {
        (Some(r), _) => r.clone(),
        // PROTOCOL §3/§7: no `reply_to`, the reply goes to `ack_to`.
        (None, None | Some(serde_json::Value::Null)) => state.settings().ack_to.clone(),
        // A `reply_to` that is no client id: nobody to answer (counted in
        // `commands_bad`); `ack_to` is not who asked for the reply.
        (None, Some(_)) => return Ok(()),
    };
    if !state.identity().reply_topic_fits(&target) {
        return Ok(());
    }
    if answered.reply_to.is_some()
        && !state
            .settings()
            .reply_to_allowed
            .iter()
            .any(|p| matches_pattern(p, &target))
    {
        Counters::bump(&state.counters().commands_reply_to_refused);
        debug!(reply_to = %target, "reply_to outside security.reply_to_allowed: no reply");
        return Ok(());
    }
    if !state.admit_limited(now, "command reply") {
        return Ok(());
    }
    change.push_outbox(OutboxEntry {
        topic: state.identity().reply_topic(&target),
        payload: answered.reply.to_json(),
    });
    Ok(())
}

/// Handles one command from the local control socket: the reply is
/// returned to the caller, whatever `reply`/`reply_to` say.
pub(crate) fn handle_local(
    state: &mut State,
    payload: &[u8],
    now: u64,
    change: &mut Change,
) -> Result<Vec<u8>, StoreError> {
    Counters::bump(&state.counters().commands_received);
    let object = match wire::parse_object(payload, state.settings().max_payload) {
        Ok(o) => o,
        Err(r) => {
            Counters::bump(&state.counters().commands_bad);
            let outcome = Err(error(ErrorCode::BadRequest, r.detail));
            return Ok(reply(state, None, outcome).to_json());
        }
    };
    Ok(answer(state, &object, Caller::Local, now, change)?
        .reply
        .to_json())
}

fn dispatch(
    state: &mut State,
    name: &str,
    params: &Value,
    caller: Caller,
    now: u64,
    change: &mut Change,
) -> MethodResult {
    let Some(method) = Method::from_name(name) else {
        return Err(error(
            ErrorCode::UnknownMethod,
            format!(
                "unknown method {name:?}; known: {}",
                Method::names(|_| true)
            ),
        )
        .into());
    };
    if let Caller::Remote { signed } = caller {
        let settings = state.settings();
        if !settings.allowed_methods.contains(&method) {
            Counters::bump(&state.counters().commands_forbidden);
            return Err(error(
                ErrorCode::Forbidden,
                format!("method {name:?} is not allowed on this agent (security.allowed_methods)"),
            )
            .into());
        }
        if !signed && method.mutating() && !settings.allow_unsigned_methods.contains(&method) {
            Counters::bump(&state.counters().commands_forbidden);
            return Err(error(
                ErrorCode::Forbidden,
                format!(
                    "method {name:?} changes state and runs only from a signed command (security.allow_unsigned_methods)"
                ),
            )
            .into());
        }
    }
    match method {
        Method::AgentStatus => Ok(agent_status(state)),
        Method::TagsList => tags_list(state, params, now),
        Method::TagGet => tag_get(state, params, now),
        Method::TasksList => tasks_list(state, params),
        Method::TaskCancel => task_cancel(state, params, now, change),
        Method::TagRefresh => tag_refresh(state, params),
        Method::NetworkPermitJoin => permit_join(state, params),
        Method::NetworkChangeChannel => change_channel(state, params),
    }
}

/// Longest permit-join the ZigBee standard allows in one request (255 means
/// "until closed", which the agent does not offer: a network left open lets
/// any device join).
const MAX_PERMIT_JOIN_S: u64 = 254;

/// `network.permit_join {"seconds": N}`: asks the radio task to open the
/// network for joining (0 closes it). The reply says the request was
/// handed to the radio; the radio's own answer is logged (the engine does
/// not wait for the radio, whose adapter may be slow or restarting).
fn permit_join(state: &State, params: &Value) -> MethodResult {
    let seconds = match params.get("seconds").and_then(Value::as_u64) {
        Some(s) if s <= MAX_PERMIT_JOIN_S => s as u8,
        _ => {
            return Err(error(
                ErrorCode::BadParams,
                format!("params.seconds must be a whole number from 0 to {MAX_PERMIT_JOIN_S}"),
            )
            .into())
        }
    };
    hand_to_radio(state, crate::msg::RadioControl::PermitJoin { seconds })?;
    Ok(json!({"requested": true, "seconds": seconds}))
}

/// `network.change_channel {"channel": N}` (11..=26): asks the radio task
/// to move the network to another channel. Answers when the request is
/// handed to the radio, like `network.permit_join`; the move takes the
/// coordinator seconds, and the radio logs its outcome.
fn change_channel(state: &State, params: &Value) -> MethodResult {
    let channel = match params.get("channel").and_then(Value::as_u64) {
        Some(c @ 11..=26) => c as u8,
        _ => {
            return Err(error(
                ErrorCode::BadParams,
                "params.channel must be a ZigBee channel, a whole number from 11 to 26",
            )
            .into())
        }
    };
    hand_to_radio(state, crate::msg::RadioControl::ChangeChannel { channel })?;
    Ok(json!({"requested": true, "channel": channel}))
}

/// Hands a request to the radio task without waiting for the radio.
fn hand_to_radio(state: &State, control: crate::msg::RadioControl) -> Result<(), MethodError> {
    let Some(tx) = state.radio_control() else {
        return Err(error(ErrorCode::InvalidState, "no radio is running").into());
    };
    tx.try_send(control).map_err(|_| {
        error(
            ErrorCode::InvalidState,
            "the radio is busy with earlier requests; try again in a moment",
        )
        .into()
    })
}

fn agent_status(state: &State) -> Value {
    let counters = state.counters().to_json();
    let link = state.link_state();
    json!({
        "agent": state.identity().client_id,
        "version": env!("CARGO_PKG_VERSION"),
        "pending": state.pending_len(),
        "outbox": state.store().outbox_len(),
        "radio": wire::radio_json(state.radio_state(), state.radio_details()),
        "mqtt": {"connected": link.connected, "connections": link.epoch},
        "counters": counters,
    })
}

fn str_param<'a>(params: &'a Value, key: &str) -> Result<Option<&'a str>, ReplyError> {
    match params.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(error(
            ErrorCode::BadParams,
            format!("params.{key}: must be a string"),
        )),
    }
}

fn limit_param(params: &Value) -> Result<usize, ReplyError> {
    match params.get("limit") {
        None | Some(Value::Null) => Ok(DEFAULT_LIMIT),
        Some(v) => match v.as_u64() {
            Some(n) if (1..=MAX_LIMIT as u64).contains(&n) => Ok(n as usize),
            _ => Err(error(
                ErrorCode::BadParams,
                format!("params.limit: must be an integer between 1 and {MAX_LIMIT}"),
            )),
        },
    }
}

/// Trims `items` until the page, wrapped by `wrap`, fits the payload limit
/// with room for the reply envelope. Returns the page.
fn fit_page<T: Clone>(items: &[T], max_payload: usize, wrap: impl Fn(&[T]) -> Value) -> Value {
    // The envelope (`{"v":1,"type":"reply",…}`) takes well under 512 bytes.
    let budget = max_payload.saturating_sub(512);
    let mut n = items.len();
    loop {
        let page = wrap(&items[..n]);
        if n == 0 || page.to_string().len() <= budget {
            return page;
        }
        n /= 2;
    }
}

fn tags_list(state: &State, params: &Value, now: u64) -> MethodResult {
    let after = str_param(params, "after")?;
    let limit = limit_param(params)?;
    let tags: Vec<TagView> = state
        .tag_views_after(after, limit.saturating_add(1), now)
        .map_err(|e| error(ErrorCode::Internal, format!("reading the store: {e}")))?;
    let more_after_limit = tags.len() > limit;
    let tags = &tags[..tags.len().min(limit)];
    Ok(fit_page(tags, state.settings().max_payload, |page| {
        let more = more_after_limit || page.len() < tags.len();
        json!({
            "tags": page,
            "next": if more { page.last().map(|t| t.tag_id.clone()) } else { None },
        })
    }))
}

fn tag_get(state: &State, params: &Value, now: u64) -> MethodResult {
    let Some(tag_id) = str_param(params, "tag_id")? else {
        return Err(error(ErrorCode::BadParams, "params.tag_id: required").into());
    };
    let view = state.tag_view(tag_id, now);
    if view.last_seen.is_none() && view.pending_task.is_none() && view.radio.is_none() {
        return Err(error(ErrorCode::NotFound, format!("tag {tag_id:?} is not known")).into());
    }
    Ok(serde_json::to_value(view).unwrap_or(Value::Null))
}

fn task_json(t: &TaskRecord) -> Value {
    let (state, status, at, detail) = match &t.state {
        TaskState::Pending => ("pending", None, None, None),
        TaskState::Final(f) => ("final", Some(f.status), Some(f.at), f.detail.clone()),
    };
    json!({
        "task_id": t.task_id, "tag_id": t.tag_id, "seq": t.seq,
        "issued_at": t.issued_at, "expires_at": t.expires_at,
        "accepted_at": t.accepted_at, "attempts": t.attempts,
        "content_hash": t.content_hash, "state": state, "status": status,
        "final_at": at, "detail": detail,
    })
}

fn tasks_list(state: &State, params: &Value) -> MethodResult {
    let pending_only = match str_param(params, "state")? {
        None | Some("all") => None,
        Some("pending") => Some(true),
        Some("final") => Some(false),
        Some(other) => {
            return Err(error(
                ErrorCode::BadParams,
                format!("params.state: {other:?} must be pending, final or all"),
            )
            .into())
        }
    };
    let tag = str_param(params, "tag_id")?;
    let after = str_param(params, "after")?;
    let limit = limit_param(params)?;
    let mut found = Vec::new();
    let mut cursor = after.map(str::to_owned);
    let mut more = false;
    // Scan the store in id order, a chunk at a time, until the page is full.
    'scan: loop {
        let chunk = state.store().tasks_after(cursor.as_deref(), 256)?;
        if chunk.is_empty() {
            break;
        }
        for t in chunk {
            cursor = Some(t.task_id.clone());
            let state_ok = pending_only.is_none_or(|p| p == (t.state == TaskState::Pending));
            if state_ok && tag.is_none_or(|g| g == t.tag_id) {
                if found.len() == limit {
                    more = true;
                    break 'scan;
                }
                found.push(task_json(&t));
            }
        }
    }
    Ok(fit_page(&found, state.settings().max_payload, |page| {
        let more = more || page.len() < found.len();
        json!({
            "tasks": page,
            "next": if more { page.last().and_then(|t| t["task_id"].as_str().map(str::to_owned)) } else { None },
        })
    }))
}

fn task_cancel(state: &mut State, params: &Value, now: u64, change: &mut Change) -> MethodResult {
    let Some(task_id) = str_param(params, "task_id")?.map(str::to_owned) else {
        return Err(error(ErrorCode::BadParams, "params.task_id: required").into());
    };
    if state.cancel(&task_id, now, change)? {
        return Ok(json!({"task_id": task_id, "status": "failed", "detail": "cancelled"}));
    }
    Err(match state.store().task(&task_id)? {
        Some(_) => error(
            ErrorCode::InvalidState,
            format!("task {task_id:?} is already final"),
        ),
        None => error(
            ErrorCode::NotFound,
            format!("task {task_id:?} is not known"),
        ),
    }
    .into())
}

fn tag_refresh(state: &mut State, params: &Value) -> MethodResult {
    let Some(tag_id) = str_param(params, "tag_id")?.map(str::to_owned) else {
        return Err(error(ErrorCode::BadParams, "params.tag_id: required").into());
    };
    if let Some(task) = state.store().pending_of(&tag_id).ok().flatten() {
        return Err(error(
            ErrorCode::InvalidState,
            format!("tag {tag_id:?} has pending task {task:?}; it is delivered at the next check-in anyway"),
        )
        .into());
    }
    match state.store().last_content(&tag_id)? {
        Some((task_id, _)) => {
            state.request_refresh(&tag_id);
            Ok(json!({"tag_id": tag_id, "task_id": task_id, "when": "next check-in"}))
        }
        None => Err(error(
            ErrorCode::NotFound,
            format!("no content was ever confirmed by tag {tag_id:?}"),
        )
        .into()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::*;
    use crate::config::Config;
    use crate::engine::EngineSettings;
    use crate::identity::Identity;
    use crate::store::Store;

    struct Fixture {
        dir: tempfile::TempDir,
        store: Arc<Store>,
        state: State,
    }

    fn fixture(config: &str) -> Fixture {
        let config = Config::from_toml(&format!(
            "[mqtt]\ngroup_id = \"GID_test\"\ndevice_id = \"dev1\"\n{config}"
        ))
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("store"), 1 << 20).unwrap());
        let identity = Identity::resolve(&config).unwrap();
        let state = State::load(
            EngineSettings::from_config(&config),
            identity,
            store.clone(),
            Arc::default(),
        )
        .unwrap();
        Fixture { dir, store, state }
    }

    impl Fixture {
        /// Handles one command; returns the replies it queued, with topics.
        async fn command(&mut self, request: Value) -> Vec<(String, Value)> {
            let before = self.store.outbox_len();
            let mut change = Change::new();
            handle(
                &mut self.state,
                request.to_string().as_bytes(),
                1,
                &mut change,
            )
            .unwrap();
            self.store.apply(change).unwrap();
            self.store.flush().await.unwrap();
            let all = self.store.outbox_after(None, 1000).unwrap();
            all.into_iter()
                .skip(before as usize)
                .map(|(_, e)| (e.topic, serde_json::from_slice(&e.payload).unwrap()))
                .collect()
        }
    }

    fn request(method: &str) -> Value {
        json!({"v": 1, "req_id": "r-1", "method": method, "params": {}, "reply_to": "GID_backend@@@c1"})
    }

    #[tokio::test]
    async fn only_allowed_methods_run() {
        let mut f = fixture("[security]\nallowed_methods = [\"agent.status\", \"tags.list\"]\n");
        let replies = f.command(request("agent.status")).await;
        assert_eq!(replies[0].0, "esl_ack/p2p/GID_backend@@@c1");
        assert_eq!(replies[0].1["ok"], true);
        let replies = f
            .command(json!({"v": 1, "req_id": "r-2", "method": "task.cancel",
            "params": {"task_id": "t1"}, "reply_to": "GID_backend@@@c1"}))
            .await;
        assert_eq!(replies[0].1["ok"], false);
        assert_eq!(replies[0].1["error"]["code"], "forbidden");
        assert!(replies[0].1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("security.allowed_methods"));
        let replies = f.command(request("agent.reboot")).await;
        assert_eq!(
            replies[0].1["error"]["code"], "unknown_method",
            "unknown stays unknown"
        );
        assert_eq!(Counters::get(&f.state.counters().commands_forbidden), 1);
    }

    /// Issue 14 item 1: PROTOCOL §3/§7, a request without `reply_to` is
    /// answered at `ack_to` (it was silence).
    #[tokio::test]
    async fn a_command_without_reply_to_is_answered_at_ack_to() {
        let mut f = fixture("");
        for method in ["agent.status", "agent.reboot"] {
            let mut r = request(method);
            r.as_object_mut().unwrap().remove("reply_to");
            let replies = f.command(r).await;
            assert_eq!(replies.len(), 1, "{method}: {replies:?}");
            assert_eq!(replies[0].0, "esl_ack/p2p/GID_backend@@@backend");
            assert_eq!(replies[0].1["req_id"], "r-1");
        }
        let mut r = request("agent.status");
        r["reply_to"] = Value::Null;
        assert_eq!(f.command(r).await.len(), 1, "null is no reply_to");
        let mut quiet = request("agent.status");
        quiet.as_object_mut().unwrap().remove("reply_to");
        quiet["reply"] = false.into();
        assert!(f.command(quiet.clone()).await.is_empty(), "reply: false");
        // Also when the request is otherwise bad (PROTOCOL §7).
        quiet["v"] = 2.into();
        assert!(
            f.command(quiet).await.is_empty(),
            "reply: false, bad request"
        );
    }

    #[test]
    fn reply_to_patterns() {
        assert!(matches_pattern("GID_backend@@@*", "GID_backend@@@be1"));
        assert!(matches_pattern("GID_backend@@@*", "GID_backend@@@"));
        assert!(!matches_pattern("GID_backend@@@*", "GID_backendx@@@be1"));
        assert!(!matches_pattern(
            "GID_backend@@@*",
            "GID_victim@@@GID_backend@@@"
        ));
        assert!(matches_pattern("GID_a@@@c1", "GID_a@@@c1"));
        assert!(!matches_pattern("GID_a@@@c1", "GID_a@@@c12"));
        assert!(matches_pattern("GID_*@@@*-ops", "GID_x@@@y-ops"));
        assert!(!matches_pattern("GID_*@@@*-ops", "GID_x@@@y-ops2"));
        assert!(matches_pattern("*", "anything"));
    }

    /// Issue 14 item 4: `reply_to` must match `security.reply_to_allowed`
    /// (default: the group of `ack_to`); others get no reply, counted.
    #[tokio::test]
    async fn a_reply_to_outside_the_allowed_patterns_gets_no_reply() {
        let mut f = fixture("");
        let mut r = request("tags.list");
        r["reply_to"] = "GID_victim@@@v1".into();
        assert!(f.command(r).await.is_empty(), "another group: silence");
        assert_eq!(
            Counters::get(&f.state.counters().commands_reply_to_refused),
            1
        );
        assert_eq!(
            f.command(request("tags.list")).await.len(),
            1,
            "ack_to's group"
        );

        let mut f = fixture("[security]\nreply_to_allowed = [\"GID_console@@@c*\"]\n");
        let mut r = request("agent.status");
        r["reply_to"] = "GID_console@@@c1".into();
        assert_eq!(f.command(r).await.len(), 1);
        assert!(f.command(request("agent.status")).await.is_empty());
        assert_eq!(
            Counters::get(&f.state.counters().commands_reply_to_refused),
            1
        );
    }

    fn signed_by(f: &mut Fixture, require: bool) -> impl Fn(Value) -> Value {
        use std::os::unix::fs::PermissionsExt;
        let key = "command-test-key-0123456789abcdef-01234";
        let path = f.dir.path().join("k1.key");
        std::fs::write(&path, key).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let config = Config::from_toml(&format!(
            "[mqtt]\ngroup_id = \"GID_test\"\ndevice_id = \"dev1\"\n[security]\nrequire_signed_commands = {require}\nrequire_signed_tasks = {require}\n[[security.signing_keys]]\nid = \"k1\"\nsecret_file = {:?}\n",
            path.display().to_string()
        ))
        .unwrap();
        let verifier =
            crate::security::signing::Verifier::from_config(&config.security, "GID_test@@@dev1")
                .unwrap();
        f.state.set_verifier(verifier);
        move |mut v: Value| {
            let m = v.as_object_mut().unwrap();
            crate::security::signing::add_signature(
                m,
                key,
                Purpose::Command,
                "GID_test@@@dev1",
                "k1",
            );
            v
        }
    }

    /// Issue 14 item 4: an unsigned `task.cancel` cancelled pending price
    /// changes; state-changing methods now need a signature unless the
    /// config allows them unsigned.
    #[tokio::test]
    async fn state_changing_methods_run_only_from_signed_commands() {
        let cancel = json!({"v": 1, "req_id": "r-1", "method": "task.cancel",
            "params": {"task_id": "t-x"}, "reply_to": "GID_backend@@@c1"});
        let refresh = json!({"v": 1, "req_id": "r-1", "method": "tag.refresh",
            "params": {"tag_id": "T1"}, "reply_to": "GID_backend@@@c1"});
        let mut f = fixture("");
        for r in [cancel.clone(), refresh.clone()] {
            let replies = f.command(r).await;
            assert_eq!(replies[0].1["error"]["code"], "forbidden", "{replies:?}");
            assert!(replies[0].1["error"]["message"]
                .as_str()
                .unwrap()
                .contains("signed"));
        }
        // Read-only methods still run unsigned.
        assert_eq!(f.command(request("tags.list")).await[0].1["ok"], true);
        // Signed: runs (the task is unknown).
        let sign = signed_by(&mut f, false);
        let replies = f.command(sign(cancel.clone())).await;
        assert_eq!(replies[0].1["error"]["code"], "not_found", "{replies:?}");
        // Explicitly allowed unsigned.
        let mut f = fixture("[security]\nallow_unsigned_methods = [\"task.cancel\"]\n");
        let replies = f.command(cancel).await;
        assert_eq!(replies[0].1["error"]["code"], "not_found", "{replies:?}");
        let replies = f.command(refresh).await;
        assert_eq!(replies[0].1["error"]["code"], "forbidden", "{replies:?}");
    }

    /// Issue 15: `network.permit_join` reaches the radio task's control
    /// channel, only from a signed command (or one the config allows
    /// unsigned), with its seconds checked.
    #[tokio::test]
    async fn permit_join_is_a_signed_request_handed_to_the_radio() {
        let permit = |seconds: Value| {
            json!({"v": 1, "req_id": "r-1", "method": "network.permit_join",
                "params": {"seconds": seconds}, "reply_to": "GID_backend@@@c1"})
        };
        let mut f = fixture("");
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        f.state.set_radio_control(tx);
        let replies = f.command(permit(json!(120))).await;
        assert_eq!(replies[0].1["error"]["code"], "forbidden", "{replies:?}");
        assert!(rx.try_recv().is_err(), "nothing reaches the radio unsigned");

        let mut f = fixture("[security]\nallow_unsigned_methods = [\"network.permit_join\"]\n");
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        f.state.set_radio_control(tx);
        for bad in [json!(255), json!(-1), json!("60"), json!(null)] {
            let replies = f.command(permit(bad.clone())).await;
            assert_eq!(
                replies[0].1["error"]["code"], "bad_params",
                "{bad}: {replies:?}"
            );
        }
        assert!(rx.try_recv().is_err());
        let replies = f.command(permit(json!(120))).await;
        assert_eq!(replies[0].1["result"]["seconds"], 120, "{replies:?}");
        match rx.try_recv() {
            Ok(crate::msg::RadioControl::PermitJoin { seconds, .. }) => assert_eq!(seconds, 120),
            other => panic!("the radio got {other:?}"),
        }
    }

    /// Issue 15: `network.change_channel` reaches the radio task's control
    /// channel only from a signed command (or one the config allows
    /// unsigned), with its channel checked to be a ZigBee one.
    #[tokio::test]
    async fn change_channel_is_a_signed_request_handed_to_the_radio() {
        let change = |channel: Value| {
            json!({"v": 1, "req_id": "r-1", "method": "network.change_channel",
                "params": {"channel": channel}, "reply_to": "GID_backend@@@c1"})
        };
        let mut f = fixture("");
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        f.state.set_radio_control(tx);
        let replies = f.command(change(json!(20))).await;
        assert_eq!(replies[0].1["error"]["code"], "forbidden", "{replies:?}");
        assert!(rx.try_recv().is_err(), "nothing reaches the radio unsigned");
        // Signed: handed over.
        let sign = signed_by(&mut f, false);
        let replies = f.command(sign(change(json!(20)))).await;
        assert_eq!(replies[0].1["result"]["channel"], 20, "{replies:?}");
        assert!(matches!(
            rx.try_recv(),
            Ok(crate::msg::RadioControl::ChangeChannel { channel: 20 })
        ));

        let mut f = fixture("[security]\nallow_unsigned_methods = [\"network.change_channel\"]\n");
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        f.state.set_radio_control(tx);
        for bad in [json!(10), json!(27), json!(-1), json!("15"), json!(null)] {
            let replies = f.command(change(bad.clone())).await;
            assert_eq!(
                replies[0].1["error"]["code"], "bad_params",
                "{bad}: {replies:?}"
            );
        }
        assert!(rx.try_recv().is_err());
        let replies = f.command(change(json!(11))).await;
        assert_eq!(replies[0].1["result"]["channel"], 11, "{replies:?}");
        match rx.try_recv() {
            Ok(crate::msg::RadioControl::ChangeChannel { channel }) => assert_eq!(channel, 11),
            other => panic!("the radio got {other:?}"),
        }
    }

    /// PROTOCOL §4 rule 2: a task a little over `limits.max_payload` is
    /// rejected naming its `task_id`, except when signed tasks are required
    /// (an unchecked message never names a task).
    #[tokio::test]
    async fn an_oversized_task_names_its_task_id_unless_signatures_are_required() {
        let acked_id = |f: &mut Fixture| {
            let mut task = json!({"v": 1, "task_id": "t-big", "tag_id": "T1", "issued_at": 1,
                "content": {"pad": ""}});
            task["content"]["pad"] = "x".repeat(f.state.settings().max_payload).into();
            let mut change = Change::new();
            f.state
                .on_task(task.to_string().as_bytes(), 1, &mut change)
                .unwrap();
            let numbers = f.store.apply(change).unwrap();
            assert_eq!(numbers.len(), 1, "one rejected ack");
            numbers[0]
        };
        let mut f = fixture("");
        let n = acked_id(&mut f);
        f.store.flush().await.unwrap();
        let ack: Value = serde_json::from_slice(
            &f.store.outbox_after(n.checked_sub(1), 1).unwrap()[0]
                .1
                .payload,
        )
        .unwrap();
        assert_eq!(ack["status"], "rejected");
        assert_eq!(ack["task_id"], "t-big", "{ack}");

        let mut f = fixture("");
        let _ = signed_by(&mut f, true);
        let n = acked_id(&mut f);
        f.store.flush().await.unwrap();
        let ack: Value = serde_json::from_slice(
            &f.store.outbox_after(n.checked_sub(1), 1).unwrap()[0]
                .1
                .payload,
        )
        .unwrap();
        assert_eq!(ack["task_id"], Value::Null, "{ack}");
    }

    /// Issue 14 item 4: a command flood (or a forged-task flood with
    /// `require_signed_tasks`) grew the outbox without bound; replies and
    /// rejection acks now pass a rate limit, the rest is dropped, counted.
    #[tokio::test]
    async fn replies_and_rejection_acks_are_limited() {
        let mut f = fixture("");
        let mut queued = 0;
        for _ in 0..(crate::engine::limiter::BURST + 100) {
            queued += f.command(request("tags.list")).await.len() as u64;
        }
        assert_eq!(queued, crate::engine::limiter::BURST);
        assert_eq!(Counters::get(&f.state.counters().replies_dropped), 100);

        let mut f = fixture("");
        let _ = signed_by(&mut f, true);
        let before = f.store.outbox_len();
        let mut change = Change::new();
        for i in 0..(crate::engine::limiter::BURST + 300) {
            let forged = json!({"v": 1, "task_id": format!("t{i}"), "tag_id": "T1",
                "issued_at": 1, "content": {}, "sig": {"kid": "k1", "hmac": "0".repeat(64)}});
            f.state
                .on_task(forged.to_string().as_bytes(), 1, &mut change)
                .unwrap();
        }
        f.store.apply(change).unwrap();
        f.store.flush().await.unwrap();
        assert_eq!(f.store.outbox_len() - before, crate::engine::limiter::BURST);
        assert_eq!(Counters::get(&f.state.counters().replies_dropped), 300);
        assert_eq!(
            Counters::get(&f.state.counters().tasks_bad_signature),
            crate::engine::limiter::BURST + 300
        );

        // Bad input from the back end is not limited: each of those tasks
        // was PUBACKed and gets its one final status (PROTOCOL §5).
        let mut f = fixture("");
        let before = f.store.outbox_len();
        let mut change = Change::new();
        for i in 0..(crate::engine::limiter::BURST + 300) {
            let bad = json!({"v": 2, "task_id": format!("t{i}")});
            f.state
                .on_task(bad.to_string().as_bytes(), 1, &mut change)
                .unwrap();
        }
        f.store.apply(change).unwrap();
        f.store.flush().await.unwrap();
        assert_eq!(
            f.store.outbox_len() - before,
            crate::engine::limiter::BURST + 300,
            "every rejected task is acked"
        );
        assert_eq!(Counters::get(&f.state.counters().replies_dropped), 0);
    }

    #[tokio::test]
    async fn reply_to_cannot_steer_a_reply_onto_another_topic() {
        let mut f = fixture("");
        for target in [
            "GID_a@@@b/../../esl_task/p2p/GID_test@@@dev1",
            "GID_a@@@#",
            "GID_a@@@+",
            "esl_task/p2p/GID_test@@@dev1",
            "GID_a@@@b\u{0}",
            "GID_a@@@b c",
            &format!("GID_a@@@{}", "d".repeat(60)),
        ] {
            let mut r = request("agent.status");
            r["reply_to"] = target.into();
            let replies = f.command(r).await;
            assert!(
                replies.is_empty(),
                "reply_to {target:?} produced {replies:?}"
            );
        }
        assert_eq!(Counters::get(&f.state.counters().commands_bad), 7);
    }

    #[tokio::test]
    async fn unsigned_commands_get_no_reply_when_signatures_are_required() {
        let mut f = fixture("");
        let sign = signed_by(&mut f, true);

        assert!(
            f.command(request("agent.status")).await.is_empty(),
            "unsigned: silence"
        );
        let signed = sign(request("agent.status"));
        let mut redirected = signed.clone();
        redirected["reply_to"] = "GID_evil@@@x".into();
        assert!(
            f.command(redirected).await.is_empty(),
            "a changed reply_to breaks the signature"
        );
        let replies = f.command(signed).await;
        assert_eq!(replies.len(), 1);
        assert_eq!(replies[0].1["ok"], true);
        assert_eq!(Counters::get(&f.state.counters().commands_bad_signature), 2);
    }
}
