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

mod mqtt;
mod radio;
mod security;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use mqtt::{is_loopback_host, AuthMode, MqttConfig};
pub use radio::{RadioConfig, RadioKind};
pub use security::{SecurityConfig, SigningKeyConfig, MAX_SIGNING_KEYS};

use crate::ids::is_id_char;

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
        self.mqtt.validate()?;
        self.topics.validate()?;
        self.store.validate()?;
        self.tasks.validate()?;
        self.status.validate()?;
        self.limits.validate()?;
        self.control.validate()?;
        self.radio.validate(&self.tasks)?;
        self.security.validate()?;
        // Last, as before the sections validated themselves: a file with
        // errors in both names the `security` key first.
        if self.radio.kind == RadioKind::Zigbee {
            self.radio.validate_zigbee(&self.tasks)?;
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

impl TopicsConfig {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let t = self;
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
        Ok(())
    }
}

impl StoreConfig {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.path.as_os_str().is_empty() {
            return Err(invalid("store.path", "must not be empty"));
        }
        if self.cache_mb == 0 || self.cache_mb > 1024 {
            return Err(invalid("store.cache_mb", "must be between 1 and 1024"));
        }
        Ok(())
    }
}

impl TasksConfig {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let k = self;
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
        Ok(())
    }
}

impl StatusConfig {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.interval_s == 0 {
            return Err(invalid("status.interval_s", "must be at least 1"));
        }
        if self.offline_after_s == 0 {
            return Err(invalid("status.offline_after_s", "must be at least 1"));
        }
        Ok(())
    }
}

impl LimitsConfig {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        // Room for the largest status chunk header and one tag record.
        if self.max_payload < 1024 || self.max_payload > 256 * 1024 * 1024 {
            return Err(invalid(
                "limits.max_payload",
                "must be between 1024 and 268435456 bytes",
            ));
        }
        Ok(())
    }
}

impl ControlConfig {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if let Some(p) = &self.socket {
            // sun_path holds 108 bytes including the terminating NUL.
            if p.as_os_str().is_empty() || p.as_os_str().len() > 107 {
                return Err(invalid(
                    "control.socket",
                    "must be a path of 1 to 107 bytes",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use esl_hal::zigbee::{FlowControl, NetworkMismatch, ZigbeeConfig};

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
    fn with_errors_in_several_sections_the_first_named_is_as_before() {
        // Sections validate themselves in the order the single validate
        // had: mqtt … control, sim, BLE, security, then ZigBee.
        let both = with(
            "",
            "[security]\nallowed_methods = [\"nope\"]\n[radio]\nkind = \"zigbee\"\n[radio.zigbee]\nendpoint = 0",
        );
        assert_eq!(rule_for(&both).0, "security.allowed_methods");
        let sim_and_security = with(
            "",
            "[security]\nallowed_methods = [\"nope\"]\n[radio.sim]\nfail_rate = 2.0",
        );
        assert_eq!(rule_for(&sim_and_security).0, "radio.sim.fail_rate");
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
        let z = c.radio.zigbee.settings();
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
             bootloader_pins = []\nbootloader_skip_byte = false\nmax_in_flight = 8\n\
             tc_link_key_file = \"/etc/esl-agent/zigbee-tclk\"",
        ))
        .unwrap();
        assert_eq!(
            c.radio.zigbee.tc_link_key_file.as_deref(),
            Some(std::path::Path::new("/etc/esl-agent/zigbee-tclk")),
            "a path; the key itself is read by security::zigbee_settings"
        );
        let z = c.radio.zigbee.settings();
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
