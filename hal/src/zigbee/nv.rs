//! The coordinator's non-volatile (OSAL NV) memory: item ids, reading and
//! writing items over ZNP, and the network the stick has stored
//! ([`StickNetwork`], from its NIB and active-key items).
//!
//! Owns: NV item ids and layouts. Must not: decide what to do with a
//! network (`commission` does) or log key material (a network key is only
//! ever compared, written, or saved by `backup` in a 0600 file).
//!
//! Item ids checked against zigpy-znp `types/nvids.py` (`OsalNvIds`) and
//! zigbee-herdsman `adapter/z-stack/constants/common.ts` (`NvItemsIds`);
//! the NIB layout against herdsman `structs/entries/nib.ts` and zigpy-znp
//! `types/structs.py` (`NIB`: 110 bytes packed on 8-bit CC253x, 116 bytes
//! with natural alignment on 32-bit CC2538/CC26x2); the key descriptor
//! against herdsman `nwk-key-descriptor.ts` (sequence number, 16-byte key).

use tokio::io::{AsyncRead, AsyncWrite};

use super::devices::{self, Device, LinkKey};
use super::firmware::ZStack;
use super::znp::{self, Znp, ZnpError};

/// OSAL NV item ids this backend reads or writes.
pub mod id {
    pub const EXTADDR: u16 = 0x0001;
    /// Z-Stack 1.2 and 3.0.x: the address manager, the whole table in one
    /// item (zigpy-znp `OsalNvIds.ADDRMGR`).
    pub const ADDRMGR: u16 = 0x0023;
    /// Bit 0: clear configuration, bit 1: clear network state, at the next
    /// reset (zigpy-znp `StartupOptions`).
    pub const STARTUP_OPTION: u16 = 0x0003;
    pub const NIB: u16 = 0x0021;
    pub const EXTENDED_PAN_ID: u16 = 0x002D;
    pub const CONCENTRATOR_ENABLE: u16 = 0x0032;
    pub const CONCENTRATOR_DISCOVERY: u16 = 0x0033;
    pub const CONCENTRATOR_RC: u16 = 0x0036;
    pub const SRC_RTG_EXPIRY_TIME: u16 = 0x0038;
    pub const NWK_ACTIVE_KEY_INFO: u16 = 0x003A;
    pub const NWK_CHILD_AGE_ENABLE: u16 = 0x003E;
    pub const APS_USE_EXT_PANID: u16 = 0x0047;
    pub const BDBNODEISONANETWORK: u16 = 0x0055;
    pub const HAS_CONFIGURED_ZSTACK3: u16 = 0x0060;
    pub const PRECFGKEY: u16 = 0x0062;
    pub const PRECFGKEYS_ENABLE: u16 = 0x0063;
    pub const PANID: u16 = 0x0083;
    pub const CHANLIST: u16 = 0x0084;
    pub const LOGICAL_TYPE: u16 = 0x0087;
    pub const ZDO_DIRECT_CB: u16 = 0x008F;
    /// Z-Stack 3: seed of the per-device trust-centre link keys.
    pub const TCLK_SEED: u16 = 0x0101;
    /// Z-Stack 1.2: the same id is the first entry of its trust-centre
    /// link-key table, the global key (zigpy-znp "TCLK_SEED is
    /// TCLK_TABLE_START in Z-Stack 1"; herdsman `LEGACY_TCLK_TABLE_START_12`).
    pub const TCLK_TABLE_START_12: u16 = 0x0101;
    pub const HAS_CONFIGURED_ZSTACK1: u16 = 0x0F00;
    /// Z-Stack 3.0.x: network security material (frame counter and
    /// extended PAN id), one entry per item from here…
    pub const LEGACY_NWK_SEC_MATERIAL_TABLE_START: u16 = 0x0075;
    /// …to here.
    pub const LEGACY_NWK_SEC_MATERIAL_TABLE_END: u16 = 0x0080;
    /// Z-Stack 1.2: the active key and its frame counter.
    pub const NWKKEY: u16 = 0x0082;
    /// Z-Stack 3.30+ (extended NV, system ZSTACK): the security material
    /// table, one entry per sub id (zigpy-znp `ExNvIds`).
    pub const EX_NWK_SEC_MATERIAL_TABLE: u16 = 0x0007;
    /// Z-Stack 3.30+ (extended NV): the address manager, one device per
    /// sub id (zigpy-znp `ExNvIds.ADDRMGR`).
    pub const EX_ADDRMGR: u16 = 0x0001;
    /// Z-Stack 3.30+ (extended NV): the hashed trust-centre link keys, one
    /// device per sub id (zigpy-znp `ExNvIds.TCLK_TABLE`).
    pub const EX_TCLK_TABLE: u16 = 0x0004;
    /// Z-Stack 3.0.x: the same table, one device per OSAL item from here…
    pub const LEGACY_TCLK_TABLE_START: u16 = 0x0111;
    /// …to here.
    pub const LEGACY_TCLK_TABLE_END: u16 = 0x01FF;
}

/// An address-manager entry with natural alignment (CC2538/CC26x2): user
/// type (1), padding (1), network address (2), IEEE address (8)
/// (zigpy-znp `AddrMgrEntry`, `align_structs`); packed (CC253x) it is one
/// byte shorter, without the padding.
pub const ADDRMGR_ENTRY_LEN: usize = 12;
pub const ADDRMGR_ENTRY_LEN_PACKED: usize = 11;
/// A hashed-link-key entry (zigpy-znp `TCLKDevEntry`): transmit and
/// receive frame counters (4 each), IEEE address (8), key attributes, key
/// type, seed shift (1 each); padded to 20 bytes when aligned.
pub const TCLK_ENTRY_LEN: usize = 20;
pub const TCLK_ENTRY_LEN_PACKED: usize = 19;
/// `keyAttributes` of a unique key the coordinator verified, as zigpy-znp
/// writes restored keys.
const KEY_VERIFIED: u8 = 0x02;
/// Added to a restored link key's transmit counter, as zigpy-znp does
/// (`write_devices`, `counter_increment`).
pub const LINK_COUNTER_MARGIN: u32 = 2_500;
/// Bytes of an item `SYS_OSAL_NV_WRITE_EXT` writes at once (zigpy-znp
/// `osal_write`).
const NV_WRITE_CHUNK: usize = 244;
/// Address-manager entries read at most (the firmware's table has a fixed
/// size, tens of entries; an uninitialised sub id ends it sooner).
const ADDRMGR_MAX: u16 = 512;
/// Address-manager user types: a child associated with the coordinator,
/// and a device the trust centre holds keys for (zigpy-znp
/// `AddrMgrUserType`).
pub const ADDRMGR_ASSOC: u8 = 0x01;
pub const ADDRMGR_SECURITY: u8 = 0x02;

