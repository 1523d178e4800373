//! Exact percentiles over every sample (no histogram buckets): the runs are
//! bounded, so keeping each latency as microseconds and sorting is cheap.

use serde_json::{json, Value};

/// Sorted samples in microseconds.
#[derive(Debug, Clone, Default)]
pub struct Dist {
    sorted: Vec<u64>,
}

impl Dist {
    pub fn new(mut samples: Vec<u64>) -> Self {
        samples.sort_unstable();
        Self { sorted: samples }
    }

    /// All samples of several distributions together.
    pub fn merge<'a>(parts: impl IntoIterator<Item = &'a Dist>) -> Dist {
        let mut v = Vec::new();
        for p in parts {
            v.extend_from_slice(&p.sorted);
        }
        Dist::new(v)
    }

    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sorted.is_empty()
    }

    /// Nearest-rank percentile, in microseconds (0 when empty).
    pub fn pct_us(&self, p: f64) -> u64 {
        if self.sorted.is_empty() {
            return 0;
        }
        let n = self.sorted.len();
        let rank = ((p / 100.0) * n as f64).ceil() as usize;
        self.sorted[rank.clamp(1, n) - 1]
    }

    /// Percentile in milliseconds.
    pub fn pct_ms(&self, p: f64) -> f64 {
        self.pct_us(p) as f64 / 1000.0
    }

    pub fn mean_ms(&self) -> f64 {
        if self.sorted.is_empty() {
            return 0.0;
        }
        self.sorted.iter().sum::<u64>() as f64 / self.sorted.len() as f64 / 1000.0
    }

    pub fn max_ms(&self) -> f64 {
        self.sorted.last().copied().unwrap_or(0) as f64 / 1000.0
    }

    pub fn summary(&self) -> Value {
        if self.is_empty() {
            return json!({"n": 0});
        }
        json!({
            "n": self.len(),
            "mean_ms": round3(self.mean_ms()),
            "p50_ms": round3(self.pct_ms(50.0)),
            "p90_ms": round3(self.pct_ms(90.0)),
            "p99_ms": round3(self.pct_ms(99.0)),
            "p999_ms": round3(self.pct_ms(99.9)),
            "max_ms": round3(self.max_ms()),
        })
    }
}

pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Median of a few values (per-round results), with min and max for the spread.
#[derive(Debug, Clone, Copy, Default)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(values: &[f64]) -> Self {
        if values.is_empty() {
            return Self::default();
        }
        let mut v = values.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Self {
            median,
            min: v[0],
            max: v[n - 1],
        }
    }

    pub fn json(&self) -> Value {
        json!({"median": round3(self.median), "min": round3(self.min), "max": round3(self.max)})
    }

    /// `+0.300 (+0.200 … +0.400)`: a difference, signed.
    pub fn fmt_signed(&self, decimals: usize) -> String {
        format!(
            "{:+.d$} ({:+.d$} … {:+.d$})",
            self.median,
            self.min,
            self.max,
            d = decimals
        )
    }

    /// `1.234 (0.9…1.5)`
    pub fn fmt(&self, decimals: usize) -> String {
        format!(
            "{:.d$} ({:.d$} … {:.d$})",
            self.median,
            self.min,
            self.max,
            d = decimals
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let d = Dist::new((1..=100).rev().collect());
        assert_eq!(d.pct_us(50.0), 50);
        assert_eq!(d.pct_us(99.0), 99);
        assert_eq!(d.pct_us(100.0), 100);
        assert_eq!(d.pct_us(0.0), 1);
        assert_eq!(Dist::new(vec![]).pct_us(50.0), 0);
    }

    #[test]
    fn spread() {
        let s = Spread::of(&[3.0, 1.0, 2.0, 10.0]);
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 10.0));
    }
}
