//! The GATT trait ([`Central`], [`Scan`], [`Link`]) on btleplug, i.e. BlueZ
//! over D-Bus on Linux. Built only with the cargo feature `ble`.
//!
//! Owns: the btleplug manager, adapter and peripheral handles, and the
//! mapping from a tag's Bluetooth address to its peripheral. Must not: make
//! protocol decisions (that is `transport.rs`) or retry (the driver).
//!
//! Untested here: no machine this is built on has a Bluetooth controller.
//! Every path above this file runs against the fakes; this file is kept thin
//! so that what only a real controller can test is as small as possible.
//! docs/BLE.md lists the commands to try it on hardware.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use btleplug::api::{
    Central as _, CentralEvent, CentralState, Characteristic, Manager as _, Peripheral as _,
    ScanFilter, ValueNotification, WriteType,
};
use btleplug::platform::{Adapter, Manager, Peripheral};
use futures::{Stream, StreamExt};
use tokio::sync::Mutex;
use uuid::Uuid;

use super::codec::{uuid16, ESL_SERVICE};
use super::transport::{
    Advertisement, Central, GattError, Link, Notification, ObjectChannel, Pairing, Scan,
};

type Events = Pin<Box<dyn Stream<Item = CentralEvent> + Send>>;
type Notifications = Pin<Box<dyn Stream<Item = ValueNotification> + Send>>;

/// The adapter, found again on every [`Central::scan`] (bluetoothd restarts
/// and USB dongles come and go).
#[derive(Clone)]
pub struct BtleplugCentral {
    /// `hci0`…; none: the first adapter.
    adapter_name: Option<String>,
    adapter: Arc<Mutex<Option<Adapter>>>,
}

impl BtleplugCentral {
    pub fn new(adapter_name: Option<String>) -> BtleplugCentral {
        BtleplugCentral {
            adapter_name,
            adapter: Arc::new(Mutex::new(None)),
        }
    }

    async fn find_adapter(&self) -> Result<Adapter, GattError> {
        let manager = Manager::new().await.map_err(adapter_error)?;
        let adapters = manager.adapters().await.map_err(adapter_error)?;
        for adapter in adapters {
            let info = adapter.adapter_info().await.map_err(adapter_error)?;
            // BlueZ reports "hci0 (usb:v1D6Bp0246d0540)".
            let matches = self
                .adapter_name
                .as_deref()
                .is_none_or(|name| info.split_whitespace().next() == Some(name));
            if matches {
                tracing::info!(adapter = %info, "using Bluetooth adapter");
                return Ok(adapter);
            }
        }
        Err(GattError::Adapter(match &self.adapter_name {
            Some(name) => format!("no Bluetooth adapter named {name}"),
            None => "no Bluetooth adapter".to_owned(),
        }))
    }
}

fn adapter_error(error: btleplug::Error) -> GattError {
    GattError::Adapter(error.to_string())
}

fn failed(error: btleplug::Error) -> GattError {
    match error {
        btleplug::Error::NotConnected => GattError::Disconnected,
        btleplug::Error::DeviceNotFound => GattError::UnknownPeer(error.to_string()),
        other => GattError::Failed(other.to_string()),
    }
}

impl Central for BtleplugCentral {
    type Scan = BtleplugScan;
    type Link = BtleplugLink;

    async fn remove_bond(&self, address: &str) -> Result<(), GattError> {
        Err(GattError::Failed(format!(
            "the btleplug backend cannot remove bonds: run `bluetoothctl remove {address}` \
             and pair the tag again"
        )))
    }

    async fn scan(&self) -> Result<BtleplugScan, GattError> {
        let adapter = self.find_adapter().await?;
        // Events first, then the scan: better a duplicate than a miss.
        let events = adapter.events().await.map_err(adapter_error)?;
        adapter
            .start_scan(ScanFilter {
                services: vec![uuid16(ESL_SERVICE)],
            })
            .await
            .map_err(adapter_error)?;
        *self.adapter.lock().await = Some(adapter.clone());
        Ok(BtleplugScan { adapter, events })
    }

    async fn connect(&self, address: &str) -> Result<BtleplugLink, GattError> {
        let adapter = self
            .adapter
            .lock()
            .await
            .clone()
            .ok_or_else(|| GattError::Adapter("not scanning".to_owned()))?;
        let peripherals = adapter.peripherals().await.map_err(adapter_error)?;
        let peripheral = peripherals
            .into_iter()
            .find(|p| p.address().to_string().eq_ignore_ascii_case(address))
            .ok_or_else(|| GattError::UnknownPeer(address.to_owned()))?;
        // Subscribe to the stream before anything can notify.
        let notifications = peripheral.notifications().await.map_err(failed)?;
        peripheral.connect().await.map_err(failed)?;
        Ok(BtleplugLink {
            peripheral,
            notifications,
            characteristics: HashMap::new(),
            connected: true,
        })
    }
}

