//! Which credential each request uses: the key set and the distributions over it.

use super::*;

/// The credentials a run uses and, for writes, the version each is known to be at.
pub(super) struct Keys {
    pub(super) names: Vec<String>,
    pub(super) versions: Vec<AtomicU64>,
    /// Unique suffixes for the miss workload.
    pub(super) miss_base: String,
    pub(super) miss_counter: AtomicU64,
}

impl Keys {
    pub(super) fn new(args: &BenchArgs, version: u64) -> Keys {
        Keys {
            names: (0..args.keys).map(|i| format!("{}{i:06}", args.prefix)).collect(),
            versions: (0..args.keys).map(|_| AtomicU64::new(version)).collect(),
            miss_base: format!("{}miss/{:016x}/", args.prefix, rand::random::<u64>()),
            miss_counter: AtomicU64::new(0),
        }
    }
}

/// Chooses key indexes.
pub(super) enum Picker {
    Uniform(u64),
    Sequential(u64),
    /// Cumulative weights of keys 0..n.
    Zipf(Arc<[f64]>),
}

impl Picker {
    pub(super) fn new(distribution: KeyDistribution, n: u64, exponent: f64) -> Picker {
        let n = n.max(1);
        match distribution {
            KeyDistribution::Uniform => Picker::Uniform(n),
            KeyDistribution::Sequential => Picker::Sequential(n),
            KeyDistribution::Zipf => {
                let mut total = 0.0;
                let mut cdf: Vec<f64> = (0..n)
                    .map(|i| {
                        total += 1.0 / ((i + 1) as f64).powf(exponent);
                        total
                    })
                    .collect();
                for c in &mut cdf {
                    *c /= total;
                }
                Picker::Zipf(cdf.into())
            }
        }
    }

    /// A key index below n; `seq` drives the sequential distribution.
    pub(super) fn pick(&self, rng: &mut SplitMix64, seq: u64) -> u64 {
        match self {
            Picker::Uniform(n) => rng.next() % n,
            Picker::Sequential(n) => seq % n,
            Picker::Zipf(cdf) => {
                let u = rng.next_f64();
                (cdf.partition_point(|c| *c < u) as u64).min(cdf.len() as u64 - 1)
            }
        }
    }
}

/// A small fast generator for key choice (not for anything secret).
pub(super) struct SplitMix64(pub(super) u64);

impl SplitMix64 {
    pub(super) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub(super) fn next_f64(&mut self) -> f64 {
        (self.next() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}
