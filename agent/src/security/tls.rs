//! The MQTT link's transport: plain TCP, TLS, or MQTT over (secure)
//! WebSocket, built once from the config for `broker_io`, which opens the
//! link's connections with it.
//!
//! TLS is rustls with the ring provider, used as a finished `ClientConfig`
//! (never through rumqttc's own builders, which look for a
//! process-wide provider and panic unless exactly one is compiled in; see
//! LIBRARY-NOTES). Rules:
//! - Only TLS 1.2 and 1.3.
//! - The broker is verified against the CA file of `mqtt.ca_file` and
//!   nothing else; without it, against the system's CA bundle (the first
//!   of `$SSL_CERT_FILE` and [`SYSTEM_CA_BUNDLES`] that exists: Debian's
//!   `ca-certificates`, OpenWrt's `ca-bundle`, …), for the name in
//!   `mqtt.host` (DNS name or IP address in the certificate's
//!   subjectAltName). A private broker CA belongs in `mqtt.ca_file`, not
//!   mixed with the public ones.
//! - A client certificate and key (`mqtt.client_cert_file`,
//!   `mqtt.client_key_file`) give mutual TLS; the key file is a secret and
//!   must not be readable by group or others.
//!
//! Files are read and checked here at start-up, so a missing or broken
//! file stops the agent with an error naming the key. [`explain`] turns a
//! TLS failure into a sentence an operator can act on. Owns no task.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rumqttc::{ConnectionError, TlsConfiguration, Transport};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{AlertDescription, CertificateError, ClientConfig, RootCertStore};

use crate::config::MqttConfig;
use crate::security::secrets::{read_private_file, SecretError};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("config key `{key}`: cannot read {path}: {source}")]
    Read {
        key: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("config key `{key}`: {path}: {problem}")]
    Pem {
        key: &'static str,
        path: String,
        problem: String,
    },
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error(
        "config key `mqtt.ca_file`: not set, and no system CA bundle was found (looked for {tried}). \
         Set mqtt.ca_file to the broker's CA certificate (PEM), or install the CA bundle \
         (Debian: ca-certificates; OpenWrt: ca-bundle)"
    )]
    NoTrustStore { tried: String },
    #[error("TLS set-up: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The transport and the broker address rumqttc wants for it.
#[derive(Clone)]
pub struct LinkTransport {
    pub transport: Transport,
    /// Host name for TCP/TLS, the full URL for WebSocket.
    pub broker_addr: String,
    /// How the link reaches the broker, for the log (`tls://host:8883`).
    pub url: String,
    /// Which CAs the broker's certificate is checked against, for the log
    /// and `check-config`; `None` without TLS.
    pub trust: Option<String>,
}

/// Where the system's CA bundle is looked for when `mqtt.ca_file` is unset,
/// after `$SSL_CERT_FILE` (OpenSSL's variable, also for tests): Debian,
/// Ubuntu, Alpine and OpenWrt (`ca-bundle` package); Fedora/RHEL; the
/// OpenSSL/LibreSSL default of Alpine and others.
pub const SYSTEM_CA_BUNDLES: [&str; 3] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// The certificates the broker is verified against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// `mqtt.ca_file`: every certificate in it must be usable.
    CaFile(PathBuf),
    /// The system bundle: certificates webpki cannot use are skipped (a
    /// bundle of a hundred public CAs may hold one), at least one must be
    /// usable.
    SystemBundle(PathBuf),
}

impl Trust {
    /// `mqtt.ca_file`, else the first system bundle that exists.
    pub fn from_config(m: &MqttConfig) -> Result<Trust, TlsError> {
        if let Some(ca) = &m.ca_file {
            return Ok(Trust::CaFile(ca.clone()));
        }
        let env = std::env::var_os("SSL_CERT_FILE").map(PathBuf::from);
        let candidates: Vec<PathBuf> = env
            .into_iter()
            .chain(SYSTEM_CA_BUNDLES.iter().map(PathBuf::from))
            .collect();
        Trust::system_bundle(&candidates)
    }

