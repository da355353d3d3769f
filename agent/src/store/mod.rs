//! The durable store: the only module that opens the database (SQLite,
//! through rusqlite).
//!
//! Writers build a [`Change`] and [`Store::apply`] it; nothing is durable
//! until [`Store::flush`] returns, and callers must not PUBACK or publish
//! acks that depend on a change before that (PROTOCOL §4 rule 1).
//!
//! # Why SQLite, not sled
//!
//! The design card named sled. sled 0.34.7 cannot hold the agent's central
//! promise (a PUBACKed task survives a power cut): its flush is `pwrite` +
//! `sync_file_range`, never `fsync`, so a power-cut test lost 29 % of the
//! PUBACKed tasks; and after one torn unsynced page it reopened *empty* or
//! panicked at every open (issue 13; figures in docs/RELIABILITY.md).
//! SQLite in WAL mode with `synchronous = FULL` fsyncs the log at every
//! commit and recovers from a torn log by its checksums.
//!
//! # Group commit
//!
//! One connection writes (`Writer`). The first change after a commit
//! opens a transaction (`BEGIN IMMEDIATE`); every later change joins it, and
//! the engine's own reads go through the same connection, so they see what
//! was applied at once. [`Store::begin_flush`] commits the transaction on a
//! blocking thread: `COMMIT` returns once the WAL is fsync'd (`synchronous =
//! FULL`), and only then does the returned future resolve. The engine does
//! not touch the store while a flush runs (it would wait for the
//! connection); messages queue in its channel meanwhile and form the next,
//! larger group.
//!
//! A second connection ([`Store::outbox_after`], [`Store::remove_outbox`])
//! serves the MQTT link. It sees only committed rows, so the link can never
//! publish an ack whose state change is not on disk; the outbox numbers
//! below `durable_outbox` are those a finished flush covered. The link's
//! removals (the broker PUBACKed an ack) wait in memory and are deleted in
//! the next commit: if a crash loses them the ack is sent once more, which
//! receivers tolerate.
//!
//! A third connection, owned by the checkpoint thread, copies the WAL into
//! the database file off the engine's path (`wal_autocheckpoint` is off, so
//! no `COMMIT` pays for a checkpoint). Space freed by pruning and by
//! delivered acks goes back to the file system by `incremental_vacuum`
//! ([`Store::reclaim`]); the WAL is cut back to `JOURNAL_SIZE_LIMIT` when it
//! restarts.
//!
//! # Schema (version 1, `PRAGMA user_version`)
//!
//! | table | key | meaning |
//! |---|---|---|
//! | `tasks` | `task_id` (unique index; rows in arrival order) | every task, pending or final; `status` is `pending` or the final ack status |
//! | `tags` | `tag_id` | highest `seq` accepted for the tag, and its pending task (NULL: none) |
//! | `tag_reports` | `tag_id` | last check-in report (best effort) |
//! | `tag_content` | `tag_id` | last content the tag confirmed, for `tag.refresh` |
//! | `outbox` | `n` | ack or reply waiting for the broker's PUBACK |
//! | `meta` | `key` | `next_outbox`: the next outbox number |
//!
//! Pending tasks are not mirrored in memory: the engine asks `tags` at a
//! check-in and the partial index `tasks_expiry` for expiry, so the agent's
//! memory does not grow with the number of pending tasks. A task is pending
//! exactly while its `status` is `pending` and `tags.pending_task` names it;
//! [`Change::put_task`] and [`Change::clear_pending`] keep the two together.
//! Integers are SQLite's signed 64 bits: u64 values are stored bit for bit,
//! except `expires_at`, which is capped at `i64::MAX` so that the expiry
//! index stays in time order (both mean "never" in practice).
//!
//! Migrations run forward at open, one transaction each (`MIGRATIONS`); a
//! store from a newer agent is refused, and so is a leftover sled store.
//!
//! # Faults
//!
//! After a failed write (a full disk, an I/O error) SQLite may have rolled
//! the open transaction back on its own. So, as the engine's model expects,
//! the first error marks the store faulted: every later call fails until
//! [`Store::reopen`], which closes the connections, opens them again from
//! what is on disk (everything committed before the fault), and lets the
//! engine rebuild its view. Between the two, calls return
//! [`StoreError::Closed`] or the fault.

mod ble_keys;

pub(crate) use ble_keys::BleKeys;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use serde::{Deserialize, Serialize};

use crate::wire::AckStatus;

/// The database file inside `store.path` (with `-wal` and `-shm` beside it).
pub(crate) const DB_FILE: &str = "store.sqlite3";
/// Held with `flock` while an agent has the store open.
const LOCK_FILE: &str = "lock";

#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    /// SQLite's own error (no `#[source]`: its text is already here, and an
    /// error chain would print it twice).
    #[error("store database: {0}")]
    Sql(rusqlite::Error),
    #[error("store record {key}: cannot decode ({reason})")]
    Corrupt { key: String, reason: String },
    /// The cause is a field, not a `#[source]`: it is in the message
    /// already, and an error chain would print it twice.
    #[error("store directory {path}: {cause}")]
    Dir { path: String, cause: std::io::Error },
    #[error("store {path} is in use by another esl-agent process (it holds {path}/{LOCK_FILE})")]
    Locked { path: String },
    #[error(
        "store {path} has schema version {found}, newer than this agent's {supported}: \
         it was written by a newer esl-agent. Run that version, or move the store away \
         to start with an empty one"
    )]
    Newer {
        path: String,
        found: i64,
        supported: i64,
    },
    #[error(
        "{path} holds a store of an earlier esl-agent (sled), which this version does not \
         read (it keeps its store in SQLite). Move it away (`mv {path} {path}.sled`) or \
         delete it, then start again; tasks still pending in it are not carried over"
    )]
    Sled { path: String },
    /// Closed for [`Store::reopen`] and not (yet) open again.
    #[error("store: closed after a fault, not reopened yet")]
    Closed,
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Sql(e)
    }
}

/// What the store keeps about a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct TaskRecord {
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
pub(crate) enum TaskState {
    Pending,
    Final(FinalState),
}

/// The final ack of a task, kept so a duplicate can be answered with it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct FinalState {
    pub status: AckStatus,
    pub at: u64,
    pub detail: Option<String>,
}

/// An ack or reply waiting for the broker's PUBACK.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct OutboxEntry {
    pub topic: String,
    pub payload: Vec<u8>,
}

/// Last check-in of a tag.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct TagRecord {
    pub battery_mv: Option<u16>,
    pub rssi: Option<i16>,
    pub content_hash: Option<String>,
    pub last_seen: Option<u64>,
}

