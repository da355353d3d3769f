//! A scripted fake GATT peer for the transport's tests: the test lists every
//! operation it expects, in order, with what the "tag" answers, and the fake
//! checks each call against the list.
//!
//! Owns: the script and the check. A call that is not the next expected one
//! panics with both in the message (the session runs on the test's own task,
//! so that fails the test); [`ScriptedCentral::assert_done`] fails a test
//! that left expected calls unmade. [`Expect::Hang`] makes the next call
//! never complete, for timeouts under paused tokio time.
//!
//! Behaviour (a tag that follows the ESL Service by itself) lives in
//! `fake_esl.rs`; this file only replays.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use uuid::Uuid;

use super::codec::{uuid16, Command, Response, CONTROL_POINT_CHARACTERISTIC};
use super::transport::{Central, GattError, Link, Notification, ObjectChannel, Pairing, Scan};

/// One expected call and the fake's answer.
#[derive(Debug, Clone)]
pub enum Expect {
    Connect(Result<(), GattError>),
    Pair(Result<Pairing, GattError>),
    RemoveBond,
    Discover(Result<Vec<Uuid>, GattError>),
    Subscribe(Uuid, Result<(), GattError>),
    /// A write of exactly `value`; after it the fake notifies `notify`.
    Write {
        characteristic: Uuid,
        value: Vec<u8>,
        result: Result<(), GattError>,
        notify: Vec<Notification>,
    },
    Read {
        characteristic: Uuid,
        result: Result<Vec<u8>, GattError>,
    },
    Disconnect,
    /// An L2CAP channel opened on this PSM.
    OpenChannel(u16, Result<(), GattError>),
    /// Exactly these bytes sent on the channel.
    Send(Vec<u8>, Result<(), GattError>),
    CloseChannel,
    /// Whatever the next call is, it never completes.
    Hang,
}

impl Expect {
    /// A Control Point write of `command`, answered by `response` bytes.
    pub fn command_raw(command: &Command, response: Vec<u8>) -> Expect {
        let cp = uuid16(CONTROL_POINT_CHARACTERISTIC);
        Expect::Write {
            characteristic: cp,
            // Test commands are valid; a panic here is a broken test.
            value: command.encode().expect("test command encodes"),
            result: Ok(()),
            notify: vec![Notification {
                characteristic: cp,
                value: response,
            }],
        }
    }

    /// A Control Point write of `command`, answered by `response`.
    pub fn command(command: &Command, response: &Response) -> Expect {
        Expect::command_raw(command, response.encode().expect("test response encodes"))
    }

    /// A Control Point write of `command` that is never answered.
    pub fn unanswered(command: &Command) -> Expect {
        Expect::Write {
            characteristic: uuid16(CONTROL_POINT_CHARACTERISTIC),
            value: command.encode().expect("test command encodes"),
            result: Ok(()),
            notify: Vec::new(),
        }
    }

    /// A write of `value` that succeeds without a notification.
    pub fn write(characteristic: Uuid, value: Vec<u8>) -> Expect {
        Expect::Write {
            characteristic,
            value,
            result: Ok(()),
            notify: Vec::new(),
        }
    }

    /// A write of `value` to a control point, answered on the same
    /// characteristic with `answer` (an OTS indication).
    pub fn indicate(characteristic: Uuid, value: Vec<u8>, answer: Vec<u8>) -> Expect {
        Expect::Write {
            characteristic,
            value,
            result: Ok(()),
            notify: vec![Notification {
                characteristic,
                value: answer,
            }],
        }
    }

    pub fn read(characteristic: Uuid, value: Vec<u8>) -> Expect {
        Expect::Read {
            characteristic,
            result: Ok(value),
        }
    }
}

#[derive(Debug, Default)]
struct Script {
    steps: VecDeque<Expect>,
    /// Calls made so far, for the failure messages.
    done: Vec<String>,
}

/// The scripted central: every [`ScriptedCentral::connect`] takes the next
/// step (which must be [`Expect::Connect`]); the link shares the script.
#[derive(Debug, Clone, Default)]
pub struct ScriptedCentral {
    script: Arc<Mutex<Script>>,
}

/// What a call that must wait forever returns instead of an answer.
enum Next<T> {
    Answer(T),
    Hang,
}