    /// The first of `candidates` that is a file.
    pub fn system_bundle(candidates: &[PathBuf]) -> Result<Trust, TlsError> {
        match candidates.iter().find(|p| p.is_file()) {
            Some(p) => Ok(Trust::SystemBundle(p.clone())),
            None => Err(TlsError::NoTrustStore {
                tried: candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    fn describe(&self) -> String {
        match self {
            Trust::CaFile(p) => format!("{} (mqtt.ca_file)", p.display()),
            Trust::SystemBundle(p) => format!(
                "{} (system CA bundle; mqtt.ca_file is not set)",
                p.display()
            ),
        }
    }
}

impl LinkTransport {
    pub fn from_config(m: &MqttConfig) -> Result<LinkTransport, TlsError> {
        let (tls, trust) = if m.uses_tls() {
            let trust = Trust::from_config(m)?;
            let client = match (&m.client_cert_file, &m.client_key_file) {
                (Some(cert), Some(key)) => Some((cert.as_path(), key.as_path())),
                _ => None,
            };
            let config = Arc::new(client_config(&trust, client)?);
            (Some(config), Some(trust.describe()))
        } else {
            (None, None)
        };
        // An IPv6 literal needs brackets inside a URL.
        let host = if m.host.contains(':') && !m.host.starts_with('[') {
            format!("[{}]", m.host)
        } else {
            m.host.clone()
        };
        Ok(match (m.websocket, tls) {
            (false, None) => LinkTransport {
                transport: Transport::Tcp,
                broker_addr: m.host.clone(),
                url: format!("mqtt://{host}:{}", m.port),
                trust,
            },
            (false, Some(config)) => LinkTransport {
                transport: Transport::Tls(TlsConfiguration::Rustls(config)),
                broker_addr: m.host.clone(),
                url: format!("mqtts://{host}:{}", m.port),
                trust,
            },
            (true, None) => {
                let url = format!("ws://{host}:{}{}", m.port, m.ws_path);
                LinkTransport {
                    transport: Transport::Ws,
                    broker_addr: url.clone(),
                    url,
                    trust: trust.clone(),
                }
            }
            (true, Some(config)) => {
                let url = format!("wss://{host}:{}{}", m.port, m.ws_path);
                LinkTransport {
                    transport: Transport::Wss(TlsConfiguration::Rustls(config)),
                    broker_addr: url.clone(),
                    url,
                    trust: trust.clone(),
                }
            }
        })
    }
}

/// A rustls client config: ring, TLS 1.2+, roots from `trust` only,
/// optional client certificate.
pub fn client_config(
    trust: &Trust,
    client: Option<(&Path, &Path)>,
) -> Result<ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    match trust {
        Trust::CaFile(ca_file) => {
            for cert in read_certs("mqtt.ca_file", ca_file)? {
                roots.add(cert).map_err(|e| TlsError::Pem {
                    key: "mqtt.ca_file",
                    path: ca_file.display().to_string(),
                    problem: format!("not a usable CA certificate: {e}"),
                })?;
            }
        }
        Trust::SystemBundle(bundle) => {
            let (_, unusable) =
                roots.add_parsable_certificates(read_certs("mqtt.ca_file", bundle)?);
            if roots.is_empty() {
                return Err(TlsError::Pem {
                    key: "mqtt.ca_file",
                    path: bundle.display().to_string(),
                    problem: format!(
                        "system CA bundle without a usable certificate ({unusable} refused)"
                    ),
                });
            }
        }
    }
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_root_certificates(roots);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some((cert_file, key_file)) => {
            let chain = read_certs("mqtt.client_cert_file", cert_file)?;
            let pem = read_private_file("mqtt.client_key_file", key_file)?;
            let key = PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::Pem {
                key: "mqtt.client_key_file",
                path: key_file.display().to_string(),
                problem: format!("no usable private key (PKCS#8, PKCS#1 or SEC1 PEM): {e}"),
            })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| TlsError::Pem {
                    key: "mqtt.client_key_file",
                    path: key_file.display().to_string(),
                    problem: format!("does not fit mqtt.client_cert_file: {e}"),
                })?
        }
    };
    Ok(config)
}

