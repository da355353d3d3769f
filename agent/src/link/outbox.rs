//! The link's protocol state, without I/O (in the style of rumqttc's
//! `MqttState`): which connection is current, which outbox entries to
//! publish, which PUBACK delivered which entry, and which PUBACKs the
//! engine released may be written. It decides; `Link` (`link/mod.rs`) does the
//! I/O: it reads the store, calls rumqttc and feeds rumqttc's events back in.
//!
//! Outbound (acks and replies; step 6 in ARCHITECTURE.md):
//! - Entries are published oldest first, at most `window` without PUBACK,
//!   and only what the store hands out (`Store::outbox_after`, which stops at
//!   the last flushed number): this type never makes an entry up.
//! - rumqttc assigns the packet id when its event loop takes the request,
//!   and reports it as `Outgoing::Publish(pkid)`, in request order (pinned
//!   in `link/mod.rs`). Each of our QoS 1 publish requests (status reports too)
//!   queues one slot that the next such event fills.
//! - A PUBACK maps back to its entry, which the link then removes from the
//!   store; a packet id we do not know (a status report's, or one forgotten
//!   at a reconnect) changes nothing.
//! - An entry without PUBACK after `publish_timeout` is published again.
//! - Every CONNACK starts a new connection (epoch): the packet-id mapping,
//!   the window and the read position are forgotten and the outbox is read
//!   again from its oldest entry.
//!
//! Inbound (step 3): a released PUBACK is written only if its token belongs
//! to the current connection; a packet id of an earlier one names another
//! message here, and the broker sends the old message again.
//!
//! Time comes in as an argument (`now`), so the tests drive it without a
//! clock or a socket.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use crate::msg::AckToken;
use crate::msg::LinkState;
use crate::store::OutboxEntry;

/// The link's state machine; see the module docs.
pub(crate) struct Outbox {
    window: usize,
    publish_timeout: Duration,
    link: LinkState,
    conn: Connection,
}

/// What is known about the current connection only.
#[derive(Default)]
struct Connection {
    /// Outbox numbers of our publish requests whose packet id is not known
    /// yet, in request order (`None` for status reports).
    awaiting_pkid: VecDeque<Option<u64>>,
    /// Packet id → outbox number, for published and not yet PUBACKed.
    by_pkid: HashMap<u16, u64>,
    /// Outbox number → when it was (last) published: the window.
    sent_at: BTreeMap<u64, Instant>,
    /// Highest outbox number read from the store on this connection.
    cursor: Option<u64>,
    /// Read from the store but not taken by rumqttc yet (its request channel
    /// was full): offered first at the next fill. Kept here so a retry costs
    /// one publish attempt, not another store read.
    read: VecDeque<(u64, OutboxEntry)>,
}

/// Released PUBACKs sorted by [`Outbox::pubacks`].
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Pubacks {
    /// Packet ids to PUBACK on the current connection, in release order.
    pub(crate) send: Vec<u16>,
    /// Tokens of an earlier connection (or released while disconnected):
    /// dropped, the broker sends those messages again.
    pub(crate) stale: usize,
}

impl Outbox {
    pub(crate) fn new(window: usize, publish_timeout: Duration) -> Outbox {
        Outbox {
            window,
            publish_timeout,
            link: LinkState::default(),
            conn: Connection::default(),
        }
    }

    pub(crate) fn link(&self) -> LinkState {
        self.link
    }

    pub(crate) fn connected(&self) -> bool {
        self.link.connected
    }

    /// A CONNACK: a new connection. Everything known about the previous one
    /// is forgotten (the link also discards what rumqttc kept of it); the
    /// next fill reads the outbox from its oldest entry.
    pub(crate) fn on_connack(&mut self) -> LinkState {
        self.link = LinkState {
            connected: true,
            epoch: self.link.epoch + 1,
        };
        self.conn = Connection::default();
        self.link
    }

