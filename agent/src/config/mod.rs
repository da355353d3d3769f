//! The agent's configuration: TOML file → typed structs, defaults in one
//! place, validated once at start-up.
//!
//! Every default lives in the `Default` impls below and nowhere else. Unknown
//! keys are errors (a typo such as `ack_too` must not silently fall back to a
//! default). [`Config::load`] parses and validates; the rest of the agent
//! receives a `Config` that is known to be good. Validation errors name the
//! key and the rule (`mqtt.port: must be between 1 and 65535`).
//!
//! This module does no I/O besides reading the file; resolving the device id
//! from a network interface lives in `identity`.

use crate::ids::is_id_char;
use crate::wire::Method;
use std::path::{Path, PathBuf};

use esl_hal::zigbee::{FlowControl, NetworkMismatch, ZigbeeConfig};
use serde::{Deserialize, Serialize};

/// A configuration problem, naming the key and the rule it breaks.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config key `{key}`: {rule}")]
    Invalid { key: &'static str, rule: String },
}

fn invalid(key: &'static str, rule: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        rule: rule.into(),
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub mqtt: MqttConfig,
    pub topics: TopicsConfig,
    pub store: StoreConfig,
    pub tasks: TasksConfig,
    pub status: StatusConfig,
    pub limits: LimitsConfig,
    pub radio: RadioConfig,
    pub log: LogConfig,
    pub control: ControlConfig,
    pub security: SecurityConfig,
}

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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicsConfig {
    pub task_parent: String,
    pub cmd_parent: String,
    pub reply_parent: String,
    pub status_parent: String,
}