/// Extended NV system id of Z-Stack's items (zigpy-znp `NvSysIds.ZSTACK`).
pub const NV_SYS_ZSTACK: u8 = 1;
/// A security-material entry: frame counter (4), extended PAN id (8).
const SEC_MATERIAL_LEN: usize = 12;
/// Entries of the 3.30+ security-material table read at most (zigpy-znp
/// calls the tables "quite small (4 values)").
const SEC_MATERIAL_MAX: u16 = 16;
/// Offset of the frame counter in Z-Stack 1.2's `NWKKEY` item: after the
/// active key descriptor (sequence number, 16-byte key).
const NWKKEY_COUNTER_AT: usize = 17;

/// Z-Stack 1.2's trust-centre link-key entry (zigpy-znp `TCLinkKey`):
/// partner IEEE address (8; all ones: the global key), key (16), transmit
/// and receive frame counters (4 each).
pub const TCLK_ENTRY_12_LEN: usize = 32;

/// Z-Stack 1.2's global trust-centre link-key entry holding `key`, as
/// zigpy-znp (`write_network_info`) and herdsman
/// (`updateCommissioningNvItems`) write it, counters zero.
pub fn global_tc_link_key_entry(key: &[u8; 16]) -> Vec<u8> {
    let mut entry = u64::MAX.to_le_bytes().to_vec();
    entry.extend(key);
    entry.extend([0; 8]);
    entry
}

/// The key of a global entry; `None` for another layout or a per-device
/// entry.
pub fn parse_global_tc_link_key(entry: &[u8]) -> Option<[u8; 16]> {
    if entry.len() < 24 || entry[..8] != [0xFF; 8] {
        return None;
    }
    entry[8..24].try_into().ok()
}

/// Value both hosts write to the "has configured" item after forming.
pub const CONFIGURED: u8 = 0x55;
/// `STARTUP_OPTION`: clear configuration and network state.
pub const STARTUP_CLEAR_ALL: u8 = 0x03;
/// `LOGICAL_TYPE` of a coordinator.
pub const LOGICAL_COORDINATOR: u8 = 0x00;
/// NV status: the item does not exist (yet), or was just created by
/// `SYS_OSAL_NV_ITEM_INIT`.
const NV_ITEM_UNINIT: u8 = 0x09;
const NV_OPER_FAILED: u8 = 0x0A;

/// NV settings a network of sleepy tags needs, written at every start when
/// they differ (the values zigpy-znp writes in `_write_stack_settings`).
/// docs/ZIGBEE.md ("NV settings") says why each.
pub const SLEEPY_SETTINGS: [(u16, &[u8]); 6] = [
    // Child aging off: Z-Stack 3 forgets an end device that has not polled
    // within its timeout; a tag asleep longer would be dropped and must
    // rejoin.
    (id::NWK_CHILD_AGE_ENABLE, &[0]),
    // The coordinator is a concentrator (many-to-one routes) and keeps a
    // route cache, so replies to tags behind routers use source routes.
    (id::CONCENTRATOR_ENABLE, &[1]),
    (id::CONCENTRATOR_DISCOVERY, &[120]),
    (id::CONCENTRATOR_RC, &[1]),
    (id::SRC_RTG_EXPIRY_TIME, &[255]),
    // ZDO messages (device announces, permit-join) come to the host.
    (id::ZDO_DIRECT_CB, &[1]),
];

/// Reads item `item`; `None` when the stick does not have it.
pub async fn read<P: AsyncRead + AsyncWrite + Unpin + Send>(
    znp: &mut Znp<P>,
    item: u16,
) -> Result<Option<Vec<u8>>, ZnpError> {
    let mut request = item.to_le_bytes().to_vec();
    request.push(0);
    let reply = znp.request(znp::SYS_OSAL_NV_READ, request).await?;
    match reply.as_slice() {
        [0, len, value @ ..] if value.len() >= usize::from(*len) => {
            Ok(Some(value[..usize::from(*len)].to_vec()))
        }
        [0, ..] => Err(ZnpError::Malformed {
            name: znp::SYS_OSAL_NV_READ.name,
            detail: format!("item {item:#06x}: value shorter than its length"),
        }),
        [_status, ..] => Ok(None),
        [] => Err(ZnpError::Malformed {
            name: znp::SYS_OSAL_NV_READ.name,
            detail: "empty reply".into(),
        }),
    }
}

/// Writes item `item`, creating it first when the stick does not have it.
pub async fn write<P: AsyncRead + AsyncWrite + Unpin + Send>(
    znp: &mut Znp<P>,
    item: u16,
    value: &[u8],
) -> Result<(), ZnpError> {
    // Values here are short (at most a 116-byte NIB).
    let len = value.len() as u8;
    let mut request = item.to_le_bytes().to_vec();
    request.extend([0, len]);
    request.extend(value);
    let reply = znp.request(znp::SYS_OSAL_NV_WRITE, request).await?;
    match reply.first() {
        Some(0) => return Ok(()),
        Some(&NV_ITEM_UNINIT) | Some(&NV_OPER_FAILED) => {}
        other => return Err(nv_failed(znp::SYS_OSAL_NV_WRITE.name, item, other)),
    }
    let mut init = item.to_le_bytes().to_vec();
    init.extend((value.len() as u16).to_le_bytes());
    init.push(len);
    init.extend(value);
    let reply = znp.request(znp::SYS_OSAL_NV_ITEM_INIT, init).await?;
    match reply.first() {
        // 0: it existed (then the write above failed for another reason);
        // 9: created with the value.
        Some(&NV_ITEM_UNINIT) => Ok(()),
        other => Err(nv_failed(znp::SYS_OSAL_NV_ITEM_INIT.name, item, other)),
    }
}

