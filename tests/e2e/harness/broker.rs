//! [`Broker`]: a real Mosquitto on a free loopback port, with its config,
//! log and persistence dir in the test's temp dir. Its debug log is the
//! harness's agent-independent witness (subscriptions, PUBACKs).

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::time::Instant;

use super::process::{append_log, kill_and_reap, send_signal, wait_exit};
use super::secure::BrokerSecurity;
use super::{eventually, TestEnv, AGENT_CLIENT_ID, MOSQUITTO, POLL_INTERVAL, TASK_TOPIC};

#[derive(Debug, Clone, Copy, Default)]
pub struct BrokerOptions {
    /// Keep sessions and queued messages across a broker restart
    /// (`persistence true`, saved when the broker gets SIGTERM).
    pub persistence: bool,
}

/// A Mosquitto process on a free loopback port, killed on drop.
pub struct Broker {
    child: Option<Child>,
    port: u16,
    /// The second listener of a [`BrokerSecurity`] with TLS.
    tls_port: Option<u16>,
    conf_path: PathBuf,
    log_path: PathBuf,
}

impl Broker {
    /// Starts a broker and waits until it accepts connections. A port taken
    /// between choosing and binding it is retried with another port.
    pub async fn start(env: &TestEnv, options: BrokerOptions) -> Broker {
        Broker::start_inner(env, options, None).await
    }

    /// A broker with passwords, an ACL and, if `security` has one, a TLS
    /// listener on [`Broker::tls_port`] besides the plain one.
    pub async fn start_secure(
        env: &TestEnv,
        options: BrokerOptions,
        security: &BrokerSecurity,
    ) -> Broker {
        Broker::start_inner(env, options, Some(security)).await
    }

    async fn start_inner(
        env: &TestEnv,
        options: BrokerOptions,
        security: Option<&BrokerSecurity>,
    ) -> Broker {
        const ATTEMPTS: usize = 5;
        for _ in 0..ATTEMPTS {
            let port = free_port();
            let tls_port = security.and_then(|s| s.has_tls().then(free_port));
            let mut broker = Broker {
                child: None,
                port,
                tls_port,
                conf_path: env.path().join("mosquitto.conf"),
                log_path: env.broker_log(),
            };
            let mut config = broker_config(env.path(), port, options, security.is_none());
            if let Some(s) = security {
                config.push_str(&s.config(env.path(), tls_port));
            }
            fs::write(&broker.conf_path, config).expect("write mosquitto.conf");
            match broker.spawn_and_wait().await {
                Ok(()) => return broker,
                Err(log) if log.contains("Address already in use") => continue,
                Err(log) => panic!("mosquitto did not start on port {port}:\n{log}"),
            }
        }
        panic!("mosquitto could not bind a free port in {ATTEMPTS} attempts");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Port of the TLS listener of a [`Broker::start_secure`] broker.
    pub fn tls_port(&self) -> u16 {
        self.tls_port
            .expect("the broker was started with a TLS listener")
    }

    /// Stops the broker with SIGTERM (it saves its persistence file then).
    pub async fn stop(&mut self) {
        let mut child = self.child.take().expect("stop() on a running broker");
        send_signal(&child, Signal::SIGTERM);
        if wait_exit(&mut child, Duration::from_secs(5))
            .await
            .is_none()
        {
            kill_and_reap(&mut child);
            panic!("mosquitto ignored SIGTERM for 5 s");
        }
    }

    /// Starts the stopped broker again on the same port with the same config.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "restart() needs a stopped broker");
        if let Err(log) = self.spawn_and_wait().await {
            panic!("mosquitto did not restart on port {}:\n{log}", self.port);
        }
    }

    async fn spawn_and_wait(&mut self) -> Result<(), String> {
        let since = self.log_len();
        let log = append_log(&self.log_path);
        let child = Command::new(MOSQUITTO)
            .arg("-c")
            .arg(&self.conf_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {MOSQUITTO}: {e}"));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let child = self.child.as_mut().expect("set above");
            if let Some(status) = child.try_wait().expect("try_wait on our broker") {
                self.child = None;
                return Err(format!(
                    "mosquitto exited with {status}; log:\n{}",
                    self.log_since(since)
                ));
            }
            // "mosquitto version 2.0.11 running" comes after the listeners are open.
            let listening = |p: u16| TcpStream::connect(("127.0.0.1", p)).is_ok();
            if self.log_since(since).contains(" running")
                && listening(self.port)
                && self.tls_port.is_none_or(listening)
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "not accepting after 10 s; log:\n{}",
                    self.log_since(since)
                ));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Current length of the broker log, to look only at what follows.
    pub fn log_len(&self) -> usize {
        fs::metadata(&self.log_path)
            .map(|m| m.len() as usize)
            .unwrap_or(0)
    }

    /// The broker log from byte `since` on.
    pub fn log_since(&self, since: usize) -> String {
        let bytes = fs::read(&self.log_path).unwrap_or_default();
        String::from_utf8_lossy(bytes.get(since..).unwrap_or_default()).into_owned()
    }

    /// How many task (or command) messages the agent has PUBACKed, counted
    /// from the broker's log. A PUBACK means "stored" (PROTOCOL §4.1).
    pub fn pubacks_from_agent(&self) -> usize {
        let needle = format!("Received PUBACK from {AGENT_CLIENT_ID} (");
        self.log_since(0).matches(&needle).count()
    }

    /// Waits until the agent has PUBACKed at least `n` messages in total.
    pub async fn wait_pubacks_from_agent(&self, n: usize, timeout: Duration) {
        let what = format!("the agent to PUBACK {n} messages (broker log)");
        eventually(&what, timeout, || {
            (self.pubacks_from_agent() >= n).then_some(())
        })
        .await;
    }

    /// Whether the agent's subscription to its task topic with QoS 1 was
    /// confirmed after byte `since` of the log.
    pub fn agent_subscribed_since(&self, since: usize) -> bool {
        let log = self.log_since(since);
        let topic_line = format!("\t{TASK_TOPIC} (QoS 1)");
        let suback = format!("Sending SUBACK to {AGENT_CLIENT_ID}");
        match log.find(&topic_line) {
            Some(at) => log[at..].contains(&suback),
            None => false,
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            kill_and_reap(child);
        }
    }
}

pub(super) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral loopback port")
        .port()
}

fn broker_config(dir: &Path, port: u16, options: BrokerOptions, anonymous: bool) -> String {
    let data = dir.join("mosquitto-data");
    fs::create_dir_all(&data).expect("create the broker data dir");
    // Run as root, Mosquitto drops to user `mosquitto`, which cannot write
    // into our 0700 temp dir; `user root` keeps it as it is.
    let running_as_root = fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false);
    let user = if running_as_root { "user root\n" } else { "" };
    format!(
        "# Written by the esl-agent end-to-end harness.\n\
         {user}\
         listener {port} 127.0.0.1\n\
         allow_anonymous {anonymous}\n\
         max_queued_messages 100000\n\
         max_inflight_messages 20\n\
         persistence {persistence}\n\
         persistence_location {data}/\n\
         autosave_interval 1\n\
         log_dest stderr\n\
         log_type all\n\
         log_timestamp_format %H:%M:%S\n",
        persistence = options.persistence,
        data = data.display(),
    )
}
