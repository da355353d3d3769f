//! The durable store: the only module that opens sled.
//!
//! One sled tree, keys prefixed by record kind, so that everything one
//! message changes (task record, pending index, highest seq, outbox entry)
//! goes in one atomic `apply_batch`. Writers build a [`Change`] and
//! [`Store::apply`] it; nothing is durable until [`Store::flush`] returns,
//! and callers must not PUBACK or publish acks that depend on a change before
//! that (PROTOCOL §4 rule 1).
//!
//! Group commit reaches sled: applied changes are staged in memory (reads
//! see them at once) and handed to sled as **one** `apply_batch` when the
//! store is flushed, or before any scan. sled 0.34 writes its log at every
//! `apply_batch` call (two `pwrite` + `sync_file_range` each, measured), so
//! one call per task cost more CPU than everything else the agent does per
//! task; one call per flush costs that once per group (docs/BENCHMARKS.md).
//!
//! Key layout (all integers big-endian so that sled's order is numeric):
//!
//! | key                      | value          | meaning                               |
//! |--------------------------|----------------|---------------------------------------|
//! | `t` task_id              | [`TaskRecord`] | every task, pending or final          |
//! | `p` tag_id               | seq, task_id   | highest `seq` accepted for the tag, and its pending task (empty id: none) |
//! | `x` expires_at task_id   | (empty)        | pending tasks by expiry, for the sweep |
//! | `f` final_at task_id     | (empty)        | finished tasks by age, for pruning    |
//! | `o` n                    | [`OutboxEntry`]| ack/reply waiting for the broker      |
//! | `g` tag_id               | [`TagRecord`]  | last check-in report (best effort)    |
//! | `c` tag_id               | task_id, content | last content the tag confirmed      |
//! | `mo`                     | u64            | next outbox number                    |
//! | `mv`                     | u64            | layout version (2)                    |
//!
//! Pending tasks are not mirrored in memory: the engine asks `p` at a
//! check-in and scans `x` up to now for expiry, so the agent's memory does
//! not grow with the number of pending tasks. A task record is `Pending`
//! exactly while `p` names it and its `x` entry exists; [`Change::put_task`]
//! keeps the three together. The pending task of a tag is always the one
//! accepted last, so one `p` value holds both the highest seq and the
//! pending task: one insert per task fewer (each costs sled ~8 µs).
//!
//! Layout 1 (before `mv`) kept the seq under its own `s` key and had no `x`
//! index; opening such a store converts it once.
//!
//! The engine is the only writer of `t`, `p`, `x`, `f`, `g`; the MQTT link
//! only removes `o` entries once the broker PUBACKed them.
//!
//! Faults: after one failed write (a full disk, an I/O error) sled refuses
//! every later operation of that `Db` with the same error, even once the
//! disk has room again. So recovery is [`Store::reopen`]: drop the `Db`,
//! open it again from what is on disk (everything flushed before the
//! fault), and let the engine rebuild its view from that. Between the two,
//! every call returns [`StoreError::Closed`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};

use crate::wire::AckStatus;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Sled(#[from] sled::Error),
    #[error("store record {key}: cannot decode ({reason})")]
    Corrupt { key: String, reason: String },
    #[error("store directory {path}: {source}")]
    Dir {
        path: String,
        source: std::io::Error,
    },
    /// Closed for [`Store::reopen`] and not (yet) open again.
    #[error("store: closed after a fault, not reopened yet")]
    Closed,
}

/// What the store keeps about a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub task_id: String,
    pub tag_id: String,
    pub seq: u64,
    pub issued_at: u64,
    pub expires_at: u64,
    pub accepted_at: u64,
    /// Canonical JSON; emptied once the task is final (only the hash is
    /// needed after that).
    pub content: String,
    pub content_hash: String,
    /// Client id that receives the ack (the task's `reply_to` or `ack_to`).
    pub ack_target: String,
    pub attempts: u32,
    pub state: TaskState,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TaskState {
    Pending,
    Final(FinalState),
}

/// The final ack of a task, kept so a duplicate can be answered with it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinalState {
    pub status: AckStatus,
    pub at: u64,
    pub detail: Option<String>,
}

/// An ack or reply waiting for the broker's PUBACK.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboxEntry {
    pub topic: String,
    pub payload: Vec<u8>,
}

/// Last check-in of a tag.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TagRecord {
    pub battery_mv: Option<u16>,
    pub rssi: Option<i16>,
    pub content_hash: Option<String>,
    pub last_seen: Option<u64>,
}

fn key(prefix: u8, rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + rest.len());
    k.push(prefix);
    k.extend_from_slice(rest);
    k
}

/// The `p` value: highest seq, then the pending task's id (may be empty).
fn tag_slot(seq: u64, task_id: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + task_id.len());
    v.extend_from_slice(&seq.to_be_bytes());
    v.extend_from_slice(task_id.as_bytes());
    v
}

