//! The node-wide write-ahead log through its public API: acknowledgements wait for fdatasync,
//! one sync serves many shards, replay restores every shard, damage is reported by name and
//! offset, purged segments give their disk space back, and a power loss right after a segment
//! was deleted leaves a log that opens with everything acknowledged.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use kvnode::storage::Error;
use kvnode::storage::wal::{Fdatasync, Syncer, Wal, WalOptions};

/// A [`Syncer`] that calls the real `fdatasync`, counts calls, logs events, and can be closed
/// so that a sync blocks until the test opens it again.
#[derive(Default)]
struct GateSyncer {
    closed: Mutex<bool>,
    changed: Condvar,
    entered: Mutex<u64>,
    entered_changed: Condvar,
    syncs: AtomicU64,
    events: Arc<Mutex<Vec<String>>>,
}

impl GateSyncer {
    fn close(&self) {
        *self.closed.lock().unwrap() = true;
    }
    fn open(&self) {
        *self.closed.lock().unwrap() = false;
        self.changed.notify_all();
    }
    /// Waits until `n` syncs have entered `sync` (blocked or not).
    fn wait_entered(&self, n: u64) {
        let mut entered = self.entered.lock().unwrap();
        while *entered < n {
            let (guard, timeout) = self
                .entered_changed
                .wait_timeout(entered, Duration::from_secs(20))
                .unwrap();
            assert!(!timeout.timed_out(), "the group-commit thread never synced");
            entered = guard;
        }
    }
    fn log(&self, event: impl Into<String>) {
        self.events.lock().unwrap().push(event.into());
    }
}

impl Syncer for GateSyncer {
    fn sync(&self, file: &File) -> io::Result<()> {
        *self.entered.lock().unwrap() += 1;
        self.entered_changed.notify_all();
        let mut closed = self.closed.lock().unwrap();
        while *closed {
            closed = self.changed.wait(closed).unwrap();
        }
        drop(closed);
        self.log("sync-start");
        Fdatasync.sync(file)?;
        self.syncs.fetch_add(1, Ordering::SeqCst);
        self.log("sync-done");
        Ok(())
    }
}

/// Opens the gate when dropped, so a failing assertion cannot leave the group-commit thread
/// blocked (and the WAL's drop waiting for it). Declare it after the WAL.
struct OpenOnDrop(Arc<GateSyncer>);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.open();
    }
}

fn options(syncer: Arc<dyn Syncer>, segment_bytes: u64) -> WalOptions {
    WalOptions {
        segment_bytes,
        syncer,
    }
}

fn entry(shard: u64, index: u64, bytes: usize) -> Vec<u8> {
    let mut e = format!("shard {shard} entry {index} ").into_bytes();
    e.resize(bytes.max(e.len()), b'.');
    e
}

/// Appends and waits for the durability callback.
fn append_durably(wal: &Wal, shard: u64, first: u64, entries: Vec<Vec<u8>>) {
    let (tx, rx) = mpsc::channel();
    wal.append(
        shard,
        first,
        entries,
        Box::new(move |r| tx.send(r).unwrap()),
    )
    .unwrap();
    rx.recv_timeout(Duration::from_secs(20))
        .expect("acknowledged")
        .expect("durable");
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    files.sort();
    files
}

