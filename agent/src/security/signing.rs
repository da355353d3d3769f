//! Signed tasks and commands: the `sig` field, the exact bytes it covers,
//! and the check against the configured keys (`[security]`).
//!
//! A signed message carries, next to its normal fields,
//! `"sig": {"kid": "<key id>", "hmac": "<64 lowercase hex digits>"}`
//! (upper case is refused, so a signature has one spelling). Every number
//! in a signed message must lie within ±(2^53−1) (I-JSON): JCS signs its
//! double, and beyond that range two integers share one.
//! `hmac` is HMAC-SHA256, keyed with the UTF-8 bytes of the key named by
//! `kid`, over
//!
//! ```text
//! "esl-sig-v1\n" + purpose + "\n" + client_id + "\n" + kid + "\n" + JCS(message without "sig")
//! ```
//!
//! - `purpose` is `task` or `command`, so a signed command can never pass
//!   as a task or the other way round;
//! - `client_id` is the receiving agent's (the last level of the P2P topic),
//!   so a task signed for one AP is refused by every other;
//! - JCS is the JSON Canonicalization Scheme of RFC 8785 (keys sorted by
//!   UTF-16 code units, no white space, ECMAScript number form, minimal
//!   string escapes), applied to the whole message minus `sig`: every field,
//!   including unknown ones, is covered.
//!
//! The check runs on the parsed message, the same value the agent then acts
//! on, so no difference between two JSON parsers can split what is checked
//! from what is applied. Tags are compared in constant time (`hmac`'s
//! `verify_slice`). docs/SECURITY.md documents the scheme for back ends, and
//! `docs/examples/sign_task.py` implements it.
//!
//! Owns no task or channel; keys are loaded once at start-up.

use std::fmt::Write as _;

use hmac::{Hmac, Mac};
use serde_json::{Map, Value};
use sha2::Sha256;

use crate::config::SecurityConfig;
use crate::security::secrets::{Secret, SecretError, SecretSource};

/// First line of the signed bytes: the scheme's version.
const DOMAIN: &str = "esl-sig-v1";
/// Shortest key accepted: 32 characters (with random hex or Base64, at
/// least 128 bits; HMAC-SHA256 gains nothing beyond 64).
pub const MIN_KEY_LEN: usize = 32;
/// Length of `sig.hmac`: SHA-256 in hex.
const HMAC_HEX_LEN: usize = 64;

/// What a signature is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Task,
    Command,
}

impl Purpose {
    fn name(self) -> &'static str {
        match self {
            Purpose::Task => "task",
            Purpose::Command => "command",
        }
    }
}

/// A message that passed the check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Signed with this key.
    Verified { kid: String },
    /// No signature, and none is required (or no keys to check one with).
    Unsigned,
}

/// Why a message failed the check. Logged and counted; the wire only ever
/// says `bad signature`, so a forger learns nothing from the reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("no `sig` field, and signatures are required")]
    Missing,
    #[error("`sig` is malformed: {0}")]
    Malformed(&'static str),
    #[error("`sig.kid` {0:?} names no configured key")]
    UnknownKey(String),
    #[error("`sig.hmac` does not match the message (key {0:?})")]
    Mismatch(String),
    /// A number JCS cannot carry exactly (I-JSON, RFC 7493 §2.2): the HMAC
    /// covers its double, but the agent would act on the exact value, so two
    /// different integers could share one signature.
    #[error("a signed message may hold numbers only within ±(2^53−1), got {0}")]
    UnsafeNumber(String),
}

/// Largest integer a double holds exactly (2^53 − 1, I-JSON's limit).
const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error(
        "config key `security.signing_keys`: key {id:?} is shorter than {MIN_KEY_LEN} characters"
    )]
    TooShort { id: String },
    #[error("config key `security.signing_keys.secret_file`: key {id:?} needs secret_file or secret_env")]
    NoSource { id: String },
}

/// The configured keys and which messages must be signed.
#[derive(Debug, Clone)]
pub struct Verifier {
    keys: Vec<(String, Secret)>,
    client_id: String,
    require_tasks: bool,
    require_commands: bool,
}

impl Verifier {
    /// Checks nothing, requires nothing.
    pub fn disabled(client_id: &str) -> Verifier {
        Verifier {
            keys: Vec::new(),
            client_id: client_id.to_owned(),
            require_tasks: false,
            require_commands: false,
        }
    }

