//! Security fixtures for `security.rs`: a test PKI made per test with rcgen
//! ([`Pki`]), Mosquitto's password file, ACL and TLS listener
//! ([`BrokerSecurity`], rendered into the broker's config by `broker.rs`),
//! a TLS WebSocket front ([`WssFront`]), and the signing script of
//! `docs/examples/sign_task.py` ([`sign_with_script`]).
//!
//! Nothing here trusts the agent's own code: passwords for Mosquitto's file
//! and signatures are made by independent tools (Python), certificates by
//! rcgen, and the broker checks them.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use serde_json::Value;
use tokio::task::JoinHandle;

/// Mosquitto's password tool (same Debian package as the broker).
const MOSQUITTO_PASSWD: &str = "/usr/bin/mosquitto_passwd";
/// The back end's login on secured brokers.
pub const BACKEND_USER: &str = "backend";
pub const BACKEND_PASSWORD: &str = "backend-password-e2e";
/// A client with a valid login but no right to publish tasks.
pub const INTRUDER_USER: &str = "intruder";
pub const INTRUDER_PASSWORD: &str = "intruder-password-e2e";

/// Writes `text` to `path` readable by its owner only (what the agent
/// demands of secret files).
pub fn write_private(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).expect("chmod 600");
}

/// A PEM certificate and its private key (mode 0600).
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The server certificates the TLS tests need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerCert {
    /// For `localhost` and `127.0.0.1`, signed by the test CA, valid now.
    Good,
    /// As `Good`, but its validity ended in 2021.
    Expired,
    /// Signed by the test CA, valid now, but for `broker.other.example`.
    WrongName,
    /// For `localhost`, valid now, signed by a CA the agent does not know.
    UnknownCa,
}

/// A test certificate authority in a directory of its own.
pub struct Pki {
    dir: PathBuf,
    ca: Certificate,
    ca_key: KeyPair,
    issued: usize,
}

fn ca(name: &str) -> (Certificate, KeyPair) {
    let key = KeyPair::generate().expect("generate a CA key");
    let mut params = CertificateParams::new(Vec::new()).expect("CA params");
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    (params.self_signed(&key).expect("self-sign the CA"), key)
}

impl Pki {
    /// A new CA; its certificate is written to [`Pki::ca_file`].
    pub fn new(dir: &Path) -> Pki {
        let dir = dir.join("pki");
        fs::create_dir_all(&dir).expect("create the pki dir");
        let (ca, ca_key) = ca("esl-e2e test CA");
        fs::write(dir.join("ca.pem"), ca.pem()).expect("write ca.pem");
        Pki {
            dir,
            ca,
            ca_key,
            issued: 0,
        }
    }

    /// The CA certificate the agent trusts (`mqtt.ca_file`).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    fn issue(&mut self, params: CertificateParams, other_ca: bool) -> CertFiles {
        self.issued += 1;
        let key = KeyPair::generate().expect("generate a key");
        let cert = if other_ca {
            let (ca, ca_key) = ca("some other CA");
            params.signed_by(&key, &ca, &ca_key)
        } else {
            params.signed_by(&key, &self.ca, &self.ca_key)
        }
        .expect("sign a certificate");
        let files = CertFiles {
            cert: self.dir.join(format!("cert-{}.pem", self.issued)),
            key: self.dir.join(format!("key-{}.pem", self.issued)),
        };
        fs::write(&files.cert, cert.pem()).expect("write a certificate");
        write_private(&files.key, &key.serialize_pem());
        files
    }

    pub fn server(&mut self, kind: ServerCert) -> CertFiles {
        let names = match kind {
            ServerCert::WrongName => vec!["broker.other.example".to_owned()],
            _ => vec!["localhost".to_owned(), "127.0.0.1".to_owned()],
        };
        let mut params = CertificateParams::new(names).expect("server params");
        params
            .distinguished_name
            .push(DnType::CommonName, "esl-e2e broker");
        if kind == ServerCert::Expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        self.issue(params, kind == ServerCert::UnknownCa)
    }

    /// A client certificate whose common name is `name` (Mosquitto's
    /// `use_identity_as_username` makes it the user name).
    pub fn client(&mut self, name: &str) -> CertFiles {
        let mut params = CertificateParams::new(Vec::new()).expect("client params");
        params.distinguished_name.push(DnType::CommonName, name);
        self.issue(params, false)
    }
}

/// A TLS listener of the broker (on [`super::Broker::tls_port`]).
#[derive(Debug, Clone)]
pub struct TlsListener {
    pub server: CertFiles,
    /// CA for client certificates (mutual TLS).
    pub ca_file: PathBuf,
    /// Mutual TLS: no client certificate, no connection; the certificate's
    /// common name becomes the user name.
    pub require_client_cert: bool,
}

