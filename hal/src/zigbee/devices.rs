//! The devices on the agent's network, by IEEE address: what the backend
//! learnt from joins (`ZDO_TC_DEV_IND`), device announces
//! (`ZDO_END_DEVICE_ANNCE_IND`) and check-ins, and how it names them as
//! tags.
//!
//! Owns: the tag-id rule for ZigBee tags, the `devices` entries of the
//! saved network (Open Coordinator Backup: `ieee_address`, `nwk_address`,
//! `is_child` and `link_key`, as zigpy-znp and zigbee-herdsman write them,
//! plus this agent's `esl_tag_id`, which both ignore) and Z-Stack 3's
//! hashed link keys (a device's key is the trust centre's seed rotated by
//! a per-device shift, XOR its IEEE address twice: zigpy-znp
//! `znp/security.py`, `compute_key`). Must not: talk to the stick, write
//! the file (the driver and `commission` do), or log a key.
//!
//! **The tag-id rule** (docs/ZIGBEE.md, "Pairing tags"): a ZigBee tag's id
//! is its IEEE address as 16 lowercase hex digits (`00124b0001abcdef`, the
//! form on its label), so that a tag is listed under its id the moment it
//! announces itself as an end device, before its first check-in. A tag
//! whose check-in names another id is bound to that id from then on (kept
//! in the saved network), and every later announce of it is reported under
//! the bound id. Routers, and devices known only from the stick's tables,
//! are no tags until they announce as end devices or check in.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use crate::{TagDetails, TagId};

/// The `devices` key naming the tag id this agent bound to a device.
const TAG_ID_KEY: &str = "esl_tag_id";

/// The tag id of a tag that names no other: its IEEE address.
pub fn ieee_tag_id(ieee: u64) -> TagId {
    format!("{ieee:016x}")
}

/// A device's trust-centre link key and its frame counters (the backup's
/// `link_key`). Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct LinkKey {
    pub key: [u8; 16],
    pub tx_counter: u32,
    pub rx_counter: u32,
}

impl std::fmt::Debug for LinkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LinkKey(tx {}, rx {})", self.tx_counter, self.rx_counter)
    }
}

/// The link key Z-Stack 3 derives for `ieee` from the trust centre's
/// `seed` and the device's `shift` (0..=15).
pub fn hashed_key(ieee: u64, seed: &[u8; 16], shift: u8) -> [u8; 16] {
    let ieee = ieee.to_le_bytes();
    let mut key = *seed;
    key.rotate_left(usize::from(shift) % 16);
    for (i, byte) in key.iter_mut().enumerate() {
        *byte ^= ieee[i % 8];
    }
    key
}

/// The shift that derives `key` for `ieee` from `seed`; `None` when the key
/// is not derived from it (an install-code or otherwise unhashed key).
pub fn key_shift(ieee: u64, key: &[u8; 16], seed: &[u8; 16]) -> Option<u8> {
    (0..16).find(|shift| hashed_key(ieee, seed, *shift) == *key)
}

/// One device on the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub ieee: u64,
    pub nwk: u16,
    /// A sleepy end device (a child of the coordinator or of a router); the
    /// backup's `is_child`.
    pub is_child: bool,
    /// The id it is listed under: its IEEE address once it announced as an
    /// end device, the id its check-in named once it checked in; `None`: no
    /// tag (a router, or only known from the stick's tables).
    pub tag_id: Option<TagId>,
    /// The parent it last joined through (`ZDO_TC_DEV_IND`), this run only.
    pub parent: Option<u16>,
    /// When it last joined or announced, ms since the Unix epoch, this run
    /// only.
    pub announced_at: Option<u64>,
    /// Its trust-centre link key, when the stick's tables have it.
    pub link_key: Option<LinkKey>,
}

impl Device {
    /// A device at `nwk`, no tag (yet).
    pub fn new(ieee: u64, nwk: u16, is_child: bool) -> Device {
        Device {
            ieee,
            nwk,
            is_child,
            tag_id: None,
            parent: None,
            announced_at: None,
            link_key: None,
        }
    }