/// A `p` value back: (highest seq, pending task id if any).
fn slot_from(k: &[u8], v: &[u8]) -> Result<(u64, Option<String>), StoreError> {
    if v.len() < 8 {
        return Err(corrupt(k, "tag record shorter than 8 bytes"));
    }
    let seq = u64_from(k, &v[..8])?;
    let task = (v.len() > 8).then(|| string_from(k, &v[8..])).transpose()?;
    Ok((seq, task))
}

/// `x` expires_at task_id: orders pending tasks by expiry.
fn expiry_key(expires_at: u64, task_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(9 + task_id.len());
    k.push(b'x');
    k.extend_from_slice(&expires_at.to_be_bytes());
    k.extend_from_slice(task_id.as_bytes());
    k
}

const NEXT_OUTBOX_KEY: &[u8] = b"mo";
/// Staged keys that make [`Store::apply`] commit without waiting for a
/// flush (changes that need no flush, e.g. check-in reports, would
/// otherwise pile up in memory).
const STAGED_MAX: usize = 4096;
/// Layout version; see the module docs.
const VERSION_KEY: &[u8] = b"mv";
const VERSION: u64 = 2;

/// How long opening waits for sled's file lock, and how often it looks.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(1);
const LOCK_RETRY: std::time::Duration = std::time::Duration::from_millis(20);

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // postcard into a Vec fails only on allocation failure or for types with
    // unsupported shapes; ours are plain structs and enums.
    postcard::to_allocvec(value).expect("store records encode")
}

fn decode<'a, T: Deserialize<'a>>(k: &[u8], bytes: &'a [u8]) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(k).into_owned(),
        reason: e.to_string(),
    })
}

/// Changes to apply atomically. Built by the engine, applied by the store.
#[derive(Default)]
pub struct Change {
    /// Key → new value (`None` = remove), in the order written.
    writes: Vec<(Vec<u8>, Option<sled::IVec>)>,
    outbox: Vec<OutboxEntry>,
}

impl Change {
    pub fn new() -> Self {
        Change::default()
    }

    fn insert(&mut self, k: Vec<u8>, v: impl Into<sled::IVec>) {
        self.writes.push((k, Some(v.into())));
    }

    fn remove(&mut self, k: Vec<u8>) {
        self.writes.push((k, None));
    }

    pub fn put_task(&mut self, record: &TaskRecord) {
        self.insert(key(b't', record.task_id.as_bytes()), encode(record));
        match &record.state {
            TaskState::Pending => {
                self.insert(
                    key(b'p', record.tag_id.as_bytes()),
                    tag_slot(record.seq, &record.task_id),
                );
                self.insert(expiry_key(record.expires_at, &record.task_id), &[][..]);
            }
            TaskState::Final(f) => {
                let mut k = f.at.to_be_bytes().to_vec();
                k.extend_from_slice(record.task_id.as_bytes());
                self.insert(key(b'f', &k), &[][..]);
            }
        }
    }

    /// `record`, which was the pending task of its tag, is not any more (it
    /// is being finished): the tag keeps its seq and has no pending task,
    /// and the expiry index entry goes. The caller writes the final record
    /// with [`Change::put_task`].
    pub fn clear_pending(&mut self, record: &TaskRecord) {
        self.insert(
            key(b'p', record.tag_id.as_bytes()),
            tag_slot(record.seq, ""),
        );
        self.remove(expiry_key(record.expires_at, &record.task_id));
    }

    /// Drops an expiry index entry whose task is no longer pending (found
    /// by [`Store::expiring_before`]; normally [`Change::clear_pending`]
    /// removes it with the task).
    pub fn drop_expiry(&mut self, expires_at: u64, task_id: &str) {
        self.remove(expiry_key(expires_at, task_id));
    }

    pub fn put_tag(&mut self, tag_id: &str, tag: &TagRecord) {
        self.insert(key(b'g', tag_id.as_bytes()), encode(tag));
    }

    /// Remembers what a tag displays, for `tag.refresh`.
    pub fn put_last_content(&mut self, tag_id: &str, task_id: &str, content: &str) {
        let value = encode(&(task_id, content));
        self.insert(key(b'c', tag_id.as_bytes()), value);
    }

    /// Queues a message for the broker; it gets its outbox number in
    /// [`Store::apply`].
    pub fn push_outbox(&mut self, entry: OutboxEntry) {
        self.outbox.push(entry);
    }

    pub fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.outbox.is_empty()
    }
}