#[test]
fn an_append_is_readable_at_once_but_acknowledged_only_after_fdatasync() {
    let dir = tempfile::tempdir().unwrap();
    let syncer = Arc::new(GateSyncer::default());
    let wal = Wal::open(dir.path(), options(syncer.clone(), 1 << 20)).unwrap();
    let entered_at_open = *syncer.entered.lock().unwrap();
    let _gate = OpenOnDrop(syncer.clone());

    syncer.close();
    let (tx, rx) = mpsc::channel();
    let events = syncer.events.clone();
    wal.append(
        1,
        0,
        vec![entry(1, 0, 64)],
        Box::new(move |r| {
            events.lock().unwrap().push("ack".into());
            tx.send(r).unwrap();
        }),
    )
    .unwrap();
    // The entry is readable before it is durable (openraft requires this of `append`).
    assert_eq!(wal.read(1, 0..1).unwrap(), vec![(0, entry(1, 0, 64))]);
    // The group-commit thread is now inside the sync, held at the gate: no ack yet.
    syncer.wait_entered(entered_at_open + 1);
    assert!(
        rx.try_recv().is_err(),
        "acknowledged before the fdatasync ran"
    );
    syncer.open();
    rx.recv_timeout(Duration::from_secs(20)).unwrap().unwrap();

    let events = syncer.events.lock().unwrap().clone();
    let ack = events.iter().position(|e| e == "ack").unwrap();
    assert_eq!(
        &events[ack - 2..=ack],
        ["sync-start", "sync-done", "ack"],
        "the ack must come right after a completed fdatasync: {events:?}"
    );
    assert!(wal.stats().syncs >= 1);
}

#[test]
fn save_vote_is_acknowledged_only_after_fdatasync_and_in_order_with_appends() {
    let dir = tempfile::tempdir().unwrap();
    let syncer = Arc::new(GateSyncer::default());
    let wal = Wal::open(dir.path(), options(syncer.clone(), 1 << 20)).unwrap();
    let entered_at_open = *syncer.entered.lock().unwrap();
    let _gate = OpenOnDrop(syncer.clone());
    syncer.close();

    let order = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = mpsc::channel();
    let mut next_index = 0;
    for what in ["append", "vote", "append2"] {
        let order = order.clone();
        let tx = tx.clone();
        let done = Box::new(move |r: Result<(), Error>| {
            r.unwrap();
            order.lock().unwrap().push(what);
            tx.send(()).unwrap();
        });
        match what {
            "vote" => wal.save_vote(2, b"term 5".to_vec(), done).unwrap(),
            _ => {
                wal.append(2, next_index, vec![entry(2, next_index, 16)], done)
                    .unwrap();
                next_index += 1;
            }
        }
    }
    assert_eq!(wal.vote(2).as_deref(), Some(&b"term 5"[..]));
    syncer.wait_entered(entered_at_open + 1);
    assert!(
        order.lock().unwrap().is_empty(),
        "acknowledged before the fdatasync ran"
    );
    syncer.open();
    for _ in 0..3 {
        rx.recv_timeout(Duration::from_secs(20)).unwrap();
    }
    assert_eq!(*order.lock().unwrap(), ["append", "vote", "append2"]);
}

#[test]
fn one_fdatasync_serves_the_appends_of_many_shards() {
    let dir = tempfile::tempdir().unwrap();
    let syncer = Arc::new(GateSyncer::default());
    let wal = Wal::open(dir.path(), options(syncer.clone(), 8 << 20)).unwrap();
    let entered_at_open = *syncer.entered.lock().unwrap();
    let _gate = OpenOnDrop(syncer.clone());
    let (tx, rx) = mpsc::channel();

    // Hold the group-commit thread inside a sync for shard 0's append ...
    syncer.close();
    let first = tx.clone();
    wal.append(
        0,
        0,
        vec![entry(0, 0, 32)],
        Box::new(move |r| first.send(r).unwrap()),
    )
    .unwrap();
    syncer.wait_entered(entered_at_open + 1);
    // ... while 200 other shards append.
    const SHARDS: u64 = 200;
    for shard in 1..=SHARDS {
        let tx = tx.clone();
        wal.append(
            shard,
            0,
            vec![entry(shard, 0, 32)],
            Box::new(move |r| tx.send(r).unwrap()),
        )
        .unwrap();
    }
    let syncs_before = syncer.syncs.load(Ordering::SeqCst);
    syncer.open();
    for _ in 0..=SHARDS {
        rx.recv_timeout(Duration::from_secs(20)).unwrap().unwrap();
    }
    let syncs = syncer.syncs.load(Ordering::SeqCst) - syncs_before;
    assert_eq!(
        syncs, 2,
        "one sync for the held append, one for all {SHARDS} queued behind it"
    );
    assert_eq!(wal.stats().acknowledged, SHARDS + 1);
}

