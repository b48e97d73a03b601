//! The consistent-hash ring that maps key hashes to shards. This file owns [`HashRing`] (its
//! point derivation, which is part of the data format, and its lookup) and [`RingError`].
//!
//! Every shard owns `points_per_shard` virtual points on a 64-bit ring; a key belongs to the
//! shard of the first point at or after its hash, wrapping past `u64::MAX` to the lowest point.
//! Growing a ring from `n` to `n + 1` shards only adds points, so the only keys that change
//! shard are those that now land on one of the new shard's points: keys move to the new shard
//! and never between old ones, and about `1 / (n + 1)` of them move.

use super::{ShardId, key_hash};

/// The number of virtual points each shard gets when built with [`HashRing::with_shards`].
///
/// With 256 points per shard the largest shard's share of the hash space is within about 13%
/// (16 shards) to 14% (64 shards) of the mean (measured; see the `spread` tests). The spread
/// shrinks as `1 / sqrt(points)`: 512 points give about 10%, 1024 about 7–8%.
pub const DEFAULT_POINTS_PER_SHARD: u32 = 256;

/// An argument to [`HashRing::new`] or [`HashRing::with_shards`] that cannot build a ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// `shards` was 0: a ring needs at least one shard.
    #[error("invalid hash ring: `shards` must be at least 1, got 0")]
    ZeroShards,
    /// `points_per_shard` was 0: every shard needs at least one point on the ring.
    #[error("invalid hash ring: `points_per_shard` must be at least 1, got 0")]
    ZeroPointsPerShard,
}

/// A consistent-hash ring with virtual points mapping key hashes to shards `0..shard_count()`.
///
/// Built once from `(shards, points_per_shard)` and immutable after; two rings built from the
/// same arguments are equal and map every key the same way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashRing {
    /// Every `(point, shard)` pair, sorted by point and then by shard id. Never empty.
    points: Vec<(u64, ShardId)>,
    /// The number of shards; shard ids are `0..shards`.
    shards: u32,
}

impl HashRing {
    /// Builds a ring of `shards` shards (ids `0..shards`), each with `points_per_shard` points.
    ///
    /// The point for shard `s`, virtual point `v` (both as `u64`) is XXH3-64 (seed 0) of the 16
    /// bytes `s.to_be_bytes() ++ v.to_be_bytes()`. **This derivation is part of the on-disk and
    /// wire format, like [`key_hash`]: changing it remaps every key.** Where two points collide,
    /// the lower shard id comes first and so wins the lookup.
    ///
    /// # Errors
    ///
    /// [`RingError::ZeroShards`] if `shards == 0`, [`RingError::ZeroPointsPerShard`] if
    /// `points_per_shard == 0`.
    pub fn new(shards: u32, points_per_shard: u32) -> Result<HashRing, RingError> {
        if shards == 0 {
            return Err(RingError::ZeroShards);
        }
        if points_per_shard == 0 {
            return Err(RingError::ZeroPointsPerShard);
        }
        let total = (shards as usize).saturating_mul(points_per_shard as usize);
        let mut points = Vec::with_capacity(total);
        for shard in 0..u64::from(shards) {
            for vnode in 0..u64::from(points_per_shard) {
                points.push((point(shard, vnode), shard));
            }
        }
        points.sort_unstable();
        Ok(HashRing { points, shards })
    }

    /// Builds a ring of `shards` shards with [`DEFAULT_POINTS_PER_SHARD`] points each.
    ///
    /// # Errors
    ///
    /// [`RingError::ZeroShards`] if `shards == 0`.
    pub fn with_shards(shards: u32) -> Result<HashRing, RingError> {
        HashRing::new(shards, DEFAULT_POINTS_PER_SHARD)
    }

    /// The shard that owns `key`: the shard for [`key_hash`]`(key)`.
    pub fn shard_for(&self, key: &[u8]) -> ShardId {
        self.shard_for_hash(key_hash(key))
    }

    /// The shard that owns the key hash `h`: the shard of the first point `>= h`, wrapping to
    /// the lowest point when `h` is above every point.
    pub fn shard_for_hash(&self, h: u64) -> ShardId {
        let idx = self.points.partition_point(|&(p, _)| p < h);
        // `points` is never empty (`new` rejects 0 shards and 0 points); `idx == len` wraps to 0.
        let idx = if idx == self.points.len() { 0 } else { idx };
        self.points[idx].1
    }

    /// The number of shards in the ring.
    pub fn shard_count(&self) -> u32 {
        self.shards
    }

    /// Every shard id in the ring, in ascending order: `0..shard_count()`.
    pub fn shards(&self) -> impl Iterator<Item = ShardId> + use<> {
        0..u64::from(self.shards)
    }
}

