//! `[mqtt]`: the broker, the login, the transport and the link's timing.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError};
use crate::ids::is_id_char;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    pub host: String,
    pub port: u16,
    /// `GID_xxx`: the first half of the client id (PROTOCOL §2).
    pub group_id: String,
    /// Explicit device id; when absent it is derived from a MAC address.
    pub device_id: Option<String>,
    /// Interface whose MAC becomes the device id (`eth0`); when absent and no
    /// `device_id` is set, the first non-loopback interface with a MAC is used.
    pub device_interface: Option<String>,
    pub clean_session: bool,
    pub keepalive_s: u64,
    /// Client id that receives acks of tasks without a `reply_to`.
    pub ack_to: String,
    /// Subscribe to the two P2P topics (false on Alibaba Cloud, where P2P
    /// messages need no subscription).
    pub p2p_subscribe: bool,
    /// Plain mode only; the other modes derive the user name.
    pub username: Option<String>,
    /// Plain mode only, inline (kept for compatibility); prefer `secret_file`.
    pub password: Option<String>,
    /// TLS on or off. Unset: on, except for a loopback host. Plain TCP to
    /// another host needs an explicit `false` (and logs a warning).
    pub tls: Option<bool>,
    /// The broker's CA certificate(s), PEM. Unset with TLS on: the system's
    /// CA bundle (`tls::SYSTEM_CA_BUNDLES`); a private broker CA belongs
    /// here rather than in the system bundle.
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain and private key (PEM) for mutual TLS.
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
    /// MQTT over WebSocket (`wss://host:port{ws_path}` with TLS).
    pub websocket: bool,
    pub ws_path: String,
    /// How the user name and password are made (PROTOCOL leaves this to the
    /// broker; Alibaba Cloud has three schemes of its own).
    pub auth: AuthMode,
    /// Alibaba Cloud modes: AccessKeyId (or DeviceAccessKeyId) and instance id.
    pub access_key_id: Option<String>,
    pub instance_id: Option<String>,
    /// Where the mode's secret is read from (plain: the password;
    /// signature/device_credential: the AccessKeySecret; token: the token).
    /// A file must not be accessible by group or others.
    pub secret_file: Option<PathBuf>,
    pub secret_env: Option<String>,
    /// First reconnect delay; doubles per failure up to `reconnect_max_ms`.
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
    pub connect_timeout_s: u64,
    /// An ack the broker has not PUBACKed after this long is published again.
    pub publish_timeout_s: u64,
    /// Outbox messages published but not yet PUBACKed, at most.
    pub outbox_window: u16,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            host: "localhost".into(),
            port: 1883,
            group_id: String::new(),
            device_id: None,
            device_interface: None,
            clean_session: true,
            keepalive_s: 60,
            ack_to: "GID_backend@@@backend".into(),
            p2p_subscribe: true,
            username: None,
            password: None,
            tls: None,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
            websocket: false,
            ws_path: "/mqtt".into(),
            auth: AuthMode::Plain,
            access_key_id: None,
            instance_id: None,
            secret_file: None,
            secret_env: None,
            reconnect_min_ms: 1_000,
            reconnect_max_ms: 60_000,
            connect_timeout_s: 10,
            publish_timeout_s: 30,
            outbox_window: 32,
        }
    }
}

/// `mqtt.auth`: how the MQTT user name and password are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// `mqtt.username` and a password (inline, file or environment).
    #[default]
    Plain,
    /// Alibaba Cloud: `Signature|AccessKeyId|InstanceId`,
    /// Base64(HMAC-SHA1(AccessKeySecret, client_id)).
    Signature,
    /// Alibaba Cloud: `Token|AccessKeyId|InstanceId`, `R|token|W|token`.
    Token,
    /// Alibaba Cloud: `DeviceCredential|DeviceAccessKeyId|InstanceId`, HMAC
    /// as in Signature mode with the DeviceAccessKeySecret.
    DeviceCredential,
}