#[test]
fn reopening_replays_every_shard_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let opts = || options(Arc::new(Fdatasync), 16 * 1024); // small: forces several segments
    let expected = {
        let wal = Wal::open(dir.path(), opts()).unwrap();
        for shard in 0..5u64 {
            for i in 0..60 {
                append_durably(&wal, shard, i, vec![entry(shard, i, 100)]);
            }
        }
        wal.truncate_after(1, Some(49)).unwrap(); // shard 1: 0..=49
        append_durably(
            &wal,
            1,
            50,
            vec![b"replaced 50".to_vec(), b"replaced 51".to_vec()],
        );
        wal.purge(2, 19, b"purged at 19".to_vec()).unwrap(); // shard 2: 20..=59
        wal.save_committed(3, Some(b"committed 40".to_vec()))
            .unwrap();
        let (tx, rx) = mpsc::channel();
        wal.save_vote(
            4,
            b"vote 7".to_vec(),
            Box::new(move |r| tx.send(r).unwrap()),
        )
        .unwrap();
        rx.recv().unwrap().unwrap();
        wal.truncate_after(0, None).unwrap(); // shard 0: empty
        assert!(wal.segment_ids().len() > 2, "test wants several segments");
        (0..5u64)
            .map(|s| (wal.shard_state(s), wal.read(s, ..).unwrap()))
            .collect::<Vec<_>>()
    };
    let wal = Wal::open(dir.path(), opts()).unwrap();
    for (shard, (state, entries)) in expected.into_iter().enumerate() {
        let shard = shard as u64;
        assert_eq!(wal.shard_state(shard), state, "shard {shard} state");
        assert_eq!(
            wal.read(shard, ..).unwrap(),
            entries,
            "shard {shard} entries"
        );
    }
    assert_eq!(wal.read(1, 50..).unwrap()[0].1, b"replaced 50");
    assert_eq!(wal.shard_state(2).first_index, Some(20));
    assert_eq!(wal.shard_state(0).last_index, None);
    // And the reopened log keeps going.
    append_durably(&wal, 0, 0, vec![b"again".to_vec()]);
}

#[test]
fn a_torn_tail_is_cut_off_and_everything_acknowledged_survives() {
    let dir = tempfile::tempdir().unwrap();
    {
        let wal = Wal::open(dir.path(), WalOptions::default()).unwrap();
        for i in 0..20 {
            append_durably(&wal, 9, i, vec![entry(9, i, 50)]);
        }
    }
    // A write the process died in the middle of: half a frame at the end of the segment.
    let segment = segment_files(dir.path()).pop().unwrap();
    let good_len = fs::metadata(&segment).unwrap().len();
    let tail = fs::read(&segment).unwrap()[good_len as usize - 40..].to_vec();
    let f = OpenOptions::new().append(true).open(&segment).unwrap();
    f.write_all_at(&tail[..25], good_len).unwrap();
    drop(f);

    let wal = Wal::open(dir.path(), WalOptions::default()).unwrap();
    assert_eq!(
        fs::metadata(&segment).unwrap().len(),
        good_len,
        "torn bytes cut off"
    );
    let entries = wal.read(9, ..).unwrap();
    assert_eq!(entries.len(), 20);
    assert_eq!(entries[19], (19, entry(9, 19, 50)));
    append_durably(&wal, 9, 20, vec![entry(9, 20, 50)]);
    drop(wal);
    let wal = Wal::open(dir.path(), WalOptions::default()).unwrap();
    assert_eq!(wal.shard_state(9).last_index, Some(20));
}