    /// Loads the keys of a validated `[security]` table.
    pub fn from_config(s: &SecurityConfig, client_id: &str) -> Result<Verifier, KeyError> {
        let mut keys = Vec::new();
        for k in &s.signing_keys {
            let (key, source) = match (&k.secret_file, &k.secret_env) {
                (Some(f), _) => (
                    "security.signing_keys.secret_file",
                    SecretSource::File(f.clone()),
                ),
                (None, Some(e)) => (
                    "security.signing_keys.secret_env",
                    SecretSource::Env(e.clone()),
                ),
                (None, None) => return Err(KeyError::NoSource { id: k.id.clone() }),
            };
            let secret = source.load(key)?;
            if secret.expose().len() < MIN_KEY_LEN {
                return Err(KeyError::TooShort { id: k.id.clone() });
            }
            keys.push((k.id.clone(), secret));
        }
        Ok(Verifier {
            keys,
            client_id: client_id.to_owned(),
            require_tasks: s.require_signed_tasks,
            require_commands: s.require_signed_commands,
        })
    }

    pub(crate) fn required(&self, purpose: Purpose) -> bool {
        match purpose {
            Purpose::Task => self.require_tasks,
            Purpose::Command => self.require_commands,
        }
    }

    /// Checks the `sig` of a parsed message. Without a requirement, an
    /// unsigned message passes, but a signed one must still be right: a
    /// back end that signs during a migration learns about a wrong key
    /// before signatures become mandatory.
    pub fn check(
        &self,
        purpose: Purpose,
        message: &Map<String, Value>,
    ) -> Result<Verdict, SignatureError> {
        let sig = match message.get("sig") {
            None | Some(Value::Null) if self.required(purpose) => {
                return Err(SignatureError::Missing)
            }
            None | Some(Value::Null) => return Ok(Verdict::Unsigned),
            Some(_) if self.keys.is_empty() => return Ok(Verdict::Unsigned),
            Some(Value::Object(sig)) => sig,
            Some(_) => {
                return Err(SignatureError::Malformed(
                    "must be an object {\"kid\", \"hmac\"}",
                ))
            }
        };
        let Some(Value::String(kid)) = sig.get("kid") else {
            return Err(SignatureError::Malformed("`kid` must be a string"));
        };
        if !crate::ids::is_key_id(kid) {
            return Err(SignatureError::Malformed(
                "`kid` must be 1-32 of [A-Za-z0-9_.:-]",
            ));
        }
        let Some(Value::String(tag_hex)) = sig.get("hmac") else {
            return Err(SignatureError::Malformed("`hmac` must be a string"));
        };
        // Lower case only, as documented: one signature has one spelling, so
        // `sig` itself is canonical (hex::decode would take upper case too).
        if tag_hex.len() != HMAC_HEX_LEN
            || !tag_hex
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(SignatureError::Malformed(
                "`hmac` must be 64 lowercase hex digits",
            ));
        }
        // 64 lowercase hex digits, checked just above.
        let tag = hex::decode(tag_hex).expect("checked to be hex");
        if let Some(n) = message.values().find_map(first_unsafe_number) {
            return Err(SignatureError::UnsafeNumber(n));
        }
        let Some((_, key)) = self.keys.iter().find(|(id, _)| id == kid) else {
            return Err(SignatureError::UnknownKey(kid.clone()));
        };
        let mac = keyed_mac(key.expose(), purpose, &self.client_id, kid, message);
        // Constant time: the comparison gives away nothing about how many
        // leading bytes of a guess were right.
        mac.verify_slice(&tag)
            .map_err(|_| SignatureError::Mismatch(kid.clone()))?;
        Ok(Verdict::Verified { kid: kid.clone() })
    }

    /// One line for `check-config` and the start-up log (ids, never keys).
    pub fn describe(&self) -> String {
        let ids: Vec<&str> = self.keys.iter().map(|(id, _)| id.as_str()).collect();
        let need = |b: bool| if b { "required" } else { "optional" };
        format!(
            "signed tasks {}, signed commands {}, keys {ids:?}",
            need(self.require_tasks),
            need(self.require_commands)
        )
    }
}

