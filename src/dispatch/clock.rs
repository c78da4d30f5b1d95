//! The wall clock the push clients read, behind a seam so tests can move time.
//!
//! Provider tokens are about wall time (JWT `iat`/`exp`, an OAuth2 `expires_in`), so the seam is
//! `SystemTime`, not tokio's paused clock: a test advances a [`ManualClock`] by 40 minutes and the
//! APNs client re-signs, without sleeping and without pausing the real network I/O around it.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Where "now" comes from.
pub trait Clock: Send + Sync + 'static {
    /// The current wall time.
    fn now(&self) -> SystemTime;
}

/// A clock shared by a client (and, in tests, the fake server it talks to).
pub type SharedClock = Arc<dyn Clock>;

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// The system clock as a [`SharedClock`].
pub fn system() -> SharedClock {
    Arc::new(SystemClock)
}

/// A clock that starts at the system time and moves only when told to.
#[derive(Debug)]
pub struct ManualClock {
    /// The current reading.
    now: parking_lot::Mutex<SystemTime>,
}

impl ManualClock {
    /// A clock reading the system time now, shared.
    pub fn new() -> Arc<Self> {
        Arc::new(Self { now: parking_lot::Mutex::new(SystemTime::now()) })
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        *self.now.lock() += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.now.lock()
    }
}

/// Whole seconds since the Unix epoch (0 for a time before it).
pub fn unix_s(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// Milliseconds since the Unix epoch (0 for a time before it).
pub fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}