fn expect_corruption(result: Result<Wal, Error>, file: &Path) -> u64 {
    match result {
        Err(err @ Error::Corruption { .. }) => {
            let text = err.to_string();
            let Error::Corruption { path, offset, .. } = err else {
                unreachable!()
            };
            assert_eq!(path, file, "the error must name the damaged file: {text}");
            assert!(text.contains(&file.display().to_string()) && text.contains("offset"));
            offset
        }
        Err(other) => panic!("expected Corruption naming {}, got {other}", file.display()),
        Ok(_) => panic!("damage in {} went unnoticed", file.display()),
    }
}

#[test]
fn a_flipped_byte_in_synced_data_is_corruption_naming_segment_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    {
        let wal = Wal::open(dir.path(), WalOptions::default()).unwrap();
        for i in 0..100 {
            append_durably(&wal, 1, i, vec![entry(1, i, 80)]);
        }
    }
    let segment = segment_files(dir.path()).pop().unwrap();
    let len = fs::metadata(&segment).unwrap().len();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&segment)
        .unwrap();
    let at = len / 2;
    let mut byte = [0u8];
    f.read_exact_at(&mut byte, at).unwrap();
    f.write_all_at(&[byte[0] ^ 0x10], at).unwrap();
    drop(f);

    let offset = expect_corruption(Wal::open(dir.path(), WalOptions::default()), &segment);
    assert!(
        offset <= at && at - offset < 200,
        "reported offset {offset} should be the frame holding byte {at}"
    );
}

#[test]
fn damage_to_a_sealed_segment_is_corruption_wherever_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let opts = || options(Arc::new(Fdatasync), 8 * 1024);
    {
        let wal = Wal::open(dir.path(), opts()).unwrap();
        for i in 0..200 {
            append_durably(&wal, 1, i, vec![entry(1, i, 100)]);
        }
    }
    let segments = segment_files(dir.path());
    assert!(segments.len() >= 3);
    let sealed = &segments[0];
    let original = fs::read(sealed).unwrap();

    // The last byte of a sealed segment (inside its seal record).
    let mut damaged = original.clone();
    *damaged.last_mut().unwrap() ^= 1;
    fs::write(sealed, &damaged).unwrap();
    expect_corruption(Wal::open(dir.path(), opts()), sealed);

    // A sealed segment cut short.
    fs::write(sealed, &original[..original.len() - 30]).unwrap();
    expect_corruption(Wal::open(dir.path(), opts()), sealed);

    // Intact again: opens fine.
    fs::write(sealed, &original).unwrap();
    drop(Wal::open(dir.path(), opts()).unwrap());
}

#[test]
fn a_missing_segment_is_corruption_not_a_shorter_log() {
    let dir = tempfile::tempdir().unwrap();
    let opts = || options(Arc::new(Fdatasync), 8 * 1024);
    {
        let wal = Wal::open(dir.path(), opts()).unwrap();
        for i in 0..200 {
            append_durably(&wal, 1, i, vec![entry(1, i, 100)]);
        }
    }
    let segments = segment_files(dir.path());
    // A hole in the middle.
    let middle = segments[1].clone();
    let saved = fs::read(&middle).unwrap();
    fs::remove_file(&middle).unwrap();
    let err = Wal::open(dir.path(), opts())
        .err()
        .expect("missing middle segment");
    assert!(matches!(err, Error::Corruption { .. }), "{err}");
    assert!(err.to_string().contains("missing"), "{err}");
    fs::write(&middle, saved).unwrap();

    // The oldest segment lost: its entries are gone, and the checkpoint after it knows.
    fs::remove_file(&segments[0]).unwrap();
    let err = Wal::open(dir.path(), opts())
        .err()
        .expect("missing first segment");
    assert!(matches!(err, Error::Corruption { .. }), "{err}");
    assert!(err.to_string().contains("entries 0.."), "{err}");
}