/// The schema's migrations, in order: entry `i` takes a store from version
/// `i` to `i + 1`. Version 0 is an empty file. Add a migration at the end;
/// never change one that has shipped.
const MIGRATIONS: &[&str] = &[
    // 1: the first SQLite layout.
    "CREATE TABLE tasks (
        id           INTEGER PRIMARY KEY,
        task_id      TEXT NOT NULL,
        tag_id       TEXT NOT NULL,
        seq          INTEGER NOT NULL,
        issued_at    INTEGER NOT NULL,
        expires_at   INTEGER NOT NULL,
        accepted_at  INTEGER NOT NULL,
        content      TEXT NOT NULL,
        content_hash TEXT NOT NULL,
        ack_target   TEXT NOT NULL,
        attempts     INTEGER NOT NULL,
        status       TEXT NOT NULL,
        final_at     INTEGER,
        detail       TEXT
    );
    CREATE UNIQUE INDEX tasks_by_id ON tasks (task_id);
    CREATE INDEX tasks_expiry ON tasks (expires_at) WHERE status = 'pending';
    CREATE INDEX tasks_final ON tasks (final_at) WHERE final_at IS NOT NULL;
    CREATE TABLE tags (
        tag_id       TEXT PRIMARY KEY,
        max_seq      INTEGER NOT NULL,
        pending_task TEXT
    ) WITHOUT ROWID;
    CREATE TABLE tag_reports (
        tag_id       TEXT PRIMARY KEY,
        battery_mv   INTEGER,
        rssi         INTEGER,
        content_hash TEXT,
        last_seen    INTEGER
    ) WITHOUT ROWID;
    CREATE TABLE tag_content (
        tag_id  TEXT PRIMARY KEY,
        task_id TEXT NOT NULL,
        content TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE outbox (
        n       INTEGER PRIMARY KEY,
        topic   TEXT NOT NULL,
        payload BLOB NOT NULL
    );
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    ) WITHOUT ROWID;",
];

/// Database page size for new stores. Every commit writes each page it
/// changed into the WAL, so at a trickle (one task per commit, 5–6 pages)
/// smaller pages write less: measured with the store alone, bytes written
/// per task at 10 tasks/s were 24.5 KiB with 4 KiB pages, 13.7 KiB with
/// 2 KiB, 9.8 KiB with 1 KiB; in a 10 000-task burst of 1 000-task commits
/// 1.2 / 1.2 / 1.3 KiB (sequential ids) and 1.6 / 1.7 / 2.1 KiB (random
/// ids), because a checkpoint's random writes of small pages each dirty a
/// whole 4 KiB page of the file system. 2 KiB halves the trickle's writes
/// at almost no cost in a burst (docs/BENCHMARKS.md).
const PAGE_SIZE: u32 = 2048;

/// The WAL is checkpointed into the database file once it holds this much
/// (or when the store has been quiet for `CHECKPOINT_IDLE`). Larger means
/// fewer database writes for pages that change often (each checkpoint
/// writes a page once however many commits changed it), at the cost of WAL
/// space and a longer recovery scan at open.
const CHECKPOINT_WAL_BYTES: u64 = 4 << 20;
/// After this long without a commit the WAL is emptied and truncated.
const CHECKPOINT_IDLE: Duration = Duration::from_secs(5);
/// How often the checkpoint thread looks when no commit wakes it.
const CHECKPOINT_POLL: Duration = Duration::from_secs(1);
/// How long a quiet TRUNCATE checkpoint waits for the engine's writes or a
/// reader to end before it gives up until the next quiet round.
const QUIET_BUSY: Duration = Duration::from_millis(100);
/// When the WAL restarts after a checkpoint it is truncated to this size,
/// so a burst does not leave a large file behind.
const JOURNAL_SIZE_LIMIT: i64 = 1 << 20;
/// Page cache of the link's and the checkpointer's connections (KiB).
const SMALL_CACHE_KIB: i64 = 256;
/// How long the writer waits for a lock held by someone else (an operator's
/// `sqlite3` shell that started a write, say) before the call fails.
const BUSY_TIMEOUT: Duration = Duration::from_secs(2);
/// Changes or outbox removals older than this are committed even when no
/// task asks for a flush (check-in reports, PUBACKed acks): see
/// [`Store::wants_commit`].
const IDLE_COMMIT: Duration = Duration::from_secs(1);
/// Free pages are given back ([`Store::reclaim`]) once there are at least
/// this many and they are a quarter of the file.
const RECLAIM_MIN_PAGES: i64 = 64;

/// One change: the operations a decision makes, applied in order.
#[derive(Debug)]
enum Op {
    PutTask(TaskRecord),
    ClearPending { tag_id: String, seq: u64 },
    PutTag(String, TagRecord),
    PutLastContent(String, String, String),
}

/// Changes to apply atomically. Built by the engine, applied by the store.
#[derive(Default)]
pub(crate) struct Change {
    ops: Vec<Op>,
    outbox: Vec<OutboxEntry>,
}

impl Change {
    pub(crate) fn new() -> Self {
        Change::default()
    }

    /// Writes the task; a pending one also becomes its tag's pending task
    /// and raises the tag's highest seq to its own.
    pub(crate) fn put_task(&mut self, record: &TaskRecord) {
        self.ops.push(Op::PutTask(record.clone()));
    }

    /// `record`, which was the pending task of its tag, is not any more (it
    /// is being finished): the tag keeps its seq and has no pending task.
    /// The caller writes the final record with [`Change::put_task`], which
    /// also takes it out of the expiry index.
    pub(crate) fn clear_pending(&mut self, record: &TaskRecord) {
        self.ops.push(Op::ClearPending {
            tag_id: record.tag_id.clone(),
            seq: record.seq,
        });
    }

    pub(crate) fn put_tag(&mut self, tag_id: &str, tag: &TagRecord) {
        self.ops.push(Op::PutTag(tag_id.to_owned(), tag.clone()));
    }

    /// Remembers what a tag displays, for `tag.refresh`.
    pub(crate) fn put_last_content(&mut self, tag_id: &str, task_id: &str, content: &str) {
        self.ops.push(Op::PutLastContent(
            tag_id.to_owned(),
            task_id.to_owned(),
            content.to_owned(),
        ));
    }

    /// Queues a message for the broker; it gets its outbox number in
    /// [`Store::apply`].
    pub(crate) fn push_outbox(&mut self, entry: OutboxEntry) {
        self.outbox.push(entry);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.ops.is_empty() && self.outbox.is_empty()
    }
}

/// The writing connection and its open transaction.
struct Writer {
    conn: Connection,
    /// When the open transaction began (`None`: no transaction open).
    open_since: Option<Instant>,
    /// The `next_outbox` value the database holds (as of the open
    /// transaction).
    saved_next_outbox: u64,
}

impl Writer {
    fn begin(&mut self) -> Result<(), StoreError> {
        if self.open_since.is_none() {
            self.conn.execute_batch("BEGIN IMMEDIATE")?;
            self.open_since = Some(Instant::now());
        }
        Ok(())
    }