fn read_certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        key,
        path: shown.clone(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            key,
            path: shown.clone(),
            problem: format!("not a PEM certificate file: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            key,
            path: shown,
            problem: "contains no certificate (expected PEM `BEGIN CERTIFICATE` blocks)".into(),
        });
    }
    Ok(certs)
}

/// A sentence for a connection error caused by TLS, naming what to check;
/// `None` for errors that are not about TLS.
pub fn explain(error: &ConnectionError, host: &str) -> Option<String> {
    find_rustls_error(error).map(|tls| explain_tls(tls, host))
}

/// The sentence for one rustls error.
pub fn explain_tls(tls: &rustls::Error, host: &str) -> String {
    match tls {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => format!(
                "the broker's certificate is not signed by a CA in mqtt.ca_file (or, when it is unset, in the system's CA bundle) ({tls})"
            ),
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => format!(
                "the broker's certificate has expired, or the AP's clock is wrong ({tls})"
            ),
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => format!(
                "the broker's certificate is not valid yet: is the AP's clock set? ({tls})"
            ),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!("the broker's certificate is not valid for host {host:?} (mqtt.host) ({tls})")
            }
            CertificateError::Other(other)
                if matches!(
                    other.0.downcast_ref::<webpki::Error>(),
                    Some(webpki::Error::UnsupportedCertVersion)
                ) =>
            {
                "the broker's certificate (or its CA) is an X.509 v1 certificate, which is refused: \
                 issue a v3 certificate with the broker's name in subjectAltName \
                 (docs/SECURITY.md, \"Certificates with openssl\")"
                    .to_owned()
            }
            _ => format!("the broker's certificate was refused ({tls})"),
        },
        rustls::Error::AlertReceived(
            alert @ (AlertDescription::ProtocolVersion | AlertDescription::InsufficientSecurity),
        ) => format!(
            "the broker ended the TLS handshake ({alert:?}): no TLS version in common; the agent speaks TLS 1.2 and 1.3 only"
        ),
        rustls::Error::AlertReceived(
            alert @ (AlertDescription::CertificateRequired
            | AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown),
        ) => format!(
            "the broker ended the TLS handshake ({alert:?}): it wants a client certificate it trusts (mqtt.client_cert_file, mqtt.client_key_file)"
        ),
        rustls::Error::AlertReceived(alert) => {
            format!("the broker ended the TLS handshake ({alert:?})")
        }
        rustls::Error::PeerIncompatible(_) => format!(
            "no TLS version or cipher in common with the broker; the agent speaks TLS 1.2 and 1.3 only ({tls})"
        ),
        other => format!("TLS failed: {other}"),
    }
}