/// The first number in `value` outside ±(2^53−1), as text. Floats count
/// too: 1e300 is as far from any exactly held integer.
fn first_unsafe_number(value: &Value) -> Option<String> {
    match value {
        Value::Number(n) => {
            let safe = match (n.as_u64(), n.as_i64()) {
                (Some(u), _) => u <= MAX_SAFE_INTEGER,
                (None, Some(i)) => i.unsigned_abs() <= MAX_SAFE_INTEGER,
                (None, None) => n
                    .as_f64()
                    .is_some_and(|f| f.abs() <= MAX_SAFE_INTEGER as f64),
            };
            (!safe).then(|| n.to_string())
        }
        Value::Array(items) => items.iter().find_map(first_unsafe_number),
        Value::Object(map) => map.values().find_map(first_unsafe_number),
        _ => None,
    }
}

/// HMAC over the signed bytes of `message` (its `sig` left out).
fn keyed_mac(
    key: &str,
    purpose: Purpose,
    client_id: &str,
    kid: &str,
    message: &Map<String, Value>,
) -> Hmac<Sha256> {
    // HMAC takes keys of any length.
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("HMAC takes any key");
    mac.update(&signing_input(purpose, client_id, kid, message));
    mac
}

/// The exact bytes the HMAC covers (see the module docs).
pub fn signing_input(
    purpose: Purpose,
    client_id: &str,
    kid: &str,
    message: &Map<String, Value>,
) -> Vec<u8> {
    let mut unsigned = message.clone();
    unsigned.remove("sig");
    let mut text = format!("{DOMAIN}\n{}\n{client_id}\n{kid}\n", purpose.name());
    write_canonical(&Value::Object(unsigned), &mut text);
    text.into_bytes()
}

/// `sig.hmac` for `message` (any `sig` in it is ignored): what a back end
/// computes. The agent only verifies; this serves tests and tools.
pub fn sign(
    key: &str,
    purpose: Purpose,
    client_id: &str,
    kid: &str,
    message: &Map<String, Value>,
) -> String {
    hex::encode(
        keyed_mac(key, purpose, client_id, kid, message)
            .finalize()
            .into_bytes(),
    )
}

/// Adds (or replaces) the `sig` of `message`, signed with `key` as `kid`.
pub fn add_signature(
    message: &mut Map<String, Value>,
    key: &str,
    purpose: Purpose,
    client_id: &str,
    kid: &str,
) {
    let hmac = sign(key, purpose, client_id, kid, message);
    message.insert("sig".into(), serde_json::json!({"kid": kid, "hmac": hmac}));
}

/// RFC 8785 (JCS) form of a JSON value.
pub fn canonical(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        // Without serde_json's `arbitrary_precision` every number has an
        // f64 value; JCS treats all numbers as IEEE doubles.
        Value::Number(n) => out.push_str(&es_number(n.as_f64().unwrap_or(0.0))),
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            // JCS orders by UTF-16 code units (what Java and JavaScript
            // compare), which differs from UTF-8 byte order above U+FFFF.
            keys.sort_by(|a, b| a.encode_utf16().cmp(b.encode_utf16()));
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(key, out);
                out.push(':');
                write_canonical(&map[key], out);
            }
            out.push('}');
        }
    }
}

