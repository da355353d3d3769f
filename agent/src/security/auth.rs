//! The MQTT login: user name and password for the configured `mqtt.auth`
//! mode (plain, or one of Alibaba Cloud's Signature, Token and
//! DeviceCredential schemes).
//!
//! | mode | user name | password |
//! |---|---|---|
//! | `plain` | `mqtt.username` | the secret (or inline `mqtt.password`) |
//! | `signature` | `Signature\|AccessKeyId\|InstanceId` | Base64(HMAC-SHA1(AccessKeySecret, client_id)) |
//! | `token` | `Token\|AccessKeyId\|InstanceId` | `R\|token\|W\|token` |
//! | `device_credential` | `DeviceCredential\|DeviceAccessKeyId\|InstanceId` | as `signature`, with the DeviceAccessKeySecret |
//!
//! [`Login`] keeps where the secret comes from, not the secret, so the link
//! can make fresh [`Credentials`] before each reconnect: an expired token
//! replaced in its file by a provisioning tool is used without a restart.
//! Owns no task or channel. Secrets stay in [`Secret`] and are never logged.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha1::Sha1;

use crate::config::{AuthMode, MqttConfig};
use crate::security::secrets::{Secret, SecretError, SecretSource};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(transparent)]
    Secret(#[from] SecretError),
    /// The rule, never the token itself.
    #[error("config key `{key}`: the token {rule}")]
    Token { key: &'static str, rule: String },
}

/// User name and password for one CONNECT.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub username: String,
    pub password: Secret,
}

/// How to make the credentials, from the config.
#[derive(Debug, Clone)]
pub struct Login {
    mode: AuthMode,
    username: Option<String>,
    access_key_id: String,
    instance_id: String,
    inline_password: Option<Secret>,
    source: Option<SecretSource>,
    /// The HMAC modes sign the client id.
    client_id: String,
}

impl Login {
    /// `m` is validated (`Config::validate`), so the mode's keys are there.
    pub fn from_config(m: &MqttConfig, client_id: &str) -> Login {
        Login {
            mode: m.auth,
            username: m.username.clone(),
            access_key_id: m.access_key_id.clone().unwrap_or_default(),
            instance_id: m.instance_id.clone().unwrap_or_default(),
            inline_password: m.password.clone().map(Secret::new),
            source: SecretSource::from_keys(m.secret_file.as_deref(), m.secret_env.as_deref()),
            client_id: client_id.to_owned(),
        }
    }

    /// Whether the secret is read from outside (and so may change between
    /// connections).
    pub fn reads_secret(&self) -> bool {
        self.source.is_some()
    }

    /// Reads the secret (if any) and builds the credentials. `None`: connect
    /// without a user name (anonymous).
    pub fn credentials(&self) -> Result<Option<Credentials>, AuthError> {
        let key = match &self.source {
            Some(SecretSource::Env(_)) => "mqtt.secret_env",
            _ => "mqtt.secret_file",
        };
        let secret = match &self.source {
            Some(source) => Some(source.load(key)?),
            None => self.inline_password.clone(),
        };
        let cloud_user =
            |prefix: &str| format!("{prefix}|{}|{}", self.access_key_id, self.instance_id);
        Ok(match self.mode {
            AuthMode::Plain => self.username.clone().map(|username| Credentials {
                username,
                password: secret.unwrap_or_else(|| Secret::new("")),
            }),
            AuthMode::Signature | AuthMode::DeviceCredential => {
                // Validation guarantees a source for these modes.
                let secret = secret.unwrap_or_else(|| Secret::new(""));
                let prefix = if self.mode == AuthMode::Signature {
                    "Signature"
                } else {
                    "DeviceCredential"
                };
                Some(Credentials {
                    username: cloud_user(prefix),
                    password: Secret::new(signature_password(secret.expose(), &self.client_id)),
                })
            }
            AuthMode::Token => {
                let secret = secret.unwrap_or_else(|| Secret::new(""));
                Some(Credentials {
                    username: cloud_user("Token"),
                    password: token_password(key, secret.expose())?,
                })
            }
        })
    }

    /// One line for `check-config`: the mode, the user name and where the
    /// secret comes from — never the secret.
    pub fn describe(&self) -> String {
        let from = match (&self.source, &self.inline_password) {
            (Some(s), _) => format!("secret from {s}"),
            (None, Some(_)) => "password inline in the config".to_owned(),
            (None, None) => "no password".to_owned(),
        };
        match self.mode {
            AuthMode::Plain => match &self.username {
                Some(u) => format!("plain, user {u:?}, {from}"),
                None => "anonymous (no user name)".to_owned(),
            },
            mode => format!(
                "{}, AccessKeyId {:?}, instance {:?}, {from}",
                mode.name(),
                self.access_key_id,
                self.instance_id
            ),
        }
    }
}

