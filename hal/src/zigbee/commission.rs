//! Start-up of the coordinator after the port is open: find the stick
//! (bootloader probe), know its firmware, reset it, make sure the network
//! on it is the agent's — forming one on a blank stick, restoring or
//! adopting only when the config says so — write the NV settings sleepy
//! tags need, start the coordinator and register the ESL endpoint. Also the
//! network requests of a running coordinator: permit-join and the channel
//! change.
//!
//! Owns: the start-up sequence and the network decision. Must not: serve
//! deliveries (the driver does), or log key material. The saved network is
//! the file `radio.zigbee.network_file` ([`NetworkBackup`], 0600).
//!
//! Sequences checked against zigbee-herdsman `adapter/z-stack/adapter/
//! manager.ts` (`determineStrategy`, `beginCommissioning`,
//! `updateCommissioningNvItems`, `clearAdapter`, `beginStartup`) and
//! zigpy-znp `api.py` (`start_network`, `reset_network_info`) and
//! `zigbee/application.py` (`_write_stack_settings`); the trust-centre
//! link key against zigpy-znp `write_network_info` and herdsman
//! `updateCommissioningNvItems`; the channel change against herdsman
//! `controller.ts` `changeChannel` and zigpy `move_network_to_channel`.

use rand::{Rng, RngCore};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{sleep, Instant};
use tracing::{debug, info, warn};

use super::app::{ESL_CLUSTER, ESL_DEVICE_ID, ESL_PROFILE};
use super::backup::{BackupError, NetworkBackup};
use super::devices::{Device, Devices};
use super::firmware::{self, Firmware, StartupStatus, ZStack};
use super::nv::{self, StickNetwork};
use super::znp::{self, Znp, ZnpError};
use super::{NetworkMismatch, TcLinkKey, ZigbeeConfig};

/// `ZDO_STARTUP_FROM_APP` start delay, ms.
const STARTUP_DELAY_MS: u16 = 100;
/// `AF_REGISTER` status when the endpoint is registered already.
const ZAPS_DUPLICATE_ENTRY: u8 = 0xB8;
/// `APP_CNF_BDB_START_COMMISSIONING` mode: network formation.
const BDB_FORMATION: u8 = 0x04;
/// Added to a restored network's frame counter: frames the old stick may
/// have sent after its last backup (an hour of a busy network is far less).
pub const FRAME_COUNTER_MARGIN: u32 = 10_000;
/// Address mode of a broadcast.
const ADDR_MODE_BROADCAST: u8 = 0x0F;
/// Broadcast address of the coordinator and all routers.
const BROADCAST_ROUTERS: u16 = 0xFFFC;
/// Broadcast address of every device, sleepy ones included (their parents
/// hold the frame for their next poll, for the broadcast delivery time).
const BROADCAST_ALL: u16 = 0xFFFF;
/// `ZDO_MGMT_NWK_UPDATE_REQ` scan duration meaning "change channel".
const NWK_UPDATE_CHANGE_CHANNEL: u8 = 0xFE;
/// How often the NIB is read while it settles after a formation.
const SETTLE_POLL: std::time::Duration = std::time::Duration::from_millis(1000);

/// Why the start-up failed. Every reason is reported as the radio's `Down`
/// reason and names what to do.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Znp(#[from] ZnpError),
    #[error(transparent)]
    Backup(#[from] BackupError),
    /// The stick's network is not the saved one (or one of them is
    /// missing) and the config does not say what to do.
    #[error("{0}")]
    Mismatch(String),
    #[error("network formation failed: {0}")]
    Formation(String),
}

/// What the start-up did with the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkOutcome {
    /// The stick had the saved network.
    Resumed,
    /// A new network was formed (first start, or `on_network_mismatch =
    /// "form"`).
    Formed,
    /// The saved network was written to the stick.
    Restored,
    /// The stick's network became the agent's.
    Adopted,
}

/// A started coordinator.
#[derive(Debug)]
pub struct Started {
    pub firmware: Firmware,
    pub network: StickNetwork,
    pub outcome: NetworkOutcome,
    /// The devices in the stick's address manager (`nv::read_devices`).
    pub devices: Vec<Device>,
}