#[test]
fn a_segment_of_another_format_version_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    {
        let wal = Wal::open(dir.path(), WalOptions::default()).unwrap();
        append_durably(&wal, 1, 0, vec![b"x".to_vec()]);
    }
    let segment = segment_files(dir.path()).pop().unwrap();
    let mut bytes = fs::read(&segment).unwrap();
    bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
    let crc = crc32fast::hash(&bytes[0..20]);
    bytes[20..24].copy_from_slice(&crc.to_le_bytes()); // a well-formed header of format 2
    fs::write(&segment, bytes).unwrap();
    match Wal::open(dir.path(), WalOptions::default()) {
        Err(Error::UnsupportedFormat {
            path,
            found: 2,
            supported: 1,
        }) => assert_eq!(path, segment),
        Err(other) => panic!("expected UnsupportedFormat, got {other}"),
        Ok(_) => panic!("a format-2 segment was accepted"),
    }
}

#[test]
fn a_second_process_cannot_open_the_same_log() {
    let dir = tempfile::tempdir().unwrap();
    let _wal = Wal::open(dir.path(), WalOptions::default()).unwrap();
    let err = Wal::open(dir.path(), WalOptions::default()).err().unwrap();
    assert!(err.to_string().contains("in use"), "{err}");
}

#[test]
fn appends_that_would_leave_a_gap_or_rewrite_purged_entries_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), WalOptions::default()).unwrap();
    append_durably(&wal, 1, 0, vec![b"a".to_vec(), b"b".to_vec()]);
    let gap = wal.append(1, 5, vec![b"x".to_vec()], Box::new(|_| {}));
    assert!(
        matches!(gap, Err(Error::InvalidLogOp { shard: 1, .. })),
        "{gap:?}"
    );
    wal.purge(1, 1, b"p".to_vec()).unwrap();
    let rewrite = wal.append(1, 1, vec![b"x".to_vec()], Box::new(|_| {}));
    assert!(
        matches!(rewrite, Err(Error::InvalidLogOp { .. })),
        "{rewrite:?}"
    );
    append_durably(&wal, 1, 2, vec![b"c".to_vec()]);
    assert_eq!(wal.read(1, ..).unwrap(), vec![(2, b"c".to_vec())]);
}

/// A syncer whose fdatasync fails: the log must fail every waiter and refuse new writes.
struct FailingSyncer(AtomicU64);

impl Syncer for FailingSyncer {
    fn sync(&self, file: &File) -> io::Result<()> {
        // Let the segment be created at open; fail every sync after that.
        if self.0.fetch_add(1, Ordering::SeqCst) == 0 {
            return file.sync_data();
        }
        Err(io::Error::other("injected EIO"))
    }
}

#[test]
fn a_failed_fdatasync_fails_the_waiters_and_stops_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(
        dir.path(),
        options(Arc::new(FailingSyncer(AtomicU64::new(0))), 1 << 20),
    )
    .unwrap();
    let (tx, rx) = mpsc::channel();
    wal.append(
        1,
        0,
        vec![b"a".to_vec()],
        Box::new(move |r| tx.send(r).unwrap()),
    )
    .unwrap();
    let result = rx.recv_timeout(Duration::from_secs(20)).unwrap();
    assert!(matches!(result, Err(Error::WalFailed(_))), "{result:?}");
    let next = wal.append(1, 1, vec![b"b".to_vec()], Box::new(|_| {}));
    assert!(matches!(next, Err(Error::WalFailed(_))), "{next:?}");
}

