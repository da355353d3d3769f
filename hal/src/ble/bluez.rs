//! The stack trait ([`Central`], [`Scan`], [`Link`], [`ObjectChannel`]) on
//! BlueZ through its own Rust binding, `bluer` (cargo feature `ble-bluez`).
//! Unlike btleplug it has L2CAP LE credit-based channels (OTS image
//! transfer) and a pairing agent (bonding), which standard ESL tags need.
//!
//! Owns: the bluer session, adapter and device handles, the pairing agent
//! the daemon registers (no input, no output: "just works", LE Secure
//! Connections when the tag supports it) and the notification streams of
//! one link. Must not: make protocol decisions (`transport.rs`) or retry
//! (the driver).
//!
//! **Only check-compiled.** No machine this was written on has a Bluetooth
//! controller; nothing here has run. Two mappings are guesses to verify on
//! hardware: a BlueZ error mentioning "key missing" is taken as the tag
//! having lost its bond ([`GattError::BondLost`]); a device's RSSI and
//! service UUIDs are read when BlueZ reports it added or changed.

use std::collections::HashMap;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;

use bluer::agent::{Agent, AgentHandle};
use bluer::gatt::remote::Characteristic;
use bluer::{Adapter, AdapterEvent, Address, Device, Session};
use futures::stream::SelectAll;
use futures::{Stream, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;
use uuid::Uuid;

use super::transport::{
    Advertisement, Central, GattError, Link, Notification, ObjectChannel, Pairing, Scan,
};

type Events = Pin<Box<dyn Stream<Item = AdapterEvent> + Send>>;
type Notifications = Pin<Box<dyn Stream<Item = Notification> + Send>>;

/// The BlueZ adapter, opened on first use and again after it failed.
#[derive(Clone)]
pub struct BluezCentral {
    adapter_name: Option<String>,
    open: Arc<Mutex<Option<Open>>>,
}

/// What stays alive while the adapter is in use: dropping the agent
/// handle unregisters the agent.
struct Open {
    _session: Session,
    adapter: Adapter,
    _agent: AgentHandle,
}

impl BluezCentral {
    pub fn new(adapter_name: Option<String>) -> BluezCentral {
        BluezCentral {
            adapter_name,
            open: Arc::new(Mutex::new(None)),
        }
    }

    async fn adapter(&self) -> Result<Adapter, GattError> {
        let mut open = self.open.lock().await;
        if let Some(open) = &*open {
            return Ok(open.adapter.clone());
        }
        let session = Session::new().await.map_err(adapter_error)?;
        let adapter = match &self.adapter_name {
            Some(name) => session.adapter(name).map_err(adapter_error)?,
            None => session.default_adapter().await.map_err(adapter_error)?,
        };
        adapter.set_powered(true).await.map_err(adapter_error)?;
        let agent = session
            .register_agent(Agent {
                request_default: true,
                ..Agent::default()
            })
            .await
            .map_err(adapter_error)?;
        *open = Some(Open {
            _session: session,
            adapter: adapter.clone(),
            _agent: agent,
        });
        Ok(adapter)
    }

    /// Forgets the adapter so the next use opens it again (bluetoothd
    /// restarted, adapter replugged).
    async fn reset(&self) {
        *self.open.lock().await = None;
    }
}

fn adapter_error(error: bluer::Error) -> GattError {
    GattError::Adapter(error.to_string())
}

fn failed(error: bluer::Error) -> GattError {
    let text = error.to_string();
    if text.to_ascii_lowercase().contains("key missing") {
        GattError::BondLost
    } else {
        GattError::Failed(text)
    }
}

fn address(text: &str) -> Result<Address, GattError> {
    Address::from_str(text).map_err(|_| GattError::UnknownPeer(text.to_owned()))
}

impl Central for BluezCentral {
    type Scan = BluezScan;
    type Link = BluezLink;

    async fn scan(&self) -> Result<BluezScan, GattError> {
        self.reset().await;
        let adapter = self.adapter().await?;
        let events = adapter
            .discover_devices_with_changes()
            .await
            .map_err(adapter_error)?;
        Ok(BluezScan {
            adapter,
            events: Box::pin(events),
        })
    }

    async fn connect(&self, text: &str) -> Result<BluezLink, GattError> {
        let adapter = self.adapter().await?;
        let device = adapter.device(address(text)?).map_err(failed)?;
        device.connect().await.map_err(failed)?;
        Ok(BluezLink {
            device,
            characteristics: HashMap::new(),
            notifications: SelectAll::new(),
        })
    }

    async fn remove_bond(&self, text: &str) -> Result<(), GattError> {
        let adapter = self.adapter().await?;
        adapter.remove_device(address(text)?).await.map_err(failed)
    }
}

/// BlueZ's discovery events, turned into advertisements.
pub struct BluezScan {
    adapter: Adapter,
    events: Events,
}

impl Scan for BluezScan {
    /// Not fully cancel-safe: an event taken while its device's properties
    /// are read is lost if the caller gives up then; the next change of
    /// that device reports it again.
    async fn next(&mut self) -> Result<Advertisement, GattError> {
        loop {
            let Some(event) = self.events.next().await else {
                return Err(GattError::Adapter("BlueZ discovery ended".to_owned()));
            };
            let AdapterEvent::DeviceAdded(addr) = event else {
                continue;
            };
            let Ok(device) = self.adapter.device(addr) else {
                continue;
            };
            let rssi = device.rssi().await.ok().flatten();
            let services = device
                .uuids()
                .await
                .ok()
                .flatten()
                .unwrap_or_default()
                .into_iter()
                .collect();
            return Ok(Advertisement {
                address: addr.to_string(),
                rssi,
                services,
            });
        }
    }
}

/// One connected tag.
pub struct BluezLink {
    device: Device,
    characteristics: HashMap<Uuid, Characteristic>,
    notifications: SelectAll<Notifications>,
}

impl BluezLink {
    fn characteristic(&self, uuid: Uuid) -> Result<&Characteristic, GattError> {
        self.characteristics
            .get(&uuid)
            .ok_or_else(|| GattError::Failed(format!("no characteristic {uuid}")))
    }
}

impl Link for BluezLink {
    type Channel = BluezChannel;

    async fn pair(&mut self) -> Result<Pairing, GattError> {
        if self.device.is_paired().await.map_err(failed)? {
            // BlueZ encrypts a bonded link when an attribute needs it.
            return Ok(Pairing::Existing);
        }
        self.device.pair().await.map_err(failed)?;
        Ok(Pairing::New)
    }

    async fn open_channel(&mut self, psm: u16) -> Result<BluezChannel, GattError> {
        let addr_type = self.device.address_type().await.map_err(failed)?;
        let target = bluer::l2cap::SocketAddr::new(self.device.address(), addr_type, psm);
        let stream = bluer::l2cap::Stream::connect(target)
            .await
            .map_err(|e| GattError::Failed(format!("L2CAP connect to PSM 0x{psm:04X}: {e}")))?;
        Ok(BluezChannel { stream })
    }

    async fn discover(&mut self) -> Result<Vec<Uuid>, GattError> {
        self.characteristics.clear();
        for service in self.device.services().await.map_err(failed)? {
            for characteristic in service.characteristics().await.map_err(failed)? {
                let uuid = characteristic.uuid().await.map_err(failed)?;
                self.characteristics.insert(uuid, characteristic);
            }
        }
        Ok(self.characteristics.keys().copied().collect())
    }

    async fn subscribe(&mut self, characteristic: Uuid) -> Result<(), GattError> {
        let values = self
            .characteristic(characteristic)?
            .notify()
            .await
            .map_err(failed)?;
        self.notifications
            .push(Box::pin(values.map(move |value| Notification {
                characteristic,
                value,
            })));
        Ok(())
    }

    async fn write(&mut self, characteristic: Uuid, value: &[u8]) -> Result<(), GattError> {
        self.characteristic(characteristic)?
            .write(value)
            .await
            .map_err(failed)
    }

    async fn read(&mut self, characteristic: Uuid) -> Result<Vec<u8>, GattError> {
        self.characteristic(characteristic)?
            .read()
            .await
            .map_err(failed)
    }

    async fn notification(&mut self) -> Result<Notification, GattError> {
        if self.notifications.is_empty() {
            return std::future::pending().await;
        }
        self.notifications
            .next()
            .await
            .ok_or(GattError::Disconnected)
    }

    async fn disconnect(&mut self) -> Result<(), GattError> {
        self.device.disconnect().await.map_err(failed)
    }
}

/// An L2CAP LE credit-based channel (the kernel segments by the peer's MTU
/// and waits for credits).
pub struct BluezChannel {
    stream: bluer::l2cap::Stream,
}

impl ObjectChannel for BluezChannel {
    async fn send(&mut self, bytes: &[u8]) -> Result<(), GattError> {
        self.stream
            .write_all(bytes)
            .await
            .map_err(|e| GattError::Failed(format!("L2CAP send: {e}")))?;
        self.stream
            .flush()
            .await
            .map_err(|e| GattError::Failed(format!("L2CAP send: {e}")))
    }

    async fn close(&mut self) -> Result<(), GattError> {
        self.stream
            .shutdown()
            .await
            .map_err(|e| GattError::Failed(format!("L2CAP close: {e}")))
    }
}