/// The ring position of virtual point `vnode` of `shard`; see [`HashRing::new`].
fn point(shard: ShardId, vnode: u64) -> u64 {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&shard.to_be_bytes());
    bytes[8..].copy_from_slice(&vnode.to_be_bytes());
    xxhash_rust::xxh3::xxh3_64(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvnode_testkit::Rng;
    use proptest::prelude::*;

    /// A random 16-byte key.
    fn random_key(rng: &mut Rng) -> Vec<u8> {
        rng.bytes(16)
    }

    const KEYS: usize = 1_000_000;

    /// Maps `KEYS` random keys from `seed` and returns the largest relative deviation of any
    /// shard's share from `1 / shards`.
    fn max_spread_deviation(ring: &HashRing, seed: u64) -> f64 {
        let mut counts = vec![0u64; ring.shard_count() as usize];
        let mut rng = Rng::new(seed);
        for _ in 0..KEYS {
            counts[ring.shard_for(&random_key(&mut rng)) as usize] += 1;
        }
        let expected = KEYS as f64 / f64::from(ring.shard_count());
        counts
            .iter()
            .map(|&c| (c as f64 - expected).abs() / expected)
            .fold(0.0, f64::max)
    }

    /// The largest relative deviation of any shard's exact share of the hash space (the sum of
    /// the arcs ending at its points) from `1 / shards`.
    fn exact_max_deviation(ring: &HashRing) -> f64 {
        let mut arcs = vec![0u128; ring.shard_count() as usize];
        let mut prev = ring.points[ring.points.len() - 1].0;
        for &(p, shard) in &ring.points {
            arcs[shard as usize] += u128::from(p.wrapping_sub(prev));
            prev = p;
        }
        let mean = (1u128 << 64) as f64 / f64::from(ring.shard_count());
        arcs.iter()
            .map(|&a| (a as f64 - mean).abs() / mean)
            .fold(0.0, f64::max)
    }

    // Tolerances. The ring is fixed, so each shard's share is set by its arc lengths; random
    // keys add only ~1-2% of sampling noise on top. Measured with 256 points per shard, 1M keys,
    // 8 key seeds: 16 shards: exact 12.9%, sampled 12.3-13.0%; 64 shards: exact 13.8%, sampled
    // 13.7-15.2%. That is the expected ~2-2.5 sigma of a 1/sqrt(256) = 6.25% per-shard spread,
    // so the ±15% / ±20% first proposed would leave too little headroom: the bounds below keep
    // ~1.5× over the worst seed (13.0% -> 20%, 15.2% -> 23%).
    const SPREAD_TOLERANCE_16: f64 = 0.20;
    const SPREAD_TOLERANCE_64: f64 = 0.23;

    #[test]
    fn spread_16_shards() {
        let ring = HashRing::new(16, 256).expect("valid ring");
        let dev = max_spread_deviation(&ring, 0x5EED_0016);
        eprintln!(
            "spread: 16 shards x 256 points: max deviation {:.2}% over 1M keys, {:.2}% exact",
            dev * 100.0,
            exact_max_deviation(&ring) * 100.0
        );
        assert!(dev <= SPREAD_TOLERANCE_16, "max deviation {dev}");
    }

    #[test]
    fn spread_64_shards() {
        let ring = HashRing::new(64, 256).expect("valid ring");
        let dev = max_spread_deviation(&ring, 0x5EED_0064);
        eprintln!(
            "spread: 64 shards x 256 points: max deviation {:.2}% over 1M keys, {:.2}% exact",
            dev * 100.0,
            exact_max_deviation(&ring) * 100.0
        );
        assert!(dev <= SPREAD_TOLERANCE_64, "max deviation {dev}");
    }

    // Moved fraction vs 1/(n+1), 1M keys, 5 key seeds: n=4 +8.1..+8.4%, n=16 +2.6..+3.6%,
    // n=63 +5.6..+7.6%. The ±25% bound keeps ~3× headroom over the worst (+8.4%).
    #[test]
    fn growing_moves_keys_only_to_the_new_shard() {
        for n in [4u32, 16, 63] {
            let old = HashRing::with_shards(n).expect("valid ring");
            let new = HashRing::with_shards(n + 1).expect("valid ring");
            let mut rng = Rng::new(0xA11C_E000 + u64::from(n));
            let mut moved = 0u64;
            for _ in 0..KEYS {
                let key = random_key(&mut rng);
                let (a, b) = (old.shard_for(&key), new.shard_for(&key));
                if a != b {
                    assert_eq!(b, u64::from(n), "key moved from {a} to old shard {b}");
                    moved += 1;
                }
            }
            let fraction = moved as f64 / KEYS as f64;
            let expected = 1.0 / f64::from(n + 1);
            eprintln!(
                "movement: {n} -> {} shards: moved {:.4} of 1M keys (1/(n+1) = {:.4}, {:+.1}%)",
                n + 1,
                fraction,
                expected,
                (fraction - expected) / expected * 100.0
            );
            assert!(
                (fraction - expected).abs() <= 0.25 * expected,
                "moved fraction {fraction}, expected {expected}"
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn growing_moves_keys_only_to_the_new_shard_prop(n in 1u32..100, seed in any::<u64>()) {
            let old = HashRing::with_shards(n).expect("valid ring");
            let new = HashRing::with_shards(n + 1).expect("valid ring");
            let mut rng = Rng::new(seed);
            for _ in 0..2000 {
                let key = random_key(&mut rng);
                let (a, b) = (old.shard_for(&key), new.shard_for(&key));
                prop_assert!(a == b || b == u64::from(n), "key moved from {} to {}", a, b);
            }
        }
    }

    /// Pins the hash and the point derivation: if this fails, every existing cluster's keys
    /// would be remapped. Do not update these values; restore the old derivation instead.
    #[test]
    fn golden_values_are_stable() {
        assert_eq!(key_hash(b"hello"), GOLDEN_HELLO);
        assert_eq!(point(0, 0), GOLDEN_POINT_0_0);
        let ring = HashRing::with_shards(16).expect("valid ring");
        let got: Vec<(&[u8], ShardId)> = GOLDEN_KEYS
            .iter()
            .map(|&(k, _)| (k, ring.shard_for(k)))
            .collect();
        assert_eq!(got, GOLDEN_KEYS.to_vec());
    }

    const GOLDEN_HELLO: u64 = 10760762337991515389;
    const GOLDEN_POINT_0_0: u64 = 15034821391391295848;
    const GOLDEN_KEYS: [(&[u8], ShardId); 8] = [
        (b"", 0),
        (b"hello", 2),
        (b"a", 10),
        (b"user:1", 4),
        (b"user:2", 10),
        (b"user:42", 9),
        (b"order/2024/0001", 12),
        (b"\x00\xff\x10", 0),
    ];

    #[test]
    fn same_arguments_build_equal_rings() {
        let a = HashRing::new(37, 100).expect("valid ring");
        let b = HashRing::new(37, 100).expect("valid ring");
        assert_eq!(a, b);
        assert_eq!(a.clone(), b);
        assert_ne!(a, HashRing::new(37, 101).expect("valid ring"));
        assert_ne!(a, HashRing::new(38, 100).expect("valid ring"));
    }

    #[test]
    fn invalid_arguments_are_errors() {
        assert_eq!(HashRing::new(0, 256), Err(RingError::ZeroShards));
        assert_eq!(HashRing::new(16, 0), Err(RingError::ZeroPointsPerShard));
        assert_eq!(HashRing::new(0, 0), Err(RingError::ZeroShards));
        assert_eq!(HashRing::with_shards(0), Err(RingError::ZeroShards));
        assert!(RingError::ZeroShards.to_string().contains("`shards`"));
        assert!(
            RingError::ZeroPointsPerShard
                .to_string()
                .contains("`points_per_shard`")
        );
    }

    #[test]
    fn accessors_and_edges() {
        let ring = HashRing::new(5, 3).expect("valid ring");
        assert_eq!(ring.shard_count(), 5);
        assert_eq!(ring.shards().collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);
        // A hash above every point wraps to the lowest point.
        let lowest = ring.points[0].1;
        assert!(ring.points[ring.points.len() - 1].0 < u64::MAX);
        assert_eq!(ring.shard_for_hash(u64::MAX), lowest);
        assert_eq!(ring.shard_for_hash(0), lowest);
        // A hash exactly on a point belongs to that point's shard.
        for &(p, s) in &ring.points {
            assert_eq!(ring.shard_for_hash(p), s);
        }
        // One shard: everything maps to shard 0.
        let one = HashRing::new(1, 1).expect("valid ring");
        assert_eq!(one.shard_for(b"anything"), 0);
        assert_eq!(one.shard_for_hash(u64::MAX), 0);
    }

    #[test]
    fn colliding_points_go_to_the_lower_shard() {
        // Simulate a collision directly: two shards with the same point.
        let ring = HashRing {
            points: vec![(10, 0), (10, 3), (20, 1)],
            shards: 4,
        };
        assert_eq!(ring.shard_for_hash(5), 0);
        assert_eq!(ring.shard_for_hash(10), 0);
        assert_eq!(ring.shard_for_hash(11), 1);
        assert_eq!(ring.shard_for_hash(21), 0);
    }
}
