//! When each request is meant to go out, and what its latency is.
//!
//! Open loop (`--rate N`): request `s` of the whole run is due at `s / N` seconds after the
//! start, and connection `c` of `K` sends requests `c, c + K, c + 2K, …` (wrk2's layout: every
//! connection carries `N / K` per second). A request is sent at its due time or, when its
//! connection is still waiting on the previous answer, as soon as that answer arrives; its
//! latency is counted from the *due* time, so a stalled server is charged for the requests it
//! held up (no coordinated omission). Closed loop (`--rate max`): every connection sends its next
//! request as soon as the previous one is answered, and latency is counted from the actual send.

use std::time::Duration;

/// The request plan of one run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Requests per second across all connections; `None` = flat out (closed loop).
    pub rate: Option<f64>,
    /// Connections the requests are spread over.
    pub connections: usize,
    /// Requests due before this offset are sent but not recorded.
    pub warmup: Duration,
    /// How long requests are recorded, after the warm-up.
    pub duration: Duration,
}

impl Schedule {
    /// The offset from the run's start at which request `j` of connection `connection` is due,
    /// or `None` in a closed loop (no request has a due time there).
    pub fn due(&self, connection: usize, j: u64) -> Option<Duration> {
        let rate = self.rate?;
        let slot = j as f64 * self.connections as f64 + connection as f64;
        Some(Duration::from_secs_f64(slot / rate))
    }

    /// When the run stops sending: requests due (open loop) or started (closed loop) at or after
    /// this offset are not sent.
    pub fn end(&self) -> Duration {
        self.warmup + self.duration
    }

    /// Whether a request due (open loop) or sent (closed loop) at `offset` is recorded.
    pub fn measured(&self, offset: Duration) -> bool {
        offset >= self.warmup && offset < self.end()
    }

    /// The latency to record: from the due time in an open loop (however late the request was
    /// actually sent), from the actual send in a closed loop. Offsets are from the run's start.
    pub fn latency(&self, due: Option<Duration>, sent: Duration, done: Duration) -> Duration {
        done.saturating_sub(due.unwrap_or(sent))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(rate: f64, connections: usize) -> Schedule {
        Schedule { rate: Some(rate), connections, warmup: Duration::from_secs(1), duration: Duration::from_secs(2) }
    }

    #[test]
    fn due_times_interleave_the_connections_at_the_total_rate() {
        let s = open(1000.0, 4);
        // Request slot = j * 4 + c, one every millisecond.
        assert_eq!(s.due(0, 0), Some(Duration::ZERO));
        assert_eq!(s.due(1, 0), Some(Duration::from_millis(1)));
        assert_eq!(s.due(3, 0), Some(Duration::from_millis(3)));
        assert_eq!(s.due(0, 1), Some(Duration::from_millis(4)));
        assert_eq!(s.due(2, 250), Some(Duration::from_millis(1002)));
        // Every slot of the first second belongs to exactly one (connection, j).
        let mut slots: Vec<Duration> = (0..4).flat_map(|c| (0..250).map(move |j| s.due(c, j).unwrap())).collect();
        slots.sort();
        slots.dedup();
        assert_eq!(slots.len(), 1000);
        assert!(slots.iter().all(|d| *d < Duration::from_secs(1)));
    }

    #[test]
    fn closed_loop_has_no_due_times() {
        let s = Schedule { rate: None, ..open(1.0, 2) };
        assert_eq!(s.due(0, 0), None);
        assert_eq!(s.due(1, 99), None);
    }

    #[test]
    fn only_the_window_after_the_warmup_is_measured() {
        let s = open(10.0, 1);
        assert!(!s.measured(Duration::from_millis(999)));
        assert!(s.measured(Duration::from_secs(1)));
        assert!(s.measured(Duration::from_millis(2999)));
        assert!(!s.measured(Duration::from_secs(3)));
        assert_eq!(s.end(), Duration::from_secs(3));
    }

    /// One connection at 100 requests/s whose server stalls 500 ms on its first request and
    /// then answers in 1 ms: the requests held up behind the stall are charged the wait.
    #[test]
    fn a_stall_is_charged_to_the_requests_it_held_up() {
        let s =
            Schedule { rate: Some(100.0), connections: 1, warmup: Duration::ZERO, duration: Duration::from_secs(2) };
        let mut free_at = Duration::ZERO;
        let mut latencies = Vec::new();
        let mut service_times = Vec::new();
        for j in 0..100u64 {
            let due = s.due(0, j).unwrap();
            let sent = due.max(free_at);
            let service = if j == 0 { Duration::from_millis(500) } else { Duration::from_millis(1) };
            let done = sent + service;
            free_at = done;
            latencies.push(s.latency(Some(due), sent, done));
            service_times.push(done - sent);
        }
        assert_eq!(latencies[0], Duration::from_millis(500));
        // Due at 10 ms, sent at 500 ms when the stall ended, answered at 501 ms.
        assert_eq!(latencies[1], Duration::from_millis(491));
        assert_eq!(latencies[2], Duration::from_millis(482));
        // What a closed-loop tool would record instead: 1 ms for all but the first.
        assert_eq!(service_times[1], Duration::from_millis(1));
        // The backlog drains at 9 ms per request, so ~55 requests see more than 10 ms.
        let late = latencies.iter().filter(|l| **l > Duration::from_millis(10)).count();
        assert!((50..=60).contains(&late), "{late}");
        assert_eq!(latencies[99], Duration::from_millis(1));
    }

    #[test]
    fn closed_loop_latency_is_from_the_send() {
        let s = Schedule { rate: None, ..open(1.0, 1) };
        assert_eq!(s.latency(None, Duration::from_millis(10), Duration::from_millis(13)), Duration::from_millis(3));
    }
}