impl ScriptedCentral {
    pub fn new(steps: impl IntoIterator<Item = Expect>) -> ScriptedCentral {
        ScriptedCentral {
            script: Arc::new(Mutex::new(Script {
                steps: steps.into_iter().collect(),
                done: Vec::new(),
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Script> {
        // A panic while holding the lock already failed the test.
        self.script.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the next step for `call`, which `check` turns into an answer
    /// (or panics on a mismatch).
    fn take<T>(&self, call: String, check: impl FnOnce(Expect) -> Result<T, Expect>) -> Next<T> {
        let mut script = self.lock();
        let Some(step) = script.steps.pop_front() else {
            panic!(
                "unexpected {call}: the script is finished (calls so far: {:?})",
                script.done
            );
        };
        script.done.push(call.clone());
        if matches!(step, Expect::Hang) {
            return Next::Hang;
        }
        match check(step) {
            Ok(answer) => Next::Answer(answer),
            Err(expected) => panic!(
                "unexpected {call}; expected {expected:?} (calls so far: {:?})",
                script.done
            ),
        }
    }

    /// Panics unless every expected call was made.
    pub fn assert_done(&self) {
        let script = self.lock();
        assert!(
            script.steps.is_empty(),
            "expected calls not made: {:?} (calls made: {:?})",
            script.steps,
            script.done
        );
    }
}

async fn answer<T>(next: Next<T>) -> T {
    match next {
        Next::Answer(value) => value,
        Next::Hang => std::future::pending().await,
    }
}

/// The scripted central does not scan; the driver's tests use `fake_esl`.
pub struct NoScan;

impl Scan for NoScan {
    async fn next(&mut self) -> Result<super::transport::Advertisement, GattError> {
        std::future::pending().await
    }
}

impl Central for ScriptedCentral {
    type Scan = NoScan;
    type Link = ScriptedLink;

    async fn remove_bond(&self, address: &str) -> Result<(), GattError> {
        let next = self.take(format!("remove_bond({address})"), |step| match step {
            Expect::RemoveBond => Ok(()),
            other => Err(other),
        });
        answer(next).await;
        Ok(())
    }

    async fn scan(&self) -> Result<NoScan, GattError> {
        Ok(NoScan)
    }

    async fn connect(&self, address: &str) -> Result<ScriptedLink, GattError> {
        let next = self.take(format!("connect({address})"), |step| match step {
            Expect::Connect(result) => Ok(result),
            other => Err(other),
        });
        answer(next).await?;
        Ok(ScriptedLink {
            central: self.clone(),
            notifications: VecDeque::new(),
        })
    }
}

/// A link whose every call is checked against the shared script.
pub struct ScriptedLink {
    central: ScriptedCentral,
    notifications: VecDeque<Notification>,
}

/// A channel whose every call is checked against the shared script.
pub struct ScriptedChannel {
    central: ScriptedCentral,
}

impl ObjectChannel for ScriptedChannel {
    async fn send(&mut self, bytes: &[u8]) -> Result<(), GattError> {
        let next = self
            .central
            .take(format!("send({} bytes)", bytes.len()), |step| match step {
                Expect::Send(expected, result) if expected == bytes => Ok(result),
                other => Err(other),
            });
        answer(next).await
    }

    async fn close(&mut self) -> Result<(), GattError> {
        let next = self
            .central
            .take("close channel".to_owned(), |step| match step {
                Expect::CloseChannel => Ok(()),
                other => Err(other),
            });
        answer(next).await;
        Ok(())
    }
}

impl Link for ScriptedLink {
    type Channel = ScriptedChannel;

    async fn pair(&mut self) -> Result<Pairing, GattError> {
        let next = self.central.take("pair()".to_owned(), |step| match step {
            Expect::Pair(result) => Ok(result),
            other => Err(other),
        });
        answer(next).await
    }

    async fn open_channel(&mut self, psm: u16) -> Result<ScriptedChannel, GattError> {
        let next = self
            .central
            .take(format!("open_channel(0x{psm:04X})"), |step| match step {
                Expect::OpenChannel(p, result) if p == psm => Ok(result),
                other => Err(other),
            });
        answer(next).await?;
        Ok(ScriptedChannel {
            central: self.central.clone(),
        })
    }

    async fn discover(&mut self) -> Result<Vec<Uuid>, GattError> {
        let next = self
            .central
            .take("discover()".to_owned(), |step| match step {
                Expect::Discover(result) => Ok(result),
                other => Err(other),
            });
        answer(next).await
    }

    async fn subscribe(&mut self, characteristic: Uuid) -> Result<(), GattError> {
        let next = self
            .central
            .take(format!("subscribe({characteristic})"), |step| match step {
                Expect::Subscribe(c, result) if c == characteristic => Ok(result),
                other => Err(other),
            });
        answer(next).await
    }

    async fn write(&mut self, characteristic: Uuid, value: &[u8]) -> Result<(), GattError> {
        let next =
            self.central.take(
                format!("write({characteristic}, {value:02X?})"),
                |step| match step {
                    Expect::Write {
                        characteristic: c,
                        value: v,
                        result,
                        notify,
                    } if c == characteristic && v == value => Ok((result, notify)),
                    other => Err(other),
                },
            );
        let (result, notify) = answer(next).await;
        self.notifications.extend(notify);
        result
    }

    async fn read(&mut self, characteristic: Uuid) -> Result<Vec<u8>, GattError> {
        let next = self
            .central
            .take(format!("read({characteristic})"), |step| match step {
                Expect::Read {
                    characteristic: c,
                    result,
                } if c == characteristic => Ok(result),
                other => Err(other),
            });
        answer(next).await
    }

    async fn notification(&mut self) -> Result<Notification, GattError> {
        match self.notifications.pop_front() {
            Some(n) => Ok(n),
            // Nothing was scripted: the tag stays silent.
            None => std::future::pending().await,
        }
    }

    async fn disconnect(&mut self) -> Result<(), GattError> {
        let next = self
            .central
            .take("disconnect()".to_owned(), |step| match step {
                Expect::Disconnect => Ok(()),
                other => Err(other),
            });
        answer(next).await;
        Ok(())
    }
}