    /// The connection failed. Returns whether it had been up (a CONNACK),
    /// rather than a connection attempt failing.
    pub(crate) fn on_connection_lost(&mut self) -> bool {
        std::mem::replace(&mut self.link.connected, false)
    }

    /// Whether entries read from the store wait for room in rumqttc's
    /// request channel.
    pub(crate) fn has_unpublished(&self) -> bool {
        !self.conn.read.is_empty()
    }

    /// Publishes outbox entries, oldest first, until the window is full,
    /// the store has no more, or rumqttc takes no more. `read(after, limit)`
    /// reads up to `limit` entries numbered above `after` from the store
    /// (flushed ones only); `publish` hands one to rumqttc and says whether
    /// it took it (one it did not take is offered first next time). Nothing
    /// while disconnected.
    pub(crate) fn fill<E>(
        &mut self,
        now: Instant,
        mut read: impl FnMut(Option<u64>, usize) -> Result<Vec<(u64, OutboxEntry)>, E>,
        mut publish: impl FnMut(&OutboxEntry) -> bool,
    ) -> Result<(), E> {
        if !self.link.connected {
            return Ok(());
        }
        let c = &mut self.conn;
        loop {
            while let Some((n, entry)) = c.read.front() {
                if !publish(entry) {
                    return Ok(());
                }
                let n = *n;
                c.read.pop_front();
                c.awaiting_pkid.push_back(Some(n));
                c.sent_at.insert(n, now);
            }
            let room = self.window.saturating_sub(c.sent_at.len());
            if room == 0 {
                return Ok(());
            }
            let entries = read(c.cursor, room)?;
            let Some((last, _)) = entries.last() else {
                return Ok(());
            };
            c.cursor = Some(*last);
            c.read.extend(entries);
        }
    }

    /// Publishes again what has had no PUBACK for `publish_timeout` (a
    /// request lost in the client, or a broker that dropped it), reading
    /// each entry with `read` as in [`Outbox::fill`]; one that is no longer
    /// in the store (or cannot be read) is forgotten. Stops at the first
    /// entry rumqttc does not take. Returns the numbers published again.
    pub(crate) fn resend_overdue<E>(
        &mut self,
        now: Instant,
        mut read: impl FnMut(Option<u64>, usize) -> Result<Vec<(u64, OutboxEntry)>, E>,
        mut publish: impl FnMut(&OutboxEntry) -> bool,
    ) -> Vec<u64> {
        let mut resent = Vec::new();
        if !self.link.connected {
            return resent;
        }
        let c = &mut self.conn;
        let overdue: Vec<u64> = c
            .sent_at
            .iter()
            .filter(|(_, at)| now.duration_since(**at) >= self.publish_timeout)
            .map(|(n, _)| *n)
            .collect();
        for n in overdue {
            let entry = match read(n.checked_sub(1), 1) {
                Ok(mut e) if e.first().is_some_and(|(m, _)| *m == n) => e.remove(0).1,
                _ => {
                    c.sent_at.remove(&n);
                    continue;
                }
            };
            if !publish(&entry) {
                break;
            }
            c.awaiting_pkid.push_back(Some(n));
            c.sent_at.insert(n, now);
            resent.push(n);
        }
        resent
    }

    /// We asked rumqttc to publish a status report (QoS 1, not from the
    /// outbox): its packet id is not ours to track, but takes a slot.
    pub(crate) fn report_published(&mut self) {
        self.conn.awaiting_pkid.push_back(None);
    }

    /// rumqttc's `Outgoing::Publish(pkid)`: the packet id of our oldest
    /// publish request without one.
    pub(crate) fn on_outgoing_publish(&mut self, pkid: u16) {
        if let Some(Some(n)) = self.conn.awaiting_pkid.pop_front() {
            self.conn.by_pkid.insert(pkid, n);
        }
    }

    /// The broker PUBACKed `pkid`: returns the outbox entry it delivered
    /// (to remove from the store), at most once per entry and connection.
    pub(crate) fn on_puback(&mut self, pkid: u16) -> Option<u64> {
        let n = self.conn.by_pkid.remove(&pkid)?;
        self.conn.sent_at.remove(&n).map(|_| n)
    }