    /// What `tags.list` and `tag.get` show of it (`radio`): `ieee`, `nwk`,
    /// and when known `parent` and `announced_at`; `None` when it is no
    /// tag.
    pub fn details(&self) -> Option<TagDetails> {
        let tag_id = self.tag_id.clone()?;
        let mut info = Map::new();
        info.insert("ieee".into(), json!(ieee_tag_id(self.ieee)));
        info.insert("nwk".into(), json!(format!("{:#06x}", self.nwk)));
        if let Some(parent) = self.parent {
            info.insert("parent".into(), json!(format!("{parent:#06x}")));
        }
        if let Some(at) = self.announced_at {
            info.insert("announced_at".into(), json!(at));
        }
        Some(TagDetails {
            tag_id,
            info,
            replaces: None,
        })
    }

    /// Its backup entry (`nwk_address` and `ieee_address` big-endian hex,
    /// as zigpy-znp writes them).
    fn to_json(&self) -> Value {
        let mut entry = json!({
            "nwk_address": format!("{:04x}", self.nwk),
            "ieee_address": ieee_tag_id(self.ieee),
            "is_child": self.is_child,
        });
        if let Some(tag_id) = &self.tag_id {
            entry[TAG_ID_KEY] = json!(tag_id);
        }
        if let Some(link) = &self.link_key {
            entry["link_key"] = json!({
                "key": super::backup::hex(&link.key),
                "tx_counter": link.tx_counter,
                "rx_counter": link.rx_counter,
            });
        }
        entry
    }

    /// A backup entry; `None` when it has no valid addresses. Accepts the
    /// IEEE address with or without colons.
    pub fn from_json(entry: &Value) -> Option<Device> {
        let ieee = entry.get("ieee_address")?.as_str()?.replace(':', "");
        let ieee = u64::from_str_radix(&ieee, 16).ok()?;
        let nwk = u16::from_str_radix(entry.get("nwk_address")?.as_str()?, 16).ok()?;
        let is_child = entry
            .get("is_child")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        let mut device = Device::new(ieee, nwk, is_child);
        device.tag_id = entry
            .get(TAG_ID_KEY)
            .and_then(Value::as_str)
            .map(str::to_owned);
        device.link_key = entry.get("link_key").and_then(|link| {
            let key = super::backup::unhex16(&link.get("key")?.as_str()?.replace(':', ""))?;
            let counter = |name| {
                link.get(name)
                    .and_then(Value::as_u64)
                    .and_then(|c| u32::try_from(c).ok())
            };
            Some(LinkKey {
                key,
                tx_counter: counter("tx_counter")?,
                rx_counter: counter("rx_counter")?,
            })
        });
        Some(device)
    }
}

/// The device table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Devices {
    by_ieee: BTreeMap<u64, Device>,
}

impl Devices {
    /// From a backup's `devices` (entries without valid addresses are
    /// skipped).
    pub fn from_backup(entries: &[Value]) -> Devices {
        Devices {
            by_ieee: entries
                .iter()
                .filter_map(Device::from_json)
                .map(|d| (d.ieee, d))
                .collect(),
        }
    }

    /// `entries` with this table's devices: an entry of the same IEEE
    /// address is updated in place (fields this table does not know, such
    /// as a `link_key`, stay), the others appended.
    pub fn merge_into(&self, entries: &mut Vec<Value>) {
        let mut seen = std::collections::HashSet::new();
        for entry in entries.iter_mut() {
            let Some(known) = Device::from_json(entry).and_then(|d| self.by_ieee.get(&d.ieee))
            else {
                continue;
            };
            seen.insert(known.ieee);
            if let (Value::Object(old), Value::Object(new)) = (entry, known.to_json()) {
                old.extend(new);
            }
        }
        entries.extend(
            self.by_ieee
                .values()
                .filter(|d| !seen.contains(&d.ieee))
                .map(Device::to_json),
        );
    }

    pub fn iter(&self) -> impl Iterator<Item = &Device> {
        self.by_ieee.values()
    }