/// Writes `value` unless the item holds it already; whether it wrote.
pub async fn write_if_changed<P: AsyncRead + AsyncWrite + Unpin + Send>(
    znp: &mut Znp<P>,
    item: u16,
    value: &[u8],
) -> Result<bool, ZnpError> {
    if read(znp, item).await?.as_deref() == Some(value) {
        return Ok(false);
    }
    write(znp, item, value).await?;
    Ok(true)
}

fn nv_failed(name: &'static str, item: u16, status: Option<&u8>) -> ZnpError {
    ZnpError::Malformed {
        name,
        detail: format!("NV item {item:#06x}: status {status:02X?}"),
    }
}

/// The network a stick has stored: what a later start compares with the
/// saved one, and what a backup holds.
#[derive(Clone, PartialEq, Eq)]
pub struct StickNetwork {
    pub channel: u8,
    /// Bit `n` set: channel `n` allowed (11..=26).
    pub channel_mask: u32,
    pub pan_id: u16,
    pub extended_pan_id: u64,
    pub nwk_update_id: u8,
    pub security_level: u8,
    pub network_key: [u8; 16],
    pub key_sequence: u8,
    pub coordinator_ieee: u64,
    /// Z-Stack 3 only.
    pub tclk_seed: Option<[u8; 16]>,
    /// The global trust-centre link key: Z-Stack 1.2 keeps it in NV
    /// ([`id::TCLK_TABLE_START_12`]); Z-Stack 3 has it compiled in, so
    /// this is the well-known default there (as zigpy-znp reads it).
    pub tc_link_key: [u8; 16],
    /// The coordinator's outgoing network frame counter; 0 when unknown.
    pub frame_counter: u32,
}

/// Never prints the key.
impl std::fmt::Debug for StickNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StickNetwork")
            .field("channel", &self.channel)
            .field("pan_id", &format_args!("{:#06x}", self.pan_id))
            .field(
                "extended_pan_id",
                &format_args!("{:016x}", self.extended_pan_id),
            )
            .field("network_key", &"<secret>")
            .finish_non_exhaustive()
    }
}

impl StickNetwork {
    /// Whether `other` is the same network (PAN id, extended PAN id,
    /// network key and trust-centre link key: a tag joins either both or
    /// neither, as zigpy's `is_compatible_with` compares). The channel may
    /// change on a live network (herdsman compares it no more either); it
    /// is followed, not compared.
    pub fn same_network(&self, other: &StickNetwork) -> bool {
        self.pan_id == other.pan_id
            && self.extended_pan_id == other.extended_pan_id
            && self.network_key == other.network_key
            && self.tc_link_key == other.tc_link_key
    }

    /// The differences to `other`, for the reason of a mismatch; keys are
    /// named, never shown.
    pub fn differences(&self, other: &StickNetwork) -> String {
        let mut out = Vec::new();
        if self.pan_id != other.pan_id {
            out.push(format!(
                "PAN id {:#06x} vs {:#06x}",
                self.pan_id, other.pan_id
            ));
        }
        if self.extended_pan_id != other.extended_pan_id {
            out.push(format!(
                "extended PAN id {:016x} vs {:016x}",
                self.extended_pan_id, other.extended_pan_id
            ));
        }
        if self.network_key != other.network_key {
            out.push("network key differs".to_owned());
        }
        if self.tc_link_key != other.tc_link_key {
            out.push("trust-centre link key differs".to_owned());
        }
        out.join(", ")
    }
}

/// The NIB fields this backend uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nib {
    pub security_level: u8,
    pub channel: u8,
    pub pan_id: u16,
    pub channel_list: u32,
    pub extended_pan_id: u64,
    pub key_loaded: bool,
    pub update_id: u8,
}

/// Offsets of the NIB fields in the packed and the aligned layout.
struct NibLayout {
    len: usize,
    channel: usize,
    pan_id: usize,
    channel_list: usize,
    extended_pan_id: usize,
    key_loaded: usize,
    update_id: usize,
}

/// CC2530/CC2531 (8051): no padding.
const NIB_PACKED: NibLayout = NibLayout {
    len: 110,
    channel: 22,
    pan_id: 33,
    channel_list: 36,
    extended_pan_id: 53,
    key_loaded: 61,
    update_id: 109,
};
/// CC2538/CC26x2 (ARM): 16-bit fields at even, 32-bit at 4-aligned offsets.
const NIB_ALIGNED: NibLayout = NibLayout {
    len: 116,
    channel: 24,
    pan_id: 36,
    channel_list: 40,
    extended_pan_id: 57,
    key_loaded: 65,
    update_id: 114,
};
/// `SecurityLevel` is byte 12 in both layouts.
const NIB_SECURITY_LEVEL: usize = 12;

impl Nib {
    /// Parses either layout, told apart by length.
    pub fn parse(bytes: &[u8]) -> Option<Nib> {
        let layout = match bytes.len() {
            n if n == NIB_PACKED.len => &NIB_PACKED,
            n if n == NIB_ALIGNED.len => &NIB_ALIGNED,
            _ => return None,
        };
        let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        let mut ext = [0u8; 8];
        ext.copy_from_slice(&bytes[layout.extended_pan_id..layout.extended_pan_id + 8]);
        let mut list = [0u8; 4];
        list.copy_from_slice(&bytes[layout.channel_list..layout.channel_list + 4]);
        Some(Nib {
            security_level: bytes[NIB_SECURITY_LEVEL],
            channel: bytes[layout.channel],
            pan_id: u16_at(layout.pan_id),
            channel_list: u32::from_le_bytes(list),
            extended_pan_id: u64::from_le_bytes(ext),
            key_loaded: bytes[layout.key_loaded] != 0,
            update_id: bytes[layout.update_id],
        })
    }

