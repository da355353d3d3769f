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

use std::path::{Path, PathBuf};

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
    pub username: Option<String>,
    pub password: Option<String>,
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
            reconnect_min_ms: 1_000,
            reconnect_max_ms: 60_000,
            connect_timeout_s: 10,
            publish_timeout_s: 30,
            outbox_window: 32,
        }
    }
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
    /// sled page cache. sled's default (1 GiB) is far too much for a router.
    pub cache_mb: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("/var/lib/esl-agent/store"),
            cache_mb: 4,
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
            batch_max: 512,
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
    /// ESL tags over Bluetooth LE (`[radio.ble]`, docs/BLE.md).
    Ble,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RadioConfig {
    pub kind: RadioKind,
    pub sim: SimRadioConfig,
    /// Validated by `esl_hal::ble::BleConfig::validate` (key names included).
    pub ble: esl_hal::ble::BleConfig,
}

/// PROTOCOL §8. Converted to `esl_hal::sim::SimConfig` by the radio task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimRadioConfig {
    pub tags: u32,
    pub id_prefix: String,
    pub checkin_interval_ms: u64,
    pub fail_rate: f64,
    pub offline: Vec<String>,
    pub seed: u64,
    pub journal: Option<PathBuf>,
    /// Time a simulated tag takes to render and confirm new content.
    pub apply_ms: u64,
}

impl Default for SimRadioConfig {
    fn default() -> Self {
        Self {
            tags: 16,
            id_prefix: "SIM".into(),
            checkin_interval_ms: 1_000,
            fail_rate: 0.0,
            offline: Vec::new(),
            seed: 1,
            journal: None,
            apply_ms: 20,
        }
    }
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

/// Characters allowed in group and device ids (PROTOCOL §2).
pub(crate) fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

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
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.to_string().trim_end().to_owned(),
        })?;
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
        if !crate::wire::is_valid_client_id(&m.ack_to) {
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
        if m.password.is_some() && m.username.is_none() {
            return Err(invalid("mqtt.password", "needs mqtt.username as well"));
        }

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
        if s.id_prefix.len() > 26 || !s.id_prefix.chars().all(crate::wire::is_tag_char) {
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
        Ok(())
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
        if shown.mqtt.password.is_some() {
            shown.mqtt.password = Some("<redacted>".into());
        }
        // Serialising plain data structs cannot fail: every field is a
        // string, number, bool, path, list or table.
        toml::to_string_pretty(&shown).expect("config serialises to TOML")
    }
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
        ];
        for (text, want) in cases {
            let (key, rule) = rule_for(&text);
            assert_eq!(key, want, "config {text:?}: rule {rule}");
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
    fn redaction_hides_the_password() {
        let c = Config::from_toml(&with("username = \"u\"\npassword = \"hunter2\"", "")).unwrap();
        let shown = c.redacted_toml();
        assert!(!shown.contains("hunter2"));
        assert!(shown.contains("<redacted>"));
        // The redacted output is itself a valid config (with the placeholder).
        Config::from_toml(&shown).unwrap();
    }
}
