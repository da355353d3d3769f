//! Who the agent is on the broker (PROTOCOL §2) and the topics that follow
//! from it (§3), resolved and checked once at start-up.
//!
//! The agent never connects with an id or topic that breaks the rules: every
//! problem stops start-up with an error naming the value and the rule. The
//! only I/O here is reading interface MAC addresses (nix `getifaddrs`).

use crate::config::Config;
use crate::ids::is_id_char;
use crate::ids::{MAX_CLIENT_ID, MAX_TOPIC};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("client id {value:?}: {rule}")]
    ClientId { value: String, rule: String },
    #[error("topic {value:?}: longer than {MAX_TOPIC} characters ({len}); shorten the parent topic or the ids")]
    TopicTooLong { value: String, len: usize },
    #[error("device id: {0}")]
    Device(String),
}

/// The resolved identity and every topic the agent uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub client_id: String,
    pub task_topic: String,
    pub cmd_topic: String,
    pub status_topic: String,
    /// `{reply_parent}/p2p/` — the reply target is appended per message.
    pub reply_prefix: String,
    /// Non-fatal remarks (e.g. Alibaba Cloud's `GID_` prefix is missing).
    pub warnings: Vec<String>,
}

impl Identity {
    /// Resolves the device id (explicit or from a MAC) and checks §2 and §3.
    pub fn resolve(config: &Config) -> Result<Identity, IdentityError> {
        let device_id = match &config.mqtt.device_id {
            Some(id) => id.clone(),
            None => mac_device_id(config.mqtt.device_interface.as_deref())?,
        };
        Identity::from_parts(config, &device_id)
    }

    /// The checks of [`Identity::resolve`] for a known device id.
    pub fn from_parts(config: &Config, device_id: &str) -> Result<Identity, IdentityError> {
        let group = &config.mqtt.group_id;
        let client_id = format!("{group}@@@{device_id}");
        let bad = |rule: &str| IdentityError::ClientId {
            value: client_id.clone(),
            rule: rule.to_owned(),
        };
        if !group.chars().all(is_id_char) || group.is_empty() {
            return Err(bad(
                "group id may contain only letters, digits, '_' and '-'",
            ));
        }
        if device_id.is_empty() || !device_id.chars().all(is_id_char) {
            return Err(bad(
                "device id may contain only letters, digits, '_' and '-'",
            ));
        }
        if client_id.len() > MAX_CLIENT_ID {
            return Err(bad(&format!(
                "longer than {MAX_CLIENT_ID} characters ({})",
                client_id.len()
            )));
        }
        let mut warnings = Vec::new();
        if !(group.starts_with("GID_") || group.starts_with("GID-"))
            || !(7..=64).contains(&group.len())
        {
            warnings.push(format!(
                "group id {group:?} lacks the GID_ prefix or is not 7-64 characters: Alibaba Cloud MQTT will refuse it (other brokers do not care)"
            ));
        }
        let t = &config.topics;
        let identity = Identity {
            task_topic: format!("{}/p2p/{client_id}", t.task_parent),
            cmd_topic: format!("{}/p2p/{client_id}", t.cmd_parent),
            status_topic: format!("{}/{client_id}", t.status_parent),
            reply_prefix: format!("{}/p2p/", t.reply_parent),
            client_id,
            warnings,
        };
        for topic in [
            &identity.task_topic,
            &identity.cmd_topic,
            &identity.status_topic,
            &identity.reply_topic(&config.mqtt.ack_to),
        ] {
            check_topic(topic)?;
        }
        Ok(identity)
    }

    /// Topic of an ack or reply for `target` (a validated client id).
    pub fn reply_topic(&self, target: &str) -> String {
        format!("{}{target}", self.reply_prefix)
    }

    /// Whether an ack or reply to `target` fits the topic limit.
    pub fn reply_topic_fits(&self, target: &str) -> bool {
        self.reply_prefix.len() + target.len() <= MAX_TOPIC
    }
}