/// Handle to the store. Cheap to share: sled's `Db` is internally
/// reference-counted and thread-safe.
pub struct Store {
    path: PathBuf,
    cache_bytes: u64,
    /// The open database; `None` between closing and reopening it. Users
    /// take a clone (sled's `Db` is a reference-counted handle) and never
    /// hold the lock across an await.
    db: RwLock<Option<sled::Db>>,
    /// Test hook: `Some(n)` makes every operation fail the way a poisoned
    /// sled `Db` does, and the next `n` reopens fail too (the disk is still
    /// full); the reopen after those clears it.
    #[cfg(test)]
    injected_fault: std::sync::Mutex<Option<u32>>,
    /// Changes applied since the last commit: read before sled, committed
    /// as one batch by [`Store::flush`] (or before a scan, or when large).
    staged: Mutex<HashMap<Vec<u8>, Option<sled::IVec>>>,
    next_outbox: AtomicU64,
    /// Outbox entries numbered below this are on disk. The link publishes
    /// only those: an ack must never reach the back end before the state
    /// change behind it is durable (a crash would otherwise undo the change
    /// after the back end saw its ack).
    durable_outbox: AtomicU64,
    outbox_len: AtomicU64,
}

impl Store {
    /// Opens (or creates) the store at `path` with a page cache of
    /// `cache_bytes`. The directory is created with mode 0700.
    pub fn open(path: &Path, cache_bytes: u64) -> Result<Store, StoreError> {
        create_private_dir(path)?;
        let store = Store {
            path: path.to_owned(),
            cache_bytes,
            db: RwLock::new(None),
            #[cfg(test)]
            injected_fault: Default::default(),
            staged: Mutex::new(HashMap::new()),
            next_outbox: AtomicU64::new(0),
            durable_outbox: AtomicU64::new(0),
            outbox_len: AtomicU64::new(0),
        };
        store.open_db()?;
        Ok(store)
    }

