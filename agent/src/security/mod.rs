//! Everything security needs at start-up, read and checked in one place for
//! both `esl-agent run` ([`crate::start`]) and `esl-agent check-config`:
//! the link's transport ([`crate::security::tls`]), the MQTT login ([`crate::security::auth`])
//! and the signing keys ([`crate::security::signing`]).
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

/// The security material of one agent run.
pub struct Prepared {
    pub transport: LinkTransport,
    pub login: Login,
    /// The first connection's credentials (the link makes them again before
    /// each reconnect).
    pub credentials: Option<Credentials>,
    pub verifier: Verifier,
}

impl Prepared {
    pub fn load(config: &Config, identity: &Identity) -> anyhow::Result<Prepared> {
        let transport = LinkTransport::from_config(&config.mqtt).context("mqtt transport")?;
        let login = Login::from_config(&config.mqtt, &identity.client_id);
        let credentials = login.credentials().context("mqtt login")?;
        let verifier = Verifier::from_config(&config.security, &identity.client_id)
            .context("security.signing_keys")?;
        Ok(Prepared {
            transport,
            login,
            credentials,
            verifier,
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