/// Logins, ACL and TLS of a secured broker. Anonymous clients are refused.
#[derive(Debug, Clone)]
pub struct BrokerSecurity {
    /// User name and password; written through `mosquitto_passwd -U`.
    pub users: Vec<(String, String)>,
    /// Mosquitto ACL file text.
    pub acl: String,
    pub tls: Option<TlsListener>,
}

impl BrokerSecurity {
    /// The agent logs in as `agent_user` with `agent_password`; the back end
    /// and an intruder get logins too; the ACL is [`least_privilege_acl`].
    pub fn with_agent(agent_user: &str, agent_password: &str) -> BrokerSecurity {
        BrokerSecurity {
            users: vec![
                (agent_user.to_owned(), agent_password.to_owned()),
                (BACKEND_USER.to_owned(), BACKEND_PASSWORD.to_owned()),
                (INTRUDER_USER.to_owned(), INTRUDER_PASSWORD.to_owned()),
            ],
            acl: least_privilege_acl(agent_user),
            tls: None,
        }
    }

    pub fn has_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Broker config lines (appended after the plain listener), writing the
    /// password and ACL files into `dir`.
    pub(super) fn config(&self, dir: &Path, tls_port: Option<u16>) -> String {
        let passwd = dir.join("mosquitto.passwd");
        let acl = dir.join("mosquitto.acl");
        let plain: String = self
            .users
            .iter()
            .map(|(u, p)| format!("{u}:{p}\n"))
            .collect();
        write_private(&passwd, &plain);
        let status = Command::new(MOSQUITTO_PASSWD)
            .arg("-U")
            .arg(&passwd)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {MOSQUITTO_PASSWD}: {e}"));
        assert!(status.success(), "mosquitto_passwd -U failed: {status}");
        fs::write(&acl, &self.acl).expect("write the ACL");
        let mut config = format!(
            "password_file {}\nacl_file {}\n",
            passwd.display(),
            acl.display()
        );
        if let (Some(tls), Some(port)) = (&self.tls, tls_port) {
            config.push_str(&format!(
                "listener {port} 127.0.0.1\n\
                 certfile {}\n\
                 keyfile {}\n\
                 cafile {}\n\
                 require_certificate {}\n\
                 use_identity_as_username {}\n",
                tls.server.cert.display(),
                tls.server.key.display(),
                tls.ca_file.display(),
                tls.require_client_cert,
                tls.require_client_cert,
            ));
        }
        config
    }
}

/// The ACL docs/SECURITY.md recommends, for the test's ids: the agent reads
/// only its own P2P topics and writes only acks and its status; the back end
/// writes tasks and commands and reads its acks; others get nothing.
pub fn least_privilege_acl(agent_user: &str) -> String {
    format!(
        "{}\n\
         user {BACKEND_USER}\n\
         topic write esl_task/p2p/#\n\
         topic write esl_cmd/p2p/#\n\
         topic read esl_ack/p2p/GID_backend@@@be1\n\
         topic read esl_status/#\n\
         \n\
         user {INTRUDER_USER}\n\
         topic read esl_status/#\n",
        agent_acl(agent_user)
    )
}

/// The agent's part of [`least_privilege_acl`] for one login.
pub fn agent_acl(agent_user: &str) -> String {
    format!(
        "\nuser {agent_user}\n\
         topic read esl_task/p2p/GID_test@@@dev1\n\
         topic read esl_cmd/p2p/GID_test@@@dev1\n\
         topic write esl_ack/p2p/#\n\
         topic write esl_status/GID_test@@@dev1\n"
    )
}

/// Runs `docs/examples/sign_task.py` on `message`: an implementation of the
/// signature scheme independent of the agent's.
pub fn sign_with_script(message: &Value, key_file: &Path, kid: &str) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/sign_task.py");
    let mut child = Command::new("python3")
        .arg(&script)
        .arg("--key-file")
        .arg(key_file)
        .arg("--kid")
        .arg(kid)
        .arg("--client-id")
        .arg(super::AGENT_CLIENT_ID)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "the signed-task tests need python3 to run {}: {e}",
                script.display()
            )
        });
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(message.to_string().as_bytes())
        .expect("write the task to the script");
    let out = child.wait_with_output().expect("run the signing script");
    assert!(out.status.success(), "sign_task.py failed: {}", out.status);
    serde_json::from_slice(&out.stdout).expect("sign_task.py prints JSON")
}