/// Finds the stick, knows its firmware and resets it: what every use of
/// the port starts with.
async fn wake<P: AsyncRead + AsyncWrite + Unpin + Send>(
    znp: &mut Znp<P>,
    cfg: &ZigbeeConfig,
) -> Result<Firmware, StartError> {
    let capabilities = firmware::probe(znp, &cfg.bootloader).await?;
    let firmware = firmware::detect(znp, capabilities).await?;
    info!(%firmware, capabilities = format_args!("{capabilities:#06x}"), "ZigBee firmware");
    let reset = znp.reset(cfg.reset_timeout).await?;
    debug!(?reset, "adapter reset");
    Ok(firmware)
}

/// A backup of the network on the stick at `cfg.port`, with the devices
/// in its address manager (and the tag ids the agent's saved file of the
/// same network knows). The agent must not hold the port: it is opened
/// exclusively. `None` when the stick has no network.
pub async fn backup_stick(cfg: &ZigbeeConfig) -> Result<Option<NetworkBackup>, String> {
    let counters = std::sync::Arc::new(super::ZigbeeCounters::default());
    let mut znp = super::driver::open_port(cfg, counters).await?;
    let fw = wake(&mut znp, cfg).await.map_err(|e| e.to_string())?;
    let Some(network) = nv::read_network(&mut znp, fw.stack)
        .await
        .map_err(|e| e.to_string())?
    else {
        return Ok(None);
    };
    let mut backup = NetworkBackup::from_network(&network, &fw.to_string());
    // The agent's own file of this network knows which tag is which.
    let mut devices = match NetworkBackup::load(&cfg.network_file) {
        Ok(Some(saved)) if saved.to_network().is_ok_and(|n| n.same_network(&network)) => {
            Devices::from_backup(&saved.devices)
        }
        _ => Devices::default(),
    };
    devices.update_from_stick(
        nv::read_devices(&mut znp, fw.stack, network.tclk_seed.as_ref())
            .await
            .map_err(|e| e.to_string())?,
    );
    devices.merge_into(&mut backup.devices);
    Ok(Some(backup))
}

/// Writes `backup`'s network to the stick at `cfg.port` (replacing what it
/// has) and saves it as the agent's network (`cfg.network_file`), so the
/// agent's next start resumes it. The agent must not hold the port.
pub async fn restore_stick(cfg: &ZigbeeConfig, backup: &NetworkBackup) -> Result<(), String> {
    let saved = backup.to_network()?;
    let counters = std::sync::Arc::new(super::ZigbeeCounters::default());
    let mut znp = super::driver::open_port(cfg, counters).await?;
    let fw = wake(&mut znp, cfg).await.map_err(|e| e.to_string())?;
    let devices = Devices::from_backup(&backup.devices);
    restore(&mut znp, cfg, &fw, &saved, &devices)
        .await
        .map_err(|e| e.to_string())?;
    // Keep what the backup holds beyond the network (devices, metadata).
    keep_previous(cfg);
    backup.save(&cfg.network_file).map_err(|e| e.to_string())?;
    Ok(())
}

/// The whole start-up on an open port (after the DTR/RTS toggling, which
/// needs the real serial port).
pub async fn start_up<P: AsyncRead + AsyncWrite + Unpin + Send>(
    znp: &mut Znp<P>,
    cfg: &ZigbeeConfig,
) -> Result<Started, StartError> {
    let firmware = wake(znp, cfg).await?;
    let (network, outcome) = own_network(znp, cfg, &firmware).await?;
    let devices = nv::read_devices(znp, firmware.stack, network.tclk_seed.as_ref()).await?;
    register_endpoint(znp, cfg).await?;
    // Joining is closed until an operator opens it.
    permit_join(znp, 0).await?;
    Ok(Started {
        firmware,
        network,
        outcome,
        devices,
    })
}