    /// A NIB in the layout `aligned` picks, zero but for these fields (the
    /// fake's; a real stick fills the rest).
    pub fn encode(&self, aligned: bool) -> Vec<u8> {
        let layout = if aligned { &NIB_ALIGNED } else { &NIB_PACKED };
        let mut out = vec![0u8; layout.len];
        out[NIB_SECURITY_LEVEL] = self.security_level;
        out[layout.channel] = self.channel;
        out[layout.pan_id..layout.pan_id + 2].copy_from_slice(&self.pan_id.to_le_bytes());
        out[layout.channel_list..layout.channel_list + 4]
            .copy_from_slice(&self.channel_list.to_le_bytes());
        out[layout.extended_pan_id..layout.extended_pan_id + 8]
            .copy_from_slice(&self.extended_pan_id.to_le_bytes());
        out[layout.key_loaded] = u8::from(self.key_loaded);
        out[layout.update_id] = self.update_id;
        out
    }

    /// Formed and settled (zigpy-znp and herdsman wait for both).
    pub fn is_formed(&self) -> bool {
        self.channel != 0 && self.pan_id != 0xFFFE && self.pan_id != 0xFFFF && self.key_loaded
    }
}

/// The network stored on the stick, or `None` when it has none (blank or
/// factory-reset). Z-Stack 3 also needs `BDBNODEISONANETWORK` = 1
/// (zigpy-znp `_load_network_info`).
pub async fn read_network<P: AsyncRead + AsyncWrite + Unpin + Send>(
    znp: &mut Znp<P>,
    stack: ZStack,
) -> Result<Option<StickNetwork>, ZnpError> {
    let Some(nib) = read(znp, id::NIB).await?.as_deref().and_then(Nib::parse) else {
        return Ok(None);
    };
    if !nib.is_formed() {
        return Ok(None);
    }
    if stack != ZStack::V1_2 && read(znp, id::BDBNODEISONANETWORK).await?.as_deref() != Some(&[1]) {
        return Ok(None);
    }
    let key = read(znp, id::NWK_ACTIVE_KEY_INFO).await?;
    let (key_sequence, network_key) = match key.as_deref() {
        Some([seq, key @ ..]) if key.len() >= 16 => {
            let mut k = [0u8; 16];
            k.copy_from_slice(&key[..16]);
            (*seq, k)
        }
        // Z-Stack 1.2 keeps no active-key item: the pre-configured key is
        // the network key (herdsman `determineStrategy`).
        _ => match read(znp, id::PRECFGKEY).await?.as_deref() {
            Some(key) if key.len() >= 16 => {
                let mut k = [0u8; 16];
                k.copy_from_slice(&key[..16]);
                (0, k)
            }
            _ => {
                return Err(ZnpError::Malformed {
                    name: znp::SYS_OSAL_NV_READ.name,
                    detail: "the stick has a network but no readable network key".into(),
                })
            }
        },
    };
    let ieee = match read(znp, id::EXTADDR).await?.as_deref() {
        Some(bytes) if bytes.len() == 8 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(bytes);
            u64::from_le_bytes(b)
        }
        _ => 0,
    };
    let tclk_seed = match stack {
        ZStack::V1_2 => None,
        _ => read(znp, id::TCLK_SEED)
            .await?
            .and_then(|seed| <[u8; 16]>::try_from(seed.get(..16)?).ok()),
    };
    let tc_link_key = match stack {
        // A 1.2 stick without the entry uses its compiled-in default.
        ZStack::V1_2 => read(znp, id::TCLK_TABLE_START_12)
            .await?
            .as_deref()
            .and_then(parse_global_tc_link_key)
            .unwrap_or(*super::TcLinkKey::DEFAULT.bytes()),
        ZStack::V3_0 | ZStack::V3x => *super::TcLinkKey::DEFAULT.bytes(),
    };
    let frame_counter = read_frame_counter(znp, stack, nib.extended_pan_id)
        .await?
        .unwrap_or(0);
    Ok(Some(StickNetwork {
        tc_link_key,
        frame_counter,
        channel: nib.channel,
        channel_mask: nib.channel_list,
        pan_id: nib.pan_id,
        extended_pan_id: nib.extended_pan_id,
        nwk_update_id: nib.update_id,
        security_level: nib.security_level,
        network_key,
        key_sequence,
        coordinator_ieee: ieee,
        tclk_seed,
    }))
}

/// Where the network frame counter lives.
enum CounterAt {
    /// An OSAL item, at this offset.
    Osal { item: u16, offset: u8 },
    /// An extended-NV security-material entry (offset 0).
    Ex { sub: u16 },
}

/// Finds the frame counter of the network `ext_pan_id` (or the global
/// entry, extended PAN id all ones), as zigpy-znp `znp/security.py`
/// `read_nwk_frame_counter` does.
async fn find_counter<P: AsyncRead + AsyncWrite + Unpin + Send>(
    znp: &mut Znp<P>,
    stack: ZStack,
    ext_pan_id: u64,
) -> Result<Option<(CounterAt, u32)>, ZnpError> {
    let counter_of = |entry: &[u8]| -> Option<(u32, u64)> {
        let counter = u32::from_le_bytes(entry.get(..4)?.try_into().ok()?);
        let ext = u64::from_le_bytes(entry.get(4..12)?.try_into().ok()?);
        Some((counter, ext))
    };
    let mut global = None;
    match stack {
        ZStack::V1_2 => {
            let at = NWKKEY_COUNTER_AT;
            let found = read(znp, id::NWKKEY)
                .await?
                .and_then(|item| Some(u32::from_le_bytes(item.get(at..at + 4)?.try_into().ok()?)));
            return Ok(found.map(|counter| {
                (
                    CounterAt::Osal {
                        item: id::NWKKEY,
                        offset: at as u8,
                    },
                    counter,
                )
            }));
        }
        ZStack::V3_0 => {
            for item in
                id::LEGACY_NWK_SEC_MATERIAL_TABLE_START..=id::LEGACY_NWK_SEC_MATERIAL_TABLE_END
            {
                let Some(entry) = read(znp, item).await? else {
                    break;
                };
                match counter_of(&entry) {
                    Some((counter, ext)) if ext == ext_pan_id => {
                        return Ok(Some((CounterAt::Osal { item, offset: 0 }, counter)))
                    }
                    Some((counter, u64::MAX)) => {
                        global = Some((CounterAt::Osal { item, offset: 0 }, counter))
                    }
                    _ => {}
                }
            }
        }
        ZStack::V3x => {
            for sub in 0..SEC_MATERIAL_MAX {
                let Some(entry) =
                    ex_read(znp, id::EX_NWK_SEC_MATERIAL_TABLE, sub, SEC_MATERIAL_LEN).await?
                else {
                    break;
                };
                match counter_of(&entry) {
                    Some((counter, ext)) if ext == ext_pan_id => {
                        return Ok(Some((CounterAt::Ex { sub }, counter)))
                    }
                    Some((counter, u64::MAX)) => global = Some((CounterAt::Ex { sub }, counter)),
                    _ => {}
                }
            }
        }
    }
    Ok(global)
}