#[test]
fn churn_keeps_disk_usage_a_small_multiple_of_the_live_log() {
    const SEGMENT: u64 = 64 * 1024;
    const SHARDS: u64 = 4;
    const KEEP: u64 = 100; // live entries per shard
    const ENTRY: usize = 500;
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), options(Arc::new(Fdatasync), SEGMENT)).unwrap();
    let live_bytes = SHARDS * KEEP * ENTRY as u64;
    let mut peak = 0;
    let mut written = 0u64;
    let mut next = 0u64;
    while written < 100 * SEGMENT {
        for shard in 0..SHARDS {
            let batch: Vec<Vec<u8>> = (next..next + 4).map(|i| entry(shard, i, ENTRY)).collect();
            written += (4 * ENTRY) as u64;
            append_durably(&wal, shard, next, batch);
            if next + 4 > KEEP {
                let upto = next + 4 - KEEP - 1;
                wal.purge(shard, upto, upto.to_le_bytes().to_vec()).unwrap();
            }
        }
        next += 4;
        peak = peak.max(wal.disk_usage().unwrap());
    }
    let end = wal.disk_usage().unwrap();
    let stats = wal.stats();
    println!(
        "churn: wrote {} KiB through {} KiB segments; live log {} KiB; disk at end {} KiB, peak {} KiB; \
         segments created {}, deleted {}",
        written / 1024,
        SEGMENT / 1024,
        live_bytes / 1024,
        end / 1024,
        peak / 1024,
        stats.segments_created,
        stats.segments_deleted
    );
    assert!(
        stats.segments_deleted > 50,
        "purged segments must be deleted"
    );
    // Live entries plus framing, spread over the segments they sit in, plus the active one.
    let bound = 2 * live_bytes + 2 * SEGMENT;
    assert!(end <= bound, "disk usage {end} exceeds {bound}");
    assert!(peak <= bound, "peak disk usage {peak} exceeds {bound}");
}

/// A disk that keeps only what was fdatasync'd. Each sync records the file's length by inode
/// (every byte written before the call is then durable); [`PowerLossDisk::lose_power`] cuts
/// every segment back to its last synced length. Directory changes (creations, unlinks) are
/// taken as durable: the worst case for a log that unlinks a segment too early.
#[derive(Default)]
struct PowerLossDisk {
    synced_len: Mutex<HashMap<u64, u64>>,
    /// While set, syncs fail (and make nothing durable).
    failing: std::sync::atomic::AtomicBool,
}

impl Syncer for PowerLossDisk {
    fn sync(&self, file: &File) -> io::Result<()> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(io::Error::other("injected EIO"));
        }
        let meta = file.metadata()?;
        self.synced_len
            .lock()
            .unwrap()
            .insert(meta.ino(), meta.len());
        Ok(())
    }
}

impl PowerLossDisk {
    /// Drops every byte not covered by a sync. Call after the log was dropped (the group-commit
    /// thread syncs nothing on drop when no acknowledgement is pending).
    fn lose_power(&self, dir: &Path) {
        let synced = self.synced_len.lock().unwrap();
        for path in segment_files(dir) {
            let ino = fs::metadata(&path).unwrap().ino();
            let len = synced.get(&ino).copied().unwrap_or(0);
            OpenOptions::new()
                .write(true)
                .open(&path)
                .unwrap()
                .set_len(len)
                .unwrap();
        }
    }
}

const PURGE_SEGMENT: u64 = 8 * 1024;

/// Appends `range` to `shard` in acknowledged batches of ten.
fn append_range_durably(wal: &Wal, shard: u64, range: std::ops::Range<u64>) {
    let indexes: Vec<u64> = range.collect();
    for batch in indexes.chunks(10) {
        let entries = batch.iter().map(|&i| entry(shard, i, 100)).collect();
        append_durably(wal, shard, batch[0], entries);
    }
}

/// Purges `shard` up to `upto`, checks that the purge deleted the oldest segment, then drops
/// the log and loses power: the moment right after the deletion, before any later sync.
fn purge_then_lose_power(dir: &Path, wal: Wal, disk: &PowerLossDisk, shard: u64, upto: u64) {
    let oldest = segment_files(dir)[0].clone();
    wal.purge(shard, upto, format!("purged at {upto}").into_bytes())
        .unwrap();
    assert!(
        wal.stats().segments_deleted >= 1 && !oldest.exists(),
        "the purge must delete {} for this test to mean anything",
        oldest.display()
    );
    drop(wal);
    disk.lose_power(dir);
}