/// Compares the stick's network with the saved one and acts on it; the
/// coordinator runs on the agent's network when this returns `Ok`.
async fn own_network<P: AsyncRead + AsyncWrite + Unpin + Send>(
    znp: &mut Znp<P>,
    cfg: &ZigbeeConfig,
    fw: &Firmware,
) -> Result<(StickNetwork, NetworkOutcome), StartError> {
    let file = &cfg.network_file;
    let saved = NetworkBackup::load(file)?;
    let saved_net = match &saved {
        // `load` validated it.
        Some(backup) => Some(backup.to_network().map_err(StartError::Formation)?),
        None => None,
    };
    let on_stick = nv::read_network(znp, fw.stack).await?;
    let shown = file.display();
    let problem = match (&on_stick, &saved_net) {
        (None, None) => {
            info!("blank coordinator stick: forming the agent's network");
            let network = form(znp, cfg, fw, &new_network(cfg)).await?;
            save(cfg, &network, fw)?;
            return Ok((network, NetworkOutcome::Formed));
        }
        (Some(stick), Some(ours))
            if stick.same_network(ours) && ours.tc_link_key == *cfg.tc_link_key.bytes() =>
        {
            start_stored(znp, cfg, fw).await?;
            if stick.channel != ours.channel {
                info!(from = ours.channel, to = stick.channel, "the network moved to another channel; saving it");
                save(cfg, stick, fw)?;
            }
            return Ok((stick.clone(), NetworkOutcome::Resumed));
        }
        // The stick has the saved network, but the config names another
        // link key: only a new network can have it.
        (Some(stick), Some(ours)) if stick.same_network(ours) => {
            link_key_mismatch(&format!("the agent's network (saved in {shown})"))
        }
        (None, Some(_)) => format!(
            "the ZigBee stick has no network, but the agent saved one in {shown} (was the stick reset or replaced?): \
             set radio.zigbee.on_network_mismatch = \"restore\" to write the saved network to it (joined tags stay), \
             or \"form\" to form a new network (every tag must join again)"
        ),
        (Some(stick), None) => format!(
            "the ZigBee stick carries a network the agent did not form (PAN id {:#06x}, extended PAN id {:016x}) \
             and {shown} does not exist: set radio.zigbee.on_network_mismatch = \"adopt\" to make it the agent's \
             (devices joined to it stay), or \"form\" to replace it with a new network (they are lost), or restore \
             a backup to {shown}",
            stick.pan_id, stick.extended_pan_id
        ),
        (Some(stick), Some(ours)) => format!(
            "the ZigBee stick's network is not the one saved in {shown} ({}): set radio.zigbee.on_network_mismatch \
             = \"restore\" to write the saved network back (joined tags stay), \"adopt\" to take the stick's \
             network and overwrite {shown}, or \"form\" to form a new one (every tag must join again)",
            stick.differences(ours)
        ),
    };
    match (cfg.on_network_mismatch, on_stick, saved_net) {
        (NetworkMismatch::Report, _, _) => Err(StartError::Mismatch(problem)),
        (NetworkMismatch::Adopt, Some(stick), _)
            if stick.tc_link_key != *cfg.tc_link_key.bytes() =>
        {
            Err(StartError::Mismatch(format!(
                "{problem}; and on_network_mismatch = \"adopt\" does not apply: {}",
                link_key_mismatch("the stick's network")
            )))
        }
        (NetworkMismatch::Adopt, Some(stick), _) => {
            warn!(
                pan_id = format_args!("{:#06x}", stick.pan_id),
                "adopting the stick's network (on_network_mismatch = \"adopt\")"
            );
            keep_previous(cfg);
            start_stored(znp, cfg, fw).await?;
            save(cfg, &stick, fw)?;
            Ok((stick, NetworkOutcome::Adopted))
        }
        (NetworkMismatch::Restore, _, Some(ours)) => {
            warn!("writing the saved network to the stick (on_network_mismatch = \"restore\")");
            let devices = saved
                .as_ref()
                .map(|b| Devices::from_backup(&b.devices))
                .unwrap_or_default();
            let network = restore(znp, cfg, fw, &ours, &devices).await?;
            Ok((network, NetworkOutcome::Restored))
        }
        (NetworkMismatch::Form, _, _) => {
            warn!(
                "forming a new network (on_network_mismatch = \"form\"): every tag must join again"
            );
            keep_previous(cfg);
            let network = form(znp, cfg, fw, &new_network(cfg)).await?;
            save(cfg, &network, fw)?;
            Ok((network, NetworkOutcome::Formed))
        }
        (policy, _, _) => Err(StartError::Mismatch(format!(
            "{problem} (on_network_mismatch = \"{}\" does not apply here)",
            policy.name()
        ))),
    }
}

