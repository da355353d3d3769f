//! The BLE radio's key material and what it learnt about each tag
//! (`esl_hal::ble::provision::ProvisionStore`), in `ble.sqlite3` beside the
//! task store.
//!
//! Its schema is versioned like the task store's (`PRAGMA user_version`,
//! forward migrations in [`BLE_MIGRATIONS`], a file from a newer agent
//! refused). Files written before the versioning are version 0 with the
//! version-1 tables already in place, so migration 1 creates them only if
//! they are missing.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};

use super::{create_private_dir, migrate, StoreError, BUSY_TIMEOUT};

/// The BLE database's migrations: entry `i` takes the file from version
/// `i` to `i + 1`. Add a migration at the end; never change one that has
/// shipped.
const BLE_MIGRATIONS: &[&str] = &[
    // 1: key material, Information and bond state (the layout before the
    // versioning, hence IF NOT EXISTS).
    "CREATE TABLE IF NOT EXISTS ble_ap (
         id       INTEGER PRIMARY KEY CHECK (id = 1),
         sync_key BLOB NOT NULL
     );
     CREATE TABLE IF NOT EXISTS ble_tags (
         tag_id       TEXT PRIMARY KEY,
         response_key BLOB NOT NULL,
         info         TEXT,
         bonded       INTEGER NOT NULL
     ) WITHOUT ROWID;",
    // 2: the content paths a tag offers, as JSON (`{"ots":true,
    // "vendor":false}`); NULL: not known yet.
    "ALTER TABLE ble_tags ADD COLUMN content_paths TEXT;",
];

/// The BLE radio's key material, tag Information, bond state and content
/// paths (`esl_hal::ble::ProvisionStore`), kept in a database of its own,
/// `ble.sqlite3` beside the task store, so the radio's driver writes
/// without going through the engine's transaction. Written through at
/// once (`synchronous = FULL`): a tag configured with a key the AP then
/// forgets would need re-bonding. Reads come from memory. The file holds
/// secrets: it is created 0600 in the 0700 store directory, and nothing
/// here logs a key.
pub(crate) struct BleKeys {
    conn: Connection,
    ap_sync_key: Option<esl_hal::ble::provision::KeyMaterial>,
    tags: std::collections::HashMap<String, esl_hal::ble::provision::TagRecord>,
}

/// The BLE key database inside `store.path`.
const BLE_DB_FILE: &str = "ble.sqlite3";

impl BleKeys {
    /// Opens (or creates) `ble.sqlite3` in the store directory `dir` and
    /// reads it into memory.
    pub(crate) fn open(dir: &Path) -> Result<BleKeys, StoreError> {
        use esl_hal::ble::provision::{KeyMaterial, TagRecord as BleTag, KEY_MATERIAL_LEN};
        create_private_dir(dir)?;
        let path = dir.join(BLE_DB_FILE);
        let mut conn = Connection::open(&path)?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(
                |cause| StoreError::Dir {
                    path: path.display().to_string(),
                    cause,
                },
            )?;
        }
        conn.busy_timeout(BUSY_TIMEOUT)?;
        conn.execute_batch("PRAGMA synchronous = FULL;")?;
        migrate(&mut conn, &path, BLE_MIGRATIONS)?;
        let key = |k: &str, bytes: Vec<u8>| -> Result<KeyMaterial, StoreError> {
            let arr: [u8; KEY_MATERIAL_LEN] =
                bytes.try_into().map_err(|_| StoreError::Corrupt {
                    key: k.to_owned(),
                    reason: format!("key material is not {KEY_MATERIAL_LEN} bytes"),
                })?;
            Ok(KeyMaterial::from_bytes(arr))
        };
        let ap_sync_key = conn
            .query_row("SELECT sync_key FROM ble_ap WHERE id = 1", [], |r| {
                r.get::<_, Vec<u8>>(0)
            })
            .optional()?
            .map(|b| key("ble_ap/sync_key", b))
            .transpose()?;
        let mut tags = std::collections::HashMap::new();
        {
            let mut stmt = conn.prepare(
                "SELECT tag_id, response_key, info, bonded, content_paths FROM ble_tags",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, bool>(3)?,
                    r.get::<_, Option<String>>(4)?,
                ))
            })?;
            for row in rows {
                let (tag_id, response_key, info, bonded, content_paths) = row?;
                let where_ = format!("ble_tags/{tag_id}");
                let record = BleTag {
                    response_key: key(&where_, response_key)?,
                    info: json_column(&where_, info)?,
                    bonded,
                    content_paths: json_column(&where_, content_paths)?,
                };
                tags.insert(tag_id, record);
            }
        }
        Ok(BleKeys {
            conn,
            ap_sync_key,
            tags,
        })
    }

    /// A failed write keeps the value in memory for this run and says so
    /// (without the key); the tag is configured again after a restart.
    fn written(&self, what: &str, result: rusqlite::Result<usize>) {
        if let Err(e) = result {
            tracing::warn!(error = %e, "cannot save the BLE {what}; it is kept until the agent stops");
        }
    }
}

/// A JSON column of `ble_tags` (NULL: `None`).
fn json_column<T: serde::de::DeserializeOwned>(
    key: &str,
    text: Option<String>,
) -> Result<Option<T>, StoreError> {
    text.map(|j| serde_json::from_str(&j))
        .transpose()
        .map_err(|e| StoreError::Corrupt {
            key: key.to_owned(),
            reason: e.to_string(),
        })
}

impl esl_hal::ble::provision::ProvisionStore for BleKeys {
    fn ap_sync_key(&mut self) -> Option<esl_hal::ble::provision::KeyMaterial> {
        self.ap_sync_key.clone()
    }

