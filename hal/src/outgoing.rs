//! The queue between a backend's driver task and the agent, shared by
//! every driver.
//!
//! Why it exists: the agent's radio task alternates between awaiting
//! `next_event()` and awaiting `deliver()`. A driver that awaited an event
//! send on its own would deadlock against an agent waiting on a full
//! delivery channel, and would stop serving its hardware meanwhile. So a
//! driver never waits on the agent: it queues what it has to say here and
//! its `select!` has one branch that reserves room in the event channel
//! while the queue is not empty, then sends the oldest entry:
//!
//! ```ignore
//! permit = event_tx.reserve(), if !state.outgoing.is_empty() => match permit {
//!     Ok(permit) => {
//!         if let Some(pending) = state.outgoing.pop() {
//!             permit.send(state.event(pending));
//!         }
//!     }
//!     Err(_) => break, // the agent is gone
//! },
//! ```
//!
//! A slow reader costs bounded memory: where the driver can build a
//! check-in or a tag's details when it is sent (the simulator, BLE), a tag
//! has at most one of each queued (coalesced, so they are fresh); a driver
//! whose check-ins carry readings only the tag's own message has (ZigBee)
//! queues built events and caps check-ins itself. Outcomes, which are never
//! dropped, number at most the deliveries the agent has in flight.

use std::collections::{HashSet, VecDeque};
use std::hash::Hash;

use crate::RadioEvent;

/// One queued entry. Check-ins and details name their tag (the driver's key
/// for it) and are built by the driver when sent.
#[derive(Debug)]
pub(crate) enum Pending<K> {
    CheckIn(K),
    Details(K),
    Event(RadioEvent),
}

/// Events a driver decided on and the agent has not taken yet, oldest
/// first, with check-ins and details coalesced per tag.
#[derive(Debug)]
pub(crate) struct Outgoing<K> {
    queue: VecDeque<Pending<K>>,
    /// Tags with a check-in in `queue`.
    checkins: HashSet<K>,
    /// Tags with a details report in `queue`.
    details: HashSet<K>,
}

impl<K> Default for Outgoing<K> {
    fn default() -> Self {
        Outgoing {
            queue: VecDeque::new(),
            checkins: HashSet::new(),
            details: HashSet::new(),
        }
    }
}

impl<K: Eq + Hash + Clone> Outgoing<K> {
    /// Queues an event built now (outcomes, radio state, a check-in the
    /// driver cannot build later).
    pub(crate) fn event(&mut self, event: RadioEvent) {
        self.queue.push_back(Pending::Event(event));
    }

    /// Queues a check-in of `tag` unless one is already queued; returns
    /// whether it queued one.
    pub(crate) fn checkin(&mut self, tag: K) -> bool {
        let new = self.checkins.insert(tag.clone());
        if new {
            self.queue.push_back(Pending::CheckIn(tag));
        }
        new
    }

    /// Queues a details report of `tag` unless one is already queued.
    pub(crate) fn details(&mut self, tag: K) -> bool {
        let new = self.details.insert(tag.clone());
        if new {
            self.queue.push_back(Pending::Details(tag));
        }
        new
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub(crate) fn len(&self) -> usize {
        self.queue.len()
    }

    /// The oldest entry; its tag may queue a new check-in or details
    /// report from now on.
    pub(crate) fn pop(&mut self) -> Option<Pending<K>> {
        let pending = self.queue.pop_front()?;
        match &pending {
            Pending::CheckIn(tag) => {
                self.checkins.remove(tag);
            }
            Pending::Details(tag) => {
                self.details.remove(tag);
            }
            Pending::Event(_) => {}
        }
        Some(pending)
    }
}

/// A driver that builds every event when it queues it (the ZigBee driver:
/// a check-in's readings come in the tag's own message) names no tags.
impl Outgoing<std::convert::Infallible> {
    /// The oldest event.
    pub(crate) fn pop_event(&mut self) -> Option<RadioEvent> {
        self.pop().map(|pending| match pending {
            Pending::Event(event) => event,
            Pending::CheckIn(never) | Pending::Details(never) => match never {},
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RadioState;

    #[test]
    fn check_ins_and_details_are_queued_once_per_tag_until_taken_and_order_is_kept() {
        let mut out: Outgoing<u32> = Outgoing::default();
        assert!(out.checkin(1));
        assert!(!out.checkin(1), "one check-in per tag in the queue");
        out.event(RadioEvent::State(RadioState::Up));
        assert!(out.details(1));
        assert!(!out.details(1));
        assert!(out.checkin(2));
        assert!(matches!(out.pop(), Some(Pending::CheckIn(1))));
        assert!(out.checkin(1), "taken: the tag may check in again");
        assert!(matches!(
            out.pop(),
            Some(Pending::Event(RadioEvent::State(RadioState::Up)))
        ));
        assert!(matches!(out.pop(), Some(Pending::Details(1))));
        assert!(matches!(out.pop(), Some(Pending::CheckIn(2))));
        assert!(matches!(out.pop(), Some(Pending::CheckIn(1))));
        assert!(out.pop().is_none());
        assert!(out.is_empty());
    }
}
