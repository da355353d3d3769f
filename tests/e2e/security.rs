//! Security end to end (issue 8, docs/SECURITY.md): TLS against a real
//! Mosquitto TLS listener with certificates made per test (right CA, unknown
//! CA, expired certificate, wrong host name, mutual TLS), MQTT over wss
//! through a TLS WebSocket front, password and ACL (an intruder with a
//! valid login cannot inject tasks), a wrong password refused clearly and
//! retried with backoff, the Alibaba Cloud login modes checked by the broker
//! against passwords computed independently, signed tasks, `check-config`
//! redaction, and no secret in any log.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::{
    eventually, sign_with_script, sim_tag, task, task_ids, write_private, AckStatus, Agent,
    AgentConfig, Backend, Broker, BrokerOptions, BrokerSecurity, LegacyTlsServer, Pki, ServerCert,
    Stack, TestEnv, TlsListener, WssFront, AGENT_CLIENT_ID, BACKEND_ID, BACKEND_PASSWORD,
    BACKEND_USER, INTRUDER_PASSWORD, INTRUDER_USER, QUIET,
};

/// The agent's login on the secured brokers (plain mode).
const AGENT_USER: &str = "ap-dev1";
const AGENT_PASSWORD: &str = "agent-pw-Zq93xLk2";
/// Long enough for a TLS handshake failure and its log line on a busy CI.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(15);

fn toml_str(s: &str) -> String {
    Value::from(s).to_string()
}

fn toml_path(p: &Path) -> String {
    toml_str(&p.display().to_string())
}

/// `[mqtt]` lines for a TLS link to `localhost:port` trusting `ca`.
fn tls_lines(port: u16, ca: &Path) -> Vec<String> {
    vec![
        format!("tls = true\nca_file = {}", toml_path(ca)),
        format!("port = {port}"),
    ]
}

/// `[mqtt]` lines for the plain login with the password in a 0600 file.
fn password_lines(env: &TestEnv, password: &str) -> Vec<String> {
    let file = env.path().join("mqtt-password");
    write_private(&file, &format!("{password}\n"));
    vec![
        format!("username = {}", toml_str(AGENT_USER)),
        format!("secret_file = {}", toml_path(&file)),
    ]
}

/// A secured broker with a TLS listener serving a certificate of `kind`
/// (client certificates required or not), and a logged-in back end.
async fn tls_broker(
    env: &TestEnv,
    pki: &mut Pki,
    kind: ServerCert,
    require_client_cert: bool,
) -> (Broker, Backend) {
    let mut security = BrokerSecurity::with_agent(AGENT_USER, AGENT_PASSWORD);
    security.tls = Some(TlsListener {
        server: pki.server(kind),
        ca_file: pki.ca_file(),
        require_client_cert,
    });
    secured(env, &security).await
}

/// A secured broker and a back end logged in on its plain listener.
async fn secured(env: &TestEnv, security: &BrokerSecurity) -> (Broker, Backend) {
    let broker = Broker::start_secure(env, BrokerOptions::default(), security).await;
    let backend = Backend::connect_as(
        &broker,
        BACKEND_ID,
        true,
        Some((BACKEND_USER, BACKEND_PASSWORD)),
    )
    .await;
    (broker, backend)
}

/// The agent config for `broker`, pointed at `localhost:port`, with
/// `mqtt_extra` lines.
fn agent_config(env: &TestEnv, broker: &Broker, mqtt_extra: Vec<String>) -> AgentConfig {
    let mut config = AgentConfig::new(env, broker);
    config.host = "localhost".to_owned();
    // `port` from the extra lines wins: TOML would refuse a duplicate key.
    if let Some(port) = mqtt_extra
        .iter()
        .find_map(|l| l.strip_prefix("port = ").and_then(|p| p.parse().ok()))
    {
        config.port = port;
    }
    config.mqtt_extra = mqtt_extra
        .into_iter()
        .filter(|l| !l.starts_with("port = "))
        .collect();
    config
}

/// Whether the broker ever let the agent in (a CONNACK was sent for it).
fn agent_ever_connected(broker: &Broker) -> bool {
    broker
        .log_since(0)
        .contains(&format!(" as {AGENT_CLIENT_ID} ("))
}