#[test]
fn a_power_loss_after_a_purge_deleted_segments_leaves_a_log_that_opens_intact() {
    let dir = tempfile::tempdir().unwrap();
    let disk = Arc::new(PowerLossDisk::default());
    let wal = Wal::open(dir.path(), options(disk.clone(), PURGE_SEGMENT)).unwrap();
    append_range_durably(&wal, 1, 0..200);
    assert!(wal.segment_ids().len() >= 3, "test wants several segments");
    // Frees the oldest segment (entries 0..~60) but not the one holding entry 100.
    purge_then_lose_power(dir.path(), wal, &disk, 1, 99);

    let wal = Wal::open(dir.path(), options(disk.clone(), PURGE_SEGMENT))
        .expect("the log must open after a power loss right after a segment was deleted");
    let expected: Vec<(u64, Vec<u8>)> = (100..200).map(|i| (i, entry(1, i, 100))).collect();
    assert_eq!(
        wal.read(1, ..).unwrap(),
        expected,
        "every acknowledged entry above the purge point survives"
    );
    assert_eq!(
        wal.shard_state(1).meta.purged,
        Some((99, b"purged at 99".to_vec())),
        "the purge that deleted segments is durable"
    );
}

#[test]
fn a_power_loss_after_purging_a_whole_log_does_not_bring_it_back_empty_and_unpurged() {
    let dir = tempfile::tempdir().unwrap();
    let disk = Arc::new(PowerLossDisk::default());
    let wal = Wal::open(dir.path(), options(disk.clone(), PURGE_SEGMENT)).unwrap();
    append_range_durably(&wal, 1, 0..120);
    // Shard 2's one entry is larger than a segment: it gets a segment of its own, so once
    // shard 1 is purged entirely, every segment before that one is garbage.
    let big = entry(2, 0, PURGE_SEGMENT as usize);
    append_durably(&wal, 2, 0, vec![big.clone()]);
    purge_then_lose_power(dir.path(), wal, &disk, 1, 119);

    let wal = Wal::open(dir.path(), options(disk.clone(), PURGE_SEGMENT)).unwrap();
    let state = wal.shard_state(1);
    assert_eq!(
        state.meta.purged,
        Some((119, b"purged at 119".to_vec())),
        "shard 1's log regressed: it held entries up to 119, now {state:?}"
    );
    assert_eq!((state.first_index, state.last_index), (None, None));
    assert_eq!(wal.read(2, ..).unwrap(), vec![(0, big)]);
    append_durably(&wal, 1, 120, vec![entry(1, 120, 100)]);
}

#[test]
fn a_sealed_last_segment_is_synced_on_open_before_the_log_builds_on_it() {
    let dir = tempfile::tempdir().unwrap();
    let disk = Arc::new(PowerLossDisk::default());
    {
        let wal = Wal::open(dir.path(), options(disk.clone(), PURGE_SEGMENT)).unwrap();
        append_range_durably(&wal, 1, 0..10);
        // An entry larger than a segment seals the active one; its sync fails, standing in for
        // a process killed between writing the seal and syncing it: the seal is in the page
        // cache only.
        disk.failing.store(true, Ordering::SeqCst);
        let big = entry(1, 10, PURGE_SEGMENT as usize);
        assert!(wal.append(1, 10, vec![big], Box::new(|_| {})).is_err());
        disk.failing.store(false, Ordering::SeqCst);
    }
    assert_eq!(
        segment_files(dir.path()).len(),
        1,
        "sealed, no successor yet"
    );
    {
        // Restart after the kill (page cache intact): the log continues in a new segment.
        let wal = Wal::open(dir.path(), options(disk.clone(), PURGE_SEGMENT)).unwrap();
        append_durably(&wal, 1, 10, vec![entry(1, 10, 100)]);
    }
    disk.lose_power(dir.path());

    let wal = Wal::open(dir.path(), options(disk.clone(), PURGE_SEGMENT))
        .expect("the log must open after a power loss following a restart");
    let expected: Vec<(u64, Vec<u8>)> = (0..=10).map(|i| (i, entry(1, i, 100))).collect();
    assert_eq!(wal.read(1, ..).unwrap(), expected);
}