/// The network frame counter of `ext_pan_id`; `None` when the stick has no
/// entry for it.
pub async fn read_frame_counter<P: AsyncRead + AsyncWrite + Unpin + Send>(
    znp: &mut Znp<P>,
    stack: ZStack,
    ext_pan_id: u64,
) -> Result<Option<u32>, ZnpError> {
    Ok(find_counter(znp, stack, ext_pan_id)
        .await?
        .map(|(_, counter)| counter))
}

/// Sets the network frame counter of `ext_pan_id` (which must be the
/// stick's network: the entry exists once it is formed).
pub async fn write_frame_counter<P: AsyncRead + AsyncWrite + Unpin + Send>(
    znp: &mut Znp<P>,
    stack: ZStack,
    ext_pan_id: u64,
    counter: u32,
) -> Result<(), ZnpError> {
    let Some((at, _)) = find_counter(znp, stack, ext_pan_id).await? else {
        return Err(ZnpError::Malformed {
            name: znp::SYS_OSAL_NV_WRITE.name,
            detail: "no security material for the network: cannot set its frame counter".into(),
        });
    };
    let value = counter.to_le_bytes();
    match at {
        CounterAt::Osal { item, offset } => {
            let mut request = item.to_le_bytes().to_vec();
            request.extend([offset, value.len() as u8]);
            request.extend(value);
            let reply = znp.request(znp::SYS_OSAL_NV_WRITE, request).await?;
            match reply.first() {
                Some(0) => Ok(()),
                other => Err(nv_failed(znp::SYS_OSAL_NV_WRITE.name, item, other)),
            }
        }
        CounterAt::Ex { sub } => {
            match ex_write(znp, id::EX_NWK_SEC_MATERIAL_TABLE, sub, &value).await? {
                0 => Ok(()),
                other => Err(nv_failed(
                    znp::SYS_NV_WRITE.name,
                    id::EX_NWK_SEC_MATERIAL_TABLE,
                    Some(&other),
                )),
            }
        }
    }
}

/// Writes an existing extended-NV entry from its start; the NV status.
async fn ex_write<P: AsyncRead + AsyncWrite + Unpin + Send>(
    znp: &mut Znp<P>,
    item: u16,
    sub: u16,
    value: &[u8],
) -> Result<u8, ZnpError> {
    let mut request = vec![NV_SYS_ZSTACK];
    request.extend(item.to_le_bytes());
    request.extend(sub.to_le_bytes());
    request.extend(0u16.to_le_bytes());
    // Entries here are 12 or 4 bytes.
    request.push(value.len() as u8);
    request.extend(value);
    let reply = znp.request(znp::SYS_NV_WRITE, request).await?;
    reply.first().copied().ok_or_else(|| ZnpError::Malformed {
        name: znp::SYS_NV_WRITE.name,
        detail: "empty reply".into(),
    })
}

/// Reads a whole OSAL item of any length (`SYS_OSAL_NV_LENGTH`, then
/// `SYS_OSAL_NV_READ_EXT` from each offset, as zigpy-znp `osal_read`);
/// `None` when the stick does not have it.
pub async fn read_long<P: AsyncRead + AsyncWrite + Unpin + Send>(
    znp: &mut Znp<P>,
    item: u16,
) -> Result<Option<Vec<u8>>, ZnpError> {
    let reply = znp
        .request(znp::SYS_OSAL_NV_LENGTH, item.to_le_bytes().to_vec())
        .await?;
    let len = match reply.as_slice() {
        [lo, hi, ..] => usize::from(u16::from_le_bytes([*lo, *hi])),
        _ => 0,
    };
    if len == 0 {
        return Ok(None);
    }
    let mut value = Vec::with_capacity(len);
    while value.len() < len {
        let mut request = item.to_le_bytes().to_vec();
        // `len` came as a u16.
        request.extend((value.len() as u16).to_le_bytes());
        let reply = znp.request(znp::SYS_OSAL_NV_READ_EXT, request).await?;
        match reply.as_slice() {
            [0, n, chunk @ ..] if *n > 0 && chunk.len() >= usize::from(*n) => {
                value.extend(&chunk[..usize::from(*n)]);
            }
            other => {
                return Err(nv_failed(
                    znp::SYS_OSAL_NV_READ_EXT.name,
                    item,
                    other.first(),
                ))
            }
        }
    }
    value.truncate(len);
    Ok(Some(value))
}

/// Overwrites an existing OSAL item of the same length, in chunks
/// (`SYS_OSAL_NV_WRITE_EXT`).
pub async fn write_long<P: AsyncRead + AsyncWrite + Unpin + Send>(
    znp: &mut Znp<P>,
    item: u16,
    value: &[u8],
) -> Result<(), ZnpError> {
    for (i, chunk) in value.chunks(NV_WRITE_CHUNK).enumerate() {
        let mut request = item.to_le_bytes().to_vec();
        // Items are far shorter than 64 KiB.
        request.extend(((i * NV_WRITE_CHUNK) as u16).to_le_bytes());
        request.extend((chunk.len() as u16).to_le_bytes());
        request.extend(chunk);
        let reply = znp.request(znp::SYS_OSAL_NV_WRITE_EXT, request).await?;
        if reply.first() != Some(&0) {
            return Err(nv_failed(
                znp::SYS_OSAL_NV_WRITE_EXT.name,
                item,
                reply.first(),
            ));
        }
    }
    Ok(())
}

