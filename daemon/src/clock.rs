//! The wall clock, for what is shown to people or stored for them (Consul metadata, the age
//! of a table). Durations and deadlines use monotonic clocks instead.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Time since the Unix epoch; zero if the clock is set before it.
pub fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    since_epoch().as_millis() as u64
}

/// Microseconds since the Unix epoch.
pub fn unix_us() -> u64 {
    since_epoch().as_micros() as u64
}
