//! The documentation, run as printed (issue 19): the quick start script
//! README quotes, the openssl recipe of SECURITY.md, every complete TOML
//! config in README.md and docs/*.md through `check-config`, the links
//! between the docs, and the CLI behaviours the docs promise
//! (`check-config` and a closed pipe, the man pages).
//!
//! A doc's TOML block is either complete (it must pass `check-config` with
//! the files it names created by the test) or starts with a
//! `# Fragment: …` comment that tells the reader where it goes.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::harness::{
    eventually, write_private, Agent, AgentConfig, Broker, BrokerOptions, BrokerSecurity,
    CertFiles, TestEnv, TlsListener,
};

/// The repository's root (this file is `tests/e2e/docs.rs`).
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("agent/ has a parent")
        .to_owned()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// README.md and every docs/*.md, by path relative to the repository.
fn doc_files() -> Vec<(String, String)> {
    let root = repo();
    let mut names = vec!["README.md".to_owned()];
    let mut docs: Vec<String> = std::fs::read_dir(root.join("docs"))
        .expect("docs/")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|n| n.ends_with(".md"))
        .map(|n| format!("docs/{n}"))
        .collect();
    docs.sort();
    names.extend(docs);
    names
        .into_iter()
        .map(|n| {
            let text = read(&root.join(&n));
            (n, text)
        })
        .collect()
}

/// The fenced blocks of `lang` in a Markdown text, with their first line.
fn blocks(text: &str, lang: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (i, line) in text.lines().enumerate() {
        let fence = line.trim_start();
        match &mut current {
            None if fence.strip_prefix("```") == Some(lang) => {
                current = Some((i + 2, String::new()))
            }
            Some(_) if fence.starts_with("```") => out.extend(current.take()),
            Some((_, body)) => {
                body.push_str(line);
                body.push('\n');
            }
            None => {}
        }
    }
    out
}

fn is_fragment(block: &str) -> bool {
    block
        .lines()
        .find(|l| !l.trim().is_empty())
        .is_some_and(|l| {
            l.trim_start()
                .to_ascii_lowercase()
                .starts_with("# fragment")
        })
}

/// What a file named by a config key holds in the test.
struct Files {
    dir: PathBuf,
    ca: String,
    client_cert: String,
    client_key: String,
}

impl Files {
    fn new(dir: &Path) -> Files {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca = CertificateParams::new(Vec::new()).expect("CA params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca.self_signed(&ca_key).expect("CA");
        let key = KeyPair::generate().expect("client key");
        let cert = CertificateParams::new(vec!["ap-docs".into()])
            .expect("client params")
            .signed_by(&key, &ca, &ca_key)
            .expect("client cert");
        std::fs::create_dir_all(dir).expect("files dir");
        Files {
            dir: dir.to_owned(),
            ca: ca.pem(),
            client_cert: cert.pem(),
            client_key: key.serialize_pem(),
        }
    }

    /// The test's stand-in for a file the config names under `key`,
    /// created with fitting content; returns its path.
    fn create(&self, key: &str, original: &str) -> String {
        let name: String = original
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let path = self.dir.join(format!("{key}-{name}"));
        match key {
            "ca_file" => std::fs::write(&path, &self.ca).expect("write CA"),
            "client_cert_file" => std::fs::write(&path, &self.client_cert).expect("write cert"),
            "client_key_file" => write_private(&path, &self.client_key),
            // A signing key wants 32 characters; a password or token any.
            _ => write_private(&path, "docs-test-secret-0123456789abcdefghijkl\n"),
        }
        path.display().to_string()
    }
}

/// Points every `*_file` key at a file the test made, and collects the
/// `*_env` variables the config names.
fn localise(value: &mut toml::Value, files: &Files, env: &mut BTreeMap<String, String>) {
    match value {
        toml::Value::Table(table) => {
            for (key, v) in table.iter_mut() {
                match v {
                    toml::Value::String(s) if key.ends_with("_file") => {
                        *s = files.create(key, s);
                    }
                    toml::Value::String(s) if key.ends_with("_env") => {
                        env.insert(s.clone(), "docs-test-secret-0123456789abcdefghijkl".into());
                    }
                    _ => localise(v, files, env),
                }
            }
        }
        toml::Value::Array(items) => {
            for item in items {
                localise(item, files, env);
            }
        }
        _ => {}
    }
}

fn agent_bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_esl-agent"))
}

