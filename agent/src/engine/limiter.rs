//! The bound on what strangers can make the agent publish: command replies
//! and the `rejected` acks of forged (badly signed) tasks.
//!
//! Anyone who may publish to the AP's P2P topics can send these for free,
//! so unbounded they let one sender fill the durable outbox (and the disk)
//! or use the AP as an amplifier (issue 14). Each such message needs a
//! token from a bucket (a sustained rate with a burst) and room in its
//! share of the outbox; without either it is dropped, counted in
//! `replies_dropped`, and logged once per [`LOG_INTERVAL_MS`]. Final acks
//! of accepted tasks, `rejected` acks of malformed tasks (PROTOCOL §5) and
//! the repeated ack of a duplicate (PROTOCOL §4 rule 3) never pass through
//! here: they are the agent's duty.
//!
//! Owned by the engine's `State` (no task, no channel); time is the `now`
//! the engine passes in (ms since the Unix epoch), so tests need no clock.

use tracing::warn;

/// Sustained rate of limited messages per second.
pub(crate) const RATE_PER_S: u64 = 50;
/// Limited messages allowed at once after a quiet spell: a console that
/// pages through `tags.list`, or a back end's burst of bad tasks, fits.
pub(crate) const BURST: u64 = 200;
/// Limited messages are stored only while the outbox holds fewer entries
/// than this: their share of the outbox (each at most `limits.max_payload`).
pub(crate) const OUTBOX_SHARE: u64 = 1_000;
/// At most one log line about dropped messages per this interval.
pub(crate) const LOG_INTERVAL_MS: u64 = 10_000;

/// Token bucket plus the outbox share; see the module docs.
#[derive(Debug)]
pub(crate) struct ReplyLimiter {
    /// Tokens × 1000 (milli-tokens), so refills of a few ms are not lost.
    milli_tokens: u64,
    refilled_at: u64,
    /// Dropped since the last log line, and when that line was written.
    unlogged: u64,
    logged_at: Option<u64>,
}

impl Default for ReplyLimiter {
    fn default() -> Self {
        ReplyLimiter {
            milli_tokens: BURST * 1000,
            refilled_at: 0,
            unlogged: 0,
            logged_at: None,
        }
    }
}

impl ReplyLimiter {
    /// Whether one more limited message may go into an outbox that holds
    /// `outbox_len` entries. A `false` is the caller's cue to drop it and
    /// count it; the log line is written here.
    pub(crate) fn admit(&mut self, now: u64, outbox_len: u64, what: &str) -> bool {
        let elapsed = now.saturating_sub(self.refilled_at);
        self.refilled_at = self.refilled_at.max(now);
        self.milli_tokens = self
            .milli_tokens
            .saturating_add(elapsed.saturating_mul(RATE_PER_S))
            .min(BURST * 1000);
        if outbox_len < OUTBOX_SHARE && self.milli_tokens >= 1000 {
            self.milli_tokens -= 1000;
            return true;
        }
        self.unlogged += 1;
        if self
            .logged_at
            .is_none_or(|at| now.saturating_sub(at) >= LOG_INTERVAL_MS)
        {
            warn!(
                dropped = self.unlogged,
                outbox = outbox_len,
                last = what,
                "replies/rejection acks over the limit ({RATE_PER_S}/s, burst {BURST}, outbox share {OUTBOX_SHARE}) dropped"
            );
            self.unlogged = 0;
            self.logged_at = Some(now);
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_the_rate_holds() {
        let mut l = ReplyLimiter::default();
        let now = 1_000_000;
        let passed = (0..1000).filter(|_| l.admit(now, 0, "t")).count() as u64;
        assert_eq!(passed, BURST);
        // One second later: one second's worth.
        let passed = (0..1000).filter(|_| l.admit(now + 1000, 0, "t")).count() as u64;
        assert_eq!(passed, RATE_PER_S);
    }

    #[test]
    fn nothing_passes_while_the_outbox_share_is_full() {
        let mut l = ReplyLimiter::default();
        assert!(!l.admit(5, OUTBOX_SHARE, "t"));
        assert!(l.admit(5, OUTBOX_SHARE - 1, "t"));
    }
}
