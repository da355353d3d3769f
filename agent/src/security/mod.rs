//! Everything security needs at start-up, read and checked in one place for
//! both `esl-agent run` ([`crate::start`]) and `esl-agent check-config`:
//! the link's transport ([`crate::security::tls`]), the MQTT login ([`crate::security::auth`])
//! and the signing keys ([`crate::security::signing`]); and the ZigBee
//! radio's settings with its trust-centre link key ([`zigbee_settings`]).
//!
//! Reading every file and secret here means a missing CA, a key file that
//! others can read or a short signing key stops the agent before it starts,
//! with an error naming the config key, instead of surfacing at the first
//! connection. Owns no task or channel.

pub mod auth;
pub mod secrets;
pub mod signing;
pub mod tls;

use anyhow::Context;

use crate::config::Config;
use crate::identity::Identity;
use crate::security::auth::{Credentials, Login};
use crate::security::signing::Verifier;
use crate::security::tls::LinkTransport;

/// The ZigBee backend's settings from `[radio.zigbee]`, with the
/// trust-centre link key read from `tc_link_key_file` like every secret
/// file (refused when group or others may read it; never logged). For
/// `run`, `check-config` and the offline `zigbee backup`/`restore`.
pub fn zigbee_settings(
    section: &esl_hal::zigbee::ZigbeeSection,
) -> anyhow::Result<esl_hal::zigbee::ZigbeeConfig> {
    const KEY: &str = "radio.zigbee.tc_link_key_file";
    let text = match &section.tc_link_key_file {
        Some(path) => Some(secrets::Secret::new(secrets::read_private_file(KEY, path)?)),
        None => None,
    };
    Ok(section.settings_with(text.as_ref().map(secrets::Secret::expose))?)
}

/// The security material of one agent run.
pub struct Prepared {
    pub transport: LinkTransport,
    pub login: Login,
    /// The first connection's credentials (the link makes them again before
    /// each reconnect).
    pub credentials: Option<Credentials>,
    pub verifier: Verifier,
    /// The ZigBee radio's settings with its trust-centre link key read
    /// (only with `radio.kind = "zigbee"`), so the secret is read once and
    /// check-config finds a bad key file.
    pub zigbee: Option<esl_hal::zigbee::ZigbeeConfig>,
}

impl Prepared {
    pub fn load(config: &Config, identity: &Identity) -> anyhow::Result<Prepared> {
        let transport = LinkTransport::from_config(&config.mqtt).context("mqtt transport")?;
        let login = Login::from_config(&config.mqtt, &identity.client_id);
        let credentials = login.credentials().context("mqtt login")?;
        let verifier = Verifier::from_config(&config.security, &identity.client_id)
            .context("security.signing_keys")?;
        let zigbee = (config.radio.kind == crate::config::RadioKind::Zigbee)
            .then(|| zigbee_settings(&config.radio.zigbee))
            .transpose()?;
        Ok(Prepared {
            transport,
            login,
            credentials,
            verifier,
            zigbee,
        })
    }

    /// What was set up, without any secret: for the start-up log and
    /// `check-config`.
    pub fn summary(&self) -> [(&'static str, String); 4] {
        [
            ("broker", self.transport.url.clone()),
            (
                "trusted CAs",
                self.transport
                    .trust
                    .clone()
                    .unwrap_or_else(|| "- (no TLS)".into()),
            ),
            ("login", self.login.describe()),
            ("signatures", self.verifier.describe()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// Issue 15: the trust-centre link key comes from a private file of
    /// 32 hex digits; a readable, missing or malformed file is refused
    /// naming the key, never showing its content.
    #[test]
    fn the_zigbee_link_key_file_is_read_as_a_secret() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tclk");
        std::fs::write(&path, "5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut section = esl_hal::zigbee::ZigbeeSection::default();
        assert!(zigbee_settings(&section).unwrap().tc_link_key.is_default());
        section.tc_link_key_file = Some(path.clone());
        let settings = zigbee_settings(&section).unwrap();
        assert_eq!(settings.tc_link_key.bytes(), &[0x5C; 16]);
        assert!(!format!("{settings:?}").contains("5c5c"), "never in Debug");

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let error = format!("{:#}", zigbee_settings(&section).unwrap_err());
        assert!(error.contains("radio.zigbee.tc_link_key_file"), "{error}");
        assert!(error.contains("chmod 600"), "{error}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, "5c5c5c5c not a key").unwrap();
        let error = format!("{:#}", zigbee_settings(&section).unwrap_err());
        assert!(error.contains("radio.zigbee.tc_link_key_file"), "{error}");
        assert!(!error.contains("5c5c"), "{error}");
    }
}
