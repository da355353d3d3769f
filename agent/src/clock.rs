//! The wall clock, in the unit every record and message uses: milliseconds
//! since the Unix epoch. Decision code takes `now` as an argument (tests
//! pass a fixed one); only the tasks read the clock, through this.

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