    /// Sorts PUBACKs the engine released: only those of the current
    /// connection are written. A token with packet id 0 (a QoS 0 message)
    /// needs none.
    pub(crate) fn pubacks(&self, tokens: impl IntoIterator<Item = AckToken>) -> Pubacks {
        let mut out = Pubacks::default();
        for token in tokens.into_iter().filter(|t| t.pkid != 0) {
            if self.link.connected && token.epoch == self.link.epoch {
                out.send.push(token.pkid);
            } else {
                out.stale += 1;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use super::*;

    const WINDOW: usize = 3;
    const TIMEOUT: Duration = Duration::from_secs(30);

    fn entry(n: u64) -> OutboxEntry {
        OutboxEntry {
            topic: "acks".into(),
            payload: format!("ack {n}").into_bytes(),
        }
    }

    /// A store's outbox as the link's reader sees it: entries below
    /// `durable` only.
    struct FakeStore {
        entries: BTreeMap<u64, OutboxEntry>,
        durable: u64,
    }

    impl FakeStore {
        fn with(numbers: std::ops::Range<u64>) -> FakeStore {
            FakeStore {
                entries: numbers.clone().map(|n| (n, entry(n))).collect(),
                durable: numbers.end,
            }
        }

        fn read(
            &self,
            after: Option<u64>,
            limit: usize,
        ) -> Result<Vec<(u64, OutboxEntry)>, Infallible> {
            let from = after.map_or(0, |n| n + 1);
            Ok(self
                .entries
                .range(from..self.durable)
                .take(limit)
                .map(|(n, e)| (*n, e.clone()))
                .collect())
        }
    }

    /// Outbox numbers in the order they were published.
    fn numbers(published: &[OutboxEntry]) -> Vec<u64> {
        published
            .iter()
            .map(|e| {
                let s = std::str::from_utf8(&e.payload).unwrap();
                s.strip_prefix("ack ").unwrap().parse().unwrap()
            })
            .collect()
    }

    /// Fills with every publish taken; returns the numbers published.
    fn fill(outbox: &mut Outbox, store: &FakeStore, now: Instant) -> Vec<u64> {
        let mut published = Vec::new();
        outbox
            .fill(
                now,
                |a, l| store.read(a, l),
                |e| {
                    published.push(e.clone());
                    true
                },
            )
            .unwrap();
        numbers(&published)
    }

    fn connected() -> Outbox {
        let mut outbox = Outbox::new(WINDOW, TIMEOUT);
        outbox.on_connack();
        outbox
    }

    #[test]
    fn publishes_oldest_first_and_at_most_the_window_unacknowledged() {
        let store = FakeStore::with(0..10);
        let now = Instant::now();
        let mut outbox = connected();
        assert_eq!(fill(&mut outbox, &store, now), [0, 1, 2]);
        assert_eq!(fill(&mut outbox, &store, now), [0u64; 0], "window full");
        for pkid in 1..=3 {
            outbox.on_outgoing_publish(pkid);
        }
        // One PUBACK, one more.
        assert_eq!(outbox.on_puback(2), Some(1));
        assert_eq!(fill(&mut outbox, &store, now), [3]);
        assert_eq!(fill(&mut outbox, &store, now), [0u64; 0]);
    }

    #[test]
    fn nothing_is_published_while_disconnected() {
        let store = FakeStore::with(0..3);
        let mut outbox = Outbox::new(WINDOW, TIMEOUT);
        assert_eq!(fill(&mut outbox, &store, Instant::now()), [0u64; 0]);
        outbox.on_connack();
        outbox.on_connection_lost();
        assert_eq!(fill(&mut outbox, &store, Instant::now()), [0u64; 0]);
    }

    #[test]
    fn an_entry_rumqttc_does_not_take_is_offered_first_next_time() {
        let store = FakeStore::with(0..3);
        let now = Instant::now();
        let mut outbox = connected();
        let mut taken = 0;
        outbox
            .fill(
                now,
                |a, l| store.read(a, l),
                |_| {
                    taken += 1;
                    taken == 1
                },
            )
            .unwrap();
        assert!(outbox.has_unpublished());
        // The store is not read again for them: an empty store now.
        let empty = FakeStore::with(0..0);
        assert_eq!(fill(&mut outbox, &empty, now), [1, 2]);
        assert!(!outbox.has_unpublished());
    }

    #[test]
    fn packet_ids_map_to_entries_in_request_order_skipping_reports() {
        let store = FakeStore::with(0..2);
        let now = Instant::now();
        let mut outbox = Outbox::new(10, TIMEOUT);
        outbox.on_connack();
        assert_eq!(fill(&mut outbox, &store, now), [0, 1]);
        outbox.report_published();
        let store = FakeStore::with(0..3);
        assert_eq!(fill(&mut outbox, &store, now), [2]);
        // Entry 0, entry 1, the report, entry 2.
        for pkid in [7, 8, 9, 10] {
            outbox.on_outgoing_publish(pkid);
        }
        assert_eq!(outbox.on_puback(10), Some(2));
        assert_eq!(outbox.on_puback(9), None, "the report's");
        assert_eq!(outbox.on_puback(7), Some(0));
        assert_eq!(outbox.on_puback(8), Some(1));
    }

    #[test]
    fn a_puback_removes_exactly_its_entry_once_and_unknown_ids_change_nothing() {
        let store = FakeStore::with(0..3);
        let now = Instant::now();
        let mut outbox = connected();
        fill(&mut outbox, &store, now);
        for pkid in 1..=3 {
            outbox.on_outgoing_publish(pkid);
        }
        assert_eq!(outbox.on_puback(42), None, "unknown packet id");
        assert_eq!(outbox.on_puback(2), Some(1));
        assert_eq!(outbox.on_puback(2), None, "a second PUBACK");
        // The others are still awaited: no room for more than one.
        let more = FakeStore::with(0..10);
        assert_eq!(fill(&mut outbox, &more, now), [3]);
        assert_eq!(outbox.on_puback(1), Some(0));
        assert_eq!(outbox.on_puback(3), Some(2));
    }

    #[test]
    fn a_reconnect_replays_from_the_oldest_entry_and_forgets_old_packet_ids() {
        let mut store = FakeStore::with(0..5);
        let now = Instant::now();
        let mut outbox = connected();
        assert_eq!(outbox.link().epoch, 1);
        fill(&mut outbox, &store, now);
        for pkid in 1..=3 {
            outbox.on_outgoing_publish(pkid);
        }
        assert_eq!(outbox.on_puback(1), Some(0));
        store.entries.remove(&0);
        // The link drops with 1 and 2 unacknowledged (3 read, not taken).
        fill(&mut outbox, &store, now);
        assert!(outbox.on_connection_lost());
        assert!(!outbox.on_connection_lost(), "already down");
        assert_eq!(
            outbox.on_connack(),
            LinkState {
                connected: true,
                epoch: 2
            }
        );
        assert!(!outbox.has_unpublished());
        assert_eq!(fill(&mut outbox, &store, now), [1, 2, 3]);
        // A PUBACK with a packet id of the old connection means nothing.
        assert_eq!(outbox.on_puback(2), None);
        for pkid in [4, 5, 6] {
            outbox.on_outgoing_publish(pkid);
        }
        assert_eq!(outbox.on_puback(4), Some(1));
    }

    #[test]
    fn pubacks_of_an_earlier_connection_or_for_qos_0_are_not_written() {
        let mut outbox = Outbox::new(WINDOW, TIMEOUT);
        let token = |epoch, pkid| AckToken { epoch, pkid };
        assert_eq!(
            outbox.pubacks([token(0, 1)]),
            Pubacks {
                send: vec![],
                stale: 1
            },
            "before the first connection"
        );
        outbox.on_connack();
        outbox.on_connack();
        assert_eq!(
            outbox.pubacks([token(2, 5), token(1, 6), token(2, 0), token(2, 4)]),
            Pubacks {
                send: vec![5, 4],
                stale: 1
            }
        );
        outbox.on_connection_lost();
        assert_eq!(
            outbox.pubacks([token(2, 5)]),
            Pubacks {
                send: vec![],
                stale: 1
            },
            "released after the connection dropped"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_entry_without_puback_in_time_is_published_again_with_a_new_packet_id() {
        let mut store = FakeStore::with(0..3);
        let mut outbox = connected();
        fill(&mut outbox, &store, Instant::now());
        for pkid in 1..=3 {
            outbox.on_outgoing_publish(pkid);
        }
        assert_eq!(outbox.on_puback(1), Some(0));
        store.entries.remove(&0);
        tokio::time::advance(TIMEOUT - Duration::from_millis(1)).await;
        let resend = |outbox: &mut Outbox, store: &FakeStore| {
            let mut published = Vec::new();
            let resent = outbox.resend_overdue(
                Instant::now(),
                |a, l| store.read(a, l),
                |e| {
                    published.push(e.clone());
                    true
                },
            );
            assert_eq!(numbers(&published), resent);
            resent
        };
        assert_eq!(resend(&mut outbox, &store), [0u64; 0], "not yet");
        tokio::time::advance(Duration::from_millis(1)).await;
        // Entry 2 was delivered some other way (gone from the store).
        store.entries.remove(&2);
        assert_eq!(resend(&mut outbox, &store), [1]);
        assert_eq!(resend(&mut outbox, &store), [0u64; 0], "timer restarted");
        outbox.on_outgoing_publish(9);
        assert_eq!(outbox.on_puback(9), Some(1));
        assert_eq!(
            outbox.on_puback(2),
            None,
            "the first publish's late PUBACK: entry 1 is delivered already"
        );
        // Entry 2 was forgotten: the window has room for two new ones.
        let more = FakeStore::with(0..6);
        assert_eq!(fill(&mut outbox, &more, Instant::now()), [3, 4, 5]);
    }

    #[tokio::test(start_paused = true)]
    async fn resending_stops_at_the_first_entry_rumqttc_does_not_take() {
        let store = FakeStore::with(0..3);
        let mut outbox = connected();
        fill(&mut outbox, &store, Instant::now());
        tokio::time::advance(TIMEOUT).await;
        let resent = outbox.resend_overdue(Instant::now(), |a, l| store.read(a, l), |_| false);
        assert_eq!(resent, [0u64; 0]);
        let resent = outbox.resend_overdue(Instant::now(), |a, l| store.read(a, l), |_| true);
        assert_eq!(resent, [0, 1, 2]);
    }

    /// The real store hands out flushed entries only, and the outbox
    /// publishes only what it is handed.
    #[tokio::test]
    async fn entries_not_yet_flushed_are_never_published() {
        use crate::store::{Change, Store};
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(Store::open(dir.path(), 1 << 20).unwrap());
        let add = |count: u64| {
            let mut c = Change::new();
            for n in 0..count {
                c.push_outbox(entry(n));
            }
            store.apply(c).unwrap();
        };
        add(2);
        store.flush().await.unwrap();
        add(2);
        let now = Instant::now();
        let mut outbox = Outbox::new(10, TIMEOUT);
        outbox.on_connack();
        let mut published = 0;
        let mut fill = |outbox: &mut Outbox| {
            outbox
                .fill(
                    now,
                    |a, l| store.outbox_after(a, l),
                    |_| {
                        published += 1;
                        true
                    },
                )
                .unwrap();
            published
        };
        assert_eq!(fill(&mut outbox), 2);
        assert_eq!(fill(&mut outbox), 2, "the rest is not on disk yet");
        store.flush().await.unwrap();
        assert_eq!(fill(&mut outbox), 4);
    }
}