    /// The backup entry of the device with this IEEE address, as the
    /// network file would hold it.
    pub fn entry_of(&self, ieee: u64) -> Option<Value> {
        self.by_ieee.get(&ieee).map(Device::to_json)
    }

    pub fn by_nwk(&self, nwk: u16) -> Option<&Device> {
        self.by_ieee.values().find(|d| d.nwk == nwk)
    }

    pub fn by_tag_id(&self, tag_id: &str) -> Option<&Device> {
        self.by_ieee
            .values()
            .find(|d| d.tag_id.as_deref() == Some(tag_id))
    }

    /// A device joined through `parent` (`ZDO_TC_DEV_IND`; its announce
    /// follows) or announced itself at `nwk` (`end_device`: whether it
    /// said it is one; then it is a tag from now on). Returns it. Another
    /// device that had `nwk` before loses it (addresses are reused).
    pub fn announced(
        &mut self,
        ieee: u64,
        nwk: u16,
        parent: Option<u16>,
        end_device: bool,
        now_ms: u64,
    ) -> &Device {
        for other in self.by_ieee.values_mut() {
            if other.nwk == nwk && other.ieee != ieee {
                // 0xFFFE: "no network address" in Z-Stack's tables.
                other.nwk = 0xFFFE;
            }
        }
        let device = self
            .by_ieee
            .entry(ieee)
            .or_insert_with(|| Device::new(ieee, nwk, true));
        device.nwk = nwk;
        if end_device && device.tag_id.is_none() {
            device.tag_id = Some(ieee_tag_id(ieee));
        }
        device.parent = parent.or(device.parent);
        device.announced_at = Some(now_ms);
        device
    }

    /// The device at `nwk` checked in as `tag_id`: binds that id to it.
    /// Returns the device and the id it was listed under before (if any)
    /// when the binding is new (to be saved and reported); `None` when
    /// nothing changed or no device has `nwk`.
    pub fn checked_in(&mut self, nwk: u16, tag_id: &str) -> Option<(&Device, Option<TagId>)> {
        let device = self.by_ieee.values_mut().find(|d| d.nwk == nwk)?;
        if device.tag_id.as_deref() == Some(tag_id) {
            return None;
        }
        let before = device.tag_id.replace(tag_id.to_owned());
        Some((device, before))
    }