/// The rustls error somewhere in `error`'s cause chain. rumqttc and
/// tungstenite wrap it in `io::Error`s, whose `source()` skips the wrapped
/// error, so those are opened by hand.
fn find_rustls_error(error: &ConnectionError) -> Option<&rustls::Error> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = current {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if let Some(tls) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                return Some(tls);
            }
        }
        current = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn mqtt(extra: &str) -> MqttConfig {
        Config::from_toml(&format!("[mqtt]\ngroup_id = \"GID_t\"\n{extra}\n"))
            .unwrap()
            .mqtt
    }

    #[test]
    fn loopback_without_tls_keys_is_plain_tcp() {
        let t = LinkTransport::from_config(&mqtt("host = \"127.0.0.1\"")).unwrap();
        assert!(matches!(t.transport, Transport::Tcp));
        assert_eq!(t.url, "mqtt://127.0.0.1:1883");
    }

    #[test]
    fn plain_websocket_needs_tls_off_explicitly() {
        let t = LinkTransport::from_config(&mqtt(
            "host = \"10.0.0.1\"\ntls = false\nwebsocket = true\nport = 80",
        ))
        .unwrap();
        assert!(matches!(t.transport, Transport::Ws));
        assert_eq!(t.broker_addr, "ws://10.0.0.1:80/mqtt");
    }

    #[test]
    fn without_ca_file_the_first_system_bundle_is_used_and_none_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _, _) = pki(dir.path());
        let missing = dir.path().join("no-bundle.crt");
        let trust = Trust::system_bundle(&[missing.clone(), ca.clone()]).unwrap();
        assert_eq!(trust, Trust::SystemBundle(ca.clone()));
        client_config(&trust, None).unwrap();
        // rumqttc always gets the finished rustls config, never its own
        // builder (`TlsConfiguration::Simple`, the only user of its old
        // rustls-webpki and rustls-pemfile: docs/SECURITY.md §6).
        let m = mqtt(&format!(
            "host = \"b.example\"\nca_file = {:?}",
            ca.display().to_string()
        ));
        let t = LinkTransport::from_config(&m).unwrap();
        assert!(
            matches!(t.transport, Transport::Tls(TlsConfiguration::Rustls(_))),
            "not a rustls config"
        );
        assert!(t.trust.unwrap().contains("(mqtt.ca_file)"));
        assert!(trust.describe().contains("system CA bundle"));

        let err = Trust::system_bundle(std::slice::from_ref(&missing))
            .err()
            .unwrap();
        let text = err.to_string();
        assert!(matches!(err, TlsError::NoTrustStore { .. }), "{text}");
        assert!(
            text.contains("mqtt.ca_file") && text.contains(&missing.display().to_string()),
            "{text}"
        );

        // An explicit ca_file wins over every bundle.
        let m = mqtt(&format!(
            "host = \"b.example\"\nca_file = {:?}",
            ca.display().to_string()
        ));
        assert_eq!(Trust::from_config(&m).unwrap(), Trust::CaFile(ca));
    }

    #[test]
    fn an_x509_v1_certificate_is_explained() {
        let error = rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(
            Arc::new(webpki::Error::UnsupportedCertVersion),
        )));
        let text = explain_tls(&error, "broker.example");
        assert!(
            text.contains("X.509 v1") && text.contains("subjectAltName"),
            "{text}"
        );
    }

    #[test]
    fn a_missing_or_empty_ca_file_names_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("ca.pem");
        let m = mqtt(&format!(
            "host = \"b.example\"\nca_file = {:?}",
            missing.display().to_string()
        ));
        let err = LinkTransport::from_config(&m).err().unwrap().to_string();
        assert!(err.contains("mqtt.ca_file"), "{err}");
        std::fs::write(&missing, "not a certificate\n").unwrap();
        let err = LinkTransport::from_config(&m).err().unwrap().to_string();
        assert!(
            err.contains("mqtt.ca_file") && err.contains("no certificate"),
            "{err}"
        );
    }

    /// A CA and a client certificate with its key, as PEM files in `dir`.
    fn pki(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["ap-7".into()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        let paths = (
            dir.join("ca.pem"),
            dir.join("client.pem"),
            dir.join("client.key"),
        );
        std::fs::write(&paths.0, ca.pem()).unwrap();
        std::fs::write(&paths.1, cert.pem()).unwrap();
        std::fs::write(&paths.2, key.serialize_pem()).unwrap();
        (paths.0, paths.1, paths.2)
    }

    #[test]
    fn the_client_key_must_be_private_and_match_the_certificate() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (ca, cert, key) = pki(dir.path());
        let mode = |m| std::fs::set_permissions(&key, std::fs::Permissions::from_mode(m)).unwrap();
        mode(0o644);
        let err = client_config(&Trust::CaFile(ca.clone()), Some((&cert, &key)))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("mqtt.client_key_file") && err.contains("0644"),
            "{err}"
        );
        mode(0o600);
        client_config(&Trust::CaFile(ca.clone()), Some((&cert, &key))).unwrap();
        client_config(&Trust::CaFile(ca.clone()), None).unwrap();
        // A key of another pair: refused at start, not at the handshake.
        let other = rcgen::KeyPair::generate().unwrap();
        std::fs::write(&key, other.serialize_pem()).unwrap();
        let err = client_config(&Trust::CaFile(ca.clone()), Some((&cert, &key)))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("does not fit"), "{err}");
    }
}