impl Default for TopicsConfig {
    fn default() -> Self {
        Self {
            task_parent: "esl_task".into(),
            cmd_parent: "esl_cmd".into(),
            reply_parent: "esl_ack".into(),
            status_parent: "esl_status".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub path: PathBuf,
    /// SQLite page cache of the store's writing connection (the link's and
    /// the checkpointer's connections have 256 KiB each).
    pub cache_mb: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("/var/lib/esl-agent/store"),
            cache_mb: 2,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TasksConfig {
    /// Lifetime of a task without `ttl_ms`.
    pub default_ttl_ms: u64,
    /// Delivery attempts before a task is acked `failed`.
    pub max_attempts: u32,
    /// A delivery whose outcome has not arrived after this long counts as a
    /// failed (retryable) attempt.
    pub delivery_timeout_ms: u64,
    /// How long finished tasks are remembered for duplicate detection.
    pub keep_final_h: u64,
    /// Publish an `accepted` progress ack when a task is stored.
    pub send_accepted: bool,
    /// Tasks stored per group commit (one disk flush) at most.
    pub batch_max: usize,
}

impl Default for TasksConfig {
    fn default() -> Self {
        Self {
            default_ttl_ms: 24 * 3600 * 1000,
            max_attempts: 5,
            delivery_timeout_ms: 30_000,
            keep_final_h: 7 * 24,
            send_accepted: false,
            batch_max: 1024,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StatusConfig {
    pub interval_s: u64,
    /// A tag not seen for this long is reported `online: false`.
    pub offline_after_s: u64,
}

impl Default for StatusConfig {
    fn default() -> Self {
        Self {
            interval_s: 60,
            offline_after_s: 300,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest MQTT payload accepted or sent (Alibaba Cloud: 64 KiB).
    pub max_payload: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_payload: 64 * 1024,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RadioKind {
    #[default]
    Sim,
    /// Z-Stack ZNP coordinator on a serial port (docs/ZIGBEE.md).
    Zigbee,
    /// ESL tags over Bluetooth LE (`[radio.ble]`, docs/BLE.md).
    Ble,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RadioConfig {
    pub kind: RadioKind,
    /// PROTOCOL §8; defaults and field docs in `esl_hal::sim::SimConfig`.
    pub sim: esl_hal::sim::SimConfig,
    pub zigbee: ZigbeeRadioConfig,
    /// Validated by `esl_hal::ble::BleConfig::validate` (key names included).
    pub ble: esl_hal::ble::BleConfig,
}

/// `[radio.zigbee]`. Defaults come from `esl_hal::zigbee::ZigbeeConfig`, so
/// they live in one place; times are in milliseconds here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ZigbeeRadioConfig {
    /// Serial device of the coordinator stick.
    pub port: PathBuf,
    pub baud_rate: u32,
    /// `"none"`, `"hardware"` (RTS/CTS) or `"software"` (XON/XOFF).
    pub flow_control: FlowControl,
    /// The agent's application endpoint on the coordinator.
    pub endpoint: u8,
    /// The agent's saved network (Open Coordinator Backup JSON, 0600);
    /// default: `zigbee-network.json` next to the store.
    pub network_file: Option<PathBuf>,
    /// Channels a new network may use.
    pub channels: Vec<u8>,
    /// PAN id and extended PAN id (16 hex digits) of a new network; random
    /// when absent.
    pub pan_id: Option<u16>,
    pub extended_pan_id: Option<String>,
    /// `"report"`, `"restore"`, `"adopt"` or `"form"` (docs/ZIGBEE.md).
    pub on_network_mismatch: NetworkMismatch,
    /// Refresh of the network file from the stick; 0: never.
    pub backup_interval_ms: u64,
    /// `[dtr, rts]` states at open; `[]` leaves the lines alone.
    pub bootloader_pins: Vec<[bool; 2]>,
    pub bootloader_skip_byte: bool,
    pub probe_timeout_ms: u64,
    /// Data requests in flight at once; default by firmware.
    pub max_in_flight: Option<usize>,
    pub sreq_timeout_ms: u64,
    pub reset_timeout_ms: u64,
    pub startup_timeout_ms: u64,
    pub confirm_timeout_ms: u64,
    pub result_timeout_ms: u64,
    pub ping_interval_ms: u64,
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
}

impl Default for ZigbeeRadioConfig {
    fn default() -> Self {
        let d = ZigbeeConfig::default();
        let ms = |t: std::time::Duration| u64::try_from(t.as_millis()).unwrap_or(u64::MAX);
        Self {
            port: d.port,
            baud_rate: d.baud_rate,
            flow_control: d.flow_control,
            endpoint: d.endpoint,
            network_file: None,
            channels: d.channels,
            pan_id: d.pan_id,
            extended_pan_id: None,
            on_network_mismatch: d.on_network_mismatch,
            backup_interval_ms: ms(d.backup_interval),
            bootloader_pins: d
                .bootloader
                .pin_states
                .iter()
                .map(|&(dtr, rts)| [dtr, rts])
                .collect(),
            bootloader_skip_byte: d.bootloader.skip_byte,
            probe_timeout_ms: ms(d.bootloader.probe_timeout),
            max_in_flight: d.max_in_flight,
            sreq_timeout_ms: ms(d.sreq_timeout),
            reset_timeout_ms: ms(d.reset_timeout),
            startup_timeout_ms: ms(d.startup_timeout),
            confirm_timeout_ms: ms(d.confirm_timeout),
            result_timeout_ms: ms(d.result_timeout),
            ping_interval_ms: ms(d.ping_interval),
            reconnect_min_ms: ms(d.reconnect_min),
            reconnect_max_ms: ms(d.reconnect_max),
        }
    }
}

impl ZigbeeRadioConfig {
    /// The backend's settings.
    pub fn to_hal(&self) -> ZigbeeConfig {
        use std::time::Duration;
        let d = ZigbeeConfig::default();
        ZigbeeConfig {
            port: self.port.clone(),
            baud_rate: self.baud_rate,
            flow_control: self.flow_control,
            endpoint: self.endpoint,
            network_file: self.network_file.clone().unwrap_or(d.network_file),
            channels: self.channels.clone(),
            pan_id: self.pan_id,
            // Checked by `validate_zigbee`.
            extended_pan_id: self
                .extended_pan_id
                .as_deref()
                .and_then(parse_extended_pan_id),
            on_network_mismatch: self.on_network_mismatch,
            backup_interval: Duration::from_millis(self.backup_interval_ms),
            bootloader: esl_hal::zigbee::firmware::BootloaderSkip {
                pin_states: self.bootloader_pins.iter().map(|[d, r]| (*d, *r)).collect(),
                skip_byte: self.bootloader_skip_byte,
                probe_timeout: Duration::from_millis(self.probe_timeout_ms),
            },
            max_in_flight: self.max_in_flight,
            sreq_timeout: Duration::from_millis(self.sreq_timeout_ms),
            reset_timeout: Duration::from_millis(self.reset_timeout_ms),
            startup_timeout: Duration::from_millis(self.startup_timeout_ms),
            confirm_timeout: Duration::from_millis(self.confirm_timeout_ms),
            result_timeout: Duration::from_millis(self.result_timeout_ms),
            ping_interval: Duration::from_millis(self.ping_interval_ms),
            reconnect_min: Duration::from_millis(self.reconnect_min_ms),
            reconnect_max: Duration::from_millis(self.reconnect_max_ms),
        }
    }
}

/// 16 hex digits, as in Open Coordinator Backups.
fn parse_extended_pan_id(text: &str) -> Option<u64> {
    (text.len() == 16)
        .then(|| u64::from_str_radix(text, 16).ok())
        .flatten()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `tracing` filter, e.g. `info` or `esl_agent=debug,info`. `RUST_LOG`
    /// overrides it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    /// Serve the local control socket for `esl-agent status|tags|tasks`.
    pub enabled: bool,
    /// Socket path; default: `control.sock` next to the store directory.
    pub socket: Option<PathBuf>,
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            socket: None,
        }
    }
}

/// `[security]`: signed messages and the command allow-list (SECURITY.md).
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

/// Characters allowed in a topic parent: no wildcards, no `/` tricks that
/// could make an uplink parent equal a downlink one.
fn is_parent_char(c: char) -> bool {
    is_id_char(c) || c == '.'
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates TOML text.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        if config.radio.zigbee.network_file.is_none() {
            config.radio.zigbee.network_file =
                Some(config.store.path.with_file_name("zigbee-network.json"));
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks every rule that does not need the network or the file system.
    /// Identity and topic-length rules that depend on the resolved device id
    /// are checked by `identity::Identity::resolve`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let m = &self.mqtt;
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

        let t = &self.topics;
        let parents = [
            ("topics.task_parent", &t.task_parent),
            ("topics.cmd_parent", &t.cmd_parent),
            ("topics.reply_parent", &t.reply_parent),
            ("topics.status_parent", &t.status_parent),
        ];
        for (key, parent) in parents {
            if parent.is_empty() || !parent.chars().all(is_parent_char) {
                return Err(invalid(
                    key,
                    format!("{parent:?} must be non-empty letters, digits, '_', '-' and '.'"),
                ));
            }
        }
        // Up- and downlink never share a parent (PROTOCOL §3): a bridge rule
        // copying one into the other would loop.
        for (up_key, up) in &parents[2..] {
            for (down_key, down) in &parents[..2] {
                if up == down {
                    return Err(invalid(
                        up_key,
                        format!("must differ from {down_key} (both are {up:?})"),
                    ));
                }
            }
        }

        if self.store.path.as_os_str().is_empty() {
            return Err(invalid("store.path", "must not be empty"));
        }
        if self.store.cache_mb == 0 || self.store.cache_mb > 1024 {
            return Err(invalid("store.cache_mb", "must be between 1 and 1024"));
        }

        let k = &self.tasks;
        if k.default_ttl_ms == 0 {
            return Err(invalid("tasks.default_ttl_ms", "must be at least 1"));
        }
        if k.max_attempts == 0 || k.max_attempts > 1000 {
            return Err(invalid("tasks.max_attempts", "must be between 1 and 1000"));
        }
        if k.delivery_timeout_ms < 100 {
            return Err(invalid("tasks.delivery_timeout_ms", "must be at least 100"));
        }
        if k.batch_max == 0 || k.batch_max > 10_000 {
            return Err(invalid("tasks.batch_max", "must be between 1 and 10000"));
        }

        if self.status.interval_s == 0 {
            return Err(invalid("status.interval_s", "must be at least 1"));
        }
        if self.status.offline_after_s == 0 {
            return Err(invalid("status.offline_after_s", "must be at least 1"));
        }
        // Room for the largest status chunk header and one tag record.
        if self.limits.max_payload < 1024 || self.limits.max_payload > 256 * 1024 * 1024 {
            return Err(invalid(
                "limits.max_payload",
                "must be between 1024 and 268435456 bytes",
            ));
        }

        if let Some(p) = &self.control.socket {
            // sun_path holds 108 bytes including the terminating NUL.
            if p.as_os_str().is_empty() || p.as_os_str().len() > 107 {
                return Err(invalid(
                    "control.socket",
                    "must be a path of 1 to 107 bytes",
                ));
            }
        }

        let s = &self.radio.sim;
        if s.tags > 1_000_000 {
            return Err(invalid("radio.sim.tags", "must be at most 1000000"));
        }
        if s.id_prefix.len() > 26 || !s.id_prefix.chars().all(crate::ids::is_tag_char) {
            return Err(invalid(
                "radio.sim.id_prefix",
                "must be at most 26 characters of letters, digits, '_', '.', ':' and '-'",
            ));
        }
        if s.checkin_interval_ms == 0 {
            return Err(invalid(
                "radio.sim.checkin_interval_ms",
                "must be at least 1",
            ));
        }
        if !(0.0..=1.0).contains(&s.fail_rate) {
            return Err(invalid(
                "radio.sim.fail_rate",
                "must be between 0.0 and 1.0",
            ));
        }
        if self.radio.kind == RadioKind::Ble {
            let ble = &self.radio.ble;
            ble.validate().map_err(|e| invalid(e.key, e.rule))?;
            // The engine must not give up on an attempt the radio still makes.
            let worst = ble.worst_case_attempt();
            if worst >= std::time::Duration::from_millis(k.delivery_timeout_ms) {
                return Err(invalid(
                    "tasks.delivery_timeout_ms",
                    format!(
                        "must be more than {} ms, the longest BLE attempt \
                         ((radio.ble.retries + 1) × radio.ble.session_timeout_ms + backoffs)",
                        worst.as_millis()
                    ),
                ));
            }
        }
        validate_security(&self.security)?;
        if self.radio.kind == RadioKind::Zigbee {
            self.validate_zigbee()?;
        }
        Ok(())
    }

    /// Settings that are allowed but weaken security, for the start-up log
    /// and `check-config`.
    pub fn warnings(&self) -> Vec<String> {
        let m = &self.mqtt;
        let mut w = Vec::new();
        if !m.uses_tls() && !is_loopback_host(&m.host) {
            w.push(format!(
                "mqtt.tls = false: tasks, acks and the MQTT credentials cross the network to {} in clear text",
                m.host
            ));
        }
        if m.uses_tls() && m.port == 1883 {
            w.push("mqtt.port is 1883, the usual plain-TCP port, but TLS is on: TLS brokers usually listen on 8883 (443 for wss)".into());
        }
        if m.password.is_some() {
            w.push("mqtt.password is inline: keep the config file mode 0600, or move the password to mqtt.secret_file".into());
        }
        w
    }

    fn validate_zigbee(&self) -> Result<(), ConfigError> {
        let z = &self.radio.zigbee;
        if let Some(ext) = &z.extended_pan_id {
            if parse_extended_pan_id(ext).is_none() {
                return Err(invalid(
                    "radio.zigbee.extended_pan_id",
                    format!("{ext:?} is not 16 hex digits"),
                ));
            }
        }
        if let Err(esl_hal::zigbee::ZigbeeError::InvalidConfig { key, reason }) =
            z.to_hal().validate()
        {
            return Err(invalid(key, reason));
        }
        // The engine counts a delivery without an outcome as failed after
        // its own timeout; the radio must answer before that, or a slow but
        // successful update is counted as a failure.
        let radio_wait = z.confirm_timeout_ms.saturating_add(z.result_timeout_ms);
        if radio_wait >= self.tasks.delivery_timeout_ms {
            return Err(invalid(
                "radio.zigbee.result_timeout_ms",
                format!(
                    "confirm_timeout_ms + result_timeout_ms ({radio_wait}) must be below tasks.delivery_timeout_ms ({})",
                    self.tasks.delivery_timeout_ms
                ),
            ));
        }
        Ok(())
    }

    /// The `reply_to` patterns in force: `security.reply_to_allowed`, or
    /// every client id in the group of `mqtt.ack_to`.
    pub fn reply_to_patterns(&self) -> Vec<String> {
        match &self.security.reply_to_allowed {
            Some(p) => p.clone(),
            None => {
                let group = self
                    .mqtt
                    .ack_to
                    .split_once("@@@")
                    .map_or(self.mqtt.ack_to.as_str(), |(g, _)| g);
                vec![format!("{group}@@@*")]
            }
        }
    }

    /// Where the control socket lives (configured, or next to the store).
    pub fn control_socket(&self) -> PathBuf {
        match &self.control.socket {
            Some(p) => p.clone(),
            None => self.store.path.with_file_name("control.sock"),
        }
    }

    /// The config as TOML with secrets replaced, for `check-config` and logs.
    pub fn redacted_toml(&self) -> String {
        let mut shown = self.clone();
        // Every other secret is referred to by a file or variable name,
        // never held in the config itself.
        if shown.mqtt.password.is_some() {
            shown.mqtt.password = Some("<redacted>".into());
        }
        // Serialising plain data structs cannot fail: every field is a
        // string, number, bool, path, list or table.
        toml::to_string_pretty(&shown).expect("config serialises to TOML")
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
fn validate_secret_source(
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

fn validate_security(s: &SecurityConfig) -> Result<(), ConfigError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[mqtt]\ngroup_id = \"GID_test\"\ndevice_id = \"dev1\"\n";

    fn rule_for(text: &str) -> (String, String) {
        match Config::from_toml(text) {
            Err(ConfigError::Invalid { key, rule }) => (key.to_owned(), rule),
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn minimal_config_gets_protocol_defaults() {
        let c = Config::from_toml(MINIMAL).unwrap();
        assert_eq!(c.topics.task_parent, "esl_task");
        assert_eq!(c.topics.reply_parent, "esl_ack");
        assert!(c.mqtt.clean_session);
        assert!(c.mqtt.p2p_subscribe);
        assert_eq!(c.limits.max_payload, 65536);
        assert_eq!(c.radio.kind, RadioKind::Sim);
        assert_eq!(c.radio.sim.tags, 16);
        assert_eq!(c.radio.sim.id_prefix, "SIM");
    }

    #[test]
    fn missing_group_id_names_the_key() {
        let (key, _) = rule_for("[mqtt]\nhost = \"x\"\n");
        assert_eq!(key, "mqtt.group_id");
    }

    /// A config with a valid `[mqtt]` table plus `mqtt_extra` lines in it and
    /// `rest` after it.
    fn with(mqtt_extra: &str, rest: &str) -> String {
        format!("{MINIMAL}{mqtt_extra}\n{rest}")
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            (with("port = 0", ""), "mqtt.port"),
            (
                "[mqtt]\ngroup_id = \"GID bad\"\n".to_owned(),
                "mqtt.group_id",
            ),
            (
                "[mqtt]\ngroup_id = \"GID_x\"\ndevice_id = \"a/b\"\n".to_owned(),
                "mqtt.device_id",
            ),
            (with("ack_to = \"no-separator\"", ""), "mqtt.ack_to"),
            (
                with("", "[topics]\nreply_parent = \"esl_task\""),
                "topics.reply_parent",
            ),
            (
                with("", "[topics]\ntask_parent = \"a/#\""),
                "topics.task_parent",
            ),
            (with("", "[tasks]\nmax_attempts = 0"), "tasks.max_attempts"),
            (with("", "[limits]\nmax_payload = 10"), "limits.max_payload"),
            (
                with("", "[radio.sim]\nfail_rate = 1.5"),
                "radio.sim.fail_rate",
            ),
            (
                with(
                    "",
                    "[radio]\nkind = \"zigbee\"\n[radio.zigbee]\nendpoint = 0",
                ),
                "radio.zigbee.endpoint",
            ),
            (
                with(
                    "",
                    "[radio]\nkind = \"zigbee\"\n[radio.zigbee]\nport = \"\"",
                ),
                "radio.zigbee.port",
            ),
            (
                with(
                    "",
                    "[tasks]\ndelivery_timeout_ms = 5000\n[radio]\nkind = \"zigbee\"",
                ),
                "radio.zigbee.result_timeout_ms",
            ),
        ];
        for (text, want) in cases {
            let (key, rule) = rule_for(&text);
            assert_eq!(key, want, "config {text:?}: rule {rule}");
        }
    }

    #[test]
    fn zigbee_section_parses_and_converts() {
        let c = Config::from_toml(&with(
            "",
            "[radio]\nkind = \"zigbee\"\n[radio.zigbee]\nport = \"/dev/ttyACM0\"\n\
             baud_rate = 230400\nflow_control = \"hardware\"\nendpoint = 11\nconfirm_timeout_ms = 9000",
        ))
        .unwrap();
        assert_eq!(c.radio.kind, RadioKind::Zigbee);
        let z = c.radio.zigbee.to_hal();
        assert_eq!(z.port, PathBuf::from("/dev/ttyACM0"));
        assert_eq!(z.baud_rate, 230_400);
        assert_eq!(z.flow_control, FlowControl::Hardware);
        assert_eq!(z.endpoint, 11);
        assert_eq!(z.confirm_timeout, std::time::Duration::from_millis(9000));
        // Untouched keys keep the backend's defaults.
        assert_eq!(z.result_timeout, ZigbeeConfig::default().result_timeout);
        let err = Config::from_toml(&with(
            "",
            "[radio]\nkind = \"zigbee\"\n[radio.zigbee]\nflow_control = \"rts\"",
        ))
        .unwrap_err();
        assert!(
            err.to_string().contains("flow_control") || err.to_string().contains("rts"),
            "{err}"
        );
        // The printed config is a valid config again.
        Config::from_toml(&c.redacted_toml()).unwrap();
    }

    #[test]
    fn zigbee_network_keys_parse_and_the_network_file_sits_next_to_the_store() {
        let c = Config::from_toml(&with(
            "",
            "[radio]\nkind = \"zigbee\"\n[radio.zigbee]\nchannels = [15, 20]\npan_id = 6754\n\
             extended_pan_id = \"00124b0012345678\"\non_network_mismatch = \"restore\"\n\
             bootloader_pins = []\nbootloader_skip_byte = false\nmax_in_flight = 8",
        ))
        .unwrap();
        let z = c.radio.zigbee.to_hal();
        assert_eq!(z.channels, [15, 20]);
        assert_eq!(z.pan_id, Some(0x1A62));
        assert_eq!(z.extended_pan_id, Some(0x0012_4B00_1234_5678));
        assert_eq!(z.on_network_mismatch, NetworkMismatch::Restore);
        assert!(z.bootloader.pin_states.is_empty() && !z.bootloader.skip_byte);
        assert_eq!(z.max_in_flight, Some(8));
        assert_eq!(
            z.network_file,
            c.store.path.with_file_name("zigbee-network.json")
        );
        Config::from_toml(&c.redacted_toml()).unwrap();
        for (toml, key) in [
            ("extended_pan_id = \"12\"", "radio.zigbee.extended_pan_id"),
            ("channels = [27]", "radio.zigbee.channels"),
            ("pan_id = 65535", "radio.zigbee.pan_id"),
        ] {
            let err = Config::from_toml(&with(
                "",
                &format!("[radio]\nkind = \"zigbee\"\n[radio.zigbee]\n{toml}"),
            ))
            .unwrap_err();
            assert!(err.to_string().contains(key), "{err}");
        }
    }

    #[test]
    fn ble_radio_config_is_validated_with_key_names() {
        let ok = Config::from_toml(&with(
            "",
            "[radio]\nkind = \"ble\"\n[radio.ble]\ntags = [\"C0:11:22:33:44:55\"]\n[radio.ble.fake]\ntags = 2\n",
        ))
        .unwrap();
        assert_eq!(ok.radio.kind, RadioKind::Ble);
        assert_eq!(ok.radio.ble.tags, ["C0:11:22:33:44:55"]);
        assert_eq!(ok.radio.ble.fake.as_ref().map(|f| f.tags), Some(2));
        // The effective config shows the BLE table and reads back the same.
        assert_eq!(Config::from_toml(&ok.redacted_toml()).unwrap(), ok);

        let cases = [
            ("[radio.ble]\nchunk_size = 0", "radio.ble.chunk_size"),
            (
                "[radio.ble]\ntags = [\"c0:11:22:33:44:55\"]",
                "radio.ble.tags",
            ),
            (
                "[radio.ble]\ncontent_characteristic = \"x\"",
                "radio.ble.content_characteristic",
            ),
            (
                "[radio.ble.fake]\nconnect_fail_rate = 2.0",
                "radio.ble.fake.connect_fail_rate",
            ),
            (
                "[radio.ble]\nsession_timeout_ms = 20000\nretries = 1",
                "tasks.delivery_timeout_ms",
            ),
        ];
        for (table, want) in cases {
            let (key, rule) = rule_for(&with("", &format!("[radio]\nkind = \"ble\"\n{table}")));
            assert_eq!(key, want, "{table}: {rule}");
        }
        // BLE settings are checked only when the BLE radio is used.
        Config::from_toml(&with("", "[radio.ble]\nchunk_size = 0")).unwrap();
    }

    #[test]
    fn unknown_key_is_an_error_that_names_it() {
        let err = Config::from_toml(&with("ack_too = \"x\"", "")).unwrap_err();
        assert!(err.to_string().contains("ack_too"), "{err}");
        let err = Config::from_toml("[radio]\nkind = \"lora\"\n").unwrap_err();
        assert!(err.to_string().contains("lora"), "{err}");
    }

    #[test]
    fn wrong_type_is_an_error_that_names_the_key() {
        let err = Config::from_toml(&with("port = \"x\"", "")).unwrap_err();
        assert!(err.to_string().contains("port"), "{err}");
    }

    #[test]
    fn tls_is_the_default_for_a_remote_broker() {
        // Without ca_file: valid, the system CA bundle is used (issue 14).
        let c = Config::from_toml(&with("host = \"broker.example.com\"", "")).unwrap();
        assert!(c.mqtt.uses_tls() && c.mqtt.ca_file.is_none());
        for host in ["localhost", "127.0.0.1", "::1", "[::1]", "127.1.2.3"] {
            let c = Config::from_toml(&with(&format!("host = {host:?}"), "")).unwrap();
            assert!(!c.mqtt.uses_tls(), "{host}");
            assert!(c.warnings().is_empty(), "{host}: {:?}", c.warnings());
        }
        let c = Config::from_toml(&with("host = \"10.1.1.1\"\ntls = false", "")).unwrap();
        assert!(!c.mqtt.uses_tls());
        assert!(c.warnings()[0].contains("clear text"), "{:?}", c.warnings());
        let c = Config::from_toml(&with(
            "host = \"b.example\"\nport = 8883\nca_file = \"/etc/ca.pem\"",
            "",
        ))
        .unwrap();
        assert!(c.mqtt.uses_tls() && c.warnings().is_empty());
    }

    #[test]
    fn security_keys_are_checked_and_named() {
        let cases = [
            (with("ca_file = \"/ca.pem\"", ""), "mqtt.ca_file"),
            (
                with("tls = true\nca_file = \"/ca.pem\"\nclient_cert_file = \"/c.pem\"", ""),
                "mqtt.client_key_file",
            ),
            (with("ws_path = \"mqtt\"", ""), "mqtt.ws_path"),
            (with("password = \"p\"", ""), "mqtt.password"),
            (with("secret_file = \"/s\"", ""), "mqtt.username"),
            (
                with("username = \"u\"\nsecret_file = \"/s\"\nsecret_env = \"S\"", ""),
                "mqtt.secret_env",
            ),
            (with("username = \"u\"\nsecret_env = \"1BAD\"", ""), "mqtt.secret_env"),
            (with("access_key_id = \"AK\"", ""), "mqtt.access_key_id"),
            (
                with("auth = \"signature\"\ninstance_id = \"i\"\nsecret_env = \"S\"", ""),
                "mqtt.access_key_id",
            ),
            (
                with(
                    "auth = \"token\"\naccess_key_id = \"A|B\"\ninstance_id = \"i\"\nsecret_env = \"S\"",
                    "",
                ),
                "mqtt.access_key_id",
            ),
            (
                with("auth = \"signature\"\naccess_key_id = \"A\"\ninstance_id = \"i\"", ""),
                "mqtt.secret_file",
            ),
            (
                with(
                    "auth = \"signature\"\nusername = \"u\"\naccess_key_id = \"A\"\ninstance_id = \"i\"\nsecret_env = \"S\"",
                    "",
                ),
                "mqtt.username",
            ),
            (
                with("", "[security]\nrequire_signed_tasks = true"),
                "security.require_signed_tasks",
            ),
            (
                with("", "[security]\nallowed_methods = [\"agent.reboot\"]"),
                "security.allowed_methods",
            ),
            (
                with("", "[[security.signing_keys]]\nid = \"k 1\"\nsecret_env = \"K\""),
                "security.signing_keys.id",
            ),
            (
                with(
                    "",
                    "[[security.signing_keys]]\nid = \"k1\"\nsecret_env = \"K\"\n[[security.signing_keys]]\nid = \"k1\"\nsecret_env = \"L\"",
                ),
                "security.signing_keys.id",
            ),
            (
                with("", "[[security.signing_keys]]\nid = \"k1\""),
                "security.signing_keys.secret_file",
            ),
        ];
        for (text, want) in cases {
            let (key, rule) = rule_for(&text);
            assert_eq!(key, want, "config {text:?}: rule {rule}");
        }
    }

    #[test]
    fn a_full_security_config_is_accepted() {
        let c = Config::from_toml(&with(
            "host = \"post-cn-x.mqtt.aliyuncs.com\"\nport = 443\nwebsocket = true\nca_file = \"/etc/esl-agent/ca.pem\"\n\
             auth = \"signature\"\naccess_key_id = \"LTAI5t\"\ninstance_id = \"post-cn-x\"\nsecret_file = \"/etc/esl-agent/ak\"",
            "[security]\nrequire_signed_tasks = true\nallowed_methods = [\"agent.status\"]\n\
             [[security.signing_keys]]\nid = \"2026-01\"\nsecret_file = \"/etc/esl-agent/k1\"\n\
             [[security.signing_keys]]\nid = \"2026-07\"\nsecret_env = \"ESL_TASK_KEY_2\"",
        ))
        .unwrap();
        assert!(c.mqtt.uses_tls());
        assert_eq!(c.mqtt.auth, AuthMode::Signature);
        assert_eq!(c.security.signing_keys.len(), 2);
        // What check-config prints is a valid config again.
        assert_eq!(Config::from_toml(&c.redacted_toml()).unwrap(), c);
    }

    #[test]
    fn redaction_hides_the_password() {
        let c = Config::from_toml(&with("username = \"u\"\npassword = \"hunter2\"", "")).unwrap();
        let shown = c.redacted_toml();
        assert!(!shown.contains("hunter2"));
        assert!(shown.contains("<redacted>"));
        // The redacted output is itself a valid config (with the placeholder).
        Config::from_toml(&shown).unwrap();
    }
}