fn check_config(config: &Path, env: &BTreeMap<String, String>, ssl_cert_file: &Path) -> Output {
    agent_bin()
        .arg("check-config")
        .arg("--config")
        .arg(config)
        .envs(env)
        .env("SSL_CERT_FILE", ssl_cert_file)
        .output()
        .expect("run esl-agent check-config")
}

/// Issue 19 item 4, issue 14 item 10: every complete config block in the
/// docs passes `check-config` as printed (only the files it names are the
/// test's), and every other block says it is a fragment.
#[test]
fn doc_config_blocks_pass_check_config() {
    let dir = tempfile::tempdir().expect("temp dir");
    let files = Files::new(&dir.path().join("files"));
    // The system CA bundle the README's TLS config falls back on.
    let bundle = dir.path().join("system-ca.pem");
    std::fs::write(&bundle, &files.ca).expect("write bundle");
    let mut complete = 0;
    let mut fragments = 0;
    let mut failures = Vec::new();
    for (name, text) in doc_files() {
        for (line, block) in blocks(&text, "toml") {
            if is_fragment(&block) {
                fragments += 1;
                continue;
            }
            complete += 1;
            let where_ = format!("{name}:{line}");
            let mut value: toml::Value = match toml::from_str(&block) {
                Ok(v) => v,
                Err(e) => {
                    failures.push(format!("{where_}: not TOML ({e}); mark it `# Fragment: …`"));
                    continue;
                }
            };
            let mut env = BTreeMap::new();
            localise(&mut value, &files, &mut env);
            let config = dir.path().join(format!("config-{complete}.toml"));
            std::fs::write(&config, toml::to_string(&value).expect("serialise")).expect("write");
            let out = check_config(&config, &env, &bundle);
            let stdout = String::from_utf8_lossy(&out.stdout);
            if !out.status.success()
                || !stdout.starts_with(&format!("# {} is valid", config.display()))
            {
                failures.push(format!(
                    "{where_}: check-config {}: {}{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim(),
                    stdout.lines().next().unwrap_or("")
                ));
            }
            if name == "README.md" && complete == 1 {
                assert!(
                    stdout.contains(&format!("{} (system CA bundle", bundle.display())),
                    "README's minimal config (TLS, no ca_file) uses the system CA bundle: {stdout}"
                );
            }
        }
    }
    assert!(
        failures.is_empty(),
        "doc config blocks that fail:\n{}",
        failures.join("\n")
    );
    // README's minimal config, CONFIG.md's, SECURITY.md's, ZIGBEE.md's,
    // BLE.md's examples at least; a parser that finds nothing must fail.
    assert!(complete >= 5, "only {complete} complete TOML blocks found");
    assert!(
        fragments >= 1,
        "no fragment found: is the marker still `# Fragment:`?"
    );
}