/// Alibaba Cloud Signature/DeviceCredential password:
/// Base64(HMAC-SHA1(secret, client_id)).
pub fn signature_password(secret: &str, client_id: &str) -> String {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = Hmac::<Sha1>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(client_id.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Alibaba Cloud Token password. A bare token is used for both reading and
/// writing (`R|t|W|t`); a value already in the `R|…|W|…` form (separate
/// read and write tokens) is used as it is after a format check.
fn token_password(key: &'static str, token: &str) -> Result<Secret, AuthError> {
    let bad = |rule: &str| AuthError::Token {
        key,
        rule: rule.to_owned(),
    };
    if !token.contains('|') {
        if token.chars().any(char::is_whitespace) {
            return Err(bad("contains white space"));
        }
        return Ok(Secret::new(format!("R|{token}|W|{token}")));
    }
    let parts: Vec<&str> = token.split('|').collect();
    let pairs_ok = parts.len().is_multiple_of(2)
        && parts
            .chunks(2)
            .all(|p| matches!(p[0], "R" | "W") && !p[1].is_empty());
    let has = |kind| parts.chunks(2).any(|p| p[0] == kind);
    if !pairs_ok || !has("R") || !has("W") || parts.len() != 4 {
        return Err(bad(
            "must be a bare token or `R|<read token>|W|<write token>`: the agent both subscribes and publishes",
        ));
    }
    Ok(Secret::new(token.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::os::unix::fs::PermissionsExt;

    /// RFC 2202 test case 2 (HMAC-SHA1, key "Jefe"), in Base64: checks the
    /// HMAC itself against the standard's published value.
    #[test]
    fn hmac_sha1_matches_rfc_2202() {
        assert_eq!(
            signature_password("Jefe", "what do ya want for nothing?"),
            // effcdf6ae5eb2fa2d27416d5f184df9c259a7c79
            "7/zfauXrL6LSdBbV8YTfnCWafHk="
        );
    }

    /// Computed independently with
    /// `printf %s 'GID_esl@@@a4b1c2d3e4f5' | openssl dgst -sha1 -hmac testSecretKey123 -binary | base64`
    /// and Python's `hmac` module; both gave this value.
    #[test]
    fn signature_password_matches_openssl() {
        assert_eq!(
            signature_password("testSecretKey123", "GID_esl@@@a4b1c2d3e4f5"),
            "4cZcvtbfltKPnBNBSR3SLLF2vfs="
        );
    }

    fn login(extra: &str, dir: &std::path::Path, secret: &str) -> Login {
        let file = dir.join("secret");
        std::fs::write(&file, secret).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let text = format!(
            "[mqtt]\ngroup_id = \"GID_esl\"\ndevice_id = \"a4b1c2d3e4f5\"\nsecret_file = {:?}\n{extra}\n",
            file.display().to_string()
        );
        let c = Config::from_toml(&text).unwrap();
        Login::from_config(&c.mqtt, "GID_esl@@@a4b1c2d3e4f5")
    }

    #[test]
    fn alibaba_modes_build_their_user_names_and_passwords() {
        let dir = tempfile::tempdir().unwrap();
        let ids = "access_key_id = \"LTAI5tExample\"\ninstance_id = \"post-cn-abc123\"\n";
        let c = login(
            &format!("auth = \"signature\"\n{ids}"),
            dir.path(),
            "testSecretKey123\n",
        )
        .credentials()
        .unwrap()
        .unwrap();
        assert_eq!(c.username, "Signature|LTAI5tExample|post-cn-abc123");
        assert_eq!(c.password.expose(), "4cZcvtbfltKPnBNBSR3SLLF2vfs=");

        let c = login(
            &format!("auth = \"device_credential\"\n{ids}"),
            dir.path(),
            "testSecretKey123",
        )
        .credentials()
        .unwrap()
        .unwrap();
        assert_eq!(c.username, "DeviceCredential|LTAI5tExample|post-cn-abc123");
        assert_eq!(c.password.expose(), "4cZcvtbfltKPnBNBSR3SLLF2vfs=");

        let l = login(&format!("auth = \"token\"\n{ids}"), dir.path(), "tok123");
        let c = l.credentials().unwrap().unwrap();
        assert_eq!(c.username, "Token|LTAI5tExample|post-cn-abc123");
        assert_eq!(c.password.expose(), "R|tok123|W|tok123");
        let l = login(&format!("auth = \"token\"\n{ids}"), dir.path(), "R|rt|W|wt");
        assert_eq!(
            l.credentials().unwrap().unwrap().password.expose(),
            "R|rt|W|wt"
        );
    }

    #[test]
    fn a_malformed_token_is_refused_without_showing_it() {
        let dir = tempfile::tempdir().unwrap();
        let ids = "auth = \"token\"\naccess_key_id = \"AK\"\ninstance_id = \"i\"\n";
        for token in ["R|onlyread", "R|a|R|b", "X|a|W|b", "R||W|b", "tok en"] {
            let err = login(ids, dir.path(), token).credentials().unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains("mqtt.secret_file"), "{msg}");
            assert!(!msg.contains(token), "{msg}");
        }
    }

    #[test]
    fn plain_mode_reads_the_secret_again_for_each_connection() {
        let dir = tempfile::tempdir().unwrap();
        let l = login("username = \"ap-7\"", dir.path(), "first");
        assert_eq!(l.credentials().unwrap().unwrap().password.expose(), "first");
        std::fs::write(dir.path().join("secret"), "second\n").unwrap();
        assert_eq!(
            l.credentials().unwrap().unwrap().password.expose(),
            "second"
        );
        assert!(l.reads_secret());
        let shown = l.describe();
        assert!(
            shown.contains("ap-7") && !shown.contains("second"),
            "{shown}"
        );
    }

    #[test]
    fn no_user_name_means_anonymous() {
        let c = Config::from_toml("[mqtt]\ngroup_id = \"GID_esl\"\n").unwrap();
        let l = Login::from_config(&c.mqtt, "GID_esl@@@x");
        assert!(l.credentials().unwrap().is_none());
    }
}