    fn exec(&self, op: &Op) -> Result<(), StoreError> {
        match op {
            Op::PutTask(r) => {
                let (status, final_at, detail) = match &r.state {
                    TaskState::Pending => ("pending", None, None),
                    TaskState::Final(f) => {
                        (f.status.as_str(), Some(f.at as i64), f.detail.as_deref())
                    }
                };
                self.conn
                    .prepare_cached(
                        "INSERT INTO tasks (task_id, tag_id, seq, issued_at, expires_at,
                             accepted_at, content, content_hash, ack_target, attempts,
                             status, final_at, detail)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
                         ON CONFLICT (task_id) DO UPDATE SET tag_id = excluded.tag_id,
                             seq = excluded.seq, issued_at = excluded.issued_at,
                             expires_at = excluded.expires_at,
                             accepted_at = excluded.accepted_at, content = excluded.content,
                             content_hash = excluded.content_hash,
                             ack_target = excluded.ack_target, attempts = excluded.attempts,
                             status = excluded.status, final_at = excluded.final_at,
                             detail = excluded.detail",
                    )?
                    .execute(params![
                        r.task_id,
                        r.tag_id,
                        r.seq as i64,
                        r.issued_at as i64,
                        expiry_value(r.expires_at),
                        r.accepted_at as i64,
                        r.content,
                        r.content_hash,
                        r.ack_target,
                        r.attempts,
                        status,
                        final_at,
                        detail,
                    ])?;
                if r.state == TaskState::Pending {
                    self.put_slot(&r.tag_id, r.seq, Some(&r.task_id))?;
                }
            }
            Op::ClearPending { tag_id, seq } => self.put_slot(tag_id, *seq, None)?,
            Op::PutTag(tag_id, t) => {
                self.conn
                    .prepare_cached(
                        "INSERT OR REPLACE INTO tag_reports
                             (tag_id, battery_mv, rssi, content_hash, last_seen)
                         VALUES (?1, ?2, ?3, ?4, ?5)",
                    )?
                    .execute(params![
                        tag_id,
                        t.battery_mv,
                        t.rssi,
                        t.content_hash,
                        t.last_seen.map(|s| s as i64),
                    ])?;
            }
            Op::PutLastContent(tag_id, task_id, content) => {
                self.conn
                    .prepare_cached(
                        "INSERT OR REPLACE INTO tag_content (tag_id, task_id, content)
                         VALUES (?1, ?2, ?3)",
                    )?
                    .execute(params![tag_id, task_id, content])?;
            }
        }
        Ok(())
    }

    fn put_slot(&self, tag_id: &str, seq: u64, task_id: Option<&str>) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "INSERT OR REPLACE INTO tags (tag_id, max_seq, pending_task) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![tag_id, seq as i64, task_id])?;
        Ok(())
    }
}

/// What the checkpoint thread is told.
#[derive(Default)]
struct CheckpointState {
    /// A commit happened since the thread last looked.
    woken: bool,
    stop: bool,
    /// When the last commit happened (`None`: none since the store opened).
    last_commit: Option<Instant>,
}

/// The checkpoint thread's handle.
#[derive(Default)]
struct CheckpointSignal {
    state: Mutex<CheckpointState>,
    cond: Condvar,
}

impl CheckpointSignal {
    /// A commit wrote to the WAL.
    fn wake(&self) {
        let mut s = lock(&self.state);
        s.woken = true;
        s.last_commit = Some(Instant::now());
        drop(s);
        self.cond.notify_one();
    }

    fn stop(&self) {
        lock(&self.state).stop = true;
        self.cond.notify_one();
    }
}

/// Handle to the store. Shared by the engine (writes and its reads), the
/// link (outbox) and the status task (size).
pub(crate) struct Store {
    dir: PathBuf,
    cache_kib: i64,
    /// `flock`ed for as long as the store exists: one agent per store.
    _lock: nix::fcntl::Flock<std::fs::File>,
    /// The engine's connection; `None` between closing and reopening it.
    writer: Mutex<Option<Writer>>,
    /// The link's connection (committed rows only).
    reader: Mutex<Option<Connection>>,
    /// Set by the first failed operation; cleared by [`Store::reopen`].
    faulted: AtomicBool,
    /// Test hook: `Some(n)` makes every operation fail the way a full disk
    /// does, and the next `n` reopens fail too; the reopen after those
    /// clears it.
    #[cfg(test)]
    injected_fault: Mutex<Option<u32>>,
    /// Outbox entries the broker has PUBACKed, deleted at the next commit,
    /// and when the oldest of them came.
    removals: Mutex<(BTreeSet<u64>, Option<Instant>)>,
    next_outbox: AtomicU64,
    /// Outbox entries numbered below this are on disk. The link publishes
    /// only those: an ack must never reach the back end before the state
    /// change behind it is durable (a crash would otherwise undo the change
    /// after the back end saw its ack).
    durable_outbox: AtomicU64,
    outbox_len: AtomicU64,
    checkpoint: Arc<CheckpointSignal>,
    checkpointer: Option<std::thread::JoinHandle<()>>,
}