/// Issue 19 item 1: relative links between the docs point at files that
/// exist in the repository (README once linked `../shared/PROTOCOL.md`).
#[test]
fn doc_links_point_into_the_repository() {
    let root = repo();
    let mut broken = Vec::new();
    for (name, text) in doc_files() {
        let base = root.join(&name).parent().expect("a parent").to_owned();
        for target in text
            .split("](")
            .skip(1)
            .filter_map(|rest| rest.split(')').next())
        {
            let path = target.split('#').next().unwrap_or("");
            if path.is_empty() || path.contains("://") || path.starts_with("mailto:") {
                continue;
            }
            let resolved = base.join(path);
            if !resolved.exists() {
                broken.push(format!("{name}: {target}"));
            } else if let Ok(canonical) = resolved.canonicalize() {
                if !canonical.starts_with(root.canonicalize().expect("root")) {
                    broken.push(format!("{name}: {target} (outside the repository)"));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

/// Issue 19 item 5: a referenced file that is missing is a validation
/// error: exit 2, the key named, and no "is valid" on stdout.
#[test]
fn check_config_with_a_missing_file_is_not_valid() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[mqtt]\nhost = \"broker.example\"\nport = 8883\ngroup_id = \"GID_esl\"\n\
             device_id = \"ap-1\"\nca_file = {:?}\n",
            dir.path().join("missing-ca.pem").display().to_string()
        ),
    )
    .expect("write config");
    let out = check_config(&config, &BTreeMap::new(), Path::new("/nonexistent"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(stderr.contains("mqtt.ca_file"), "{stderr}");
    // The OS error is printed once (issue 19 item 3).
    let os = std::io::Error::from_raw_os_error(2).to_string();
    assert_eq!(stderr.matches(&os).count(), 1, "{stderr}");
}

/// Issue 14 item 10: TLS without ca_file and without any system bundle is
/// refused with a message naming the key and the paths looked at.
#[test]
fn check_config_without_any_ca_bundle_says_what_to_install() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        "[mqtt]\nhost = \"localhost\"\ntls = true\ngroup_id = \"GID_esl\"\ndevice_id = \"ap-1\"\n",
    )
    .expect("write config");
    let missing = dir.path().join("no-bundle.pem");
    let out = check_config(&config, &BTreeMap::new(), &missing);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if esl_agent::security::tls::SYSTEM_CA_BUNDLES
        .iter()
        .any(|p| Path::new(p).exists())
    {
        // This machine has a bundle: it is used and named.
        assert!(out.status.success(), "{stderr}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("(system CA bundle"));
    } else {
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("mqtt.ca_file") && stderr.contains(&missing.display().to_string()),
            "{stderr}"
        );
    }
}

/// Issue 19 item 6: `check-config … | head` with the reader gone ends the
/// process quietly (SIGPIPE, as `cat` does), not with a panic.
#[test]
fn check_config_into_a_closed_pipe_ends_quietly() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        "[mqtt]\ngroup_id = \"GID_esl\"\ndevice_id = \"ap-1\"\n",
    )
    .expect("write config");
    let (reader, writer) = nix::unistd::pipe().expect("pipe");
    drop(reader); // the reader is gone before anything is written
    let out = agent_bin()
        .arg("check-config")
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .expect("run esl-agent check-config");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        out.status.signal(),
        Some(nix::sys::signal::Signal::SIGPIPE as i32),
        "{}: {stderr}",
        out.status
    );
}

/// Issue 19 item 9: the man pages (what build-deb.sh ships) cover the
/// command and every visible subcommand, with their options.
#[test]
fn man_pages_cover_every_subcommand() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = agent_bin()
        .arg("man")
        .arg(dir.path())
        .output()
        .expect("run esl-agent man");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // roff escapes the hyphens of names (`esl\-agent`).
    let main = read(&dir.path().join("esl-agent.1")).replace("\\-", "-");
    assert!(main.contains(".TH esl-agent 1"), "{main}");
    for sub in ["run", "check-config", "status", "tags", "tasks"] {
        assert!(
            main.contains(&format!("esl-agent-{sub}(1)")),
            "{sub} not listed"
        );
        let page = read(&dir.path().join(format!("esl-agent-{sub}.1"))).replace("\\-", "-");
        assert!(
            page.contains("config"),
            "esl-agent-{sub}.1 lacks --config: {page}"
        );
    }
    assert!(
        !dir.path().join("esl-agent-man.1").exists(),
        "the hidden man command got a page"
    );
}

