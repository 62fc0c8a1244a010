//! Retry delays, written once for the server and the agent: exponential
//! backoff from a floor to a cap, reset on success, optionally jittered so
//! that many agents retrying against one restarted server spread out.

use std::time::Duration;

/// An exponential backoff. Each [`Backoff::next_delay`] returns the current
/// delay (jittered if asked) and doubles it up to the cap;
/// [`Backoff::reset`] returns to the floor after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
    jitter: bool,
}

impl Backoff {
    /// Starts at `min`, doubles up to `max`, no jitter.
    pub const fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            current: min,
            jitter: false,
        }
    }

    /// The same, with each delay drawn uniformly from [d/2, d] ("equal
    /// jitter"): never less than half the nominal delay, never more.
    pub const fn jittered(self) -> Self {
        Self {
            jitter: true,
            ..self
        }
    }

    /// The delay to wait before the next attempt; advances the backoff.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.current;
        self.current = (self.current * 2).min(self.max);
        if !self.jitter {
            return d;
        }
        let half = d / 2;
        let r = u32::from_le_bytes(crate::ids::random_bytes::<4>());
        half + half.mul_f64(f64::from(r) / f64::from(u32::MAX))
    }

    /// After a success: the next failure waits the floor again.
    pub fn reset(&mut self) {
        self.current = self.min;
    }

    /// The nominal delay the next failure would wait (before jitter).
    pub fn current(&self) -> Duration {
        self.current
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_the_cap_and_resets_to_the_floor() {
        let mut b = Backoff::new(Duration::from_millis(200), Duration::from_secs(1));
        let got: Vec<u128> = (0..5).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(got, vec![200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(200));
    }

    #[test]
    fn jittered_delays_stay_within_half_and_full() {
        let mut b = Backoff::new(Duration::from_secs(8), Duration::from_secs(8)).jittered();
        let delays: Vec<Duration> = (0..200).map(|_| b.next_delay()).collect();
        assert!(
            delays
                .iter()
                .all(|d| *d >= Duration::from_secs(4) && *d <= Duration::from_secs(8))
        );
        let distinct: std::collections::BTreeSet<_> = delays.iter().collect();
        assert!(distinct.len() > 100, "jitter spreads the delays");
    }
}