/// Locks a mutex whose data stays consistent even if a holder panicked
/// (every critical section here is a single assignment or a complete SQL
/// call).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Store {
    /// Opens (or creates) the store in the directory `path` with a page
    /// cache of `cache_bytes`. The directory is created with mode 0700.
    pub(crate) fn open(path: &Path, cache_bytes: u64) -> Result<Store, StoreError> {
        create_private_dir(path)?;
        let dir_err = |cause| StoreError::Dir {
            path: path.display().to_string(),
            cause,
        };
        if !path.join(DB_FILE).exists() && ["conf", "db"].iter().all(|f| path.join(f).exists()) {
            return Err(StoreError::Sled {
                path: path.display().to_string(),
            });
        }
        let lock_file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path.join(LOCK_FILE))
            .map_err(dir_err)?;
        let lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, errno)| match errno {
                nix::errno::Errno::EWOULDBLOCK => StoreError::Locked {
                    path: path.display().to_string(),
                },
                other => dir_err(std::io::Error::from(other)),
            })?;
        let checkpoint = Arc::new(CheckpointSignal::default());
        let mut store = Store {
            dir: path.to_owned(),
            cache_kib: (cache_bytes / 1024).max(64) as i64,
            _lock: lock,
            writer: Mutex::new(None),
            reader: Mutex::new(None),
            faulted: AtomicBool::new(false),
            #[cfg(test)]
            injected_fault: Default::default(),
            removals: Default::default(),
            next_outbox: AtomicU64::new(0),
            durable_outbox: AtomicU64::new(0),
            outbox_len: AtomicU64::new(0),
            checkpoint: checkpoint.clone(),
            checkpointer: None,
        };
        store.open_db()?;
        let db = store.db_path();
        store.checkpointer = Some(
            std::thread::Builder::new()
                .name("store-checkpoint".into())
                .spawn(move || run_checkpointer(&db, &checkpoint))
                .map_err(dir_err)?,
        );
        Ok(store)
    }

    fn db_path(&self) -> PathBuf {
        self.dir.join(DB_FILE)
    }

    /// Opens both connections, migrates the schema, and derives the outbox
    /// counters from what is on disk. Everything on disk counts as durable:
    /// it survived.
    fn open_db(&self) -> Result<(), StoreError> {
        let mut conn = Connection::open(self.db_path())?;
        configure(&conn, self.cache_kib)?;
        migrate(&mut conn, &self.dir, MIGRATIONS)?;
        let next_outbox: u64 = conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'next_outbox'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .optional()?
            .map(|v| v as u64)
            .unwrap_or(0);
        let outbox_len: u64 = conn.query_row("SELECT count(*) FROM outbox", [], |r| {
            r.get::<_, i64>(0).map(|n| n as u64)
        })?;
        // Read-write at the file level (a read-only connection to a WAL
        // database needs extra care), but it never writes: `query_only`.
        let reader = Connection::open_with_flags(
            self.db_path(),
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        reader.execute_batch(&format!(
            "PRAGMA cache_size = -{SMALL_CACHE_KIB}; PRAGMA mmap_size = 0; PRAGMA query_only = 1;"
        ))?;
        self.next_outbox.store(next_outbox, Ordering::SeqCst);
        self.durable_outbox.store(next_outbox, Ordering::SeqCst);
        self.outbox_len.store(outbox_len, Ordering::Relaxed);
        *lock(&self.removals) = Default::default();
        *lock(&self.reader) = Some(reader);
        *lock(&self.writer) = Some(Writer {
            conn,
            open_since: None,
            saved_next_outbox: next_outbox,
        });
        self.faulted.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// The writer, unless the store is closed or faulted.
    fn writer(&self) -> Result<MutexGuard<'_, Option<Writer>>, StoreError> {
        self.check_open()?;
        let w = lock(&self.writer);
        if w.is_none() {
            return Err(StoreError::Closed);
        }
        Ok(w)
    }

    fn check_open(&self) -> Result<(), StoreError> {
        #[cfg(test)]
        if lock(&self.injected_fault).is_some() {
            return Err(injected_error());
        }
        if self.faulted.load(Ordering::SeqCst) {
            return Err(StoreError::Closed);
        }
        Ok(())
    }

    /// Passes a result through; an error of a write marks the store
    /// faulted (SQLite may have rolled the transaction back by itself).
    fn guard<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        if result.is_err() {
            self.faulted.store(true, Ordering::SeqCst);
        }
        result
    }

    /// Runs a read on the writer connection (which sees applied changes).
    fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let w = self.writer()?;
        let w = w.as_ref().expect("writer() checked it is open");
        f(&w.conn)
    }

    /// Closes the database and opens it again from disk: the way out of a
    /// fault. Changes applied but not flushed before the fault are gone
    /// afterwards; the caller must rebuild whatever it derived from them.
    /// Fails (and stays closed; try again later) while the disk is still
    /// unusable.
    pub(crate) fn reopen(&self) -> Result<(), StoreError> {
        self.faulted.store(true, Ordering::SeqCst);
        // Dropping the writer rolls back its open transaction.
        drop(lock(&self.writer).take());
        drop(lock(&self.reader).take());
        #[cfg(test)]
        {
            let mut injected = lock(&self.injected_fault);
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
        *lock(&self.injected_fault) = Some(failing_reopens);
    }

    /// Applies one change (visible to the engine's reads at once, durable
    /// after the next [`Store::flush`]). Returns the outbox numbers it
    /// assigned.
    pub(crate) fn apply(&self, change: Change) -> Result<Vec<u64>, StoreError> {
        let mut w = self.writer()?;
        if change.is_empty() {
            // No transaction for nothing: an open one holds SQLite's write
            // lock and keeps the checkpoint thread from seeing a quiet store.
            return Ok(Vec::new());
        }
        let w = w.as_mut().expect("writer() checked it is open");
        let result = (|| {
            w.begin()?;
            for op in &change.ops {
                w.exec(op)?;
            }
            let mut numbers = Vec::with_capacity(change.outbox.len());
            if !change.outbox.is_empty() {
                // Only the engine applies changes, so numbers are handed out
                // by one task; the atomic makes them cheap to share.
                let first = self
                    .next_outbox
                    .fetch_add(change.outbox.len() as u64, Ordering::SeqCst);
                let mut insert = w
                    .conn
                    .prepare_cached("INSERT INTO outbox (n, topic, payload) VALUES (?1, ?2, ?3)")?;
                for (i, entry) in change.outbox.iter().enumerate() {
                    let n = first + i as u64;
                    insert.execute(params![n as i64, entry.topic, entry.payload])?;
                    numbers.push(n);
                }
                self.outbox_len
                    .fetch_add(numbers.len() as u64, Ordering::Relaxed);
            }
            Ok(numbers)
        })();
        self.guard(result)
    }

    /// Makes every applied change durable: survives a process crash and a
    /// power cut. One flush covers any number of changes: this is the group
    /// commit.
    pub(crate) async fn flush(self: &Arc<Self>) -> Result<(), StoreError> {
        self.begin_flush()?.await
    }

    /// [`Store::flush`] as a future that may run on another task. The
    /// commit (and its fsync) runs on a blocking thread and holds the
    /// writer: the caller must not apply or read until it has ended (the
    /// engine does not), or it waits for the disk.
    pub(crate) fn begin_flush(
        self: &Arc<Self>,
    ) -> Result<
        impl std::future::Future<Output = Result<(), StoreError>> + Send + 'static,
        StoreError,
    > {
        self.check_open()?;
        let store = Arc::clone(self);
        Ok(async move {
            tokio::task::spawn_blocking(move || store.commit())
                .await
                .map_err(|_| StoreError::Closed)?
        })
    }

    /// Commits the open transaction, with the outbox removals and the next
    /// outbox number, and waits for the disk (`synchronous = FULL`).
    fn commit(&self) -> Result<(), StoreError> {
        let mut guard = self.writer()?;
        let w = guard.as_mut().expect("writer() checked it is open");
        // Entries applied before this point are covered by this commit.
        let covered = self.next_outbox.load(Ordering::SeqCst);
        let removals: Vec<u64> = lock(&self.removals).0.iter().copied().collect();
        // Whether a COMMIT wrote anything (nothing to do: no fsync).
        let result = (|| {
            if !removals.is_empty() || covered != w.saved_next_outbox {
                w.begin()?;
            }
            if w.open_since.is_none() {
                return Ok(false);
            }
            let mut delete = w.conn.prepare_cached("DELETE FROM outbox WHERE n = ?1")?;
            for n in &removals {
                delete.execute([*n as i64])?;
            }
            drop(delete);
            if covered != w.saved_next_outbox {
                w.conn
                    .prepare_cached(
                        "INSERT OR REPLACE INTO meta (key, value) VALUES ('next_outbox', ?1)",
                    )?
                    .execute([covered as i64])?;
            }
            w.conn.execute_batch("COMMIT")?;
            w.open_since = None;
            w.saved_next_outbox = covered;
            Ok(true)
        })();
        let committed = self.guard(result)?;
        {
            let mut pending = lock(&self.removals);
            for n in &removals {
                pending.0.remove(n);
            }
            if pending.0.is_empty() {
                pending.1 = None;
            }
            drop(pending);
            self.durable_outbox.fetch_max(covered, Ordering::SeqCst);
            if committed {
                self.checkpoint.wake();
            }
        }
        Ok(())
    }

    /// Whether something has waited for a commit longer than
    /// `IDLE_COMMIT`: changes that asked for no flush (check-in reports)
    /// or outbox removals. The engine flushes then, so neither waits for
    /// the next task.
    pub(crate) fn wants_commit(&self) -> bool {
        let due = |since: Option<Instant>| since.is_some_and(|t| t.elapsed() >= IDLE_COMMIT);
        if due(lock(&self.removals).1) {
            return true;
        }
        lock(&self.writer)
            .as_ref()
            .is_some_and(|w| due(w.open_since))
    }

    pub(crate) fn task(&self, task_id: &str) -> Result<Option<TaskRecord>, StoreError> {
        self.read(|c| {
            c.prepare_cached(
                "SELECT task_id, tag_id, seq, issued_at, expires_at, accepted_at, content,
                        content_hash, ack_target, attempts, status, final_at, detail
                 FROM tasks WHERE task_id = ?1",
            )?
            .query_row([task_id], task_from_row)
            .optional()?
            .transpose()
        })
    }

    /// The tag's highest accepted seq and its pending task, if any.
    pub(crate) fn tag_slot(
        &self,
        tag_id: &str,
    ) -> Result<Option<(u64, Option<String>)>, StoreError> {
        self.read(|c| {
            Ok(
                c.prepare_cached("SELECT max_seq, pending_task FROM tags WHERE tag_id = ?1")?
                    .query_row([tag_id], |r| {
                        Ok((r.get::<_, i64>(0)? as u64, r.get::<_, Option<String>>(1)?))
                    })
                    .optional()?,
            )
        })
    }

    /// The id of the tag's pending task, if it has one.
    pub(crate) fn pending_of(&self, tag_id: &str) -> Result<Option<String>, StoreError> {
        Ok(self.tag_slot(tag_id)?.and_then(|(_, task)| task))
    }

    /// How many tags have a pending task (for start-up and after a reopen).
    pub(crate) fn pending_count(&self) -> Result<usize, StoreError> {
        self.read(|c| {
            Ok(c.query_row(
                "SELECT count(*) FROM tasks WHERE status = 'pending'",
                [],
                |r| r.get::<_, i64>(0),
            )? as usize)
        })
    }

    /// Up to `limit` tags with a pending task whose id is after `after`, in
    /// id order.
    pub(crate) fn pending_tags_after(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT tag_id FROM tags WHERE pending_task IS NOT NULL AND tag_id > ?1
                 ORDER BY tag_id LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![after.unwrap_or(""), limit as i64], |r| r.get(0))?;
            Ok(rows.collect::<Result<Vec<String>, _>>()?)
        })
    }

    /// Up to `limit` pending tasks that expire before `now`, oldest expiry
    /// first, as `(expires_at, task_id)`.
    pub(crate) fn expiring_before(
        &self,
        now: u64,
        limit: usize,
    ) -> Result<Vec<(u64, String)>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT expires_at, task_id FROM tasks
                 WHERE status = 'pending' AND expires_at < ?1
                 ORDER BY expires_at LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![expiry_value(now), limit as i64], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get(1)?))
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    /// The last task and content a tag confirmed.
    pub(crate) fn last_content(
        &self,
        tag_id: &str,
    ) -> Result<Option<(String, String)>, StoreError> {
        self.read(|c| {
            Ok(
                c.prepare_cached("SELECT task_id, content FROM tag_content WHERE tag_id = ?1")?
                    .query_row([tag_id], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()?,
            )
        })
    }

    /// Every tag's last check-in, for the engine's start-up.
    pub(crate) fn tags(&self) -> Result<Vec<(String, TagRecord)>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare(
                "SELECT tag_id, battery_mv, rssi, content_hash, last_seen FROM tag_reports
                 ORDER BY tag_id",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get(0)?,
                    TagRecord {
                        battery_mv: r.get(1)?,
                        rssi: r.get(2)?,
                        content_hash: r.get(3)?,
                        last_seen: r.get::<_, Option<i64>>(4)?.map(|s| s as u64),
                    },
                ))
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    /// Up to `limit` tasks whose id is greater than `after`, in id order
    /// (for paged listings).
    pub(crate) fn tasks_after(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<TaskRecord>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT task_id, tag_id, seq, issued_at, expires_at, accepted_at, content,
                        content_hash, ack_target, attempts, status, final_at, detail
                 FROM tasks WHERE task_id > ?1 ORDER BY task_id LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![after.unwrap_or(""), limit as i64], task_from_row)?;
            let mut out = Vec::new();
            for row in rows {
                out.push(row??);
            }
            Ok(out)
        })
    }

    /// Up to `limit` durable outbox entries numbered above `after`, oldest
    /// first (the link's connection: committed rows only).
    pub(crate) fn outbox_after(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, OutboxEntry)>, StoreError> {
        self.check_open()?;
        let durable = self.durable_outbox.load(Ordering::SeqCst);
        let start = match after {
            Some(n) => match n.checked_add(1) {
                Some(n) => n,
                None => return Ok(Vec::new()),
            },
            None => 0,
        };
        // Entries the broker already has are skipped; ask for that many more.
        let removed_len = lock(&self.removals).0.len();
        let reader = lock(&self.reader);
        let reader = reader.as_ref().ok_or(StoreError::Closed)?;
        let mut stmt = reader.prepare_cached(
            "SELECT n, topic, payload FROM outbox WHERE n >= ?1 AND n < ?2 ORDER BY n LIMIT ?3",
        )?;
        let rows = stmt.query_map(
            params![start as i64, durable as i64, (limit + removed_len) as i64],
            |r| {
                Ok((
                    r.get::<_, i64>(0)? as u64,
                    OutboxEntry {
                        topic: r.get(1)?,
                        payload: r.get(2)?,
                    },
                ))
            },
        )?;
        // Looked up under the lock while the rows stream, not copied: the
        // set is the link's PUBACKed entries and this runs at every outbox
        // fill; rows are read only until `limit` are kept. (No path takes
        // the reader's lock while holding this one.)
        let removed = lock(&self.removals);
        let mut out = Vec::new();
        for row in rows {
            let (n, entry) = row?;
            if !removed.0.contains(&n) {
                out.push((n, entry));
                if out.len() == limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// The broker has the message: forget it (deleted at the next commit).
    /// Not flushed on purpose: if the removal is lost in a crash, the ack is
    /// sent once more, which receivers tolerate.
    pub(crate) fn remove_outbox(&self, n: u64) -> Result<bool, StoreError> {
        self.check_open()?;
        let exists = {
            let guard = lock(&self.reader);
            let reader = guard.as_ref().ok_or(StoreError::Closed)?;
            let found = reader
                .prepare_cached("SELECT 1 FROM outbox WHERE n = ?1")?
                .query_row([n as i64], |_| Ok(()))
                .optional()?;
            found.is_some()
        };
        if !exists {
            return Ok(false);
        }
        let mut removals = lock(&self.removals);
        if !removals.0.insert(n) {
            return Ok(false);
        }
        removals.1.get_or_insert_with(Instant::now);
        self.outbox_len.fetch_sub(1, Ordering::Relaxed);
        Ok(true)
    }

    pub(crate) fn outbox_len(&self) -> u64 {
        self.outbox_len.load(Ordering::Relaxed)
    }

    /// Forgets finished tasks that became final before `cutoff_ms` (at most
    /// `limit`, oldest first; in the open transaction). Returns how many
    /// were removed.
    pub(crate) fn prune_final(&self, cutoff_ms: u64, limit: usize) -> Result<usize, StoreError> {
        let mut w = self.writer()?;
        let w = w.as_mut().expect("writer() checked it is open");
        let result = (|| {
            let any = w
                .conn
                .prepare_cached("SELECT 1 FROM tasks WHERE final_at < ?1 LIMIT 1")?
                .query_row([cutoff_ms as i64], |_| Ok(()))
                .optional()?;
            if any.is_none() {
                return Ok(0);
            }
            w.begin()?;
            Ok(w.conn
                .prepare_cached(
                    "DELETE FROM tasks WHERE id IN (SELECT id FROM tasks
                     WHERE final_at < ?1 ORDER BY final_at LIMIT ?2)",
                )?
                .execute(params![cutoff_ms as i64, limit as i64])?)
        })();
        self.guard(result)
    }

    /// Gives free pages back to the file system (`incremental_vacuum`, in
    /// the open transaction) once they are many and a quarter of the file:
    /// after pruning, and after a flood of acks or replies has been
    /// delivered. Returns the number of pages freed.
    pub(crate) fn reclaim(&self) -> Result<u64, StoreError> {
        let mut w = self.writer()?;
        let w = w.as_mut().expect("writer() checked it is open");
        let result = (|| {
            let free: i64 = w
                .conn
                .query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
            let total: i64 = w.conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
            if free < RECLAIM_MIN_PAGES || free * 4 < total {
                return Ok(0);
            }
            w.begin()?;
            // The pragma frees one page per step: step it to the end.
            let mut stmt = w
                .conn
                .prepare(&format!("PRAGMA incremental_vacuum({free})"))?;
            let mut rows = stmt.query([])?;
            while rows.next()?.is_some() {}
            Ok(free as u64)
        })();
        self.guard(result)
    }

    /// On-disk size in bytes (database and WAL), for status reports.
    pub(crate) fn size_on_disk(&self) -> u64 {
        let db = self.db_path();
        [db.clone(), wal_path(&db)]
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum()
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.checkpoint.stop();
        if let Some(t) = self.checkpointer.take() {
            // A panicked checkpointer has nothing left to clean up.
            let _ = t.join();
        }
    }
}

/// Per-connection settings of the writer (the journal mode and auto-vacuum
/// are properties of the file, set here when it is new).
fn configure(conn: &Connection, cache_kib: i64) -> Result<(), StoreError> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.set_prepared_statement_cache_capacity(32);
    // page_size and auto_vacuum must be chosen before the first table
    // exists; on an existing file they are no-ops.
    conn.execute_batch(&format!(
        "PRAGMA page_size = {PAGE_SIZE};
         PRAGMA auto_vacuum = INCREMENTAL;
         PRAGMA synchronous = FULL;
         PRAGMA cache_size = -{cache_kib};
         PRAGMA mmap_size = 0;
         PRAGMA wal_autocheckpoint = 0;
         PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT};"
    ))?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Corrupt {
            key: DB_FILE.into(),
            reason: format!("cannot switch to WAL mode (journal_mode is {mode})"),
        });
    }
    Ok(())
}

