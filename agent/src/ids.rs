//! Character rules and length limits of the names on the wire and in the
//! config (PROTOCOL §2–§4): client, group and device ids, task and tag ids,
//! key ids, topics. A leaf: `wire`, `config`, `identity` and `security`
//! all check names with these, so none of them has to import another for it.

/// Longest `task_id` (PROTOCOL §4).
pub const MAX_TASK_ID: usize = 64;
/// Longest `tag_id` (PROTOCOL §4).
pub const MAX_TAG_ID: usize = 32;
/// Longest client id (PROTOCOL §2).
pub const MAX_CLIENT_ID: usize = 64;
/// Longest full topic (PROTOCOL §3).
pub const MAX_TOPIC: usize = 64;
/// Longest signing key id.
pub(crate) const MAX_KEY_ID: usize = 32;

/// Characters of `task_id` and `tag_id`: `[A-Za-z0-9_.:-]`.
pub fn is_tag_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-')
}

/// Characters allowed in group and device ids (PROTOCOL §2).
pub(crate) fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

/// `GROUP@@@DEVICE`, both halves `[A-Za-z0-9_-]+`, at most 64 characters.
pub fn is_valid_client_id(id: &str) -> bool {
    if id.len() > MAX_CLIENT_ID {
        return false;
    }
    match id.split_once("@@@") {
        Some((group, device)) => {
            let ok = |s: &str| !s.is_empty() && s.chars().all(is_id_char);
            ok(group) && ok(device)
        }
        None => false,
    }
}

/// Key ids: 1-32 of `[A-Za-z0-9_.:-]`.
pub(crate) fn is_key_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_KEY_ID && s.chars().all(is_tag_char)
}
