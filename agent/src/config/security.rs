//! `[security]`: signing keys, which methods run, where replies may go.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::mqtt::validate_secret_source;
use super::{invalid, ConfigError};
use crate::ids::is_id_char;
use crate::wire::Method;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecurityConfig {
    /// Reject (`bad signature`) every task without a valid `sig`.
    pub require_signed_tasks: bool,
    /// Drop every command without a valid `sig` (no reply: its `reply_to`
    /// is not trusted).
    pub require_signed_commands: bool,
    /// HMAC-SHA256 keys by id; two at once allow a rotation without a gap.
    pub signing_keys: Vec<SigningKeyConfig>,
    /// Remote methods the agent answers; others get a `forbidden` error.
    pub allowed_methods: Vec<String>,
    /// Client ids a command's `reply_to` may name (PROTOCOL §7), as
    /// patterns where `*` stands for any run of characters
    /// (`GID_backend@@@*`). Unset: every client id in the group of
    /// `mqtt.ack_to`. Others get no reply (`commands_reply_to_refused`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply_to_allowed: Option<Vec<String>>,
    /// Methods that change state (`task.cancel`, `tag.refresh`) which run
    /// from unsigned commands too. Empty (the default): only from commands
    /// with a valid signature.
    pub allow_unsigned_methods: Vec<String>,
}

impl Default for SecurityConfig {
    fn default() -> Self {
        Self {
            require_signed_tasks: false,
            require_signed_commands: false,
            signing_keys: Vec::new(),
            allowed_methods: Method::ALL.iter().map(|m| m.name().to_owned()).collect(),
            reply_to_allowed: None,
            allow_unsigned_methods: Vec::new(),
        }
    }
}

/// One `[[security.signing_keys]]` entry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SigningKeyConfig {
    /// The `kid` a signature names: 1-32 of `[A-Za-z0-9_.:-]`.
    pub id: String,
    pub secret_file: Option<PathBuf>,
    pub secret_env: Option<String>,
}

/// Most signing keys at once: two cover a rotation; a few more leave room
/// for per-back-end keys without making a key search expensive.
pub const MAX_SIGNING_KEYS: usize = 4;

/// `[security]`: signed messages and the command allow-list (SECURITY.md).
impl SecurityConfig {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let s = self;

        if s.signing_keys.len() > MAX_SIGNING_KEYS {
            return Err(invalid(
                "security.signing_keys",
                format!("at most {MAX_SIGNING_KEYS} keys"),
            ));
        }
        for (i, k) in s.signing_keys.iter().enumerate() {
            if !crate::ids::is_key_id(&k.id) {
                return Err(invalid(
                    "security.signing_keys.id",
                    format!(
                        "{:?} must be 1-32 of letters, digits, '_', '.', ':' and '-'",
                        k.id
                    ),
                ));
            }
            if s.signing_keys[..i].iter().any(|other| other.id == k.id) {
                return Err(invalid(
                    "security.signing_keys.id",
                    format!("{:?} is used twice", k.id),
                ));
            }
            validate_secret_source(
                "security.signing_keys.secret_file",
                "security.signing_keys.secret_env",
                &k.secret_file,
                &k.secret_env,
            )?;
            if k.secret_file.is_none() && k.secret_env.is_none() {
                return Err(invalid(
                    "security.signing_keys.secret_file",
                    format!("key {:?} needs secret_file or secret_env", k.id),
                ));
            }
        }
        for (key, required) in [
            ("security.require_signed_tasks", s.require_signed_tasks),
            (
                "security.require_signed_commands",
                s.require_signed_commands,
            ),
        ] {
            if required && s.signing_keys.is_empty() {
                return Err(invalid(
                    key,
                    "needs at least one [[security.signing_keys]] entry",
                ));
            }
        }
        for m in &s.allowed_methods {
            if Method::from_name(m).is_none() {
                return Err(invalid(
                    "security.allowed_methods",
                    format!(
                        "{m:?} is not a method of this agent; known: {}",
                        Method::names(|_| true)
                    ),
                ));
            }
        }
        for m in &s.allow_unsigned_methods {
            if !Method::from_name(m).is_some_and(Method::mutating) {
                return Err(invalid(
                    "security.allow_unsigned_methods",
                    format!(
                        "{m:?} is not a method that changes state; those are: {}",
                        Method::names(Method::mutating)
                    ),
                ));
            }
        }
        for p in s.reply_to_allowed.iter().flatten() {
            let ok = !p.is_empty()
                && p.len() <= crate::ids::MAX_CLIENT_ID
                && p.chars().all(|c| is_id_char(c) || c == '@' || c == '*');
            if !ok {
                return Err(invalid(
                "security.reply_to_allowed",
                format!(
                    "{p:?} must be a client-id pattern of letters, digits, '_', '-', '@' and '*' (any run of characters), at most 64 characters"
                ),
            ));
            }
        }
        Ok(())
    }
}