/// Why `network` cannot be the agent's under its config's link key, with
/// the remedy. Names no key.
fn link_key_mismatch(network: &str) -> String {
    format!(
        "{network} uses another trust-centre link key than radio.zigbee.tc_link_key_file names (no file: the \
         well-known default); the key is set when a network is formed: put the network's key in the file (or \
         remove the setting if it is the default), or set radio.zigbee.on_network_mismatch = \"form\" to form \
         a new network with the configured key (every tag must join again)"
    )
}

/// Saves `network` as the agent's; a saved file of the same network is
/// updated (its devices kept), another one replaced.
pub fn save(cfg: &ZigbeeConfig, network: &StickNetwork, fw: &Firmware) -> Result<(), StartError> {
    let firmware = fw.to_string();
    let backup = match NetworkBackup::load(&cfg.network_file) {
        Ok(Some(old)) if old.to_network().is_ok_and(|o| o.same_network(network)) => {
            old.updated(network, &firmware)
        }
        _ => NetworkBackup::from_network(network, &firmware),
    };
    backup.save(&cfg.network_file)?;
    info!(file = %cfg.network_file.display(), "saved the ZigBee network (Open Coordinator Backup)");
    Ok(())
}

/// Writes `devices` into the saved network's `devices` (merged by IEEE
/// address: what other hosts wrote there stays). Nothing without a saved
/// network.
pub fn save_devices(cfg: &ZigbeeConfig, devices: &Devices) -> Result<(), StartError> {
    let Some(mut backup) = NetworkBackup::load(&cfg.network_file)? else {
        return Ok(());
    };
    let before = backup.devices.clone();
    devices.merge_into(&mut backup.devices);
    if backup.devices != before {
        backup.save(&cfg.network_file)?;
    }
    Ok(())
}