/// JSON string with the escapes of ECMAScript's `JSON.stringify`: `"`,
/// `\`, the five short control escapes, `\u00xx` for other controls,
/// everything else as it is.
fn write_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\u{c}' => out.push_str("\\f"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 => {
                // Writing to a String cannot fail.
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// ECMAScript Number::toString for a finite double (ECMA-262 7.1.12.1),
/// which JCS prescribes: shortest round-trip digits (ties to even), plain
/// notation for exponents from -7 to 20, `1e+21` style beyond.
fn es_number(x: f64) -> String {
    if x == 0.0 || !x.is_finite() {
        // JSON has no NaN or infinity; -0 prints as 0.
        return "0".to_owned();
    }
    if x < 0.0 {
        return format!("-{}", es_number(-x));
    }
    // serde_json prints doubles with Ryu: the shortest digits that round
    // trip, and the even one of two equally close candidates, as ECMAScript
    // asks (Rust's own `{:e}` does not break such ties to even). Its layout
    // (`100.0`, `1e-6`, `2.9514790517935283e+20`) is taken apart here.
    let text = serde_json::Number::from_f64(x)
        .map(|n| n.to_string())
        .unwrap_or_default();
    let (mantissa, exp) = match text.split_once(['e', 'E']) {
        Some((m, e)) => (m, e.parse::<i32>().unwrap_or(0)),
        None => (text.as_str(), 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let all = format!("{int}{frac}");
    let significant = all.trim_start_matches('0');
    // x = 0.digits × 10^n
    let n = int.len() as i32 + exp - (all.len() - significant.len()) as i32;
    let digits = significant.trim_end_matches('0');
    let k = digits.len() as i32;
    if k <= n && n <= 21 {
        format!("{digits}{}", "0".repeat((n - k) as usize))
    } else if 0 < n && n <= 21 {
        let (int, frac) = digits.split_at(n as usize);
        format!("{int}.{frac}")
    } else if -6 < n && n <= 0 {
        format!("0.{}{digits}", "0".repeat((-n) as usize))
    } else {
        let e = n - 1;
        let sign = if e < 0 { '-' } else { '+' };
        let (first, rest) = digits.split_at(1);
        let rest = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        format!("{first}{rest}e{sign}{}", e.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const KEY: &str = "k2026a-0123456789abcdef0123456789abcdef";
    const CLIENT: &str = "GID_esl@@@a4b1c2d3e4f5";

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("test bug: not an object"),
        }
    }

    /// RFC 8785 §3.2.2.3 number samples (IEEE bits → JCS text), as printed
    /// by the RFC and by Node's `JSON.stringify`.
    #[test]
    fn numbers_follow_ecmascript() {
        let cases: [(u64, &str); 21] = [
            (0x0000000000000000, "0"),
            (0x8000000000000000, "0"),
            (0x0000000000000001, "5e-324"),
            (0x8000000000000001, "-5e-324"),
            (0x7fefffffffffffff, "1.7976931348623157e+308"),
            (0xffefffffffffffff, "-1.7976931348623157e+308"),
            (0x4340000000000000, "9007199254740992"),
            (0xc340000000000000, "-9007199254740992"),
            (0x4430000000000000, "295147905179352830000"),
            (0x44b52d02c7e14af5, "9.999999999999997e+22"),
            (0x44b52d02c7e14af6, "1e+23"),
            (0x44b52d02c7e14af7, "1.0000000000000001e+23"),
            (0x444b1ae4d6e2ef4e, "999999999999999700000"),
            (0x444b1ae4d6e2ef4f, "999999999999999900000"),
            (0x444b1ae4d6e2ef50, "1e+21"),
            (0x3eb0c6f7a0b5ed8c, "9.999999999999997e-7"),
            (0x3eb0c6f7a0b5ed8d, "0.000001"),
            (0x41b3de4355555553, "333333333.3333332"),
            (0x41b3de4355555557, "333333333.33333343"),
            (0xbecbf647612f3696, "-0.0000033333333333333333"),
            (0x43143ff3c1cb0959, "1424953923781206.2"),
        ];
        for (bits, want) in cases {
            assert_eq!(es_number(f64::from_bits(bits)), want, "{bits:#x}");
        }
        assert_eq!(es_number(100.0), "100");
        assert_eq!(es_number(9.9), "9.9");
    }

    /// RFC 8785 §3.2.3 sorting sample and escapes, expected text from the
    /// RFC and Node (the RFC's reference `jcs()`, see docs/SECURITY.md).
    #[test]
    fn keys_sort_by_utf16_and_strings_escape_minimally() {
        let v: Value = serde_json::from_str(
            r#"{"\u20ac":"Euro Sign","\r":"Carriage Return","\ufb33":"Hebrew Letter Dalet With Dagesh","1":"One","\ud83d\ude00":"Emoji: Grinning Face","\u0080":"Control","\u00f6":"Latin Small Letter O With Diaeresis"}"#,
        )
        .unwrap();
        assert_eq!(
            canonical(&v),
            "{\"\\r\":\"Carriage Return\",\"1\":\"One\",\"\u{80}\":\"Control\",\"\u{f6}\":\"Latin Small Letter O With Diaeresis\",\"\u{20ac}\":\"Euro Sign\",\"\u{1f600}\":\"Emoji: Grinning Face\",\"\u{fb33}\":\"Hebrew Letter Dalet With Dagesh\"}"
        );
        let v = json!({"s": "a\"b\\c\u{1}\u{1f}\u{7f}/\n", "n": [1, 2.5, -0.0, true, null, {}]});
        assert_eq!(
            canonical(&v),
            "{\"n\":[1,2.5,0,true,null,{}],\"s\":\"a\\\"b\\\\c\\u0001\\u001f\u{7f}/\\n\"}"
        );
    }

    /// Computed independently with Node (crypto.createHmac and the RFC 8785
    /// reference `jcs()`; script in docs/SECURITY.md) for this message.
    #[test]
    fn hmac_matches_the_reference_vector() {
        let task = obj(json!({
            "v": 1, "task_id": "t-1", "tag_id": "SIM000001", "seq": 5,
            "issued_at": 1764230400000u64, "ttl_ms": 3600000,
            "content": {"price": "9.90", "name": "Milk 1L", "w": 1.5},
        }));
        assert_eq!(
            String::from_utf8(signing_input(Purpose::Task, CLIENT, "k1", &task)).unwrap(),
            "esl-sig-v1\ntask\nGID_esl@@@a4b1c2d3e4f5\nk1\n{\"content\":{\"name\":\"Milk 1L\",\"price\":\"9.90\",\"w\":1.5},\"issued_at\":1764230400000,\"seq\":5,\"tag_id\":\"SIM000001\",\"task_id\":\"t-1\",\"ttl_ms\":3600000,\"v\":1}"
        );
        assert_eq!(
            sign(KEY, Purpose::Task, CLIENT, "k1", &task),
            "aeeb171504f5bbbc7735d0ad3dadc04c1c60ca15b66f1309e6d951c5d9349ae9"
        );
    }

    fn verifier(require: bool) -> Verifier {
        Verifier {
            keys: vec![
                ("k1".into(), Secret::new(KEY)),
                (
                    "k2".into(),
                    Secret::new("another-key-0123456789abcdef-0123456789"),
                ),
            ],
            client_id: CLIENT.into(),
            require_tasks: require,
            require_commands: false,
        }
    }

    fn signed(kid: &str, key: &str, purpose: Purpose, client: &str) -> Map<String, Value> {
        let mut m = obj(json!({"v": 1, "task_id": "t-1", "content": {"price": "1.00"}}));
        add_signature(&mut m, key, purpose, client, kid);
        m
    }

    #[test]
    fn either_of_two_keys_verifies_during_a_rotation() {
        let v = verifier(true);
        assert_eq!(
            v.check(Purpose::Task, &signed("k1", KEY, Purpose::Task, CLIENT)),
            Ok(Verdict::Verified { kid: "k1".into() })
        );
        let other = "another-key-0123456789abcdef-0123456789";
        assert_eq!(
            v.check(Purpose::Task, &signed("k2", other, Purpose::Task, CLIENT)),
            Ok(Verdict::Verified { kid: "k2".into() })
        );
    }

    #[test]
    fn forged_changed_misrouted_and_unsigned_messages_fail() {
        let v = verifier(true);
        let wrong_key = signed(
            "k1",
            "attacker-key-0123456789abcdef0123456789",
            Purpose::Task,
            CLIENT,
        );
        assert_eq!(
            v.check(Purpose::Task, &wrong_key),
            Err(SignatureError::Mismatch("k1".into()))
        );
        let mut changed = signed("k1", KEY, Purpose::Task, CLIENT);
        changed["content"]["price"] = "0.01".into();
        assert_eq!(
            v.check(Purpose::Task, &changed),
            Err(SignatureError::Mismatch("k1".into()))
        );
        let mut added = signed("k1", KEY, Purpose::Task, CLIENT);
        added.insert("reply_to".into(), "GID_evil@@@x".into());
        assert!(
            v.check(Purpose::Task, &added).is_err(),
            "unknown fields are covered too"
        );
        let other_ap = signed("k1", KEY, Purpose::Task, "GID_esl@@@000000000000");
        assert!(
            v.check(Purpose::Task, &other_ap).is_err(),
            "signed for another AP"
        );
        let as_command = signed("k1", KEY, Purpose::Command, CLIENT);
        assert!(
            v.check(Purpose::Task, &as_command).is_err(),
            "a command signature is no task signature"
        );
        let mut unsigned = signed("k1", KEY, Purpose::Task, CLIENT);
        unsigned.remove("sig");
        assert_eq!(
            v.check(Purpose::Task, &unsigned),
            Err(SignatureError::Missing)
        );
        let unknown = signed("k9", KEY, Purpose::Task, CLIENT);
        assert_eq!(
            v.check(Purpose::Task, &unknown),
            Err(SignatureError::UnknownKey("k9".into()))
        );
        for bad in [
            json!("x"),
            json!({"kid": "k1"}),
            json!({"kid": "k1", "hmac": "zz"}),
            json!({"kid": 1, "hmac": "00"}),
            json!({"kid": "k1", "hmac": "g".repeat(64)}),
        ] {
            let mut m = signed("k1", KEY, Purpose::Task, CLIENT);
            m.insert("sig".into(), bad.clone());
            assert!(
                matches!(
                    v.check(Purpose::Task, &m),
                    Err(SignatureError::Malformed(_))
                ),
                "{bad}"
            );
        }
    }

    /// Issue 14 item 5: JCS turns numbers into doubles, so 2^62 and
    /// 2^62 + 256 signed the same; the agent now refuses every number a
    /// double cannot hold exactly, anywhere in a signed message.
    #[test]
    fn numbers_beyond_2_pow_53_are_refused_in_signed_messages() {
        let v = verifier(true);
        let at = |n: Value, nested: bool| {
            let mut m = obj(json!({"v": 1, "task_id": "t-1", "content": {"price": "1.00"}}));
            if nested {
                m["content"]["n"] = json!([n]);
            } else {
                m.insert("seq".into(), n);
            }
            add_signature(&mut m, KEY, Purpose::Task, CLIENT, "k1");
            v.check(Purpose::Task, &m)
        };
        for safe in [
            json!(9007199254740991u64),
            json!(-9007199254740991i64),
            json!(1.5),
        ] {
            assert!(at(safe.clone(), false).is_ok(), "{safe}");
            assert!(at(safe.clone(), true).is_ok(), "{safe}");
        }
        for unsafe_n in [
            json!(9007199254740992u64),
            json!(1u64 << 62),
            json!(-9007199254740992i64),
            json!(1e300),
        ] {
            for nested in [false, true] {
                assert!(
                    matches!(
                        at(unsafe_n.clone(), nested),
                        Err(SignatureError::UnsafeNumber(_))
                    ),
                    "{unsafe_n} nested={nested}"
                );
            }
        }
        // The attack itself: 2^62 and 2^62 + 256 have one canonical form.
        let mut m = obj(json!({"v": 1, "seq": 1u64 << 62}));
        let one = sign(KEY, Purpose::Task, CLIENT, "k1", &m);
        m["seq"] = json!((1u64 << 62) + 256);
        assert_eq!(sign(KEY, Purpose::Task, CLIENT, "k1", &m), one);
    }

    /// Issue 14 item 5: `sig.hmac` is lower-case hex only.
    #[test]
    fn upper_case_hmac_is_malformed() {
        let v = verifier(true);
        let mut m = signed("k1", KEY, Purpose::Task, CLIENT);
        assert!(v.check(Purpose::Task, &m).is_ok());
        let upper = m["sig"]["hmac"].as_str().unwrap().to_uppercase();
        m["sig"]["hmac"] = upper.into();
        assert_eq!(
            v.check(Purpose::Task, &m),
            Err(SignatureError::Malformed(
                "`hmac` must be 64 lowercase hex digits"
            ))
        );
    }

    #[test]
    fn optional_mode_accepts_unsigned_but_not_wrongly_signed() {
        let v = verifier(false);
        let mut unsigned = signed("k1", KEY, Purpose::Task, CLIENT);
        unsigned.remove("sig");
        assert_eq!(v.check(Purpose::Task, &unsigned), Ok(Verdict::Unsigned));
        let mut changed = signed("k1", KEY, Purpose::Task, CLIENT);
        changed["task_id"] = "t-2".into();
        assert!(v.check(Purpose::Task, &changed).is_err());
        // Nothing configured: signatures are not looked at.
        let off = Verifier::disabled(CLIENT);
        assert_eq!(off.check(Purpose::Task, &changed), Ok(Verdict::Unsigned));
    }

    #[test]
    fn describe_names_key_ids_only() {
        let shown = verifier(true).describe();
        assert!(shown.contains("k1") && !shown.contains(KEY), "{shown}");
        assert!(!format!("{:?}", verifier(true)).contains(KEY));
    }
}