/// Whether the stick lays out structs with natural alignment (32-bit
/// CC2538/CC26x2) rather than packed (8-bit CC253x): told by its NIB's
/// length, as zigpy-znp `determine_alignment` does.
async fn aligned_structs<P: AsyncRead + AsyncWrite + Unpin + Send>(
    znp: &mut Znp<P>,
) -> Result<bool, ZnpError> {
    Ok(read(znp, id::NIB)
        .await?
        .is_some_and(|nib| nib.len() == NIB_ALIGNED.len))
}

/// The devices in the stick's address manager (children of the
/// coordinator, and devices the trust centre knows) with their hashed link
/// keys when the trust centre's `seed` is known, as zigpy-znp
/// `read_devices` reads them. Keys of devices the address manager does not
/// list are dropped, as there.
pub async fn read_devices<P: AsyncRead + AsyncWrite + Unpin + Send>(
    znp: &mut Znp<P>,
    stack: ZStack,
    seed: Option<&[u8; 16]>,
) -> Result<Vec<Device>, ZnpError> {
    let mut devices = read_addrmgr(znp, stack).await?;
    if let Some(seed) = seed {
        for (ieee, key) in read_link_keys(znp, stack, seed).await? {
            if let Some(device) = devices.iter_mut().find(|d| d.ieee == ieee) {
                device.link_key = Some(key);
            }
        }
    }
    Ok(devices)
}

/// The address manager: Z-Stack 3.x.0 one extended-NV entry per device,
/// older firmware one OSAL item holding the table.
async fn read_addrmgr<P: AsyncRead + AsyncWrite + Unpin + Send>(
    znp: &mut Znp<P>,
    stack: ZStack,
) -> Result<Vec<Device>, ZnpError> {
    let mut devices = Vec::new();
    if stack != ZStack::V3x {
        let aligned = aligned_structs(znp).await?;
        let len = entry_len(aligned);
        if let Some(table) = read_long(znp, id::ADDRMGR).await? {
            devices.extend(
                table
                    .chunks_exact(len)
                    .filter_map(|e| parse_addrmgr_entry(e, aligned)),
            );
        }
        return Ok(devices);
    }
    for sub in 0..ADDRMGR_MAX {
        let Some(entry) = ex_read(znp, id::EX_ADDRMGR, sub, ADDRMGR_ENTRY_LEN).await? else {
            break;
        };
        devices.extend(parse_addrmgr_entry(&entry, true));
    }
    Ok(devices)
}

/// The hashed link keys in the stick's TCLK table, derived from `seed`
/// (zigpy-znp `read_hashed_link_keys`): Z-Stack 3.x.0 extended NV, 3.0.x
/// one OSAL item per entry; Z-Stack 1.2 keeps none (its unhashed APS keys
/// are not read).
pub async fn read_link_keys<P: AsyncRead + AsyncWrite + Unpin + Send>(
    znp: &mut Znp<P>,
    stack: ZStack,
    seed: &[u8; 16],
) -> Result<Vec<(u64, LinkKey)>, ZnpError> {
    let mut entries: Vec<Vec<u8>> = Vec::new();
    match stack {
        ZStack::V1_2 => return Ok(Vec::new()),
        ZStack::V3x => {
            for sub in 0..ADDRMGR_MAX {
                let Some(entry) = ex_read(znp, id::EX_TCLK_TABLE, sub, TCLK_ENTRY_LEN).await?
                else {
                    break;
                };
                entries.push(entry);
            }
        }
        ZStack::V3_0 => {
            for item in id::LEGACY_TCLK_TABLE_START..=id::LEGACY_TCLK_TABLE_END {
                let Some(entry) = read(znp, item).await? else {
                    break;
                };
                entries.push(entry);
            }
        }
    }
    Ok(entries
        .iter()
        .filter_map(|e| parse_tclk_entry(e, seed))
        .collect())
}

/// One TCLK entry (either layout: the fields before the padding are the
/// same); `None` for an empty one.
pub fn parse_tclk_entry(entry: &[u8], seed: &[u8; 16]) -> Option<(u64, LinkKey)> {
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(entry.get(at..at + 4)?.try_into().ok()?))
    };
    let ieee = u64::from_le_bytes(entry.get(8..16)?.try_into().ok()?);
    if ieee == 0 || ieee == u64::MAX {
        return None;
    }
    let shift = *entry.get(18)?;
    Some((
        ieee,
        LinkKey {
            key: devices::hashed_key(ieee, seed, shift),
            tx_counter: u32_at(0)?,
            rx_counter: u32_at(4)?,
        },
    ))
}

/// The TCLK entry of `ieee`'s `key` derived with `shift`, its transmit
/// counter above the saved one.
pub fn tclk_entry(ieee: u64, key: &LinkKey, shift: u8, aligned: bool) -> Vec<u8> {
    let mut entry = key
        .tx_counter
        .saturating_add(LINK_COUNTER_MARGIN)
        .to_le_bytes()
        .to_vec();
    entry.extend(key.rx_counter.to_le_bytes());
    entry.extend(ieee.to_le_bytes());
    entry.extend([KEY_VERIFIED, 0, shift]);
    if aligned {
        entry.push(0);
    }
    entry
}

/// Writes the link keys of `devices` that derive from `seed` into a freshly
/// formed stick's TCLK table (zigpy-znp `write_devices`); returns how many
/// it wrote. Keys not derived from the seed (install codes) are skipped:
/// zigpy-znp writes those to the APS key tables, which this backend does
/// not.
pub async fn write_link_keys<P: AsyncRead + AsyncWrite + Unpin + Send>(
    znp: &mut Znp<P>,
    stack: ZStack,
    seed: &[u8; 16],
    devices: &[Device],
) -> Result<usize, ZnpError> {
    if stack == ZStack::V1_2 {
        return Ok(0);
    }
    let aligned = stack == ZStack::V3x || aligned_structs(znp).await?;
    let hashed = devices.iter().filter_map(|d| {
        let key = d.link_key.as_ref()?;
        let shift = devices::key_shift(d.ieee, &key.key, seed)?;
        Some(tclk_entry(d.ieee, key, shift, aligned))
    });
    let mut written = 0;
    for (index, entry) in hashed.enumerate() {
        // The tables hold far fewer than 0xEF entries.
        let index = index as u16;
        if stack == ZStack::V3x {
            match ex_write(znp, id::EX_TCLK_TABLE, index, &entry).await? {
                0 => {}
                NV_ITEM_UNINIT => break,
                other => {
                    return Err(nv_failed(
                        znp::SYS_NV_WRITE.name,
                        id::EX_TCLK_TABLE,
                        Some(&other),
                    ))
                }
            }
        } else {
            let item = id::LEGACY_TCLK_TABLE_START + index;
            if item > id::LEGACY_TCLK_TABLE_END {
                break;
            }
            write(znp, item, &entry).await?;
        }
        written += 1;
    }
    Ok(written)
}