/// Runs `script` (a docs/examples file) with `sh` in `cwd`.
fn run_script(script: &str, cwd: &Path, args: &[&str], env: &[(&str, String)]) -> Output {
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_esl-agent"))
        .parent()
        .expect("bin dir");
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("timeout")
        .arg("120")
        .arg("sh")
        .arg(repo().join("docs/examples").join(script))
        .args(args)
        .current_dir(cwd)
        .env("PATH", path)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap_or_else(|e| panic!("run {script}: {e}"));
    assert!(
        out.status.success(),
        "{script} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Issue 19 item 2: README's "Send your first task" is
/// docs/examples/quickstart.sh verbatim, and the script works against a
/// local Mosquitto: the task is acked `applied` and `esl-agent tags` shows
/// the tag's new content. Needs mosquitto_pub and mosquitto_sub
/// (Debian: mosquitto-clients).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_runs_as_documented() {
    let script = read(&repo().join("docs/examples/quickstart.sh"));
    let body = script
        .split_once("set -eu\n")
        .expect("the script has `set -eu`")
        .1;
    assert!(
        read(&repo().join("README.md")).contains(body),
        "README.md must quote docs/examples/quickstart.sh (from after `set -eu`) verbatim"
    );
    for tool in ["mosquitto_pub", "mosquitto_sub"] {
        let found = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "the quick start needs {tool} (Debian: apt-get install mosquitto-clients)"
        );
    }
    let env = TestEnv::new("docs-quickstart");
    let broker = Broker::start(&env, BrokerOptions::default()).await;
    let cwd = env.path().to_owned();
    let port = broker.port().to_string();
    let out = tokio::task::spawn_blocking(move || {
        run_script("quickstart.sh", &cwd, &[], &[("BROKER_PORT", port)])
    })
    .await
    .expect("the script's thread");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let ack = stdout
        .lines()
        .find(|l| l.contains("\"type\":\"ack\""))
        .unwrap_or_else(|| panic!("no ack printed:\n{stdout}"));
    let ack: serde_json::Value = serde_json::from_str(ack).expect("the ack is JSON");
    assert_eq!(ack["task_id"], "t-1", "{ack}");
    assert_eq!(ack["status"], "applied", "{ack}");
    let hash = ack["content_hash"].as_str().expect("a content hash");
    let row = stdout
        .lines()
        .find(|l| l.starts_with("SIM000001 "))
        .unwrap_or_else(|| panic!("no tags table:\n{stdout}"));
    assert!(row.contains(hash), "tags shows the new content: {row}");
}

/// The files the openssl recipe wrote, as the broker's TLS listener.
fn recipe_listener(dir: &Path) -> TlsListener {
    TlsListener {
        server: CertFiles {
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
        },
        ca_file: dir.join("ca.pem"),
        require_client_cert: false,
    }
}

/// Starts the agent over TLS to `broker`, trusting `ca`, with a password.
fn tls_agent(env: &TestEnv, broker: &Broker, ca: &Path) -> AgentConfig {
    let mut config = AgentConfig::new(env, broker);
    config.host = "localhost".to_owned();
    config.port = broker.tls_port();
    let secret = env.path().join("mqtt-password");
    write_private(&secret, &format!("{DOCS_PASSWORD}\n"));
    config.mqtt_extra = vec![
        "tls = true".to_owned(),
        format!("ca_file = {:?}", ca.display().to_string()),
        format!("username = {DOCS_USER:?}"),
        format!("secret_file = {:?}", secret.display().to_string()),
    ];
    config
}

const DOCS_USER: &str = "esl-agent-docs";
const DOCS_PASSWORD: &str = "docs-pw-Lq82mZ";

/// Issue 19 item 7: SECURITY.md's openssl recipe (docs/examples/
/// tls-certs.sh, quoted there) makes a CA and broker certificate that
/// Mosquitto serves and the agent accepts: it connects and subscribes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_recipe_makes_a_certificate_the_agent_accepts() {
    let script = read(&repo().join("docs/examples/tls-certs.sh"));
    let quoted = script.split_once("set -eu\n").expect("set -eu").1;
    assert!(
        read(&repo().join("docs/SECURITY.md")).contains(quoted),
        "docs/SECURITY.md must quote docs/examples/tls-certs.sh (from after `set -eu`) verbatim"
    );
    let env = TestEnv::new("docs-tls-recipe");
    let pki = env.path().join("recipe");
    std::fs::create_dir_all(&pki).expect("recipe dir");
    let cwd = pki.clone();
    tokio::task::spawn_blocking(move || {
        run_script("tls-certs.sh", &cwd, &["localhost", "127.0.0.1"], &[])
    })
    .await
    .expect("the script's thread");
    let mut security = BrokerSecurity::with_agent(DOCS_USER, DOCS_PASSWORD);
    security.tls = Some(recipe_listener(&pki));
    let broker = Broker::start_secure(&env, BrokerOptions::default(), &security).await;
    let config = tls_agent(&env, &broker, &pki.join("ca.pem"));
    let _agent = Agent::start_ready(&env, &broker, &config).await;
}

