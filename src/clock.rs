//! Time that keeps counting while the machine is suspended, and the leader-lease rule built
//! on it.
//!
//! `std::time::Instant` (and tokio's) reads `CLOCK_MONOTONIC`, which on Linux **stops while the
//! machine is suspended** (a laptop lid, a VM paused by its hypervisor or live-migrated). The
//! other nodes' clocks keep running meanwhile, so after a suspend a monotonic clock
//! under-reports how long ago something happened by the length of the suspend. Two things
//! in kvnode must not be fooled by that:
//!
//! - **A leader's lease.** openraft reckons a lease from the last quorum acknowledgement on the
//!   monotonic clock. A leader suspended for longer than the election timeout resumes still
//!   believing its lease holds while a new leader has been elected and acknowledged writes: a
//!   lease read would be stale. [`lease_holds`] adds the time this process spent suspended
//!   since the acknowledgement (seen as `CLOCK_BOOTTIME` running ahead of `CLOCK_MONOTONIC`),
//!   and a margin for clock-rate drift.
//! - **A bounded-staleness proof's age** ([`crate::read_index::Freshness`]): measured on
//!   [`BootInstant`], which counts the suspend.
//!
//! # The lease rule
//!
//! A follower that acknowledged the leader's message at its local time `r` refuses to vote for
//! anyone else until `r + election_timeout_max` on its own clock (openraft's vote lease).
//! The leader reckons its lease from the *send* time `s ≤ r` of the acknowledged message. If
//! the follower's clock runs faster than the leader's by a factor `1 + ρ`, its refusal ends
//! `election_timeout_max · ρ / (1 + ρ)` early in real time. So the leader serves lease reads
//! only while `elapsed + suspended + margin < election_timeout_max`, where `margin`
//! ([`crate::Config::lease_margin_ms`]) bounds that drift: 250 ms of a 2 s lease tolerates
//! followers' clocks running up to 14 % fast, far beyond what NTP-disciplined or even free-running
//! quartz clocks do. A leader that cannot show the lease holds serves the read with a quorum
//! round instead (and the receipt says linearizable).
//!
//! # Measuring a suspend
//!
//! `offset = boottime − monotonic` grows only while the machine is suspended. A node samples it
//! (every heartbeat interval, and on every lease check) into a short history; the time
//! suspended since an instant `t` is at most `offset(now) − offset(last sample at or before t)`.
//! With no sample at or before `t` there is no bound, and the lease is not trusted: the read
//! takes a quorum round. On platforms without `CLOCK_BOOTTIME` the offset is always zero.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A point on the clock that keeps counting through a suspend (`CLOCK_BOOTTIME` on Linux).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct BootInstant(Duration);

impl BootInstant {
    /// Now.
    pub fn now() -> BootInstant {
        BootInstant(boottime())
    }

    /// Time since `self`, suspends included (zero if `self` is in the future).
    pub fn elapsed(&self) -> Duration {
        boottime().saturating_sub(self.0)
    }
}

#[cfg(target_os = "linux")]
fn boottime() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_BOOTTIME exists on every Linux
    // kernel since 2.6.39, and clock_gettime does not fail for a valid clock and pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_BOOTTIME) failed");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[cfg(not(target_os = "linux"))]
fn boottime() -> Duration {
    use std::sync::OnceLock;
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed()
}

/// How many samples of the offset are kept (at one per heartbeat interval or more often,
/// more than any lease is long).
const SAMPLES: usize = 512;

/// Samples closer together than this replace each other (lease checks can run at every read).
const MIN_SAMPLE_GAP: Duration = Duration::from_millis(5);

/// The history of `boottime − monotonic` (see the module doc).
#[derive(Debug, Default)]
pub struct SuspendTracker {
    samples: Mutex<VecDeque<(Instant, Duration)>>,
}

impl SuspendTracker {
    /// Records the offset between the two clocks as read at `mono` and `boot` (unless the last
    /// sample is younger than [`MIN_SAMPLE_GAP`]).
    pub fn observe(&self, mono: Instant, boot: Duration) {
        let offset = offset(mono, boot);
        let mut samples = self.samples.lock().expect("clock samples lock");
        if samples
            .back()
            .is_some_and(|&(last, _)| mono.saturating_duration_since(last) < MIN_SAMPLE_GAP)
        {
            return;
        }
        samples.push_back((mono, offset));
        while samples.len() > SAMPLES {
            samples.pop_front();
        }
    }

    /// An upper bound on the time spent suspended between `since` and the moment the clocks
    /// read `now_mono` and `now_boot`, or `None` if no sample was taken at or before `since`.
    pub fn suspended_since(
        &self,
        since: Instant,
        now_mono: Instant,
        now_boot: Duration,
    ) -> Option<Duration> {
        let samples = self.samples.lock().expect("clock samples lock");
        let before = samples.iter().rev().find(|(t, _)| *t <= since)?;
        Some(offset(now_mono, now_boot).saturating_sub(before.1))
    }
}