    fn set_ap_sync_key(&mut self, key: &esl_hal::ble::provision::KeyMaterial) {
        self.ap_sync_key = Some(key.clone());
        let r = self.conn.execute(
            "INSERT OR REPLACE INTO ble_ap (id, sync_key) VALUES (1, ?1)",
            [&key.expose()[..]],
        );
        self.written("AP sync key", r);
    }

    fn tag(&mut self, tag: &str) -> Option<esl_hal::ble::provision::TagRecord> {
        self.tags.get(tag).cloned()
    }

    fn tag_ids(&mut self) -> Vec<String> {
        self.tags.keys().cloned().collect()
    }

    fn set_tag(&mut self, tag: &str, record: &esl_hal::ble::provision::TagRecord) {
        self.tags.insert(tag.to_owned(), record.clone());
        // TagInfo and ContentPaths are plain data (no maps with
        // non-string keys): serialising them cannot fail.
        let info = record
            .info
            .as_ref()
            .map(|i| serde_json::to_string(i).expect("TagInfo serialises"));
        let paths = record
            .content_paths
            .map(|p| serde_json::to_string(&p).expect("ContentPaths serialises"));
        let r = self.conn.execute(
            "INSERT OR REPLACE INTO ble_tags
                 (tag_id, response_key, info, bonded, content_paths)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                tag,
                &record.response_key.expose()[..],
                info,
                record.bonded,
                paths
            ],
        );
        self.written("tag record", r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use esl_hal::ble::provision::{
        ContentPaths, KeyMaterial, ProvisionStore, TagInfo, TagRecord as BleTag,
    };

    #[test]
    fn ble_keys_and_tag_records_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let ap = KeyMaterial::from_bytes([1; 24]);
        let tag = BleTag {
            response_key: KeyMaterial::from_bytes([2; 24]),
            info: Some(TagInfo {
                max_image_index: Some(3),
                ..TagInfo::default()
            }),
            bonded: true,
            content_paths: Some(ContentPaths {
                ots: true,
                vendor: false,
            }),
        };
        {
            let mut keys = BleKeys::open(dir.path()).unwrap();
            assert_eq!(keys.ap_sync_key(), None);
            keys.set_ap_sync_key(&ap);
            keys.set_tag("C0:11:22:33:44:55", &tag);
        }
        let mut keys = BleKeys::open(dir.path()).unwrap();
        assert_eq!(keys.ap_sync_key(), Some(ap));
        assert_eq!(keys.tag("C0:11:22:33:44:55"), Some(tag));
        assert_eq!(keys.tag("other"), None);
        assert_eq!(
            keys.tag_ids(),
            ["C0:11:22:33:44:55"],
            "listed for the radio at start"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(BLE_DB_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the file holds secrets");
    }

    /// `ble.sqlite3` as agents wrote it before its schema had a version.
    const UNVERSIONED: &str = "CREATE TABLE ble_ap (
            id       INTEGER PRIMARY KEY CHECK (id = 1),
            sync_key BLOB NOT NULL
        );
        CREATE TABLE ble_tags (
            tag_id       TEXT PRIMARY KEY,
            response_key BLOB NOT NULL,
            info         TEXT,
            bonded       INTEGER NOT NULL
        ) WITHOUT ROWID;";

    fn user_version(dir: &Path) -> i64 {
        Connection::open(dir.join(BLE_DB_FILE))
            .unwrap()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn a_file_from_before_content_paths_opens_and_then_keeps_them() {
        let dir = tempfile::tempdir().unwrap();
        let info = TagInfo {
            max_image_index: Some(1),
            ..TagInfo::default()
        };
        {
            let c = Connection::open(dir.path().join(BLE_DB_FILE)).unwrap();
            c.execute_batch(UNVERSIONED).unwrap();
            c.execute(
                "INSERT INTO ble_ap (id, sync_key) VALUES (1, ?1)",
                [&[1u8; 24][..]],
            )
            .unwrap();
            c.execute(
                "INSERT INTO ble_tags (tag_id, response_key, info, bonded)
                 VALUES ('C0:11:22:33:44:55', ?1, ?2, 1)",
                params![&[2u8; 24][..], serde_json::to_string(&info).unwrap()],
            )
            .unwrap();
        }
        let mut keys = BleKeys::open(dir.path()).unwrap();
        assert_eq!(user_version(dir.path()), BLE_MIGRATIONS.len() as i64);
        assert_eq!(keys.ap_sync_key(), Some(KeyMaterial::from_bytes([1; 24])));
        let mut record = keys.tag("C0:11:22:33:44:55").expect("kept");
        let old = BleTag {
            response_key: KeyMaterial::from_bytes([2; 24]),
            info: Some(info),
            bonded: true,
            content_paths: None,
        };
        assert_eq!(record, old, "as it was, paths not known");
        record.content_paths = Some(ContentPaths {
            ots: false,
            vendor: true,
        });
        keys.set_tag("C0:11:22:33:44:55", &record);
        drop(keys);
        let mut keys = BleKeys::open(dir.path()).unwrap();
        assert_eq!(keys.tag("C0:11:22:33:44:55"), Some(record));
    }

    #[test]
    fn a_ble_file_from_a_newer_agent_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(BleKeys::open(dir.path()).unwrap());
        Connection::open(dir.path().join(BLE_DB_FILE))
            .unwrap()
            .pragma_update(None, "user_version", BLE_MIGRATIONS.len() as i64 + 1)
            .unwrap();
        match BleKeys::open(dir.path()) {
            Err(e @ StoreError::Newer { .. }) => {
                assert!(e.to_string().contains(BLE_DB_FILE), "{e}")
            }
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("a newer file was opened"),
        }
    }
}