/// Shard 1 writes a log across several segments with a vote and a committed marker; shard 2
/// writes a little. Returns the log.
fn two_shards_with_a_long_log_on_one(dir: &Path, disk: Arc<PowerLossDisk>) -> Wal {
    let wal = Wal::open(dir, options(disk, PURGE_SEGMENT)).unwrap();
    append_range_durably(&wal, 1, 0..300);
    let (tx, rx) = mpsc::channel();
    wal.save_vote(
        1,
        b"vote of 1".to_vec(),
        Box::new(move |r| tx.send(r).unwrap()),
    )
    .unwrap();
    rx.recv_timeout(Duration::from_secs(20)).unwrap().unwrap();
    wal.save_committed(1, Some(b"committed 299".to_vec()))
        .unwrap();
    append_range_durably(&wal, 2, 0..3);
    assert!(segment_files(dir).len() > 2, "shard 1 must span segments");
    wal
}

fn assert_retired(wal: &Wal, shard: u64) {
    let state = wal.shard_state(shard);
    assert_eq!((state.first_index, state.last_index), (None, None));
    assert_eq!(state.meta, Default::default(), "vote and markers are gone");
    assert!(!wal.shards().contains(&shard));
    assert_eq!(wal.read(shard, ..).unwrap(), Vec::new());
}

#[test]
fn a_retired_shard_loses_its_log_and_markers_frees_its_segments_and_can_start_again() {
    let dir = tempfile::tempdir().unwrap();
    let disk = Arc::new(PowerLossDisk::default());
    let wal = two_shards_with_a_long_log_on_one(dir.path(), disk.clone());
    let before = segment_files(dir.path()).len();
    wal.retire(1).unwrap();
    assert_retired(&wal, 1);
    assert!(
        segment_files(dir.path()).len() < before,
        "shard 1 pinned the older segments; retiring it must free them"
    );
    let shard2: Vec<(u64, Vec<u8>)> = (0..3).map(|i| (i, entry(2, i, 100))).collect();
    assert_eq!(wal.read(2, ..).unwrap(), shard2);
    drop(wal);

    // Replay agrees, and a new incarnation of shard 1 starts from an empty log.
    let wal = Wal::open(dir.path(), options(disk.clone(), PURGE_SEGMENT)).unwrap();
    assert_retired(&wal, 1);
    assert_eq!(wal.read(2, ..).unwrap(), shard2);
    append_durably(&wal, 1, 1, vec![entry(1, 1, 10)]);
    drop(wal);
    let wal = Wal::open(dir.path(), options(disk, PURGE_SEGMENT)).unwrap();
    assert_eq!(wal.read(1, ..).unwrap(), vec![(1, entry(1, 1, 10))]);
    assert_eq!(
        wal.vote(1),
        None,
        "the old incarnation's vote must not come back"
    );
}

#[test]
fn a_power_loss_right_after_a_retire_keeps_the_shard_retired_and_the_log_intact() {
    let dir = tempfile::tempdir().unwrap();
    let disk = Arc::new(PowerLossDisk::default());
    let wal = two_shards_with_a_long_log_on_one(dir.path(), disk.clone());
    wal.retire(1).unwrap();
    assert!(
        wal.stats().segments_deleted >= 1,
        "the retire must delete segments"
    );
    drop(wal);
    disk.lose_power(dir.path());

    let wal = Wal::open(dir.path(), options(disk, PURGE_SEGMENT))
        .expect("the log must open after a power loss following a retire");
    assert_retired(&wal, 1);
    let shard2: Vec<(u64, Vec<u8>)> = (0..3).map(|i| (i, entry(2, i, 100))).collect();
    assert_eq!(wal.read(2, ..).unwrap(), shard2);
}
