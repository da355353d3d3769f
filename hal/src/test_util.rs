//! Helpers the backends' unit tests share: reading a [`Radio`]'s events
//! under paused tokio time.

use tokio::time::{timeout_at, Duration, Instant};

use crate::{CheckIn, Radio, RadioEvent};

/// Every event until `for_ms` of (paused) time has passed, each with its
/// arrival in ms since the call.
pub(crate) async fn events_for<R: Radio>(radio: &mut R, for_ms: u64) -> Vec<(u64, RadioEvent)> {
    let start = Instant::now();
    let deadline = start + Duration::from_millis(for_ms);
    let mut events = Vec::new();
    while let Ok(event) = timeout_at(deadline, radio.next_event()).await {
        let at = (Instant::now() - start).as_millis() as u64;
        events.push((at, event.expect("radio open")));
    }
    events
}

/// The check-ins among `events`, with their arrival times.
pub(crate) fn checkins(events: &[(u64, RadioEvent)]) -> Vec<(u64, &CheckIn)> {
    events
        .iter()
        .filter_map(|(at, event)| match event {
            RadioEvent::CheckIn(checkin) => Some((*at, checkin)),
            _ => None,
        })
        .collect()
}