/// Publishes one task per tag in `tags` and requires each to be applied.
async fn tasks_are_applied(backend: &mut Backend, prefix: &str, tags: usize) {
    let tasks: Vec<Value> = (0..tags)
        .map(|i| task(&format!("{prefix}-{i}"), &sim_tag(i), 1))
        .collect();
    backend.publish_tasks(&tasks).await;
    let acks = backend
        .collect_final_acks(&task_ids(&tasks), Duration::from_secs(20))
        .await;
    acks.assert_all(&task_ids(&tasks), AckStatus::Applied);
}

/// Panics if any of `secrets` is in the agent's log.
fn assert_not_logged(env: &TestEnv, secrets: &[&str]) {
    let log = env.agent_log_text();
    assert!(
        !log.is_empty(),
        "the agent log is empty: nothing was checked"
    );
    for s in secrets {
        assert!(
            !log.contains(s),
            "a secret ({} characters) appears in the agent log",
            s.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_password_and_acl_carries_tasks_and_keeps_intruders_out() {
    let env = TestEnv::new("tls-ok");
    let mut pki = Pki::new(env.path());
    let (broker, mut backend) = tls_broker(&env, &mut pki, ServerCert::Good, false).await;
    let mut lines = tls_lines(broker.tls_port(), &pki.ca_file());
    lines.extend(password_lines(&env, AGENT_PASSWORD));
    let config = agent_config(&env, &broker, lines);
    let mut agent = Agent::start_ready(&env, &broker, &config).await;

    // The broker saw the agent on its TLS listener, logged in as its user.
    let log = broker.log_since(0);
    assert!(
        log.contains(&format!(" on port {}.", broker.tls_port())),
        "no connection on the TLS port"
    );
    assert!(
        log.contains(&format!("as {AGENT_CLIENT_ID} ("))
            && log.contains(&format!("u'{AGENT_USER}'")),
        "the agent did not log in as {AGENT_USER}"
    );
    tasks_are_applied(&mut backend, "t-tls", 3).await;

    // A client with a valid login but without the right to publish tasks:
    // the broker drops its task, so the agent never answers it.
    let intruder = Backend::connect_as(
        &broker,
        "GID_intruder@@@x",
        true,
        Some((INTRUDER_USER, INTRUDER_PASSWORD)),
    )
    .await;
    intruder
        .publish_task(&task("t-intruder", &sim_tag(0), 99))
        .await;
    eventually(
        "the broker to deny the intruder's task",
        Duration::from_secs(10),
        || {
            broker
                .log_since(0)
                .contains("Denied PUBLISH from GID_intruder@@@x")
                .then_some(())
        },
    )
    .await;
    let acks = backend.acks_within(QUIET).await;
    assert!(
        acks.iter().all(|a| a.task_id() != Some("t-intruder")),
        "the intruder's task reached the agent: {acks:?}"
    );

    // Local surface: the store and the tag journal are private.
    agent.assert_running();
    assert_private_tree(&config.store, true);
    assert_private_tree(&config.journal, false);
    assert_not_logged(&env, &[AGENT_PASSWORD]);
}

/// `path` (a dir whose mode must be 0700, or a file) and everything below
/// it: no access for group or others.
fn assert_private_tree(path: &Path, is_dir: bool) {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777;
    if is_dir {
        assert_eq!(mode, 0o700, "{} has mode {mode:o}", path.display());
        for entry in std::fs::read_dir(path).expect("read the store dir") {
            let entry = entry.expect("dir entry");
            let file_type = entry.file_type().expect("file type");
            assert_private_tree(&entry.path(), file_type.is_dir());
        }
    } else {
        assert_eq!(mode & 0o077, 0, "{} has mode {mode:o}", path.display());
    }
}

/// The agent must refuse the broker's certificate `kind`: it logs `phrase`,
/// keeps running, and never gets an MQTT session.
async fn assert_tls_refused(name: &str, kind: ServerCert, phrase: &str) {
    let env = TestEnv::new(name);
    let mut pki = Pki::new(env.path());
    let (broker, _backend) = tls_broker(&env, &mut pki, kind, false).await;
    let mut lines = tls_lines(broker.tls_port(), &pki.ca_file());
    lines.extend(password_lines(&env, AGENT_PASSWORD));
    let config = agent_config(&env, &broker, lines);
    let mut agent = Agent::start(&env, &config);
    eventually(
        &format!("the agent to log {phrase:?}"),
        REFUSAL_TIMEOUT,
        || env.agent_log_text().contains(phrase).then_some(()),
    )
    .await;
    agent.assert_running();
    assert!(
        !agent_ever_connected(&broker),
        "the broker accepted the agent although its certificate should have been refused"
    );
    // The password never went out: TLS failed before CONNECT.
    assert_not_logged(&env, &[AGENT_PASSWORD]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_refuses_a_certificate_from_an_unknown_ca() {
    assert_tls_refused(
        "tls-unknown-ca",
        ServerCert::UnknownCa,
        "not signed by a CA in mqtt.ca_file",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_refuses_an_expired_certificate() {
    assert_tls_refused(
        "tls-expired",
        ServerCert::Expired,
        "certificate has expired",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_refuses_a_certificate_for_another_host_name() {
    assert_tls_refused(
        "tls-wrong-name",
        ServerCert::WrongName,
        "not valid for host \"localhost\"",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_refuses_a_server_that_offers_only_tls_1_1() {
    let env = TestEnv::new("tls-1-1");
    let mut pki = Pki::new(env.path());
    let server = LegacyTlsServer::start(&env, &pki.server(ServerCert::Good)).await;
    // A broker only to fill in the config; the agent is pointed elsewhere.
    let broker = Broker::start(&env, BrokerOptions::default()).await;
    let config = agent_config(&env, &broker, tls_lines(server.port, &pki.ca_file()));
    let mut agent = Agent::start(&env, &config);
    eventually("the agent to refuse TLS 1.1", REFUSAL_TIMEOUT, || {
        env.agent_log_text()
            .contains("no TLS version in common; the agent speaks TLS 1.2 and 1.3 only")
            .then_some(())
    })
    .await;
    agent.assert_running();
    // OpenSSL's side: the agent offered no version it would speak.
    let log = server.log();
    assert!(log.contains("unsupported protocol"), "s_server log:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_requires_the_client_certificate() {
    let env = TestEnv::new("mtls");
    let mut pki = Pki::new(env.path());
    // The certificate's common name becomes the user name the ACL knows.
    let client = pki.client(AGENT_USER);
    let (broker, mut backend) = tls_broker(&env, &mut pki, ServerCert::Good, true).await;

    // Without a client certificate the broker ends the handshake.
    let config = agent_config(&env, &broker, tls_lines(broker.tls_port(), &pki.ca_file()));
    let mut agent = Agent::start(&env, &config);
    eventually("the agent to report the refused handshake", REFUSAL_TIMEOUT, || {
        env.agent_log_text()
            .contains("the broker ended the TLS handshake (CertificateRequired): it wants a client certificate")
            .then_some(())
    })
    .await;
    assert!(!agent_ever_connected(&broker));
    agent.terminate().await;

    // With it (and no password at all), the agent is in.
    let mut lines = tls_lines(broker.tls_port(), &pki.ca_file());
    lines.push(format!(
        "client_cert_file = {}\nclient_key_file = {}",
        toml_path(&client.cert),
        toml_path(&client.key)
    ));
    let config = agent_config(&env, &broker, lines);
    let since = broker.log_len();
    let mut agent = Agent::start(&env, &config);
    agent
        .wait_subscribed(&broker, since, Duration::from_secs(15))
        .await;
    assert!(broker
        .log_since(since)
        .contains(&format!("u'{AGENT_USER}'")));
    tasks_are_applied(&mut backend, "t-mtls", 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_over_wss_through_a_tls_websocket_front() {
    let env = TestEnv::new("wss");
    let mut pki = Pki::new(env.path());
    let server = pki.server(ServerCert::Good);
    let (broker, mut backend) = secured(
        &env,
        &BrokerSecurity::with_agent(AGENT_USER, AGENT_PASSWORD),
    )
    .await;
    let front = WssFront::start(&server, broker.port()).await;
    let mut lines = tls_lines(front.port, &pki.ca_file());
    lines.push("websocket = true\nws_path = \"/mqtt\"".to_owned());
    lines.extend(password_lines(&env, AGENT_PASSWORD));
    let config = agent_config(&env, &broker, lines);
    let _agent = Agent::start_ready(&env, &broker, &config).await;
    tasks_are_applied(&mut backend, "t-wss", 2).await;
    let upgrades = front.upgrades.lock().expect("upgrades").clone();
    assert!(!upgrades.is_empty());
    for u in &upgrades {
        assert_eq!(u.path, "/mqtt");
        assert_eq!(u.protocol.as_deref(), Some("mqtt"));
    }
}

/// Lines of the agent log that report a failed connection attempt, with
/// the announced wait before the next one.
fn announced_retries(env: &TestEnv) -> Vec<u64> {
    env.agent_log_text()
        .lines()
        .filter(|l| l.contains("cannot connect to broker"))
        .filter_map(|l| {
            let at = l.find("retry_in_ms=")? + "retry_in_ms=".len();
            l[at..]
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_refused_clearly_and_retried_with_backoff() {
    /// How long connection attempts are counted.
    const WINDOW: Duration = Duration::from_secs(6);
    const WRONG: &str = "not-the-password-7Hq2";
    let env = TestEnv::new("bad-password");
    let (broker, _backend) = secured(
        &env,
        &BrokerSecurity::with_agent(AGENT_USER, AGENT_PASSWORD),
    )
    .await;
    let mut config = agent_config(&env, &broker, password_lines(&env, WRONG));
    config.host = "127.0.0.1".to_owned();
    config.reconnect_min_ms = 200;
    config.reconnect_max_ms = 1600;
    let mut agent = Agent::start(&env, &config);

    // Mosquitto refuses with CONNACK code 5; the back end logged in fine, so
    // every refusal is one of the agent's attempts.
    let refusals = || {
        broker
            .log_since(0)
            .matches("Sending CONNACK to 127.0.0.1 (0, 5)")
            .count()
    };
    eventually("the broker to refuse the agent", REFUSAL_TIMEOUT, || {
        (refusals() >= 1).then_some(())
    })
    .await;
    let before = refusals();
    // Counting over a fixed window is the point of this test: an agent
    // without backoff would make hundreds of attempts in it.
    tokio::time::sleep(WINDOW).await;
    let attempts = refusals() - before;
    // Waits after failure k are 50-100 % of min(200 ms * 2^(k-1), 1600 ms):
    // between 5 and 9 attempts fit in 6 s.
    assert!(
        (3..=10).contains(&attempts),
        "{attempts} connection attempts in {WINDOW:?}; expected 3-10 with backoff"
    );
    let waits = announced_retries(&env);
    assert!(
        waits.starts_with(&[200, 400, 800, 1600, 1600]),
        "the announced waits should double up to the maximum: {waits:?}"
    );
    let log = env.agent_log_text();
    assert!(
        log.contains("refused the login") && log.contains("mqtt.secret_file"),
        "the agent log should say the login was refused and what to check"
    );
    agent.assert_running();

    // The operator fixes the password file: the next attempt reads it.
    let since = broker.log_len();
    write_private(&env.path().join("mqtt-password"), AGENT_PASSWORD);
    agent
        .wait_subscribed(&broker, since, Duration::from_secs(15))
        .await;
    assert_not_logged(&env, &[WRONG, AGENT_PASSWORD]);
}

/// Base64(HMAC-SHA1(secret, client id)) computed by Python, independently
/// of the agent's code.
fn python_signature_password(secret: &str, client_id: &str) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg(
            "import base64,hashlib,hmac,sys;\
             print(base64.b64encode(hmac.new(sys.argv[1].encode(),sys.argv[2].encode(),hashlib.sha1).digest()).decode())",
        )
        .arg(secret)
        .arg(client_id)
        .output()
        .expect("the Alibaba login test needs python3");
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .expect("ASCII")
        .trim()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alibaba_cloud_login_modes_are_accepted_by_the_broker() {
    const ACCESS_KEY_SECRET: &str = "aks-e2e-9dH3kQ0pLm2Vb7";
    const DEVICE_SECRET: &str = "dks-e2e-Xc81Mn4rT6yU0w";
    const TOKEN: &str = "tok-e2e-5fGh2Jk8Lq1Zs4";
    const TOKEN_ENV: &str = "ESL_E2E_MQTT_TOKEN";
    let sig_user = "Signature|LTAI5tE2e|post-cn-e2e";
    let token_user = "Token|LTAI5tE2e|post-cn-e2e";
    let device_user = "DeviceCredential|DAKe2e|post-cn-e2e";
    let sig_password = python_signature_password(ACCESS_KEY_SECRET, AGENT_CLIENT_ID);
    let device_password = python_signature_password(DEVICE_SECRET, AGENT_CLIENT_ID);
    let token_password = format!("R|{TOKEN}|W|{TOKEN}");

    let env = TestEnv::new("alibaba-login");
    let mut security = BrokerSecurity::with_agent(sig_user, &sig_password);
    for (user, password) in [
        (token_user, &token_password),
        (device_user, &device_password),
    ] {
        security.users.push((user.to_owned(), password.clone()));
        security.acl.push_str(&crate::harness::agent_acl(user));
    }
    let (broker, mut backend) = secured(&env, &security).await;
    let secret_file = |name: &str, value: &str| {
        let path = env.path().join(name);
        write_private(&path, value);
        format!("secret_file = {}", toml_path(&path))
    };
    let ids = "access_key_id = \"LTAI5tE2e\"\ninstance_id = \"post-cn-e2e\"";
    let runs = [
        (
            sig_user,
            vec![
                "auth = \"signature\"".to_owned(),
                ids.to_owned(),
                secret_file("aks", ACCESS_KEY_SECRET),
            ],
        ),
        (
            token_user,
            vec![
                "auth = \"token\"".to_owned(),
                ids.to_owned(),
                format!("secret_env = {}", toml_str(TOKEN_ENV)),
            ],
        ),
        (
            device_user,
            vec![
                "auth = \"device_credential\"".to_owned(),
                "access_key_id = \"DAKe2e\"\ninstance_id = \"post-cn-e2e\"".to_owned(),
                secret_file("dks", DEVICE_SECRET),
            ],
        ),
    ];
    for (n, (user, lines)) in runs.into_iter().enumerate() {
        let mut config = agent_config(&env, &broker, lines);
        config.host = "127.0.0.1".to_owned();
        config.env = vec![(TOKEN_ENV.to_owned(), TOKEN.to_owned())];
        config.log_filter = "trace".to_owned();
        let since = broker.log_len();
        let mut agent = Agent::start(&env, &config);
        agent
            .wait_subscribed(&broker, since, Duration::from_secs(15))
            .await;
        assert!(
            broker.log_since(since).contains(&format!("u'{user}'")),
            "run {n}: the agent did not log in as {user}"
        );
        tasks_are_applied(&mut backend, &format!("t-ali-{n}"), 1).await;

        // check-config shows the mode and where the secret is, not the secret.
        let out = Command::new(env!("CARGO_BIN_EXE_esl-agent"))
            .args(["check-config", "--config"])
            .arg(env.path().join("agent.toml"))
            .env(TOKEN_ENV, TOKEN)
            .output()
            .expect("run check-config");
        let shown = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "check-config failed: {shown}");
        for secret in [
            ACCESS_KEY_SECRET,
            DEVICE_SECRET,
            TOKEN,
            &sig_password,
            &device_password,
        ] {
            assert!(
                !shown.contains(secret),
                "check-config shows a secret:\n{shown}"
            );
        }
        agent.terminate().await;
    }
    assert_not_logged(
        &env,
        &[
            ACCESS_KEY_SECRET,
            DEVICE_SECRET,
            TOKEN,
            &sig_password,
            &device_password,
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_redacts_and_refuses_open_secret_files() {
    let env = TestEnv::new("check-config");
    let config_path = env.path().join("agent.toml");
    let run = || {
        let out = Command::new(env!("CARGO_BIN_EXE_esl-agent"))
            .args(["check-config", "--config"])
            .arg(&config_path)
            .output()
            .expect("run check-config");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let base = "[mqtt]\ngroup_id = \"GID_test\"\ndevice_id = \"dev1\"\nusername = \"u\"\n";
    write_private(
        &config_path,
        &format!("{base}password = \"inline-Secret-42\"\n"),
    );
    let (code, shown) = run();
    assert_eq!(code, Some(0), "{shown}");
    assert!(
        shown.contains("<redacted>") && !shown.contains("inline-Secret-42"),
        "{shown}"
    );
    assert!(
        shown.contains("warning: mqtt.password is inline"),
        "{shown}"
    );

    let secret = env.path().join("open-secret");
    std::fs::write(&secret, "file-Secret-43").expect("write");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    write_private(
        &config_path,
        &format!("{base}secret_file = {}\n", toml_path(&secret)),
    );
    let (code, shown) = run();
    assert_eq!(code, Some(2), "{shown}");
    assert!(
        shown.contains("mqtt.secret_file") && shown.contains("0644"),
        "{shown}"
    );
    assert!(!shown.contains("file-Secret-43"), "{shown}");
}

/// Keys of the signed-task test: `k1` in a file, `k2` in the environment.
const TASK_KEY_1: &str = "task-key-1-b3f9c2d87a6e4f10a5c3d2e1f0a9b8c7";
const TASK_KEY_2: &str = "task-key-2-0f1e2d3c4b5a69788796a5b4c3d2e1f0";
const TASK_KEY_2_ENV: &str = "ESL_E2E_TASK_KEY_2";

/// The next final ack that is a `bad signature` rejection.
async fn expect_bad_signature(stack: &mut Stack, claimed: &str) {
    let ack = stack
        .backend
        .expect_final_ack(
            &format!("the forgery of {claimed}"),
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(ack.status(), AckStatus::Rejected, "{}", ack.json);
    assert_eq!(ack.detail(), Some("bad signature"), "{}", ack.json);
    assert_eq!(
        ack.task_id(),
        None,
        "a forgery must not name a task: {}",
        ack.json
    );
    assert_eq!(ack.json["unverified_task_id"], claimed, "{}", ack.json);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_tasks_are_applied_and_forgeries_rejected() {
    let mut key_files: Vec<PathBuf> = Vec::new();
    let mut stack = Stack::start("signed-tasks", |c| {
        let dir = c
            .store
            .parent()
            .expect("the store is in the test dir")
            .to_owned();
        let k1 = dir.join("k1.key");
        write_private(&k1, TASK_KEY_1);
        let wrong = dir.join("wrong.key");
        write_private(&wrong, "attacker-key-000000000000000000000000000000");
        c.extra = format!(
            "\n[security]\nrequire_signed_tasks = true\n\
             [[security.signing_keys]]\nid = \"k1\"\nsecret_file = {}\n\
             [[security.signing_keys]]\nid = \"k2\"\nsecret_env = {}\n",
            toml_path(&k1),
            toml_str(TASK_KEY_2_ENV)
        );
        c.env = vec![(TASK_KEY_2_ENV.to_owned(), TASK_KEY_2.to_owned())];
        c.log_filter = "trace".to_owned();
        let k2 = dir.join("k2.key");
        write_private(&k2, TASK_KEY_2);
        key_files = vec![k1, k2, wrong];
    })
    .await;
    let (k1, k2, wrong) = (&key_files[0], &key_files[1], &key_files[2]);

    // Both keys of a rotation are accepted; signing is done by the example
    // script, not by the agent's code.
    let signed_1 = sign_with_script(&task("t-sig-1", &sim_tag(0), 1), k1, "k1");
    let signed_2 = sign_with_script(&task("t-sig-2", &sim_tag(1), 1), k2, "k2");
    stack
        .backend
        .publish_tasks(&[signed_1.clone(), signed_2.clone()])
        .await;
    let ids = vec!["t-sig-1".to_owned(), "t-sig-2".to_owned()];
    let acks = stack
        .backend
        .collect_final_acks(&ids, Duration::from_secs(20))
        .await;
    acks.assert_all(&ids, AckStatus::Applied);

    // A forgery (wrong key), an unsigned task, and the signed task replayed
    // with a new price: all rejected, none displayed.
    stack
        .backend
        .publish_task(&sign_with_script(
            &task("t-forged", &sim_tag(2), 1),
            wrong,
            "k1",
        ))
        .await;
    expect_bad_signature(&mut stack, "t-forged").await;
    stack
        .backend
        .publish_task(&task("t-unsigned", &sim_tag(3), 1))
        .await;
    expect_bad_signature(&mut stack, "t-unsigned").await;
    let mut tampered = signed_1.clone();
    tampered["content"]["price"] = json!("0.01");
    tampered["seq"] = json!(2);
    stack.backend.publish_task(&tampered).await;
    expect_bad_signature(&mut stack, "t-sig-1").await;

    // The untouched replay is a duplicate: the same final ack again.
    stack.backend.publish_task(&signed_1).await;
    let again = stack
        .backend
        .expect_final_ack("the verbatim replay", Duration::from_secs(10))
        .await;
    assert_eq!(again.task_id(), Some("t-sig-1"));
    assert!(again.duplicate(), "{}", again.json);
    assert_eq!(again.status(), AckStatus::Applied);
    stack
        .backend
        .expect_no_final_ack(QUIET, "nothing else was sent")
        .await;

    let journal = stack.env.journal();
    assert!(journal.contains("t-sig-1") && journal.contains("t-sig-2"));
    for id in ["t-forged", "t-unsigned"] {
        assert!(!journal.contains(id), "{id} was displayed");
    }
    assert_eq!(
        journal.count("t-sig-1"),
        1,
        "the tampered replay was displayed"
    );
    assert_not_logged(&stack.env, &[TASK_KEY_1, TASK_KEY_2]);
}