/// Brings the schema of the database at `path` to the end of `migrations`
/// ([`MIGRATIONS`], or the BLE database's), one transaction per step, or
/// refuses a database from a newer agent.
fn migrate(conn: &mut Connection, path: &Path, migrations: &[&str]) -> Result<(), StoreError> {
    let supported = migrations.len() as i64;
    let found: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if found > supported {
        return Err(StoreError::Newer {
            path: path.display().to_string(),
            found,
            supported,
        });
    }
    for (version, sql) in migrations.iter().enumerate().skip(found.max(0) as usize) {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", version as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}

/// The checkpoint thread: copies the WAL into the database file when it has
/// grown past [`CHECKPOINT_WAL_BYTES`] (PASSIVE: it never waits for the
/// engine, so ingest does not stall on it), and once the store has been
/// quiet for [`CHECKPOINT_IDLE`] copies the rest and truncates the WAL to
/// nothing (TRUNCATE, which needs a moment without writer and readers: it
/// gives up after [`QUIET_BUSY`] and tries at the next quiet round). So
/// the space a flood took in the WAL comes back once the flood is over.
/// Errors are left for the next round (a full disk shows in the writer's
/// own calls).
fn run_checkpointer(db: &Path, signal: &CheckpointSignal) {
    // Opened (again) when needed: a connection that could not be opened at
    // one moment (a full disk) must not end checkpoints for good.
    let mut conn: Option<Connection> = None;
    let wal = wal_path(db);
    loop {
        let last_commit = {
            let state = lock(&signal.state);
            let (mut state, _) = signal
                .cond
                .wait_timeout_while(state, CHECKPOINT_POLL, |s| !s.woken && !s.stop)
                .unwrap_or_else(|e| e.into_inner());
            if state.stop {
                return;
            }
            state.woken = false;
            state.last_commit
        };
        let len = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
        let quiet = last_commit.is_none_or(|t| t.elapsed() >= CHECKPOINT_IDLE);
        let mode = if len >= CHECKPOINT_WAL_BYTES {
            "PASSIVE"
        } else if quiet && len > 0 {
            "TRUNCATE"
        } else {
            continue;
        };
        if conn.is_none() {
            conn = Connection::open(db)
                .and_then(|c| {
                    c.busy_timeout(QUIET_BUSY)?;
                    c.execute_batch(&format!(
                        "PRAGMA cache_size = -{SMALL_CACHE_KIB}; PRAGMA mmap_size = 0;
                         PRAGMA synchronous = FULL; PRAGMA wal_autocheckpoint = 0;"
                    ))?;
                    Ok(c)
                })
                .map_err(|e| tracing::debug!(error = %e, "checkpoint connection failed"))
                .ok();
        }
        let Some(c) = &conn else { continue };
        // TRUNCATE copies everything first, like PASSIVE, but waits for the
        // writer: copy without waiting first, so the wait is short.
        let steps: &[&str] = if mode == "TRUNCATE" {
            &["PASSIVE", "TRUNCATE"]
        } else {
            &["PASSIVE"]
        };
        for step in steps {
            let sql = format!("PRAGMA wal_checkpoint({step})");
            if let Err(e) = c.query_row(&sql, [], |_| Ok(())) {
                tracing::debug!(error = %e, step, "WAL checkpoint failed; trying again later");
                if !matches!(
                    e.sqlite_error_code(),
                    Some(rusqlite::ErrorCode::DatabaseBusy)
                ) {
                    conn = None;
                }
                break;
            }
        }
    }
}

fn wal_path(db: &Path) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push("-wal");
    PathBuf::from(p)
}

/// `expires_at` as stored: capped so that the expiry index keeps time order.
fn expiry_value(ms: u64) -> i64 {
    ms.min(i64::MAX as u64) as i64
}

/// A `tasks` row (in the column order of the SELECTs above). The outer
/// error is SQLite's; the inner one a value this agent did not write.
fn task_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<TaskRecord, StoreError>> {
    let task_id: String = r.get(0)?;
    let status: String = r.get(10)?;
    let final_at: Option<i64> = r.get(11)?;
    let state = match (status.as_str(), final_at) {
        ("pending", _) => TaskState::Pending,
        (other, Some(at)) => match AckStatus::from_name(other) {
            Some(status) => TaskState::Final(FinalState {
                status,
                at: at as u64,
                detail: r.get(12)?,
            }),
            None => {
                return Ok(Err(StoreError::Corrupt {
                    key: format!("tasks/{task_id}"),
                    reason: format!("unknown status {other:?}"),
                }))
            }
        },
        (_, None) => {
            return Ok(Err(StoreError::Corrupt {
                key: format!("tasks/{task_id}"),
                reason: "a final task without final_at".into(),
            }))
        }
    };
    Ok(Ok(TaskRecord {
        task_id,
        tag_id: r.get(1)?,
        seq: r.get::<_, i64>(2)? as u64,
        issued_at: r.get::<_, i64>(3)? as u64,
        expires_at: r.get::<_, i64>(4)? as u64,
        accepted_at: r.get::<_, i64>(5)? as u64,
        content: r.get(6)?,
        content_hash: r.get(7)?,
        ack_target: r.get(8)?,
        attempts: r.get(9)?,
        state,
    }))
}

#[cfg(test)]
fn injected_error() -> StoreError {
    StoreError::Sql(rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
        Some("injected fault: database or disk is full".into()),
    ))
}

