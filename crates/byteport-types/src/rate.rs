//! Token buckets by key: a burst, then a steady rate. The control plane
//! and the node's metadata relay both limit each guest with one.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Instant;

/// Metadata requests a guest may make in a burst, and how many a second it
/// regains: cloud-init fetches three or four documents a boot. The node's
/// relay and the control plane both hold each guest to it.
pub const METADATA_BURST: f64 = 20.0;
pub const METADATA_PER_SECOND: f64 = 2.0;

/// Keys beyond this many make a sweep of the buckets that have refilled.
const SWEEP_AT: usize = 10_000;

/// One bucket per key, `burst` deep, refilled at `per_second`.
pub struct Buckets<K> {
    pub burst: f64,
    pub per_second: f64,
    buckets: Mutex<HashMap<K, (f64, Instant)>>,
}

impl<K: Hash + Eq> Buckets<K> {
    pub fn new(burst: f64, per_second: f64) -> Self {
        Buckets {
            burst,
            per_second,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one from `key`'s bucket; false when it is empty.
    pub fn take(&self, key: K) -> bool {
        let now = Instant::now();
        let Ok(mut b) = self.buckets.lock() else {
            return true;
        };
        let (burst, rate) = (self.burst, self.per_second);
        if b.len() > SWEEP_AT {
            // Buckets that have refilled are as good as new: forget them.
            b.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate < burst
            });
        }
        let (tokens, at) = b.entry(key).or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * rate).min(burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_nothing_until_it_refills_and_keys_are_apart() {
        let b = Buckets::new(5.0, 0.001);
        let taken = (0..8).filter(|_| b.take("a")).count();
        assert_eq!(taken, 5);
        assert!(b.take("b"), "another key has its own bucket");
        let fast = Buckets::new(1.0, 1000.0);
        assert!(fast.take(1));
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(fast.take(1), "refilled");
    }
}
