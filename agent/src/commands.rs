//! Remote commands (PROTOCOL §7): decode, dispatch, reply through the
//! outbox.
//!
//! Runs inside the engine task (commands read and change the engine's
//! state), so it owns no channel. Every request that names a `reply_to` and
//! asks for a reply gets one, also for unknown methods and bad params; a
//! request with `"reply": false` gets none. Replies go through the durable
//! outbox like acks. Listings are paged so that a reply always fits
//! `limits.max_payload`.

use serde_json::{json, Value};
use tracing::debug;

use crate::counters::Counters;
use crate::engine::{State, TagView};
use crate::store::{Change, OutboxEntry, StoreError, TaskRecord, TaskState};
use crate::wire::{self, ErrorCode, Reply, ReplyError};

/// Page size of listings when the request names none.
const DEFAULT_LIMIT: usize = 50;
/// Largest page a request may ask for.
const MAX_LIMIT: usize = 500;

type MethodResult = Result<Value, ReplyError>;

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

/// Decodes and executes one request; every request gets a [`Reply`], which
/// the caller sends or drops.
fn answer(
    state: &mut State,
    payload: &[u8],
    now: u64,
    change: &mut Change,
) -> Result<Answered, StoreError> {
    Counters::bump(&state.counters().commands_received);
    let max_payload = state.settings().max_payload;
    let (req_id, reply_to, wants_reply, outcome) = match wire::decode_command(payload, max_payload)
    {
        Ok(cmd) => {
            debug!(method = %cmd.method, req_id = ?cmd.req_id, "command");
            let outcome = dispatch(state, &cmd.method, &cmd.params, now, change)?;
            (cmd.req_id, cmd.reply_to, cmd.reply, outcome)
        }
        Err(bad) => {
            Counters::bump(&state.counters().commands_bad);
            debug!(message = %bad.message, "bad command");
            (
                bad.req_id,
                bad.reply_to,
                true,
                Err(error(ErrorCode::BadRequest, bad.message)),
            )
        }
    };
    let (ok, result, error) = match outcome {
        Ok(result) => (true, Some(result), None),
        Err(e) => (false, None, Some(e)),
    };
    let reply = Reply {
        v: 1,
        kind: "reply",
        req_id,
        ok,
        result,
        error,
        agent: state.identity().client_id.clone(),
    };
    Ok(Answered {
        reply_to,
        wants_reply,
        reply,
    })
}

/// Handles one command that came over MQTT: the reply goes into the outbox
/// for `reply_to`, unless the request said `"reply": false`.
pub fn handle(
    state: &mut State,
    payload: &[u8],
    now: u64,
    change: &mut Change,
) -> Result<(), StoreError> {
    let answered = answer(state, payload, now, change)?;
    if !answered.wants_reply {
        return Ok(());
    }
    // Without a usable `reply_to` there is nobody to answer; bad requests
    // are counted in `commands_bad`.
    let Some(target) = answered
        .reply_to
        .filter(|r| state.identity().reply_topic_fits(r))
    else {
        return Ok(());
    };
    change.push_outbox(OutboxEntry {
        topic: state.identity().reply_topic(&target),
        payload: answered.reply.to_json(),
    });
    Ok(())
}

/// Handles one command from the local control socket: the reply is
/// returned to the caller, whatever `reply`/`reply_to` say.
pub fn handle_local(
    state: &mut State,
    payload: &[u8],
    now: u64,
    change: &mut Change,
) -> Result<Vec<u8>, StoreError> {
    Ok(answer(state, payload, now, change)?.reply.to_json())
}

fn dispatch(
    state: &mut State,
    method: &str,
    params: &Value,
    now: u64,
    change: &mut Change,
) -> Result<MethodResult, StoreError> {
    Ok(match method {
        "agent.status" => Ok(agent_status(state, now)),
        "tags.list" => tags_list(state, params, now),
        "tag.get" => tag_get(state, params, now),
        "tasks.list" => tasks_list(state, params)?,
        "task.cancel" => task_cancel(state, params, now, change)?,
        "tag.refresh" => tag_refresh(state, params, now)?,
        other => Err(error(
            ErrorCode::UnknownMethod,
            format!("unknown method {other:?}; known: agent.status, tags.list, tag.get, tasks.list, task.cancel, tag.refresh"),
        )),
    })
}

