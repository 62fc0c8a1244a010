//! Percentiles (nearest rank) over samples.

use std::time::Duration;

/// Sorted samples in microseconds.
pub(crate) struct Samples {
    us: Vec<f64>,
}

impl Samples {
    pub(crate) fn from_durations(d: impl IntoIterator<Item = Duration>) -> Self {
        let mut us: Vec<f64> = d.into_iter().map(|d| d.as_secs_f64() * 1e6).collect();
        us.sort_by(f64::total_cmp);
        Self { us }
    }

    pub(crate) fn len(&self) -> usize {
        self.us.len()
    }

    /// The `q` quantile (0..=1) by nearest rank, in microseconds; NaN if empty.
    pub(crate) fn q_us(&self, q: f64) -> f64 {
        if self.us.is_empty() {
            return f64::NAN;
        }
        let rank = (q * self.us.len() as f64).ceil() as usize;
        self.us[rank.clamp(1, self.us.len()) - 1]
    }

    pub(crate) fn q_ms(&self, q: f64) -> f64 {
        self.q_us(q) / 1000.0
    }

    pub(crate) fn max_us(&self) -> f64 {
        self.us.last().copied().unwrap_or(f64::NAN)
    }

    pub(crate) fn max_ms(&self) -> f64 {
        self.max_us() / 1000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let s = Samples::from_durations((1..=100).map(Duration::from_micros));
        assert_eq!(s.q_us(0.5), 50.0);
        assert_eq!(s.q_us(0.99), 99.0);
        assert_eq!(s.max_us(), 100.0);
        assert_eq!(s.len(), 100);
        assert!(Samples::from_durations([]).q_us(0.5).is_nan());
    }
}