    /// Devices read from the stick's tables: their addresses replace the
    /// known ones; bindings and this run's facts stay; devices only the
    /// table knew are added. Known devices the stick no longer lists stay
    /// too (a device table may be full).
    pub fn update_from_stick(&mut self, read: impl IntoIterator<Item = Device>) {
        for fresh in read {
            match self.by_ieee.get_mut(&fresh.ieee) {
                Some(known) => {
                    known.nwk = fresh.nwk;
                    known.is_child = fresh.is_child;
                    if fresh.link_key.is_some() {
                        known.link_key = fresh.link_key;
                    }
                }
                None => {
                    self.by_ieee.insert(fresh.ieee, fresh);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IEEE: u64 = 0x0012_4B00_0102_0304;

    #[test]
    fn a_new_device_is_named_by_its_ieee_address_until_a_check_in_binds_another_id() {
        let mut devices = Devices::default();
        // A router is no tag; an end device is one, by its IEEE address.
        assert!(devices
            .announced(IEEE + 9, 0x0009, None, false, 1)
            .details()
            .is_none());
        let d = devices.announced(IEEE, 0x1234, Some(0), true, 1_000);
        assert_eq!(d.tag_id.as_deref(), Some("00124b0001020304"));
        let details = d.details().expect("a tag");
        assert_eq!(details.info["ieee"], "00124b0001020304");
        assert_eq!(details.info["nwk"], "0x1234");
        assert_eq!(details.info["parent"], "0x0000");
        assert_eq!(details.info["announced_at"], 1_000);
        // Its own IEEE id binds nothing; another id does, once.
        assert!(devices.checked_in(0x1234, "00124b0001020304").is_none());
        let (_, before) = devices.checked_in(0x1234, "SHELF-7").expect("bound");
        assert_eq!(
            before.as_deref(),
            Some("00124b0001020304"),
            "listed under its IEEE id until now"
        );
        assert!(devices.checked_in(0x1234, "SHELF-7").is_none());
        // A rejoin at a new address keeps the bound id.
        let d = devices.announced(IEEE, 0x4321, None, true, 2_000);
        assert_eq!((d.tag_id.as_deref(), d.nwk), (Some("SHELF-7"), 0x4321));
        assert_eq!(d.parent, Some(0), "the parent stays known");
        assert!(devices.checked_in(0x9999, "X").is_none(), "unknown address");
    }

    #[test]
    fn hashed_keys_follow_the_seed_rotation_and_the_shift_is_found_again() {
        let seed: [u8; 16] = std::array::from_fn(|i| i as u8);
        // Shift 0: the seed XOR the IEEE address (little-endian) twice.
        let key = hashed_key(IEEE, &seed, 0);
        let ieee = IEEE.to_le_bytes();
        assert_eq!(key[0], ieee[0]);
        assert_eq!(key[9], 9 ^ ieee[1]);
        // Shift 3: the seed rotated left by three first.
        assert_eq!(hashed_key(IEEE, &seed, 3)[0], 3 ^ ieee[0]);
        for shift in 0..16 {
            let key = hashed_key(IEEE, &seed, shift);
            assert_eq!(key_shift(IEEE, &key, &seed), Some(shift));
        }
        assert_eq!(key_shift(IEEE, &[0x42; 16], &seed), None);
    }

    #[test]
    fn an_address_taken_by_another_device_is_no_longer_the_first_ones() {
        let mut devices = Devices::default();
        devices.announced(IEEE, 0x1234, None, true, 1);
        devices.announced(IEEE + 1, 0x1234, None, true, 2);
        assert_eq!(devices.by_nwk(0x1234).map(|d| d.ieee), Some(IEEE + 1));
    }

    #[test]
    fn backup_entries_round_trip_and_foreign_fields_stay() {
        let mut devices = Devices::default();
        devices.announced(IEEE, 0x1234, None, true, 1);
        devices.checked_in(0x1234, "SHELF-7");
        devices.announced(IEEE + 1, 0x0042, None, true, 1);
        let mut router = Device::new(IEEE + 2, 0x0077, false);
        router.link_key = Some(LinkKey {
            key: [0xAB; 16],
            tx_counter: 5,
            rx_counter: 6,
        });
        devices.update_from_stick([router.clone()]);
        // An entry zigpy wrote for the first device, with its link key.
        let mut entries = vec![json!({
            "nwk_address": "0999", "ieee_address": "00:12:4b:00:01:02:03:04",
            "is_child": true, "link_key": {"key": "aa", "tx_counter": 1, "rx_counter": 2},
        })];
        devices.merge_into(&mut entries);
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[0]["nwk_address"], "1234");
        assert_eq!(entries[0]["esl_tag_id"], "SHELF-7");
        assert_eq!(entries[0]["link_key"]["tx_counter"], 1);
        assert_eq!(entries[1]["ieee_address"], "00124b0001020305");
        assert_eq!(entries[1]["esl_tag_id"], "00124b0001020305");
        assert!(entries[2].get("esl_tag_id").is_none(), "no tag");
        assert_eq!(entries[2]["is_child"], false);
        assert_eq!(entries[2]["link_key"]["key"], "ab".repeat(16));
        assert_eq!(entries[2]["link_key"]["tx_counter"], 5);
        let read = Devices::from_backup(&entries);
        let link = read.iter().find(|d| d.ieee == IEEE + 2).expect("router");
        assert_eq!(link.link_key, router.link_key, "read back");
        assert_eq!(read.by_tag_id("SHELF-7").map(|d| d.nwk), Some(0x1234));
        assert_eq!(
            read.by_tag_id("00124b0001020305").map(|d| d.nwk),
            Some(0x0042)
        );
        assert!(Devices::from_backup(&[json!({"ieee_address": "zz"})])
            .iter()
            .next()
            .is_none());
    }
}