    /// Opens sled and derives the outbox counters from what is on disk.
    /// Everything on disk counts as durable: it survived.
    fn open_db(&self) -> Result<(), StoreError> {
        let config = sled::Config::new()
            .path(&self.path)
            .segment_size(segment_size_of(&self.path))
            .cache_capacity(self.cache_bytes)
            .flush_every_ms(Some(1000));
        // sled's background threads may hold the file lock of a database
        // this process just dropped for a moment after the drop (sled's own
        // tests block on the lock for that reason). Another process holding
        // it does not let go, and fails after the wait.
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        let db = loop {
            match config.open() {
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(LOCK_RETRY);
                }
                other => break other?,
            }
        };
        let next_outbox = match db.get(NEXT_OUTBOX_KEY)? {
            Some(v) => u64_from(NEXT_OUTBOX_KEY, &v)?,
            None => 0,
        };
        Self::upgrade(&db)?;
        let outbox_len = db.scan_prefix([b'o']).count() as u64;
        self.next_outbox.store(next_outbox, Ordering::SeqCst);
        self.durable_outbox.store(next_outbox, Ordering::SeqCst);
        self.outbox_len.store(outbox_len, Ordering::Relaxed);
        *self.db.write().unwrap_or_else(|e| e.into_inner()) = Some(db);
        Ok(())
    }

    /// The current `Db` handle.
    fn db(&self) -> Result<sled::Db, StoreError> {
        #[cfg(test)]
        if self.injected_fault.lock().unwrap().is_some() {
            return Err(injected_error());
        }
        // A poisoned lock only means another thread panicked while swapping
        // the handle; the `Option` inside is still a valid state.
        self.db
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or(StoreError::Closed)
    }

    /// Closes the database and opens it again from disk: the way out of a
    /// fault, since sled keeps failing after one failed write. Changes
    /// applied but not flushed before the fault may be gone afterwards;
    /// the caller must rebuild whatever it derived from them. Fails (and
    /// stays closed; try again later) while the disk is still unusable or
    /// while another thread still holds the old handle (sled's file lock).
    pub fn reopen(&self) -> Result<(), StoreError> {
        let old = self.db.write().unwrap_or_else(|e| e.into_inner()).take();
        // Not on disk, so gone with the fault like any unflushed change.
        self.staged_map().clear();
        // Dropping the last handle stops sled's flusher thread and releases
        // the file lock that the new open takes.
        drop(old);
        #[cfg(test)]
        {
            let mut injected = self.injected_fault.lock().unwrap();
            match *injected {
                Some(0) => *injected = None,
                Some(n) => {
                    *injected = Some(n - 1);
                    return Err(injected_error());
                }
                None => {}
            }
        }
        self.open_db()
    }

    /// Test hook: every operation fails from now on, as after a failed
    /// write, until [`Store::reopen`].
    #[cfg(test)]
    pub(crate) fn inject_fault(&self, failing_reopens: u32) {
        *self.injected_fault.lock().unwrap() = Some(failing_reopens);
    }

    fn staged_map(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<u8>, Option<sled::IVec>>> {
        // Poisoned only if a thread panicked while holding it; the map is
        // still consistent (every operation on it is a single insert/take).
        self.staged.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies one change (visible to this store's reads at once, handed to
    /// sled with the others at the next commit, durable after the next
    /// [`Store::flush`]). Returns the outbox numbers it assigned.
    pub fn apply(&self, mut change: Change) -> Result<Vec<u64>, StoreError> {
        // A closed store takes nothing (the caller holds its messages).
        self.db()?;
        let mut numbers = Vec::with_capacity(change.outbox.len());
        if !change.outbox.is_empty() {
            // Only the engine applies changes, so numbers are handed out by
            // one task; the atomic makes that cheap to share, not racy.
            let first = self
                .next_outbox
                .fetch_add(change.outbox.len() as u64, Ordering::SeqCst);
            for (i, entry) in std::mem::take(&mut change.outbox).iter().enumerate() {
                let n = first + i as u64;
                change.insert(key(b'o', &n.to_be_bytes()), encode(entry));
                numbers.push(n);
            }
            let next = first + numbers.len() as u64;
            change.insert(NEXT_OUTBOX_KEY.to_vec(), &next.to_be_bytes()[..]);
        }
        let large = {
            let mut staged = self.staged_map();
            staged.extend(change.writes);
            staged.len() >= STAGED_MAX
        };
        self.outbox_len
            .fetch_add(numbers.len() as u64, Ordering::Relaxed);
        if large {
            self.commit()?;
        }
        Ok(numbers)
    }

    /// Hands the staged changes to sled as one atomic batch (not flushed).
    fn commit(&self) -> Result<(), StoreError> {
        let db = self.db()?;
        let staged = std::mem::take(&mut *self.staged_map());
        if staged.is_empty() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for (k, v) in staged {
            match v {
                Some(v) => batch.insert(k, v),
                None => batch.remove(k),
            }
        }
        db.apply_batch(batch)?;
        Ok(())
    }

    /// One key: the staged value if there is one, else sled's.
    fn get(&self, k: &[u8]) -> Result<Option<sled::IVec>, StoreError> {
        if let Some(v) = self.staged_map().get(k) {
            return Ok(v.clone());
        }
        Ok(self.db()?.get(k)?)
    }

    /// The database for a scan, with everything staged committed first (so
    /// the scan sees it).
    fn scan_db(&self) -> Result<sled::Db, StoreError> {
        self.commit()?;
        self.db()
    }

    /// Makes every applied change durable (survives a process crash; see
    /// docs for power loss). One flush covers any number of changes: this is
    /// the group commit.
    pub async fn flush(self: &Arc<Self>) -> Result<(), StoreError> {
        self.begin_flush()?.await
    }

    /// [`Store::flush`] in two steps: hands what is staged to sled now (so
    /// later reads and changes may go on at once) and returns the wait for
    /// the disk, which may run on another task. Changes applied after this
    /// call are not covered by it.
    pub fn begin_flush(
        self: &Arc<Self>,
    ) -> Result<
        impl std::future::Future<Output = Result<(), StoreError>> + Send + 'static,
        StoreError,
    > {
        // Entries applied before this point are covered by the flush below.
        let covered = self.next_outbox.load(Ordering::SeqCst);
        self.commit()?;
        let db = self.db()?;
        let store = Arc::clone(self);
        Ok(async move {
            db.flush_async().await?;
            store.durable_outbox.fetch_max(covered, Ordering::SeqCst);
            Ok(())
        })
    }

    pub fn task(&self, task_id: &str) -> Result<Option<TaskRecord>, StoreError> {
        let k = key(b't', task_id.as_bytes());
        match self.get(&k)? {
            Some(v) => Ok(Some(decode(&k, &v)?)),
            None => Ok(None),
        }
    }

    /// The tag's highest accepted seq and its pending task, if any.
    pub fn tag_slot(&self, tag_id: &str) -> Result<Option<(u64, Option<String>)>, StoreError> {
        let k = key(b'p', tag_id.as_bytes());
        match self.get(&k)? {
            Some(v) => Ok(Some(slot_from(&k, &v)?)),
            None => Ok(None),
        }
    }

    /// The id of the tag's pending task, if it has one.
    pub fn pending_of(&self, tag_id: &str) -> Result<Option<String>, StoreError> {
        Ok(self.tag_slot(tag_id)?.and_then(|(_, task)| task))
    }

    /// How many tags have a pending task (one scan of the `p` keys; for
    /// start-up and after a reopen).
    pub fn pending_count(&self) -> Result<usize, StoreError> {
        let mut n = 0;
        for item in self.scan_db()?.scan_prefix([b'p']) {
            let (_, v) = item?;
            if v.len() > 8 {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Up to `limit` tags with a pending task whose id is after `after`, in
    /// id order.
    pub fn pending_tags_after(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let start = start_after(b'p', after);
        let mut out = Vec::new();
        for item in self.scan_db()?.range(start..vec![b'p' + 1]) {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item?;
            if v.len() > 8 {
                out.push(string_from(&k, &k[1..])?);
            }
        }
        Ok(out)
    }

    /// Up to `limit` pending tasks that expire before `now`, oldest expiry
    /// first, as `(expires_at, task_id)`. An index entry whose task is no
    /// longer pending is the caller's to drop (see [`Change::drop_expiry`]).
    pub fn expiring_before(
        &self,
        now: u64,
        limit: usize,
    ) -> Result<Vec<(u64, String)>, StoreError> {
        let mut out = Vec::new();
        for item in self
            .scan_db()?
            .range(vec![b'x']..key(b'x', &now.to_be_bytes()))
            .take(limit)
        {
            let (k, _) = item?;
            if k.len() < 9 {
                return Err(corrupt(&k, "expiry index key shorter than 9 bytes"));
            }
            let at = u64_from(&k, &k[1..9])?;
            out.push((at, string_from(&k, &k[9..])?));
        }
        Ok(out)
    }

    /// Converts a layout-1 store (see the module docs) in one batch: the
    /// `s` seq moves into the `p` value and every pending task gets its `x`
    /// entry. A store at the current layout is left alone; a newer one is
    /// refused (a downgrade would misread it).
    fn upgrade(db: &sled::Db) -> Result<(), StoreError> {
        if let Some(v) = db.get(VERSION_KEY)? {
            return match u64_from(VERSION_KEY, &v)? {
                VERSION => Ok(()),
                other => Err(corrupt(
                    VERSION_KEY,
                    &format!("store layout {other}; this agent reads layout {VERSION} (newer agent's store?)"),
                )),
            };
        }
        let mut batch = sled::Batch::default();
        let mut tags: HashMap<Vec<u8>, (u64, Vec<u8>)> = HashMap::new();
        for item in db.scan_prefix([b's']) {
            let (k, v) = item?;
            tags.entry(k[1..].to_vec()).or_default().0 = u64_from(&k, &v)?;
            batch.remove(k);
        }
        for item in db.scan_prefix([b'p']) {
            let (k, task_id) = item?;
            let tk = key(b't', &task_id);
            let rec: TaskRecord = match db.get(&tk)? {
                Some(v) => decode(&tk, &v)?,
                None => return Err(corrupt(&k, "pending index points at a missing task")),
            };
            if rec.state != TaskState::Pending {
                return Err(corrupt(
                    &k,
                    "pending index points at a task that is not pending",
                ));
            }
            batch.insert(expiry_key(rec.expires_at, &rec.task_id), &[][..]);
            let slot = tags.entry(k[1..].to_vec()).or_default();
            slot.0 = slot.0.max(rec.seq);
            slot.1 = task_id.to_vec();
        }
        for (tag, (seq, task_id)) in tags {
            let mut v = seq.to_be_bytes().to_vec();
            v.extend_from_slice(&task_id);
            batch.insert(key(b'p', &tag), v);
        }
        batch.insert(VERSION_KEY, &VERSION.to_be_bytes()[..]);
        db.apply_batch(batch)?;
        db.flush()?;
        Ok(())
    }

    /// The last task and content a tag confirmed.
    pub fn last_content(&self, tag_id: &str) -> Result<Option<(String, String)>, StoreError> {
        let k = key(b'c', tag_id.as_bytes());
        match self.get(&k)? {
            Some(v) => Ok(Some(decode(&k, &v)?)),
            None => Ok(None),
        }
    }

    /// Every tag's last check-in, for the engine's start-up.
    pub fn tags(&self) -> Result<Vec<(String, TagRecord)>, StoreError> {
        let mut out = Vec::new();
        for item in self.scan_db()?.scan_prefix([b'g']) {
            let (k, v) = item?;
            let tag_id = String::from_utf8_lossy(&k[1..]).into_owned();
            out.push((tag_id, decode(&k, &v)?));
        }
        Ok(out)
    }

    /// Up to `limit` tasks whose id is greater than `after`, in id order
    /// (for paged listings).
    pub fn tasks_after(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<TaskRecord>, StoreError> {
        let start = start_after(b't', after);
        let mut out = Vec::new();
        for item in self.scan_db()?.range(start..vec![b't' + 1]) {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item?;
            out.push(decode(&k, &v)?);
        }
        Ok(out)
    }

    /// Up to `limit` durable outbox entries numbered above `after`, oldest
    /// first.
    pub fn outbox_after(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, OutboxEntry)>, StoreError> {
        let durable = self.durable_outbox.load(Ordering::SeqCst);
        let start = match after {
            Some(n) => match n.checked_add(1) {
                Some(n) => key(b'o', &n.to_be_bytes()),
                None => return Ok(Vec::new()),
            },
            None => vec![b'o'],
        };
        let mut out = Vec::new();
        for item in self
            .db()?
            .range(start..key(b'o', &durable.to_be_bytes()))
            .take(limit)
        {
            let (k, v) = item?;
            let n = u64_from(&k, &k[1..])?;
            out.push((n, decode(&k, &v)?));
        }
        Ok(out)
    }

    /// The broker has the message: forget it. Not flushed on purpose: if the
    /// removal is lost in a crash, the ack is sent once more, which receivers
    /// tolerate; losing it would not be tolerable.
    pub fn remove_outbox(&self, n: u64) -> Result<bool, StoreError> {
        let removed = self.db()?.remove(key(b'o', &n.to_be_bytes()))?.is_some();
        if removed {
            self.outbox_len.fetch_sub(1, Ordering::Relaxed);
        }
        Ok(removed)
    }

    pub fn outbox_len(&self) -> u64 {
        self.outbox_len.load(Ordering::Relaxed)
    }

    /// Forgets finished tasks that became final before `cutoff_ms`. Returns
    /// how many were removed.
    pub fn prune_final(&self, cutoff_ms: u64, limit: usize) -> Result<usize, StoreError> {
        let end = key(b'f', &cutoff_ms.to_be_bytes());
        let mut removed = 0;
        let db = self.scan_db()?;
        // One batch for the pass (sled writes its log once per batch).
        let mut batch = sled::Batch::default();
        for item in db.range(vec![b'f']..end).take(limit) {
            let (k, _) = item?;
            batch.remove(key(b't', &k[9..]));
            batch.remove(k);
            removed += 1;
        }
        if removed > 0 {
            db.apply_batch(batch)?;
        }
        Ok(removed)
    }

    /// On-disk size in bytes, for status reports.
    pub fn size_on_disk(&self) -> u64 {
        self.db().and_then(|db| Ok(db.size_on_disk()?)).unwrap_or(0)
    }
}

#[cfg(test)]
fn injected_error() -> StoreError {
    StoreError::Sled(sled::Error::Io(std::io::Error::new(
        std::io::ErrorKind::StorageFull,
        "injected fault: no space left on device",
    )))
}

/// sled's segment (and I/O buffer) size for new stores. 128 KiB instead of
/// sled's 512 KiB lowered sled's peak RSS while writing 100 000 tasks from
/// 26.6 to 20.7 MiB (standalone, same key pattern; docs/BENCHMARKS.md).
const SEGMENT_SIZE: usize = 128 * 1024;

/// The segment size an existing store was created with (sled refuses to
/// open it with another), from sled's `conf` file; [`SEGMENT_SIZE`] for a
/// new store or a `conf` that does not say.
fn segment_size_of(path: &Path) -> usize {
    // The text is followed by a binary checksum: not valid UTF-8 as a whole.
    std::fs::read(path.join("conf"))
        .ok()
        .and_then(|conf| {
            String::from_utf8_lossy(&conf)
                .lines()
                .find_map(|l| l.strip_prefix("segment_size: "))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(SEGMENT_SIZE)
}

/// The first key of `prefix` after the id `after` (the whole prefix for
/// `None`), for paged range reads.
fn start_after(prefix: u8, after: Option<&str>) -> Vec<u8> {
    match after {
        Some(id) => {
            let mut k = key(prefix, id.as_bytes());
            k.push(0);
            k
        }
        None => vec![prefix],
    }
}

fn corrupt(k: &[u8], reason: &str) -> StoreError {
    StoreError::Corrupt {
        key: String::from_utf8_lossy(k).into_owned(),
        reason: reason.to_owned(),
    }
}

fn string_from(k: &[u8], v: &[u8]) -> Result<String, StoreError> {
    String::from_utf8(v.to_vec()).map_err(|_| corrupt(k, "not UTF-8"))
}

fn u64_from(k: &[u8], v: &[u8]) -> Result<u64, StoreError> {
    let bytes: [u8; 8] = v.try_into().map_err(|_| StoreError::Corrupt {
        key: String::from_utf8_lossy(k).into_owned(),
        reason: format!("expected 8 bytes, found {}", v.len()),
    })?;
    Ok(u64::from_be_bytes(bytes))
}

fn create_private_dir(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let err = |source| StoreError::Dir {
        path: path.display().to_string(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(task_id: &str, tag_id: &str, state: TaskState) -> TaskRecord {
        TaskRecord {
            task_id: task_id.into(),
            tag_id: tag_id.into(),
            seq: 1,
            issued_at: 1,
            expires_at: 10,
            accepted_at: 1,
            content: "{}".into(),
            content_hash: "00".into(),
            ack_target: "GID_b@@@b".into(),
            attempts: 0,
            state,
        }
    }

    fn entry(n: u8) -> OutboxEntry {
        OutboxEntry {
            topic: "esl_ack/p2p/GID_b@@@b".into(),
            payload: vec![n],
        }
    }

    #[tokio::test]
    async fn changes_survive_reopen_after_flush() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Arc::new(Store::open(dir.path(), 1 << 20).unwrap());
            let mut c = Change::new();
            let mut r = record("t1", "A", TaskState::Pending);
            r.seq = 7;
            c.put_task(&r);
            c.push_outbox(entry(1));
            assert_eq!(store.apply(c).unwrap(), vec![0]);
            store.flush().await.unwrap();
        }
        let store = Arc::new(Store::open(dir.path(), 1 << 20).unwrap());
        assert_eq!(store.pending_count().unwrap(), 1);
        assert_eq!(
            store.tag_slot("A").unwrap(),
            Some((7, Some("t1".to_owned())))
        );
        assert_eq!(store.outbox_len(), 1);
        // Numbering continues after a restart, so order is kept.
        let mut c = Change::new();
        c.push_outbox(entry(2));
        assert_eq!(store.apply(c).unwrap(), vec![1]);
    }

    #[tokio::test]
    async fn outbox_is_read_oldest_first_and_removed_by_number() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), 1 << 20).unwrap());
        for n in 0..5 {
            let mut c = Change::new();
            c.push_outbox(entry(n));
            store.apply(c).unwrap();
        }
        assert!(
            store.outbox_after(None, 10).unwrap().is_empty(),
            "nothing is published before the flush that covers it"
        );
        store.flush().await.unwrap();
        let first = store.outbox_after(None, 2).unwrap();
        assert_eq!(first.iter().map(|e| e.0).collect::<Vec<_>>(), vec![0, 1]);
        let rest = store.outbox_after(Some(1), 10).unwrap();
        assert_eq!(rest.iter().map(|e| e.0).collect::<Vec<_>>(), vec![2, 3, 4]);
        assert!(store.remove_outbox(0).unwrap());
        assert!(
            !store.remove_outbox(0).unwrap(),
            "second removal is a no-op"
        );
        assert_eq!(store.outbox_len(), 4);
        assert_eq!(store.outbox_after(None, 1).unwrap()[0].0, 1);
    }

    #[tokio::test]
    async fn applied_changes_are_read_at_once_and_reach_sled_in_one_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), 1 << 20).unwrap());
        for (task, tag) in [("t1", "A"), ("t2", "B")] {
            let mut c = Change::new();
            c.put_task(&record(task, tag, TaskState::Pending));
            store.apply(c).unwrap();
        }
        let in_sled = |k: &[u8]| store.db().unwrap().get(k).unwrap().is_some();
        assert!(
            store.task("t1").unwrap().is_some(),
            "visible before the flush"
        );
        assert!(!in_sled(b"tt1"), "staged, not handed to sled one by one");
        let mut c = Change::new();
        c.clear_pending(&record("t1", "A", TaskState::Pending));
        store.apply(c).unwrap();
        assert_eq!(
            store.pending_of("A").unwrap(),
            None,
            "a staged change is read before sled's value"
        );
        store.flush().await.unwrap();
        assert!(in_sled(b"tt1") && in_sled(b"tt2") && in_sled(b"pB"));
        assert_eq!(store.tag_slot("A").unwrap(), Some((1, None)));
        assert!(store.staged_map().is_empty());
        let x_b = expiry_key(10, "t2");
        let mut c = Change::new();
        c.clear_pending(&record("t2", "B", TaskState::Pending));
        store.apply(c).unwrap();
        assert!(in_sled(&x_b));
        assert_eq!(
            store.get(&x_b).unwrap(),
            None,
            "a staged removal hides sled's key"
        );
        store.flush().await.unwrap();
        assert!(!in_sled(&x_b));
        // A staged change is not durable: a reopen (after a fault) drops it.
        let mut c = Change::new();
        c.put_task(&record("t3", "C", TaskState::Pending));
        store.apply(c).unwrap();
        store.reopen().unwrap();
        assert!(store.task("t3").unwrap().is_none());
        assert!(store.task("t2").unwrap().is_some());
    }

    #[tokio::test]
    async fn pending_tasks_are_found_by_expiry_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), 1 << 20).unwrap());
        let mut c = Change::new();
        for (task, tag, expires_at) in [("t1", "A", 30), ("t2", "B", 10), ("t3", "C", 20)] {
            let mut r = record(task, tag, TaskState::Pending);
            r.expires_at = expires_at;
            c.put_task(&r);
        }
        store.apply(c).unwrap();
        assert_eq!(
            store.expiring_before(21, 10).unwrap(),
            vec![(10, "t2".to_owned()), (20, "t3".to_owned())]
        );
        assert_eq!(
            store.expiring_before(20, 10).unwrap().len(),
            1,
            "before, not at"
        );
        assert_eq!(
            store.expiring_before(u64::MAX, 2).unwrap().len(),
            2,
            "limit"
        );
        assert_eq!(
            store.pending_tags_after(None, 10).unwrap(),
            vec!["A", "B", "C"]
        );
        assert_eq!(store.pending_tags_after(Some("A"), 1).unwrap(), vec!["B"]);
    }

    #[tokio::test]
    async fn new_stores_use_small_segments_and_old_ones_keep_theirs() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path(), 1 << 20).unwrap());
        assert_eq!(segment_size_of(dir.path()), SEGMENT_SIZE);
        let old = tempfile::tempdir().unwrap();
        // Created by sled's defaults (512 KiB), as the first agent version did.
        drop(sled::open(old.path()).unwrap());
        assert_eq!(segment_size_of(old.path()), 512 * 1024);
        let store = Store::open(old.path(), 1 << 20).expect("opens with its own size");
        assert!(store.task("x").unwrap().is_none());
    }

    #[tokio::test]
    async fn a_layout_1_store_is_converted_at_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            // Layout 1: `p` tag → task id, `s` tag → seq, no `x`, no `mv`.
            let db = sled::open(dir.path()).unwrap();
            let mut r = record("t1", "A", TaskState::Pending);
            r.expires_at = 50;
            r.seq = 4;
            db.insert(key(b't', b"t1"), encode(&r)).unwrap();
            db.insert(key(b'p', b"A"), &b"t1"[..]).unwrap();
            db.insert(key(b's', b"A"), &4u64.to_be_bytes()[..]).unwrap();
            db.insert(key(b's', b"B"), &9u64.to_be_bytes()[..]).unwrap();
            db.flush().unwrap();
        }
        let store = Arc::new(Store::open(dir.path(), 1 << 20).unwrap());
        assert_eq!(
            store.expiring_before(51, 10).unwrap(),
            vec![(50, "t1".to_owned())]
        );
        assert_eq!(
            store.tag_slot("A").unwrap(),
            Some((4, Some("t1".to_owned())))
        );
        assert_eq!(
            store.tag_slot("B").unwrap(),
            Some((9, None)),
            "seq kept without a pending task"
        );
        assert_eq!(store.pending_count().unwrap(), 1);
        assert!(store.db().unwrap().scan_prefix([b's']).next().is_none());
        drop(store);
        // Opening again changes nothing.
        let store = Arc::new(Store::open(dir.path(), 1 << 20).unwrap());
        assert_eq!(
            store.tag_slot("A").unwrap(),
            Some((4, Some("t1".to_owned())))
        );
    }

    #[tokio::test]
    async fn final_tasks_leave_the_pending_index_and_can_be_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), 1 << 20).unwrap());
        let mut c = Change::new();
        c.put_task(&record("t1", "A", TaskState::Pending));
        store.apply(c).unwrap();
        let mut c = Change::new();
        c.put_task(&record(
            "t1",
            "A",
            TaskState::Final(FinalState {
                status: AckStatus::Applied,
                at: 100,
                detail: None,
            }),
        ));
        c.clear_pending(&record("t1", "A", TaskState::Pending));
        store.apply(c).unwrap();
        assert_eq!(store.pending_count().unwrap(), 0);
        assert_eq!(store.pending_of("A").unwrap(), None);
        assert!(
            store.expiring_before(u64::MAX, 10).unwrap().is_empty(),
            "the expiry index entry goes with the pending one"
        );
        assert!(store.task("t1").unwrap().is_some());
        assert_eq!(
            store.prune_final(100, 10).unwrap(),
            0,
            "cutoff is exclusive"
        );
        assert_eq!(store.prune_final(101, 10).unwrap(), 1);
        assert!(store.task("t1").unwrap().is_none());
    }

    #[tokio::test]
    async fn store_directory_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let _store = Store::open(&path, 1 << 20).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[tokio::test]
    async fn reopen_after_a_fault_keeps_what_was_flushed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), 1 << 20).unwrap());
        let mut c = Change::new();
        c.put_task(&record("t1", "A", TaskState::Pending));
        c.push_outbox(entry(1));
        store.apply(c).unwrap();
        store.flush().await.unwrap();
        store.inject_fault(1);
        assert!(store.apply(Change::new()).is_err(), "a faulted store fails");
        assert!(store.reopen().is_err(), "the disk is still full");
        assert!(store.task("t1").is_err(), "closed until a reopen works");
        store.reopen().unwrap();
        assert!(store.task("t1").unwrap().is_some());
        assert_eq!(store.outbox_len(), 1);
        assert_eq!(store.outbox_after(None, 10).unwrap().len(), 1);
        let mut c = Change::new();
        c.push_outbox(entry(2));
        assert_eq!(store.apply(c).unwrap(), vec![1], "numbering continues");
    }

    #[tokio::test]
    async fn a_second_open_of_the_same_store_fails() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path(), 1 << 20).unwrap();
        assert!(Store::open(dir.path(), 1 << 20).is_err());
    }
}