fn entry_len(aligned: bool) -> usize {
    if aligned {
        ADDRMGR_ENTRY_LEN
    } else {
        ADDRMGR_ENTRY_LEN_PACKED
    }
}

/// One address-manager entry in either layout; `None` for an empty one or
/// a user type that is neither a child nor a secured device.
pub fn parse_addrmgr_entry(entry: &[u8], aligned: bool) -> Option<Device> {
    let at = usize::from(aligned);
    let user = *entry.first()?;
    let nwk = u16::from_le_bytes(entry.get(1 + at..3 + at)?.try_into().ok()?);
    let ieee = u64::from_le_bytes(entry.get(3 + at..11 + at)?.try_into().ok()?);
    if ieee == 0 || ieee == u64::MAX || user == 0xFF {
        return None;
    }
    (user & (ADDRMGR_ASSOC | ADDRMGR_SECURITY) != 0)
        .then(|| Device::new(ieee, nwk, user & ADDRMGR_ASSOC != 0))
}

/// The address-manager entry of `device` in the layout `aligned` picks (a
/// child is associated and secured, as zigpy-znp writes it).
pub fn addrmgr_entry(device: &Device, aligned: bool) -> Vec<u8> {
    let user = if device.is_child {
        ADDRMGR_ASSOC | ADDRMGR_SECURITY
    } else {
        ADDRMGR_SECURITY
    };
    let at = usize::from(aligned);
    let mut entry = vec![0xFF; entry_len(aligned)];
    entry[0] = user;
    entry[1 + at..3 + at].copy_from_slice(&device.nwk.to_le_bytes());
    entry[3 + at..11 + at].copy_from_slice(&device.ieee.to_le_bytes());
    entry
}

/// Writes `devices` into the address manager of a freshly formed stick
/// (from its first entry); returns how many fitted (the table's size is
/// the firmware's).
pub async fn write_devices<P: AsyncRead + AsyncWrite + Unpin + Send>(
    znp: &mut Znp<P>,
    stack: ZStack,
    devices: &[Device],
) -> Result<usize, ZnpError> {
    if stack != ZStack::V3x {
        let aligned = aligned_structs(znp).await?;
        let len = entry_len(aligned);
        let Some(mut table) = read_long(znp, id::ADDRMGR).await? else {
            return Ok(0);
        };
        let fitted = devices.len().min(table.len() / len);
        for (slot, device) in table.chunks_exact_mut(len).zip(&devices[..fitted]) {
            slot.copy_from_slice(&addrmgr_entry(device, aligned));
        }
        if fitted > 0 {
            write_long(znp, id::ADDRMGR, &table).await?;
        }
        return Ok(fitted);
    }
    for (sub, device) in devices.iter().enumerate() {
        // The table ends where an entry does not exist.
        let Ok(sub) = u16::try_from(sub) else {
            return Ok(sub);
        };
        match ex_write(znp, id::EX_ADDRMGR, sub, &addrmgr_entry(device, true)).await? {
            0 => {}
            NV_ITEM_UNINIT => return Ok(usize::from(sub)),
            other => {
                return Err(nv_failed(
                    znp::SYS_NV_WRITE.name,
                    id::EX_ADDRMGR,
                    Some(&other),
                ))
            }
        }
    }
    Ok(devices.len())
}

/// One extended-NV table entry of `len` bytes; `None` past the table's
/// end.
async fn ex_read<P: AsyncRead + AsyncWrite + Unpin + Send>(
    znp: &mut Znp<P>,
    item: u16,
    sub: u16,
    len: usize,
) -> Result<Option<Vec<u8>>, ZnpError> {
    let mut request = vec![NV_SYS_ZSTACK];
    request.extend(item.to_le_bytes());
    request.extend(sub.to_le_bytes());
    request.extend(0u16.to_le_bytes());
    request.push(len as u8);
    let reply = match znp.request(znp::SYS_NV_READ, request).await {
        Ok(reply) => reply,
        // A 3.0 build mistaken for 3.30+: no extended NV.
        Err(ZnpError::Rpc { .. }) => return Ok(None),
        Err(error) => return Err(error),
    };
    match reply.as_slice() {
        [0, len, value @ ..] if value.len() >= usize::from(*len) => {
            Ok(Some(value[..usize::from(*len)].to_vec()))
        }
        _ => Ok(None),
    }
}

/// Channel list as a bit mask (`CHANLIST`, `APP_CNF_BDB_SET_CHANNEL`).
pub fn channel_mask(channels: &[u8]) -> u32 {
    channels
        .iter()
        .filter(|c| (11..=26).contains(*c))
        .fold(0, |mask, c| mask | 1 << c)
}