/// The adapter's event stream, turned into ESL advertisements.
pub struct BtleplugScan {
    adapter: Adapter,
    events: Events,
}

impl Scan for BtleplugScan {
    async fn next(&mut self) -> Result<Advertisement, GattError> {
        loop {
            // Cancel-safe: `StreamExt::next` takes nothing it does not return.
            let event = self
                .events
                .next()
                .await
                .ok_or_else(|| GattError::Adapter("adapter event stream ended".to_owned()))?;
            let id = match event {
                CentralEvent::DeviceDiscovered(id)
                | CentralEvent::DeviceUpdated(id)
                | CentralEvent::ServicesAdvertisement { id, .. } => id,
                CentralEvent::StateUpdate(CentralState::PoweredOff) => {
                    return Err(GattError::Adapter("adapter powered off".to_owned()))
                }
                _ => continue,
            };
            // A device that vanished between the event and this call is
            // simply not reported.
            let Ok(peripheral) = self.adapter.peripheral(&id).await else {
                continue;
            };
            let Ok(Some(properties)) = peripheral.properties().await else {
                continue;
            };
            return Ok(Advertisement {
                address: properties.address.to_string(),
                rssi: properties.rssi,
                services: properties.services,
            });
        }
    }
}

/// One connected peripheral.
pub struct BtleplugLink {
    peripheral: Peripheral,
    notifications: Notifications,
    /// Filled by `discover`.
    characteristics: HashMap<Uuid, Characteristic>,
    connected: bool,
}

impl BtleplugLink {
    fn characteristic(&self, uuid: Uuid) -> Result<&Characteristic, GattError> {
        self.characteristics
            .get(&uuid)
            .ok_or_else(|| GattError::Failed(format!("characteristic {uuid} not discovered")))
    }
}

/// btleplug has no L2CAP channels: this type is never built, and OTS
/// image delivery fails with a clear error on this backend.
pub enum NoChannel {}

impl ObjectChannel for NoChannel {
    async fn send(&mut self, _bytes: &[u8]) -> Result<(), GattError> {
        match *self {}
    }

    async fn close(&mut self) -> Result<(), GattError> {
        match *self {}
    }
}

impl Link for BtleplugLink {
    type Channel = NoChannel;

    /// btleplug has no pairing API. BlueZ raises the security of a bonded
    /// link by itself when the tag answers Insufficient Encryption, so a
    /// tag bonded beforehand (`bluetoothctl pair`) works; a new tag does
    /// not get bonded by this backend.
    async fn pair(&mut self) -> Result<Pairing, GattError> {
        Ok(Pairing::Existing)
    }

    async fn open_channel(&mut self, psm: u16) -> Result<NoChannel, GattError> {
        Err(GattError::Failed(format!(
            "the btleplug backend cannot open L2CAP channels (PSM 0x{psm:04X}): \
             images over OTS need a backend with L2CAP LE credit-based channels"
        )))
    }

    async fn discover(&mut self) -> Result<Vec<Uuid>, GattError> {
        self.peripheral.discover_services().await.map_err(failed)?;
        self.characteristics = self
            .peripheral
            .characteristics()
            .into_iter()
            .map(|c| (c.uuid, c))
            .collect();
        Ok(self.characteristics.keys().copied().collect())
    }

    async fn subscribe(&mut self, characteristic: Uuid) -> Result<(), GattError> {
        let c = self.characteristic(characteristic)?.clone();
        self.peripheral.subscribe(&c).await.map_err(failed)
    }

    async fn write(&mut self, characteristic: Uuid, value: &[u8]) -> Result<(), GattError> {
        let c = self.characteristic(characteristic)?.clone();
        self.peripheral
            .write(&c, value, WriteType::WithResponse)
            .await
            .map_err(failed)
    }

    async fn read(&mut self, characteristic: Uuid) -> Result<Vec<u8>, GattError> {
        let c = self.characteristic(characteristic)?.clone();
        self.peripheral.read(&c).await.map_err(failed)
    }

    async fn notification(&mut self) -> Result<Notification, GattError> {
        let n = self
            .notifications
            .next()
            .await
            .ok_or(GattError::Disconnected)?;
        Ok(Notification {
            characteristic: n.uuid,
            value: n.value,
        })
    }

    async fn disconnect(&mut self) -> Result<(), GattError> {
        self.connected = false;
        self.peripheral.disconnect().await.map_err(failed)
    }
}

impl Drop for BtleplugLink {
    /// A session that timed out is dropped mid-operation: disconnect in the
    /// background, or BlueZ keeps the link (and the tag awake).
    fn drop(&mut self) {
        if self.connected {
            let peripheral = self.peripheral.clone();
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    let _ = peripheral.disconnect().await;
                });
            }
        }
    }
}