fn create_private_dir(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let err = |cause| StoreError::Dir {
        path: path.display().to_string(),
        cause,
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

    fn open(dir: &Path) -> Arc<Store> {
        Arc::new(Store::open(dir, 1 << 20).unwrap())
    }

    /// What another process (an operator's `sqlite3` shell, or the disk
    /// after a crash) sees: committed rows only.
    fn outside_count(dir: &Path, sql: &str) -> i64 {
        let c = Connection::open_with_flags(dir.join(DB_FILE), OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
        c.query_row(sql, [], |r| r.get(0)).unwrap()
    }

    #[tokio::test]
    async fn changes_survive_reopen_after_flush() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path());
            let mut c = Change::new();
            let mut r = record("t1", "A", TaskState::Pending);
            r.seq = 7;
            c.put_task(&r);
            c.push_outbox(entry(1));
            assert_eq!(store.apply(c).unwrap(), vec![0]);
            store.flush().await.unwrap();
        }
        let store = open(dir.path());
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
        let store = open(dir.path());
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
        assert_eq!(
            store.outbox_after(None, 1).unwrap()[0].0,
            1,
            "a removed entry is not read again, even before the commit"
        );
        let on_disk = "SELECT count(*) FROM outbox";
        assert_eq!(outside_count(dir.path(), on_disk), 5);
        assert!(
            !store.wants_commit(),
            "a removal waits a moment for company"
        );
        store.flush().await.unwrap();
        assert_eq!(
            outside_count(dir.path(), on_disk),
            4,
            "deleted by the commit"
        );
        drop(store);
        let store = open(dir.path());
        assert_eq!(store.outbox_len(), 4);
        assert_eq!(store.outbox_after(None, 1).unwrap()[0].0, 1);
    }

    #[tokio::test]
    async fn applied_changes_are_read_at_once_and_on_disk_only_after_the_flush() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        for (task, tag) in [("t1", "A"), ("t2", "B")] {
            let mut c = Change::new();
            c.put_task(&record(task, tag, TaskState::Pending));
            store.apply(c).unwrap();
        }
        let committed = "SELECT count(*) FROM tasks";
        assert!(
            store.task("t1").unwrap().is_some(),
            "visible before the flush"
        );
        assert_eq!(outside_count(dir.path(), committed), 0, "not committed yet");
        let mut c = Change::new();
        c.clear_pending(&record("t1", "A", TaskState::Pending));
        store.apply(c).unwrap();
        assert_eq!(store.pending_of("A").unwrap(), None);
        store.flush().await.unwrap();
        assert_eq!(outside_count(dir.path(), committed), 2);
        assert_eq!(store.tag_slot("A").unwrap(), Some((1, None)));
        // An applied change is not durable: a reopen (after a fault) drops it.
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
        let store = open(dir.path());
        let mut c = Change::new();
        for (task, tag, expires_at) in [
            ("t1", "A", 30),
            ("t2", "B", 10),
            ("t3", "C", 20),
            ("t4", "D", u64::MAX),
        ] {
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
            store.expiring_before(u64::MAX - 1, 2).unwrap().len(),
            2,
            "limit"
        );
        assert_eq!(
            store.expiring_before(u64::MAX - 1, 10).unwrap().len(),
            3,
            "a task that expires at u64::MAX stays in time order (never)"
        );
        assert_eq!(store.pending_count().unwrap(), 4);
        assert_eq!(
            store.pending_tags_after(None, 10).unwrap(),
            vec!["A", "B", "C", "D"]
        );
        assert_eq!(store.pending_tags_after(Some("A"), 1).unwrap(), vec!["B"]);
    }

    #[tokio::test]
    async fn final_tasks_leave_the_pending_index_and_can_be_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
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
                detail: Some("why".into()),
            }),
        ));
        c.clear_pending(&record("t1", "A", TaskState::Pending));
        store.apply(c).unwrap();
        assert_eq!(store.pending_count().unwrap(), 0);
        assert_eq!(store.pending_of("A").unwrap(), None);
        assert!(
            store.expiring_before(u64::MAX, 10).unwrap().is_empty(),
            "the expiry index entry goes with the pending state"
        );
        let t1 = store.task("t1").unwrap().unwrap();
        assert!(matches!(t1.state, TaskState::Final(ref f) if f.detail.as_deref() == Some("why")));
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
        let store = open(dir.path());
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
    async fn a_second_open_of_the_same_store_fails_and_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path(), 1 << 20).unwrap();
        match Store::open(dir.path(), 1 << 20) {
            Err(e @ StoreError::Locked { .. }) => {
                assert!(e.to_string().contains("another esl-agent process"), "{e}")
            }
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("two agents on one store"),
        }
    }

    #[tokio::test]
    async fn a_store_from_a_newer_agent_is_refused() {
        const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;
        let dir = tempfile::tempdir().unwrap();
        drop(open(dir.path()));
        let c = Connection::open(dir.path().join(DB_FILE)).unwrap();
        assert_eq!(
            c.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))
                .unwrap(),
            SCHEMA_VERSION,
            "a new store is at the current version"
        );
        c.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        drop(c);
        match Store::open(dir.path(), 1 << 20) {
            Err(e @ StoreError::Newer { .. }) => assert!(e.to_string().contains("newer esl-agent")),
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("a newer schema was opened"),
        }
    }

    #[tokio::test]
    async fn a_leftover_sled_store_is_refused_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        // The files sled 0.34 leaves in its directory.
        std::fs::write(dir.path().join("conf"), b"segment_size: 524288\n").unwrap();
        std::fs::write(dir.path().join("db"), [0u8; 64]).unwrap();
        let e = Store::open(dir.path(), 1 << 20).err().expect("refused");
        let text = e.to_string();
        assert!(matches!(e, StoreError::Sled { .. }));
        assert!(
            text.contains(&dir.path().display().to_string()) && text.contains("mv "),
            "{text}"
        );
        assert!(
            !dir.path().join(DB_FILE).exists(),
            "nothing created beside it"
        );
    }

    #[tokio::test]
    async fn a_permission_problem_is_named_as_such_once() {
        let dir = tempfile::tempdir().unwrap();
        let e = StoreError::Dir {
            path: dir.path().display().to_string(),
            cause: std::io::Error::from_raw_os_error(13),
        };
        let text = format!("{:#}", anyhow::Error::from(e));
        let os = std::io::Error::from_raw_os_error(13).to_string();
        assert_eq!(
            text.matches(&os).count(),
            1,
            "the cause is said once: {text}"
        );
    }

    #[tokio::test]
    async fn space_is_given_back_after_a_flood_of_acks_is_delivered() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let pages = |s: &Store| {
            s.read(|c| Ok(c.query_row("PRAGMA page_count", [], |r| r.get::<_, i64>(0))?))
                .unwrap()
        };
        let before = pages(&store);
        let mut c = Change::new();
        for _ in 0..3000 {
            c.push_outbox(OutboxEntry {
                topic: "esl_ack/p2p/GID_b@@@b".into(),
                payload: vec![7; 1000],
            });
        }
        let numbers = store.apply(c).unwrap();
        store.flush().await.unwrap();
        let flooded = pages(&store);
        assert!(flooded > before + 500, "{before} -> {flooded}");
        for n in numbers {
            assert!(store.remove_outbox(n).unwrap());
        }
        store.flush().await.unwrap();
        assert!(store.reclaim().unwrap() > 500);
        store.flush().await.unwrap();
        let after = pages(&store);
        assert!(
            after <= before * 2,
            "{before} -> {flooded} -> {after} pages"
        );
    }

    #[tokio::test]
    async fn the_checkpoint_thread_copies_a_large_wal_into_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let db_len = || std::fs::metadata(dir.path().join(DB_FILE)).unwrap().len();
        let mut c = Change::new();
        for _ in 0..6000 {
            c.push_outbox(OutboxEntry {
                topic: "esl_ack/p2p/GID_b@@@b".into(),
                payload: vec![7; 1000],
            });
        }
        store.apply(c).unwrap();
        store.flush().await.unwrap();
        // COMMIT never checkpoints (wal_autocheckpoint is off): until the
        // store's own thread runs, the pages are in the WAL only.
        let deadline = Instant::now() + Duration::from_secs(10);
        while db_len() < CHECKPOINT_WAL_BYTES {
            assert!(
                Instant::now() < deadline,
                "no checkpoint: database file {} bytes",
                db_len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_quiet_store_empties_and_truncates_its_wal() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let wal = wal_path(&dir.path().join(DB_FILE));
        let mut c = Change::new();
        for _ in 0..200 {
            c.push_outbox(entry(1));
        }
        store.apply(c).unwrap();
        store.flush().await.unwrap();
        assert!(std::fs::metadata(&wal).unwrap().len() > 0);
        // An empty change (the engine's sweep makes one every 500 ms) opens
        // no transaction: it would hold the write lock and keep the store
        // from ever looking quiet.
        store.apply(Change::new()).unwrap();
        let outside = Connection::open(dir.path().join(DB_FILE)).unwrap();
        outside.busy_timeout(Duration::ZERO).unwrap();
        outside
            .execute_batch("BEGIN IMMEDIATE; ROLLBACK;")
            .expect("the write lock is free");
        drop(outside);
        let deadline = Instant::now() + CHECKPOINT_IDLE + Duration::from_secs(5);
        while std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0) > 0 {
            assert!(Instant::now() < deadline, "the WAL was never truncated");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let db_len = std::fs::metadata(dir.path().join(DB_FILE)).unwrap().len();
        assert!(db_len > 4096, "its pages went into the database");
        assert_eq!(store.outbox_after(None, 1000).unwrap().len(), 200);
    }

    #[tokio::test]
    async fn operators_can_read_the_queue_while_the_agent_runs() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let mut c = Change::new();
        c.put_task(&record("t1", "A", TaskState::Pending));
        store.apply(c).unwrap();
        store.flush().await.unwrap();
        // The query docs/RELIABILITY.md shows for the sqlite3 shell, on a
        // connection of its own while the store is open and a transaction
        // of the agent's is in progress.
        let mut c = Change::new();
        c.put_task(&record("t2", "B", TaskState::Pending));
        store.apply(c).unwrap();
        assert_eq!(
            outside_count(
                dir.path(),
                "SELECT count(*) FROM tasks WHERE status = 'pending'"
            ),
            1
        );
    }
}