/// Issue 19 item 7: a v1 certificate (`openssl x509 -req` without
/// extensions) is refused with a sentence, not webpki's enum.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_x509_v1_broker_certificate_is_explained() {
    let env = TestEnv::new("docs-tls-v1");
    let pki = env.path().join("v1");
    std::fs::create_dir_all(&pki).expect("v1 dir");
    let openssl = |args: &str| {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("openssl {args}"))
            .current_dir(&pki)
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {args}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    openssl("req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key -out ca.pem -days 30 -subj /CN=v1-ca");
    openssl("req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout server.key -out server.csr -subj /CN=localhost");
    openssl("x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 30 -out server.pem");
    std::fs::set_permissions(
        pki.join("server.key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .expect("chmod");
    let mut security = BrokerSecurity::with_agent(DOCS_USER, DOCS_PASSWORD);
    security.tls = Some(recipe_listener(&pki));
    let broker = Broker::start_secure(&env, BrokerOptions::default(), &security).await;
    let config = tls_agent(&env, &broker, &pki.join("ca.pem"));
    let mut agent = Agent::start(&env, &config);
    eventually(
        "the agent to explain the v1 certificate",
        Duration::from_secs(15),
        || {
            env.agent_log_text()
                .contains("is an X.509 v1 certificate")
                .then_some(())
        },
    )
    .await;
    agent.assert_running();
    assert!(
        !env.agent_log_text().contains("UnsupportedCertVersion"),
        "the raw webpki error reached the log"
    );
}

/// Issue 19 item 8: COMMANDS.md lists every counter the agent reports.
#[test]
fn commands_md_lists_every_counter() {
    let doc = read(&repo().join("docs/COMMANDS.md"));
    let counters = esl_agent::counters::Counters::default().to_json();
    let names: Vec<&String> = counters.as_object().expect("an object").keys().collect();
    assert!(names.len() > 10, "{names:?}");
    let missing: Vec<&&String> = names
        .iter()
        .filter(|n| !doc.contains(&format!("`{n}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/COMMANDS.md lacks the counters {missing:?}"
    );
}

/// Every key of every config section, as the defaults serialise, is in
/// docs/CONFIG.md under that section's heading (keys whose default is
/// "absent" do not serialise and are not checked).
#[test]
fn config_md_lists_every_key_of_every_section() {
    let doc = read(&repo().join("docs/CONFIG.md"));
    let defaults: toml::Table = toml::from_str(&esl_agent::Config::default().redacted_toml())
        .expect("the defaults serialise to TOML");
    let mut missing = Vec::new();
    let mut checked = 0;
    let mut sections = vec![(String::new(), defaults)];
    while let Some((path, table)) = sections.pop() {
        let text = if path.is_empty() {
            None
        } else {
            // `## [mqtt]`, `### [radio.sim]`: the section runs to the next
            // heading.
            let heading = format!("# `[{path}]`\n");
            let Some(at) = doc.find(&heading) else {
                missing.push(format!("[{path}] (no heading)"));
                continue;
            };
            let rest = &doc[at + heading.len()..];
            let end = [rest.find("\n## "), rest.find("\n### ")]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(rest.len());
            Some(&rest[..end])
        };
        for (key, value) in table {
            let full = if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            };
            match value {
                // A map with entries of the user's choosing (empty by
                // default) is one key.
                toml::Value::Table(t) if !t.is_empty() => sections.push((full, t)),
                _ => {
                    checked += 1;
                    if !text.is_some_and(|t| t.contains(&format!("`{key}`"))) {
                        missing.push(full);
                    }
                }
            }
        }
    }
    assert!(checked > 50, "only {checked} keys found");
    assert!(missing.is_empty(), "docs/CONFIG.md lacks {missing:?}");
}

/// Issue 19 item 3: an agent whose user may not create its store says
/// "permission denied", names the directory and the fix, does not blame a
/// lock, and prints the OS error once. As root (CI) the agent runs as
/// `nobody` (root may write anywhere); otherwise as the current user, on a
/// directory without write permission.
#[test]
fn a_store_directory_the_user_cannot_write_is_named() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("temp dir");
    let mode = |p: &Path, m| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m));
    mode(dir.path(), 0o755).expect("chmod");
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let locked = dir.path().join("lib");
    std::fs::create_dir(&locked).expect("mkdir");
    // Root's directory, or one the current user made read-only.
    mode(&locked, if root { 0o755 } else { 0o555 }).expect("chmod");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[mqtt]\nhost = \"127.0.0.1\"\nport = 1\ngroup_id = \"GID_esl\"\ndevice_id = \"ap-1\"\n\
             [store]\npath = {:?}\n",
            locked.join("esl-agent/store").display().to_string()
        ),
    )
    .expect("write config");
    mode(&config, 0o644).expect("chmod");
    let mut command = if root {
        // The build dir may not be reachable for nobody: a copy is.
        let bin = dir.path().join("esl-agent");
        std::fs::copy(env!("CARGO_BIN_EXE_esl-agent"), &bin).expect("copy the binary");
        mode(&bin, 0o755).expect("chmod");
        let mut c = Command::new("runuser");
        c.args(["-u", "nobody", "--"]).arg(bin);
        c
    } else {
        agent_bin()
    };
    let out = command
        .arg("run")
        .arg("--config")
        .arg(&config)
        .output()
        .expect("run the agent");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("permission denied") && stderr.contains(&locked.display().to_string()),
        "{stderr}"
    );
    assert!(stderr.contains("install -d -o esl-agent"), "{stderr}");
    assert!(!stderr.contains("another agent"), "{stderr}");
    let os = std::io::Error::from_raw_os_error(13).to_string();
    assert_eq!(stderr.matches(&os).count(), 1, "{stderr}");
}