impl AuthMode {
    /// The name used in the config file and in the Alibaba user name.
    pub fn name(self) -> &'static str {
        match self {
            AuthMode::Plain => "plain",
            AuthMode::Signature => "signature",
            AuthMode::Token => "token",
            AuthMode::DeviceCredential => "device_credential",
        }
    }
}

impl MqttConfig {
    /// Whether the link uses TLS: as configured, else on unless the host is
    /// a loopback address.
    pub fn uses_tls(&self) -> bool {
        self.tls.unwrap_or_else(|| !is_loopback_host(&self.host))
    }
}

/// `localhost` or a loopback IP address: traffic that never leaves the AP.
/// Other names are not resolved (DNS could say anything), so they count as
/// remote.
pub fn is_loopback_host(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl MqttConfig {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let m = self;
        if m.host.trim().is_empty() {
            return Err(invalid("mqtt.host", "must not be empty"));
        }
        if m.port == 0 {
            return Err(invalid("mqtt.port", "must be between 1 and 65535"));
        }
        if m.group_id.is_empty() {
            return Err(invalid(
                "mqtt.group_id",
                "is required (e.g. \"GID_esl\"): letters, digits, '_' and '-'",
            ));
        }
        if !m.group_id.chars().all(is_id_char) {
            return Err(invalid(
                "mqtt.group_id",
                format!(
                    "{:?} may contain only letters, digits, '_' and '-'",
                    m.group_id
                ),
            ));
        }
        if let Some(device_id) = &m.device_id {
            if device_id.is_empty() || !device_id.chars().all(is_id_char) {
                return Err(invalid(
                    "mqtt.device_id",
                    format!("{device_id:?} must be non-empty letters, digits, '_' and '-'"),
                ));
            }
        }
        if !crate::ids::is_valid_client_id(&m.ack_to) {
            return Err(invalid(
                "mqtt.ack_to",
                format!(
                    "{:?} must be a client id GROUP@@@DEVICE (letters, digits, '_', '-'), at most 64 characters",
                    m.ack_to
                ),
            ));
        }
        if m.keepalive_s < 5 || m.keepalive_s > 1200 {
            return Err(invalid(
                "mqtt.keepalive_s",
                "must be between 5 and 1200 seconds",
            ));
        }
        if m.reconnect_min_ms == 0 {
            return Err(invalid("mqtt.reconnect_min_ms", "must be at least 1"));
        }
        if m.reconnect_max_ms < m.reconnect_min_ms {
            return Err(invalid(
                "mqtt.reconnect_max_ms",
                "must be at least mqtt.reconnect_min_ms",
            ));
        }
        if m.connect_timeout_s == 0 {
            return Err(invalid("mqtt.connect_timeout_s", "must be at least 1"));
        }
        if m.publish_timeout_s == 0 {
            return Err(invalid("mqtt.publish_timeout_s", "must be at least 1"));
        }
        if m.outbox_window == 0 || m.outbox_window > 1000 {
            return Err(invalid("mqtt.outbox_window", "must be between 1 and 1000"));
        }
        validate_transport(m)?;
        validate_auth(m)?;
        Ok(())
    }
}

fn validate_transport(m: &MqttConfig) -> Result<(), ConfigError> {
    let tls = m.uses_tls();
    // Without `ca_file` the link trusts the system's CA bundle; whether one
    // exists is a file-system question, answered by `tls` at start-up and
    // by `check-config`.
    if !tls {
        for (key, set) in [
            ("mqtt.ca_file", m.ca_file.is_some()),
            ("mqtt.client_cert_file", m.client_cert_file.is_some()),
            ("mqtt.client_key_file", m.client_key_file.is_some()),
        ] {
            if set {
                return Err(invalid(
                    key,
                    "is set but TLS is off (mqtt.tls = false): it would be ignored",
                ));
            }
        }
    }
    match (&m.client_cert_file, &m.client_key_file) {
        (Some(_), None) => {
            return Err(invalid(
                "mqtt.client_key_file",
                "is required with mqtt.client_cert_file (mutual TLS)",
            ))
        }
        (None, Some(_)) => {
            return Err(invalid(
                "mqtt.client_cert_file",
                "is required with mqtt.client_key_file (mutual TLS)",
            ))
        }
        _ => {}
    }
    let path_ok = m.ws_path.starts_with('/')
        && m.ws_path.len() <= 256
        && m.ws_path
            .chars()
            .all(|c| c.is_ascii_graphic() && !matches!(c, '?' | '#' | '%'));
    if !path_ok {
        return Err(invalid(
            "mqtt.ws_path",
            format!(
                "{:?} must start with '/' and be printable ASCII without '?', '#' or '%'",
                m.ws_path
            ),
        ));
    }
    Ok(())
}

