//! The in-memory index of one shard's log: where each live entry's record sits, plus the
//! shard's vote, committed and purge markers. Rebuilt by replaying segments on open.

use std::collections::BTreeMap;

use crate::storage::wal::record::ShardMeta;

/// Where an entry lives: the frame holding it and its position in that frame's entry list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loc {
    /// Segment id.
    pub segment: u64,
    /// Byte offset of the frame.
    pub offset: u64,
    /// Frame length.
    pub len: u32,
    /// Position of the entry inside the `Append` record.
    pub slot: u32,
}

/// One shard's log as the WAL knows it.
#[derive(Debug, Default, Clone)]
pub struct ShardIndex {
    /// Live entries by log index. Always contiguous, and all above the purge point.
    pub entries: BTreeMap<u64, Loc>,
    /// Vote, committed and purge markers.
    pub meta: ShardMeta,
    /// Where the live log begins: the purge point + 1 after a purge, else the first index
    /// appended since the log was last empty; `None` while the log is empty and unpurged.
    /// Carried in every checkpoint, so a lost older segment shows up as missing entries.
    pub start: Option<u64>,
}

impl ShardIndex {
    /// Index of the last purged entry, 0 if nothing was purged.
    pub fn purged_index(&self) -> Option<u64> {
        self.meta.purged.as_ref().map(|(i, _)| *i)
    }

    /// First live entry.
    pub fn first_index(&self) -> Option<u64> {
        self.entries.keys().next().copied()
    }

    /// Last live entry.
    pub fn last_index(&self) -> Option<u64> {
        self.entries.keys().next_back().copied()
    }

    /// The index the next append must start at or before (an append may overwrite a suffix).
    pub fn next_index(&self) -> u64 {
        match (self.last_index(), self.purged_index()) {
            (Some(last), _) => last + 1,
            (None, Some(purged)) => purged + 1,
            (None, None) => 0,
        }
    }

    /// Why appending at `first_index` would break the log, if it would. An empty log that was
    /// never purged may start anywhere.
    pub fn check_append(&self, first_index: u64) -> Result<(), String> {
        if self.entries.is_empty() && self.meta.purged.is_none() {
            return Ok(());
        }
        let next = self.next_index();
        if first_index > next {
            return Err(format!(
                "append at index {first_index} would leave a gap: the log ends before {next}"
            ));
        }
        if let Some(purged) = self.purged_index()
            && first_index <= purged
        {
            return Err(format!(
                "append at index {first_index} overwrites purged entries (purged up to {purged})"
            ));
        }
        Ok(())
    }

    /// Records entries `first_index..first_index+count` stored in the frame at `frame`,
    /// replacing any entries at or after `first_index`.
    pub fn append(&mut self, first_index: u64, count: usize, frame: Loc) {
        self.truncate_after(first_index.checked_sub(1));
        if self.start.is_none() {
            self.start = Some(first_index);
        }
        for slot in 0..count {
            self.entries.insert(
                first_index + slot as u64,
                Loc {
                    slot: slot as u32,
                    ..frame
                },
            );
        }
    }

    /// Drops entries after `after` (`None`: all).
    pub fn truncate_after(&mut self, after: Option<u64>) {
        match after {
            Some(after) => {
                self.entries.split_off(&(after + 1));
            }
            None => self.entries.clear(),
        }
        let emptied = self.start.is_some_and(|s| after.is_none_or(|a| a < s));
        if emptied && self.meta.purged.is_none() {
            self.start = None;
        }
    }

    /// Drops entries up to and including `upto` and records the purge marker. A purge at or
    /// below the current purge point changes nothing.
    pub fn purge(&mut self, upto: u64, marker: Vec<u8>) {
        if self.purged_index().is_some_and(|p| p >= upto) {
            return;
        }
        self.entries = self.entries.split_off(&(upto + 1));
        self.meta.purged = Some((upto, marker));
        self.start = Some(upto + 1);
    }

    /// Applies checkpointed metadata, dropping entries the checkpoint's purge point covers.
    pub fn apply_checkpoint(&mut self, meta: ShardMeta, start: Option<u64>) {
        if let Some((upto, _)) = &meta.purged {
            self.entries = self.entries.split_off(&(upto + 1));
        }
        self.meta = meta;
        self.start = start;
    }

    /// Why this log is not contiguous from its purge point, if it is not.
    pub fn check_contiguous(&self) -> Result<(), String> {
        if let Some(first) = self.first_index()
            && self.start != Some(first)
        {
            return Err(match self.start {
                Some(start) => format!(
                    "entries {start}..{first} are missing (the log starts at {start}, the first \
                     entry found is {first})"
                ),
                None => format!("entry {first} found in a log recorded as empty"),
            });
        }
        if let (Some(first), Some(last)) = (self.first_index(), self.last_index()) {
            let expected = (last - first + 1) as usize;
            if self.entries.len() != expected {
                return Err(format!(
                    "log {first}..={last} has {} entries, expected {expected}",
                    self.entries.len()
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRAME: Loc = Loc {
        segment: 1,
        offset: 0,
        len: 0,
        slot: 0,
    };

    #[test]
    fn append_truncate_purge_keep_the_log_contiguous() {
        let mut log = ShardIndex::default();
        assert_eq!(log.next_index(), 0);
        assert!(
            log.check_append(7).is_ok(),
            "an empty, unpurged log may start anywhere"
        );
        log.append(0, 5, FRAME);
        assert_eq!((log.first_index(), log.last_index()), (Some(0), Some(4)));
        log.append(3, 4, FRAME); // overwrite a suffix
        assert_eq!(log.last_index(), Some(6));
        assert!(log.check_append(8).is_err(), "gap must be refused");
        log.truncate_after(Some(4));
        assert_eq!(log.last_index(), Some(4));
        log.purge(2, b"p2".to_vec());
        assert_eq!(log.first_index(), Some(3));
        assert!(
            log.check_append(2).is_err(),
            "purged entries must not be overwritten"
        );
        log.purge(1, b"p1".to_vec()); // going backwards is ignored
        assert_eq!(log.purged_index(), Some(2));
        log.purge(10, b"p10".to_vec());
        assert_eq!(log.first_index(), None);
        assert_eq!(log.next_index(), 11);
        log.check_contiguous().unwrap();
    }

    #[test]
    fn contiguity_check_finds_missing_entries() {
        let mut log = ShardIndex::default();
        log.purge(4, Vec::new());
        log.entries.insert(7, FRAME);
        assert!(log.check_contiguous().unwrap_err().contains("5..7"));

        // A log whose oldest entries sat in a lost segment: the checkpoint says it starts at 0.
        let mut log = ShardIndex::default();
        log.apply_checkpoint(ShardMeta::default(), Some(0));
        log.append(11, 3, FRAME);
        assert!(log.check_contiguous().unwrap_err().contains("0..11"));
    }

    #[test]
    fn a_log_truncated_to_empty_may_restart_anywhere() {
        let mut log = ShardIndex::default();
        log.append(5, 3, FRAME);
        log.truncate_after(Some(2));
        assert_eq!(log.start, None);
        log.append(3, 1, FRAME);
        assert_eq!(log.start, Some(3));
        log.check_contiguous().unwrap();
    }
}