/// The channels of a mask, lowest first.
pub fn mask_channels(mask: u32) -> Vec<u8> {
    (11..=26).filter(|c| mask & 1 << c != 0).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nib_round_trips_in_both_layouts_and_other_lengths_are_refused() {
        let nib = Nib {
            security_level: 5,
            channel: 15,
            pan_id: 0x1A62,
            channel_list: channel_mask(&[15, 20]),
            extended_pan_id: 0xDDDD_DDDD_DDDD_DDDD,
            key_loaded: true,
            update_id: 3,
        };
        for aligned in [false, true] {
            let bytes = nib.encode(aligned);
            assert_eq!(bytes.len(), if aligned { 116 } else { 110 });
            assert_eq!(Nib::parse(&bytes), Some(nib));
        }
        assert_eq!(Nib::parse(&[0; 100]), None);
        assert!(nib.is_formed());
        let blank = Nib { channel: 0, ..nib };
        assert!(!blank.is_formed());
    }

    #[test]
    fn packed_nib_offsets_follow_the_herdsman_struct() {
        // Channel 11, PAN 0x1A62, extended PAN DD..DD, channel list 0x800
        // (channel 11), key loaded: the fields at the offsets herdsman's
        // struct puts them on an 8-bit target.
        let mut bytes = vec![0u8; 110];
        bytes[22] = 11;
        bytes[33..35].copy_from_slice(&[0x62, 0x1A]);
        bytes[36..40].copy_from_slice(&[0x00, 0x08, 0x00, 0x00]);
        bytes[53..61].copy_from_slice(&[0xDD; 8]);
        bytes[61] = 1;
        let nib = Nib::parse(&bytes).expect("packed NIB");
        assert_eq!((nib.channel, nib.pan_id), (11, 0x1A62));
        assert_eq!(mask_channels(nib.channel_list), [11]);
        assert!(nib.is_formed());
    }

    #[test]
    fn channel_masks() {
        assert_eq!(channel_mask(&[11]), 0x0000_0800);
        assert_eq!(channel_mask(&[11, 15, 20, 25]), 0x0210_8800);
        assert_eq!(mask_channels(0x0210_8800), [11, 15, 20, 25]);
        assert_eq!(channel_mask(&[10, 27]), 0, "out of range ignored");
    }

    #[test]
    fn tclk_entries_carry_counters_address_and_shift() {
        let ieee = 0x0012_4B00_0102_0304u64;
        let seed = [0x11; 16];
        let key = LinkKey {
            key: devices::hashed_key(ieee, &seed, 5),
            tx_counter: 7,
            rx_counter: 9,
        };
        for aligned in [true, false] {
            let entry = tclk_entry(ieee, &key, 5, aligned);
            let len = if aligned {
                TCLK_ENTRY_LEN
            } else {
                TCLK_ENTRY_LEN_PACKED
            };
            assert_eq!(entry.len(), len);
            // tx (above the saved one), rx, IEEE, verified, type, shift.
            assert_eq!(entry[..4], (7 + LINK_COUNTER_MARGIN).to_le_bytes());
            assert_eq!(entry[4..8], 9u32.to_le_bytes());
            assert_eq!(entry[8..16], ieee.to_le_bytes());
            assert_eq!(entry[16..19], [KEY_VERIFIED, 0, 5]);
            let (read_ieee, read) = parse_tclk_entry(&entry, &seed).expect("an entry");
            assert_eq!((read_ieee, read.key), (ieee, key.key));
        }
        assert!(
            parse_tclk_entry(&[0; TCLK_ENTRY_LEN], &seed).is_none(),
            "empty"
        );
    }

    #[test]
    fn address_manager_entries_follow_the_aligned_layout() {
        let ieee = 0x0012_4B00_0102_0304u64;
        // type, padding, nwk (LE), IEEE (LE): zigpy-znp `AddrMgrEntry` on
        // CC26x2.
        let mut entry = vec![0x03, 0xFF, 0x34, 0x12];
        entry.extend(ieee.to_le_bytes());
        let device = parse_addrmgr_entry(&entry, true).expect("a child");
        assert_eq!(
            (device.ieee, device.nwk, device.is_child),
            (ieee, 0x1234, true)
        );
        assert_eq!(addrmgr_entry(&device, true), entry, "written as read");
        // Packed (CC253x): no padding byte.
        let mut packed = entry.clone();
        packed.remove(1);
        assert_eq!(parse_addrmgr_entry(&packed, false), Some(device.clone()));
        assert_eq!(addrmgr_entry(&device, false), packed);
        entry[0] = ADDRMGR_SECURITY;
        assert!(!parse_addrmgr_entry(&entry, true).expect("known").is_child);
        let router = Device::new(ieee, 0x1234, false);
        assert_eq!(addrmgr_entry(&router, true)[0], ADDRMGR_SECURITY);
        // Empty (Z-Stack 3 fills with 0xFF, 1.2 has type 0), and blank ones.
        assert!(parse_addrmgr_entry(&[0xFF; ADDRMGR_ENTRY_LEN], true).is_none());
        entry[0] = 0;
        assert!(parse_addrmgr_entry(&entry, true).is_none());
        let blank = [0x01, 0xFF, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert!(parse_addrmgr_entry(&blank, true).is_none());
        assert!(parse_addrmgr_entry(&entry[..5], true).is_none());
    }

    #[test]
    fn zstack_12_global_link_key_entry_is_all_ones_key_and_zero_counters() {
        let key = *b"ZigBeeAlliance09";
        let entry = global_tc_link_key_entry(&key);
        assert_eq!(entry.len(), TCLK_ENTRY_12_LEN);
        // The bytes herdsman writes for the default key.
        assert_eq!(entry[..8], [0xFF; 8]);
        assert_eq!(
            entry[8..24],
            [
                0x5a, 0x69, 0x67, 0x42, 0x65, 0x65, 0x41, 0x6c, 0x6c, 0x69, 0x61, 0x6e, 0x63, 0x65,
                0x30, 0x39
            ]
        );
        assert_eq!(entry[24..], [0; 8]);
        assert_eq!(parse_global_tc_link_key(&entry), Some(key));
        let mut device = entry.clone();
        device[0] = 0x01;
        assert_eq!(parse_global_tc_link_key(&device), None, "a device's key");
        assert_eq!(parse_global_tc_link_key(&entry[..20]), None);
    }

    #[test]
    fn debug_never_shows_the_key() {
        let net = StickNetwork {
            channel: 15,
            channel_mask: 1 << 15,
            pan_id: 1,
            extended_pan_id: 2,
            nwk_update_id: 0,
            security_level: 5,
            network_key: [0xAB; 16],
            key_sequence: 0,
            coordinator_ieee: 3,
            tclk_seed: None,
            tc_link_key: [0xCD; 16],
            frame_counter: 0,
        };
        let shown = format!("{net:?}");
        assert!(!shown.to_lowercase().contains("cdcd"), "{shown}");
        assert!(!shown.to_lowercase().contains("abab"), "{shown}");
    }
}