/// `boot − mono`, with `mono` measured from a fixed origin (only differences matter).
fn offset(mono: Instant, boot: Duration) -> Duration {
    boot.saturating_sub(mono_since_origin(mono))
}

/// A fixed origin for turning monotonic instants into durations (only differences matter).
fn mono_since_origin(mono: Instant) -> Duration {
    use std::sync::OnceLock;
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(|| Instant::now() - Duration::from_secs(1));
    mono.saturating_duration_since(origin)
}

/// The process's tracker: the offset is a property of the machine, not of a shard.
fn tracker() -> &'static SuspendTracker {
    use std::sync::OnceLock;
    static TRACKER: OnceLock<SuspendTracker> = OnceLock::new();
    TRACKER.get_or_init(SuspendTracker::default)
}

/// Samples the offset between the clocks now (the hibernation controller calls it every
/// heartbeat interval; lease checks call it too).
pub fn sample() {
    tracker().observe(Instant::now(), boottime());
}

/// True if a leader whose last quorum acknowledgement was sent at `acked` (monotonic) still
/// holds a lease of `lease` with `margin` for clock drift, counting any suspend since (see the
/// module doc). False when the suspend cannot be bounded.
pub fn lease_holds(acked: Instant, lease: Duration, margin: Duration) -> bool {
    let (now, boot) = (Instant::now(), boottime());
    tracker().observe(now, boot);
    lease_holds_with(tracker(), (now, boot), acked, lease, margin)
}

fn lease_holds_with(
    tracker: &SuspendTracker,
    (now, boot): (Instant, Duration),
    acked: Instant,
    lease: Duration,
    margin: Duration,
) -> bool {
    let Some(suspended) = tracker.suspended_since(acked, now, boot) else {
        return false;
    };
    let elapsed = now.saturating_duration_since(acked) + suspended;
    elapsed.saturating_add(margin) < lease
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_millis(2000);
    const MARGIN: Duration = Duration::from_millis(250);

    /// A tracker fed with scripted readings: `boot` runs ahead of `mono` only when told.
    struct Script {
        tracker: SuspendTracker,
        mono: Instant,
        boot: Duration,
    }

    impl Script {
        fn new() -> Script {
            let s = Script {
                tracker: SuspendTracker::default(),
                mono: Instant::now(),
                boot: Duration::from_secs(100),
            };
            s.tracker.observe(s.mono, s.boot);
            s
        }
        fn run(&mut self, d: Duration) {
            self.mono += d;
            self.boot += d;
            self.tracker.observe(self.mono, self.boot);
        }
        fn suspend(&mut self, d: Duration) {
            self.boot += d;
        }
        fn holds(&self, acked: Instant) -> bool {
            lease_holds_with(&self.tracker, (self.mono, self.boot), acked, LEASE, MARGIN)
        }
    }

    #[test]
    fn a_lease_holds_until_the_margin_before_it_ends() {
        let mut s = Script::new();
        s.run(Duration::from_millis(10));
        let acked = s.mono;
        s.run(Duration::from_millis(1000));
        assert!(s.holds(acked));
        s.run(Duration::from_millis(800)); // 1800 ms: inside the lease, but within its margin
        assert!(!s.holds(acked), "no margin for clock drift");
    }

    #[test]
    fn a_suspend_since_the_acknowledgement_counts_against_the_lease() {
        let mut s = Script::new();
        s.run(Duration::from_millis(10));
        let acked = s.mono;
        s.run(Duration::from_millis(100));
        // The VM is suspended for 5 s: the monotonic clock stops, boottime does not.
        s.suspend(Duration::from_secs(5));
        assert!(
            !s.holds(acked),
            "a lease survived a suspend (no sample since)"
        );
        s.run(Duration::from_millis(100));
        // 200 ms on the monotonic clock: openraft alone would still call this a lease.
        assert_eq!(s.mono.duration_since(acked), Duration::from_millis(200));
        assert!(!s.holds(acked), "a lease survived a suspend");
        // A suspend before the acknowledgement does not count.
        let acked = s.mono;
        s.run(Duration::from_millis(100));
        assert!(s.holds(acked));
    }

    #[test]
    fn with_no_sample_before_the_acknowledgement_the_lease_is_not_trusted() {
        let s = Script::new();
        let before_any_sample = s.mono - Duration::from_millis(1);
        assert!(!s.holds(before_any_sample));
    }

    #[test]
    fn the_boot_clock_counts_forward() {
        let a = BootInstant::now();
        std::thread::sleep(Duration::from_millis(2));
        assert!(a.elapsed() >= Duration::from_millis(2));
        assert!(BootInstant::now() > a);
    }
}