/// Before the saved network is replaced: the old file stays as `….old`.
fn keep_previous(cfg: &ZigbeeConfig) {
    let old = cfg.network_file.with_extension("json.old");
    match std::fs::rename(&cfg.network_file, &old) {
        Ok(()) => warn!(file = %old.display(), "the previous saved network is kept here"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => warn!(%error, "cannot keep the previous saved network"),
    }
}

/// Parameters of a network to form.
#[derive(Clone, PartialEq, Eq)]
pub struct NewNetwork {
    pub channel_mask: u32,
    pub pan_id: u16,
    pub extended_pan_id: u64,
    pub network_key: [u8; 16],
    pub tc_link_key: TcLinkKey,
}

/// From the config, the rest random: the PAN id in 0x0001..=0xFFF6
/// (0xFFF7.. are reserved), the extended PAN id, and the network key from
/// the operating system's random source (a secret).
pub fn new_network(cfg: &ZigbeeConfig) -> NewNetwork {
    let mut rng = rand::rngs::OsRng;
    let mut network_key = [0u8; 16];
    rng.fill_bytes(&mut network_key);
    NewNetwork {
        channel_mask: nv::channel_mask(&cfg.channels),
        pan_id: cfg.pan_id.unwrap_or_else(|| rng.gen_range(0x0001..=0xFFF6)),
        extended_pan_id: cfg
            .extended_pan_id
            .unwrap_or_else(|| rng.gen_range(1..u64::MAX)),
        network_key,
        tc_link_key: cfg.tc_link_key.clone(),
    }
}

/// Why `key` cannot be the link key of a network on `fw`: Z-Stack 3 builds
/// have the global trust-centre link key compiled in, and a host cannot
/// change it (zigpy-znp `write_network_info` warns "configured at build
/// time in Z-Stack 3 and cannot be changed at runtime"; herdsman writes it
/// only on 1.2).
fn unsupported_link_key(fw: &Firmware, key: &TcLinkKey) -> Option<StartError> {
    (fw.stack != ZStack::V1_2 && !key.is_default()).then(|| {
        StartError::Formation(format!(
            "{fw} has its trust-centre link key built in (the well-known default) and a host cannot change it: \
             radio.zigbee.tc_link_key_file needs a Z-Stack Home 1.2 stick; remove the setting to use the default key"
        ))
    })
}

/// Clears the stick and forms `new` on it (herdsman `beginCommissioning`).
pub async fn form<P: AsyncRead + AsyncWrite + Unpin + Send>(
    znp: &mut Znp<P>,
    cfg: &ZigbeeConfig,
    fw: &Firmware,
    new: &NewNetwork,
) -> Result<StickNetwork, StartError> {
    // Before anything on the stick is cleared.
    if let Some(error) = unsupported_link_key(fw, &new.tc_link_key) {
        return Err(error);
    }
    nv::write(znp, nv::id::STARTUP_OPTION, &[nv::STARTUP_CLEAR_ALL]).await?;
    znp.reset(cfg.reset_timeout).await?;
    nv::write(znp, nv::id::STARTUP_OPTION, &[0]).await?;

    nv::write(znp, nv::id::LOGICAL_TYPE, &[nv::LOGICAL_COORDINATOR]).await?;
    for (item, value) in nv::SLEEPY_SETTINGS {
        nv::write(znp, item, value).await?;
    }
    let ext = new.extended_pan_id.to_le_bytes();
    nv::write(znp, nv::id::CHANLIST, &new.channel_mask.to_le_bytes()).await?;
    nv::write(znp, nv::id::PANID, &new.pan_id.to_le_bytes()).await?;
    nv::write(znp, nv::id::EXTENDED_PAN_ID, &ext).await?;
    nv::write(znp, nv::id::APS_USE_EXT_PANID, &ext).await?;
    // The key is not pre-configured in the tags: the trust centre sends it
    // to each joining tag, encrypted with the link key.
    nv::write(znp, nv::id::PRECFGKEYS_ENABLE, &[0]).await?;
    nv::write(znp, nv::id::PRECFGKEY, &new.network_key).await?;
    if fw.stack == ZStack::V1_2 {
        // The global entry of 1.2's link-key table (Z-Stack 3: built in).
        let entry = nv::global_tc_link_key_entry(new.tc_link_key.bytes());
        nv::write(znp, nv::id::TCLK_TABLE_START_12, &entry).await?;
    }

    match fw.stack {
        ZStack::V1_2 => {
            // 1.2 has no BDB: the start-up forms the network from the NV
            // items (status 1 = new network).
            startup_from_app(znp, cfg, fw.stack).await?;
        }
        ZStack::V3_0 | ZStack::V3x => {
            let mut primary = vec![1];
            primary.extend(new.channel_mask.to_le_bytes());
            expect_ok(znp, znp::APP_CNF_BDB_SET_CHANNEL, primary).await?;
            expect_ok(znp, znp::APP_CNF_BDB_SET_CHANNEL, vec![0, 0, 0, 0, 0]).await?;
            let reply = znp
                .request_within(
                    znp::APP_CNF_BDB_START_COMMISSIONING,
                    vec![BDB_FORMATION],
                    cfg.startup_timeout,
                )
                .await?;
            if reply.first() != Some(&0) {
                return Err(StartError::Formation(format!(
                    "BDB commissioning refused (status {:02X?})",
                    reply.first()
                )));
            }
        }
    }
    wait_coordinator(znp, cfg).await.map_err(|e| {
        StartError::Formation(format!(
            "{e}: most likely a network with the same PAN id or extended PAN id is nearby, or too much interference"
        ))
    })?;
    let network = settled_network(znp, cfg, fw).await?;
    if network.pan_id != new.pan_id {
        return Err(StartError::Formation(format!(
            "PAN id collision: asked for {:#06x}, the stick formed {:#06x}",
            new.pan_id, network.pan_id
        )));
    }
    let configured = match fw.stack {
        ZStack::V1_2 => nv::id::HAS_CONFIGURED_ZSTACK1,
        _ => nv::id::HAS_CONFIGURED_ZSTACK3,
    };
    nv::write(znp, configured, &[nv::CONFIGURED]).await?;
    info!(
        channel = network.channel,
        pan_id = format_args!("{:#06x}", network.pan_id),
        extended_pan_id = format_args!("{:016x}", network.extended_pan_id),
        "formed the agent's ZigBee network"
    );
    Ok(network)
}

/// Writes a saved network to the stick: forms it with the saved channel,
/// PAN ids and key, then the saved key sequence number, coordinator
/// address, (Z-Stack 3) link-key seed, the devices (address manager,
/// Z-Stack 3.x.0 only; no link keys), and the frame counter (plus
/// [`FRAME_COUNTER_MARGIN`]), and restarts (docs/ZIGBEE.md).
pub async fn restore<P: AsyncRead + AsyncWrite + Unpin + Send>(
    znp: &mut Znp<P>,
    cfg: &ZigbeeConfig,
    fw: &Firmware,
    saved: &StickNetwork,
    devices: &Devices,
) -> Result<StickNetwork, StartError> {
    let new = NewNetwork {
        channel_mask: nv::channel_mask(&[saved.channel]),
        pan_id: saved.pan_id,
        extended_pan_id: saved.extended_pan_id,
        network_key: saved.network_key,
        tc_link_key: TcLinkKey::new(saved.tc_link_key),
    };
    if new.tc_link_key != cfg.tc_link_key {
        return Err(StartError::Mismatch(link_key_mismatch(
            "the network to restore",
        )));
    }
    form(znp, cfg, fw, &new).await?;
    let mut key_info = vec![saved.key_sequence];
    key_info.extend(saved.network_key);
    if fw.stack != ZStack::V1_2 {
        nv::write(znp, nv::id::NWK_ACTIVE_KEY_INFO, &key_info).await?;
        if let Some(seed) = &saved.tclk_seed {
            nv::write(znp, nv::id::TCLK_SEED, seed).await?;
        }
    }
    if saved.coordinator_ieee != 0 {
        nv::write(znp, nv::id::EXTADDR, &saved.coordinator_ieee.to_le_bytes()).await?;
    }
    // Known devices go back in the address manager, so the new stick
    // answers its children's polls and routes to the others.
    let known: Vec<Device> = devices.iter().filter(|d| d.nwk < 0xFFF8).cloned().collect();
    let written = nv::write_devices(znp, fw.stack, &known).await?;
    if written < known.len() {
        warn!(
            written,
            devices = known.len(),
            "the stick's address manager is full: the other devices must rejoin"
        );
    } else if written > 0 {
        info!(
            devices = written,
            "restored the devices to the stick's address manager"
        );
    }
    if let Some(seed) = &saved.tclk_seed {
        let keys = nv::write_link_keys(znp, fw.stack, seed, &known).await?;
        let with_keys = known.iter().filter(|d| d.link_key.is_some()).count();
        if keys < with_keys {
            warn!(restored = keys, link_keys = with_keys,
                "link keys not derived from the seed (or beyond the table) are not restored: those devices may have to be paired again");
        } else if keys > 0 {
            info!(link_keys = keys, "restored the devices' link keys");
        }
    }
    // Joined devices drop frames whose counter is not above the last one
    // they saw: start above the saved one, with a margin for the frames
    // sent after the backup was taken.
    let counter = saved.frame_counter.saturating_add(FRAME_COUNTER_MARGIN);
    nv::write_frame_counter(znp, fw.stack, saved.extended_pan_id, counter).await?;
    znp.reset(cfg.reset_timeout).await?;
    start_stored(znp, cfg, fw).await?;
    let network = nv::read_network(znp, fw.stack).await?.ok_or_else(|| {
        StartError::Formation("the stick has no network after the restore".into())
    })?;
    if !network.same_network(saved) {
        return Err(StartError::Formation(format!(
            "the stick's network after the restore differs: {}",
            network.differences(saved)
        )));
    }
    Ok(network)
}

/// Starts the network stored on the stick, after writing the sleepy-tag
/// NV settings (a reset applies them when any changed).
async fn start_stored<P: AsyncRead + AsyncWrite + Unpin + Send>(
    znp: &mut Znp<P>,
    cfg: &ZigbeeConfig,
    fw: &Firmware,
) -> Result<(), StartError> {
    let mut changed = false;
    for (item, value) in nv::SLEEPY_SETTINGS {
        changed |= nv::write_if_changed(znp, item, value).await?;
    }
    if changed {
        info!("wrote the NV settings sleepy tags need; resetting the stick to apply them");
        znp.reset(cfg.reset_timeout).await?;
    }
    let info = znp.request(znp::UTIL_GET_DEVICE_INFO, vec![]).await?;
    // status, IEEE address (8), short address (2), device type, state.
    let state = match info.as_slice() {
        [0, _, _, _, _, _, _, _, _, _, _, _, state, ..] => *state,
        _ => {
            return Err(ZnpError::Malformed {
                name: znp::UTIL_GET_DEVICE_INFO.name,
                detail: format!("unexpected reply {info:02X?}"),
            }
            .into())
        }
    };
    if state == znp::DEV_ZB_COORD {
        return Ok(());
    }
    match startup_from_app(znp, cfg, fw.stack).await? {
        StartupStatus::Restored | StartupStatus::Starting => {}
        // On 1.2 this means the stored network was gone: not ours any more.
        StartupStatus::NewNetwork => {
            return Err(StartError::Mismatch(
                "the stick formed a new network instead of restoring its stored one".into(),
            ))
        }
    }
    wait_coordinator(znp, cfg).await?;
    Ok(())
}

/// `ZDO_STARTUP_FROM_APP` with the commissioning time-out, its status read
/// the way this firmware means it (a failure is a formation error).
async fn startup_from_app<P: AsyncRead + AsyncWrite + Unpin + Send>(
    znp: &mut Znp<P>,
    cfg: &ZigbeeConfig,
    stack: ZStack,
) -> Result<StartupStatus, StartError> {
    let reply = znp
        .request_within(
            znp::ZDO_STARTUP_FROM_APP,
            STARTUP_DELAY_MS.to_le_bytes().to_vec(),
            cfg.startup_timeout,
        )
        .await?;
    let status = reply.first().copied().unwrap_or(0xFF);
    stack.startup_status(status).map_err(StartError::Formation)
}

async fn wait_coordinator<P: AsyncRead + AsyncWrite + Unpin + Send>(
    znp: &mut Znp<P>,
    cfg: &ZigbeeConfig,
) -> Result<(), ZnpError> {
    znp.wait_areq(znp::ZDO_STATE_CHANGE_IND, cfg.startup_timeout, |p| {
        p.first() == Some(&znp::DEV_ZB_COORD)
    })
    .await
    .map(|_| ())
}

/// Reads the network until the NIB shows it formed: it settles a few
/// seconds after the "coordinator" indication on real sticks.
async fn settled_network<P: AsyncRead + AsyncWrite + Unpin + Send>(
    znp: &mut Znp<P>,
    cfg: &ZigbeeConfig,
    fw: &Firmware,
) -> Result<StickNetwork, StartError> {
    let deadline = Instant::now() + cfg.startup_timeout;
    loop {
        if let Some(network) = nv::read_network(znp, fw.stack).await? {
            return Ok(network);
        }
        if Instant::now() + SETTLE_POLL > deadline {
            return Err(StartError::Formation(format!(
                "the network did not settle within {:?}",
                cfg.startup_timeout
            )));
        }
        sleep(SETTLE_POLL).await;
    }
}

async fn expect_ok<P: AsyncRead + AsyncWrite + Unpin + Send>(
    znp: &mut Znp<P>,
    cmd: znp::Command,
    payload: Vec<u8>,
) -> Result<(), StartError> {
    let reply = znp.request(cmd, payload).await?;
    match reply.first() {
        Some(0) => Ok(()),
        other => Err(StartError::Formation(format!(
            "{} failed (status {other:02X?})",
            cmd.name
        ))),
    }
}

/// `ZDO_MGMT_PERMIT_JOIN_REQ` to the coordinator and all routers
/// (broadcast 0xFFFC, address mode 0x0F), trust-centre significance 1 (as
/// zigbee-herdsman `zStackAdapter.ts` `permitJoin` and zigpy-znp
/// `commands/zdo.py` `MgmtPermitJoinReq`).
pub async fn permit_join<P: AsyncRead + AsyncWrite + Unpin + Send>(
    znp: &mut Znp<P>,
    seconds: u8,
) -> Result<(), ZnpError> {
    let mut request = vec![ADDR_MODE_BROADCAST];
    request.extend(BROADCAST_ROUTERS.to_le_bytes());
    request.extend([seconds, 1]);
    let reply = znp.request(znp::ZDO_MGMT_PERMIT_JOIN_REQ, request).await?;
    match reply.first() {
        Some(0) => Ok(()),
        other => Err(ZnpError::Malformed {
            name: znp::ZDO_MGMT_PERMIT_JOIN_REQ.name,
            detail: format!("refused (status {other:02X?})"),
        }),
    }
}

/// Moves the running network to `channel` as zigbee-herdsman
/// (`controller.ts` `changeChannel`) and zigpy (`move_network_to_channel`)
/// do: one `ZDO_MGMT_NWK_UPDATE_REQ` broadcast to every device (0xFFFF,
/// address mode 0x0F) with the new channel's mask and scan duration 0xFE
/// (scan count and manager address 0: Z-Stack increments the network's
/// update id itself), which the coordinator acts on too after the
/// broadcast delivery time; then the NIB is read until it shows the new
/// channel (within `startup_timeout`, as zigpy waits for it). Devices that
/// did not hear the broadcast (a sleepy tag whose parent dropped the
/// frame before its next poll) stay on the old channel until they rejoin.
/// Returns the stick's NIB then (the caller saves the whole network).
pub async fn change_channel<P: AsyncRead + AsyncWrite + Unpin + Send>(
    znp: &mut Znp<P>,
    cfg: &ZigbeeConfig,
    channel: u8,
) -> Result<nv::Nib, ZnpError> {
    let name = znp::ZDO_MGMT_NWK_UPDATE_REQ.name;
    let failed = |detail: String| ZnpError::Malformed { name, detail };
    let mut request = BROADCAST_ALL.to_le_bytes().to_vec();
    request.push(ADDR_MODE_BROADCAST);
    request.extend(nv::channel_mask(&[channel]).to_le_bytes());
    request.extend([NWK_UPDATE_CHANGE_CHANNEL, 0, 0, 0]);
    let reply = znp.request(znp::ZDO_MGMT_NWK_UPDATE_REQ, request).await?;
    if reply.first() != Some(&0) {
        return Err(failed(format!("refused (status {:02X?})", reply.first())));
    }
    let deadline = Instant::now() + cfg.startup_timeout;
    // Only the NIB tells the channel: one read per poll (the caller then
    // saves the whole network once).
    loop {
        let nib = nv::read(znp, nv::id::NIB).await?;
        match nib.as_deref().and_then(nv::Nib::parse) {
            Some(nib) if nib.is_formed() && nib.channel == channel => return Ok(nib),
            Some(nib) if nib.is_formed() => {}
            _ => return Err(failed("the stick has no network any more".into())),
        }
        if Instant::now() + SETTLE_POLL > deadline {
            return Err(failed(format!(
                "the coordinator did not move to channel {channel} within {:?}",
                cfg.startup_timeout
            )));
        }
        sleep(SETTLE_POLL).await;
    }
}

async fn register_endpoint<P: AsyncRead + AsyncWrite + Unpin + Send>(
    znp: &mut Znp<P>,
    cfg: &ZigbeeConfig,
) -> Result<(), StartError> {
    let cluster = ESL_CLUSTER.to_le_bytes();
    let mut register = vec![cfg.endpoint];
    register.extend(ESL_PROFILE.to_le_bytes());
    register.extend(ESL_DEVICE_ID.to_le_bytes());
    // Device version, latency (none), one input and one output cluster.
    register.extend([0, 0, 1, cluster[0], cluster[1], 1, cluster[0], cluster[1]]);
    let reply = znp.request(znp::AF_REGISTER, register).await?;
    match reply.first() {
        Some(0) | Some(&ZAPS_DUPLICATE_ENTRY) => Ok(()),
        other => Err(ZnpError::Malformed {
            name: znp::AF_REGISTER.name,
            detail: format!(
                "endpoint {} not registered (status {other:02X?})",
                cfg.endpoint
            ),
        }
        .into()),
    }
}