fn check_topic(topic: &str) -> Result<(), IdentityError> {
    if topic.len() > MAX_TOPIC {
        return Err(IdentityError::TopicTooLong {
            value: topic.to_owned(),
            len: topic.len(),
        });
    }
    Ok(())
}

/// 12 lowercase hex digits of the MAC of `interface`, or of the first
/// non-loopback interface (by name) with a non-zero MAC.
fn mac_device_id(interface: Option<&str>) -> Result<String, IdentityError> {
    let addrs = nix::ifaddrs::getifaddrs()
        .map_err(|e| IdentityError::Device(format!("cannot list network interfaces: {e}")))?;
    let mut candidates: Vec<(String, [u8; 6])> = addrs
        .filter_map(|a| {
            let mac = a.address.as_ref()?.as_link_addr()?.addr()?;
            let loopback = a
                .flags
                .contains(nix::net::if_::InterfaceFlags::IFF_LOOPBACK);
            (!loopback && mac != [0; 6]).then_some((a.interface_name, mac))
        })
        .collect();
    candidates.sort();
    let chosen = match interface {
        Some(name) => candidates
            .into_iter()
            .find(|(n, _)| n == name)
            .ok_or_else(|| {
                IdentityError::Device(format!(
                "interface {name:?} (mqtt.device_interface) has no MAC address or does not exist"
            ))
            })?,
        None => candidates.into_iter().next().ok_or_else(|| {
            IdentityError::Device(
                "no network interface with a MAC address; set mqtt.device_id".into(),
            )
        })?,
    };
    Ok(format_mac(&chosen.1))
}

fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(group: &str) -> Config {
        let mut c = Config::default();
        c.mqtt.group_id = group.into();
        c
    }

    #[test]
    fn client_id_and_topics_follow_the_protocol() {
        let id = Identity::from_parts(&config("GID_esl"), "a4b1c2d3e4f5").unwrap();
        assert_eq!(id.client_id, "GID_esl@@@a4b1c2d3e4f5");
        assert_eq!(id.task_topic, "esl_task/p2p/GID_esl@@@a4b1c2d3e4f5");
        assert_eq!(id.cmd_topic, "esl_cmd/p2p/GID_esl@@@a4b1c2d3e4f5");
        assert_eq!(id.status_topic, "esl_status/GID_esl@@@a4b1c2d3e4f5");
        assert_eq!(id.reply_topic("GID_b@@@x"), "esl_ack/p2p/GID_b@@@x");
        assert!(id.warnings.is_empty());
    }

    #[test]
    fn missing_gid_prefix_is_only_a_warning() {
        let id = Identity::from_parts(&config("stores"), "dev1").unwrap();
        assert_eq!(id.warnings.len(), 1);
    }

    #[test]
    fn over_long_client_id_is_refused_and_named() {
        let err = Identity::from_parts(&config("GID_esl"), &"d".repeat(60)).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("GID_esl@@@ddd"), "{msg}");
        assert!(msg.contains("longer than 64"), "{msg}");
    }

    #[test]
    fn bad_device_charset_is_refused() {
        assert!(Identity::from_parts(&config("GID_esl"), "dev/1").is_err());
        assert!(Identity::from_parts(&config("GID_esl"), "").is_err());
    }

    #[test]
    fn over_long_topic_is_refused_and_named() {
        let mut c = config("GID_esl");
        c.topics.status_parent = "s".repeat(45);
        let err = Identity::from_parts(&c, "a4b1c2d3e4f5").unwrap_err();
        assert!(matches!(err, IdentityError::TopicTooLong { .. }), "{err}");
        assert!(err.to_string().contains("sss"), "{err}");
    }

    #[test]
    fn mac_is_twelve_lowercase_hex_digits() {
        assert_eq!(
            format_mac(&[0xa4, 0xb1, 0xc2, 0xd3, 0xe4, 0xf5]),
            "a4b1c2d3e4f5"
        );
    }

    #[test]
    fn unknown_interface_is_named_in_the_error() {
        let err = mac_device_id(Some("no-such-if0")).unwrap_err();
        assert!(err.to_string().contains("no-such-if0"), "{err}");
    }
}