/// OpenSSL's test server, the TLS peer for the version test.
const OPENSSL: &str = "/usr/bin/openssl";

/// `openssl s_server` on a free loopback port that speaks only TLS 1.1 (with
/// the weak ciphers that needs): a broker the agent must refuse. Its log
/// says what the agent offered. Killed on drop.
pub struct LegacyTlsServer {
    child: Child,
    pub port: u16,
    log: PathBuf,
}

impl LegacyTlsServer {
    pub async fn start(env: &super::TestEnv, server: &CertFiles) -> LegacyTlsServer {
        let port = super::broker::free_port();
        let log = env.path().join("s_server.log");
        let out = super::process::append_log(&log);
        let child = Command::new(OPENSSL)
            .args([
                "s_server",
                "-quiet",
                "-tls1_1",
                "-cipher",
                "DEFAULT:@SECLEVEL=0",
            ])
            .arg("-accept")
            .arg(format!("127.0.0.1:{port}"))
            .arg("-cert")
            .arg(&server.cert)
            .arg("-key")
            .arg(&server.key)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone log handle"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("the TLS version test needs {OPENSSL}: {e}"));
        let mut server = LegacyTlsServer { child, port, log };
        super::eventually(
            "openssl s_server to listen",
            Duration::from_secs(10),
            || {
                if let Ok(Some(status)) = server.child.try_wait() {
                    panic!("openssl s_server exited with {status}: {}", server.log());
                }
                std::net::TcpStream::connect(("127.0.0.1", port)).ok()
            },
        )
        .await;
        server
    }

    pub fn log(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.log).unwrap_or_default()).into_owned()
    }
}

impl Drop for LegacyTlsServer {
    fn drop(&mut self) {
        super::process::kill_and_reap(&mut self.child);
    }
}

/// What the WebSocket front saw of one upgrade request.
#[derive(Debug, Clone)]
pub struct Upgrade {
    pub path: String,
    pub protocol: Option<String>,
}

/// A TLS WebSocket front on a free loopback port that forwards each
/// connection's binary stream to a plain MQTT port, as a cloud load
/// balancer on 443 does (Debian's Mosquitto has no WebSocket listener).
/// Only `/mqtt` upgrades with the `mqtt` subprotocol are accepted.
pub struct WssFront {
    pub port: u16,
    pub upgrades: Arc<Mutex<Vec<Upgrade>>>,
    task: JoinHandle<()>,
}

impl WssFront {
    pub async fn start(server: &CertFiles, upstream_port: u16) -> WssFront {
        use async_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};

        let chain = CertificateDer::pem_file_iter(&server.cert)
            .expect("read the server certificate")
            .collect::<Result<Vec<_>, _>>()
            .expect("parse the server certificate");
        let key = PrivateKeyDer::from_pem_file(&server.key).expect("read the server key");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server certificate and key");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the wss front");
        let port = listener.local_addr().expect("local addr").port();
        let upgrades = Arc::new(Mutex::new(Vec::new()));
        let seen = upgrades.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let seen = seen.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    // The `Result<Response, ErrorResponse>` shape is
                    // tungstenite's callback signature, not ours to shrink.
                    #[allow(clippy::result_large_err)]
                    let callback = |req: &Request, mut resp: Response| {
                        let protocol = req
                            .headers()
                            .get("Sec-WebSocket-Protocol")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned);
                        let path = req.uri().path().to_owned();
                        let ok = path == "/mqtt"
                            && protocol
                                .as_deref()
                                .is_some_and(|p| p.split(',').any(|p| p.trim() == "mqtt"));
                        seen.lock()
                            .expect("upgrades lock")
                            .push(Upgrade { path, protocol });
                        if !ok {
                            let mut refusal =
                                ErrorResponse::new(Some("not an MQTT endpoint".into()));
                            *refusal.status_mut() =
                                async_tungstenite::tungstenite::http::StatusCode::NOT_FOUND;
                            return Err(refusal);
                        }
                        resp.headers_mut().insert(
                            "Sec-WebSocket-Protocol",
                            "mqtt".parse().expect("header value"),
                        );
                        Ok(resp)
                    };
                    let Ok(ws) = async_tungstenite::tokio::accept_hdr_async(tls, callback).await
                    else {
                        return;
                    };
                    let mut client = ws_stream_tungstenite::WsStream::new(ws);
                    let Ok(mut broker) =
                        tokio::net::TcpStream::connect(("127.0.0.1", upstream_port)).await
                    else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut broker).await;
                });
            }
        });
        WssFront {
            port,
            upgrades,
            task,
        }
    }
}

impl Drop for WssFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}