/// Issue 19 item 1: docs/PROTOCOL.md's examples are what the agent reads
/// and writes: the task and command decode, each ack example has exactly
/// the fields of the agent's ack type, and the `applied` ack carries the
/// hash of the task example's content.
#[test]
fn protocol_md_examples_match_the_wire_types() {
    use esl_agent::wire;
    let doc = read(&repo().join("docs/PROTOCOL.md"));
    let mut task_hash = None;
    let (mut tasks, mut acks, mut commands) = (0, 0, 0);
    let mut applied_hash = None;
    for (line, block) in blocks(&doc, "json") {
        // Examples with `…` in place of values are illustrations only.
        let Ok(value) = serde_json::from_str::<serde_json::Value>(&block) else {
            continue;
        };
        match value["type"].as_str() {
            None if value.get("method").is_some() => {
                wire::decode_command(block.as_bytes(), 65_536)
                    .unwrap_or_else(|e| panic!("PROTOCOL.md:{line}: command refused: {e:?}"));
                commands += 1;
            }
            None => {
                let task = wire::decode_task(block.as_bytes(), 65_536)
                    .unwrap_or_else(|e| panic!("PROTOCOL.md:{line}: task refused: {e:?}"));
                task_hash = Some(task.content_hash);
                tasks += 1;
            }
            Some("ack") => {
                let ack: wire::Ack = serde_json::from_value(value.clone())
                    .unwrap_or_else(|e| panic!("PROTOCOL.md:{line}: not an ack: {e}"));
                let again: serde_json::Value =
                    serde_json::from_slice(&ack.to_json()).expect("the ack's JSON");
                assert_eq!(
                    again, value,
                    "PROTOCOL.md:{line}: fields differ from the agent's ack"
                );
                if value["status"] == "applied" {
                    applied_hash = ack.content_hash.clone();
                }
                acks += 1;
            }
            _ => {}
        }
    }
    assert!(
        tasks >= 1 && acks >= 2 && commands >= 1,
        "{tasks} tasks, {acks} acks, {commands} commands"
    );
    assert_eq!(
        applied_hash, task_hash,
        "the applied ack shows the task example's content hash"
    );
}