/// AccessKeyId, instance id: what Alibaba Cloud issues, and never a `|`,
/// which would shift the fields of the user name.
fn is_cloud_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// A POSIX environment variable name.
fn is_env_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// At most one of a secret's sources; a variable name must be valid.
pub(super) fn validate_secret_source(
    file_key: &'static str,
    env_key: &'static str,
    file: &Option<PathBuf>,
    env: &Option<String>,
) -> Result<(), ConfigError> {
    if let Some(f) = file {
        if f.as_os_str().is_empty() {
            return Err(invalid(file_key, "must not be empty"));
        }
        if env.is_some() {
            return Err(invalid(
                env_key,
                format!("cannot be used together with {file_key}: set one of them"),
            ));
        }
    }
    if let Some(e) = env {
        if !is_env_name(e) {
            return Err(invalid(
                env_key,
                format!("{e:?} is not an environment variable name"),
            ));
        }
    }
    Ok(())
}

fn validate_auth(m: &MqttConfig) -> Result<(), ConfigError> {
    validate_secret_source(
        "mqtt.secret_file",
        "mqtt.secret_env",
        &m.secret_file,
        &m.secret_env,
    )?;
    let has_secret = m.secret_file.is_some() || m.secret_env.is_some();
    if m.auth == AuthMode::Plain {
        if m.password.is_some() && has_secret {
            return Err(invalid(
                "mqtt.password",
                "cannot be used together with mqtt.secret_file or mqtt.secret_env: set one of them",
            ));
        }
        if (m.password.is_some() || has_secret) && m.username.is_none() {
            let key = if m.password.is_some() {
                "mqtt.password"
            } else {
                "mqtt.username"
            };
            return Err(invalid(key, "a password needs mqtt.username as well"));
        }
        for (key, set) in [
            ("mqtt.access_key_id", m.access_key_id.is_some()),
            ("mqtt.instance_id", m.instance_id.is_some()),
        ] {
            if set {
                return Err(invalid(
                    key,
                    "is only used with mqtt.auth = \"signature\", \"token\" or \"device_credential\"",
                ));
            }
        }
        return Ok(());
    }
    let mode = m.auth.name();
    for (key, set) in [
        ("mqtt.username", m.username.is_some()),
        ("mqtt.password", m.password.is_some()),
    ] {
        if set {
            return Err(invalid(
                key,
                format!("must not be set with mqtt.auth = {mode:?}: the user name and password are derived from mqtt.access_key_id, mqtt.instance_id and the secret"),
            ));
        }
    }
    for (key, value) in [
        ("mqtt.access_key_id", &m.access_key_id),
        ("mqtt.instance_id", &m.instance_id),
    ] {
        match value {
            None => {
                return Err(invalid(
                    key,
                    format!("is required with mqtt.auth = {mode:?}"),
                ))
            }
            Some(v) if !is_cloud_id(v) => {
                return Err(invalid(
                    key,
                    format!("{v:?} must be 1-128 letters, digits, '-', '_' or '.'"),
                ))
            }
            Some(_) => {}
        }
    }
    if !has_secret {
        return Err(invalid(
            "mqtt.secret_file",
            format!(
                "is required with mqtt.auth = {mode:?} (or mqtt.secret_env): the {}",
                match m.auth {
                    AuthMode::Token => "token",
                    _ => "AccessKeySecret",
                }
            ),
        ));
    }
    Ok(())
}
