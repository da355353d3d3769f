//! Secrets: the MQTT password, Alibaba Cloud AccessKeySecret or token, the
//! task-signing keys and the TLS client key. Where they may come from, and
//! how they are held so that they never reach a log.
//!
//! A secret comes from a file or an environment variable. A file that its
//! group or others may access in any way is refused (like ssh does with
//! private keys): on an AP, another local account, a debug bundle or a
//! backup of `/etc` must not yield the broker login or the signing key. The
//! mode is checked on the opened file, so a swap between check and read does
//! not help. Values live in [`Secret`], whose `Debug` prints `<redacted>`, so
//! a stray `{:?}` cannot leak one.
//!
//! Owns no task and no channel; the only I/O is reading the named file or
//! variable, at start-up (and by the link before a reconnect, so a rotated
//! token is picked up).

use std::fmt;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Largest secret file read: keys and PEM private keys are far smaller; a
/// larger file is a wrong path (a log, a disk image), not a secret.
const MAX_SECRET_FILE: u64 = 64 * 1024;

/// A secret value. Only [`Secret::expose`] gives it out.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The value, for the one place that needs it (HMAC, CONNECT packet, TLS).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Where a secret is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    File(PathBuf),
    Env(String),
}

impl SecretSource {
    /// The source named by a `*_file` / `*_env` key pair (validated by
    /// `config` to name at most one).
    pub fn from_keys(file: Option<&Path>, env: Option<&str>) -> Option<SecretSource> {
        match (file, env) {
            (Some(f), _) => Some(SecretSource::File(f.to_owned())),
            (None, Some(e)) => Some(SecretSource::Env(e.to_owned())),
            (None, None) => None,
        }
    }

    /// Reads the secret; surrounding whitespace (a trailing newline) is not
    /// part of it. `key` names the config key in errors.
    pub fn load(&self, key: &'static str) -> Result<Secret, SecretError> {
        let raw = match self {
            SecretSource::File(path) => read_private_file(key, path)?,
            SecretSource::Env(name) => match std::env::var(name) {
                Ok(v) => v,
                Err(_) => {
                    return Err(SecretError::Env {
                        key,
                        name: name.clone(),
                    })
                }
            },
        };
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return Err(SecretError::Empty {
                key,
                source_name: self.to_string(),
            });
        }
        Ok(Secret(trimmed.to_owned()))
    }
}

impl fmt::Display for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::File(p) => write!(f, "file {}", p.display()),
            SecretSource::Env(n) => write!(f, "environment variable {n}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("config key `{key}`: cannot read {}: {source}", path.display())]
    Read {
        key: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "config key `{key}`: {} holds a secret but is accessible by group or others (mode {mode:04o}); \
         run `chmod 600 {}` and let only the agent's user own it",
        path.display(), path.display()
    )]
    TooOpen {
        key: &'static str,
        path: PathBuf,
        mode: u32,
    },
    #[error("config key `{key}`: {} is larger than {MAX_SECRET_FILE} bytes; is it the right file?", path.display())]
    TooLarge { key: &'static str, path: PathBuf },
    #[error("config key `{key}`: environment variable {name} is not set (or not UTF-8)")]
    Env { key: &'static str, name: String },
    #[error("config key `{key}`: the secret in {source_name} is empty")]
    Empty {
        key: &'static str,
        source_name: String,
    },
}

/// Reads a file that holds a secret, refusing it when group or others have
/// any access to it.
pub fn read_private_file(key: &'static str, path: &Path) -> Result<String, SecretError> {
    let read_err = |source| SecretError::Read {
        key,
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(SecretError::TooOpen {
            key,
            path: path.to_owned(),
            mode,
        });
    }
    if meta.len() > MAX_SECRET_FILE {
        return Err(SecretError::TooLarge {
            key,
            path: path.to_owned(),
        });
    }
    let mut text = String::new();
    file.take(MAX_SECRET_FILE + 1)
        .read_to_string(&mut text)
        .map_err(read_err)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;

    fn write(dir: &Path, name: &str, mode: u32, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(mode)
            .open(&path)
            .unwrap();
        std::fs::write(&path, text).unwrap();
        // `mode` at creation is filtered by the umask; set it exactly.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn a_private_file_is_read_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "s", 0o600, "  hunter2\n");
        let s = SecretSource::File(path).load("mqtt.secret_file").unwrap();
        assert_eq!(s.expose(), "hunter2");
        let path = write(dir.path(), "r", 0o400, "k");
        assert_eq!(
            SecretSource::File(path).load("k").unwrap().expose(),
            "k",
            "read-only for the owner is fine"
        );
    }

    #[test]
    fn a_file_readable_by_group_or_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o644, 0o640, 0o604, 0o660, 0o602, 0o610] {
            let path = write(dir.path(), "s", mode, "hunter2");
            let err = SecretSource::File(path.clone())
                .load("mqtt.secret_file")
                .unwrap_err();
            let msg = err.to_string();
            assert!(
                matches!(err, SecretError::TooOpen { .. }),
                "{mode:o}: {msg}"
            );
            assert!(msg.contains("mqtt.secret_file"), "{msg}");
            assert!(msg.contains(&format!("{mode:04o}")), "{msg}");
            assert!(!msg.contains("hunter2"), "{msg}");
        }
    }

    #[test]
    fn missing_empty_and_huge_sources_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let err = SecretSource::File(dir.path().join("nope"))
            .load("mqtt.secret_file")
            .unwrap_err();
        assert!(err.to_string().contains("mqtt.secret_file"), "{err}");
        let path = write(dir.path(), "empty", 0o600, " \n");
        let err = SecretSource::File(path).load("x.secret_file").unwrap_err();
        assert!(matches!(err, SecretError::Empty { .. }), "{err}");
        let path = write(dir.path(), "big", 0o600, &"a".repeat(70_000));
        let err = SecretSource::File(path).load("x.secret_file").unwrap_err();
        assert!(matches!(err, SecretError::TooLarge { .. }), "{err}");
        let err = SecretSource::Env("ESL_TEST_SURELY_UNSET_VAR".into())
            .load("mqtt.secret_env")
            .unwrap_err();
        assert!(
            err.to_string().contains("ESL_TEST_SURELY_UNSET_VAR"),
            "{err}"
        );
    }

    #[test]
    fn debug_never_shows_the_value() {
        let s = Secret::new("hunter2");
        let shown = format!("{s:?} {:?}", Some(&s));
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("redacted"));
    }
}