fn agent_status(state: &State, _now: u64) -> Value {
    let counters: serde_json::Map<String, Value> = state
        .counters()
        .snapshot()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.into()))
        .collect();
    json!({
        "agent": state.identity().client_id,
        "version": env!("CARGO_PKG_VERSION"),
        "pending": state.pending_len(),
        "outbox": state.store().outbox_len(),
        "radio": crate::status::radio_json(state.radio_state()),
        "mqtt": {"connected": state.link_state().connected, "connections": state.link_state().epoch},
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
        .tag_views(now)
        .into_iter()
        .filter(|t| after.is_none_or(|a| t.tag_id.as_str() > a))
        .take(limit + 1)
        .collect();
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
        return Err(error(ErrorCode::BadParams, "params.tag_id: required"));
    };
    let view = state.tag_view(tag_id, now);
    if view.last_seen.is_none() && view.pending_task.is_none() {
        return Err(error(
            ErrorCode::NotFound,
            format!("tag {tag_id:?} is not known"),
        ));
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

fn tasks_list(state: &State, params: &Value) -> Result<MethodResult, StoreError> {
    let parsed = (|| {
        let filter = match str_param(params, "state")? {
            None | Some("all") => None,
            Some("pending") => Some(true),
            Some("final") => Some(false),
            Some(other) => {
                return Err(error(
                    ErrorCode::BadParams,
                    format!("params.state: {other:?} must be pending, final or all"),
                ))
            }
        };
        Ok((
            filter,
            str_param(params, "tag_id")?,
            str_param(params, "after")?,
            limit_param(params)?,
        ))
    })();
    let (pending_only, tag, after, limit) = match parsed {
        Ok(p) => p,
        Err(e) => return Ok(Err(e)),
    };
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
    Ok(Ok(fit_page(&found, state.settings().max_payload, |page| {
        let more = more || page.len() < found.len();
        json!({
            "tasks": page,
            "next": if more { page.last().and_then(|t| t["task_id"].as_str().map(str::to_owned)) } else { None },
        })
    })))
}

fn task_cancel(
    state: &mut State,
    params: &Value,
    now: u64,
    change: &mut Change,
) -> Result<MethodResult, StoreError> {
    let task_id = match str_param(params, "task_id") {
        Ok(Some(id)) => id.to_owned(),
        Ok(None) => return Ok(Err(error(ErrorCode::BadParams, "params.task_id: required"))),
        Err(e) => return Ok(Err(e)),
    };
    if state.cancel(&task_id, now, change)? {
        return Ok(Ok(
            json!({"task_id": task_id, "status": "failed", "detail": "cancelled"}),
        ));
    }
    Ok(Err(match state.store().task(&task_id)? {
        Some(_) => error(
            ErrorCode::InvalidState,
            format!("task {task_id:?} is already final"),
        ),
        None => error(
            ErrorCode::NotFound,
            format!("task {task_id:?} is not known"),
        ),
    }))
}

fn tag_refresh(state: &mut State, params: &Value, now: u64) -> Result<MethodResult, StoreError> {
    let tag_id = match str_param(params, "tag_id") {
        Ok(Some(id)) => id.to_owned(),
        Ok(None) => return Ok(Err(error(ErrorCode::BadParams, "params.tag_id: required"))),
        Err(e) => return Ok(Err(e)),
    };
    if let Some(task) = state.tag_view(&tag_id, now).pending_task {
        return Ok(Err(error(
            ErrorCode::InvalidState,
            format!("tag {tag_id:?} has pending task {task:?}; it is delivered at the next check-in anyway"),
        )));
    }
    match state.store().last_content(&tag_id)? {
        Some((task_id, _)) => {
            state.request_refresh(&tag_id);
            Ok(Ok(
                json!({"tag_id": tag_id, "task_id": task_id, "when": "next check-in"}),
            ))
        }
        None => Ok(Err(error(
            ErrorCode::NotFound,
            format!("no content was ever confirmed by tag {tag_id:?}"),
        ))),
    }
}
