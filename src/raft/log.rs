//! The replicated log: a compacted prefix (the snapshot) and the entries after it.

use super::types::{Configuration, Entry, LogIndex, Payload, Snapshot, Term};

/// The log of one node. Indexes up to `snapshot.last_index` are compacted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RaftLog {
    snapshot: Snapshot,
    entries: Vec<Entry>,
}

impl RaftLog {
    /// Restores a log from persisted parts. Entries MUST follow the snapshot
    /// contiguously; anything else is refused.
    pub fn restore(snapshot: Snapshot, entries: Vec<Entry>) -> Result<RaftLog, String> {
        let mut last_term = snapshot.last_term;
        for (expected, e) in (snapshot.last_index + 1..).zip(entries.iter()) {
            if e.index != expected {
                return Err(format!(
                    "log entry index {} where {} was expected",
                    e.index, expected
                ));
            }
            if e.term < last_term {
                return Err(format!(
                    "log entry {} has term {} below the previous term {}",
                    e.index, e.term, last_term
                ));
            }
            last_term = e.term;
        }
        Ok(RaftLog { snapshot, entries })
    }

    /// Returns the compacted prefix.
    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// Returns the entries after the snapshot.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Returns the index of the last entry (or of the snapshot).
    pub fn last_index(&self) -> LogIndex {
        self.snapshot.last_index + self.entries.len() as u64
    }

    /// Returns the term of the last entry (or of the snapshot).
    pub fn last_term(&self) -> Term {
        self.entries
            .last()
            .map_or(self.snapshot.last_term, |e| e.term)
    }

    /// Returns whether nothing, not even a bootstrap configuration, is here.
    pub fn is_empty(&self) -> bool {
        self.last_index() == 0
    }

    /// Returns the term at `index`, or None if it is compacted away (other than
    /// the snapshot's last index) or beyond the end.
    pub fn term_at(&self, index: LogIndex) -> Option<Term> {
        if index == self.snapshot.last_index {
            return Some(self.snapshot.last_term);
        }
        self.entry(index).map(|e| e.term)
    }

    /// Returns the entry at `index` if it is in the uncompacted part.
    pub fn entry(&self, index: LogIndex) -> Option<&Entry> {
        if index <= self.snapshot.last_index {
            return None;
        }
        self.entries
            .get((index - self.snapshot.last_index - 1) as usize)
    }

    /// Returns up to `max` entries starting at `from` (which MUST be after the snapshot).
    pub fn slice(&self, from: LogIndex, max: usize) -> Vec<Entry> {
        if from <= self.snapshot.last_index {
            return Vec::new();
        }
        let start = (from - self.snapshot.last_index - 1) as usize;
        self.entries.iter().skip(start).take(max).cloned().collect()
    }

    /// Returns whether a log ending at (`last_index`, `last_term`) is at least
    /// as up to date as this one (Raft paper §5.4.1).
    pub fn is_up_to_date(&self, last_index: LogIndex, last_term: Term) -> bool {
        (last_term, last_index) >= (self.last_term(), self.last_index())
    }

    /// Appends an entry created by this node as leader.
    pub fn append(&mut self, term: Term, payload: Payload) -> LogIndex {
        let index = self.last_index() + 1;
        self.entries.push(Entry {
            index,
            term,
            payload,
        });
        index
    }

    /// Removes every entry from `index` on.
    pub fn truncate_from(&mut self, index: LogIndex) {
        if index <= self.snapshot.last_index {
            self.entries.clear();
            return;
        }
        self.entries
            .truncate((index - self.snapshot.last_index - 1) as usize);
    }

    /// Returns the latest configuration in the log and the index it was
    /// appended at. The latest one is in force, committed or not (§4.1).
    pub fn latest_config(&self) -> (LogIndex, &Configuration) {
        self.config_at(self.last_index())
    }

    /// Returns the configuration in force at `index` and where it was appended.
    pub fn config_at(&self, index: LogIndex) -> (LogIndex, &Configuration) {
        for e in self.entries.iter().rev() {
            if e.index > index {
                continue;
            }
            if let Payload::Config(c) = &e.payload {
                return (e.index, c);
            }
        }
        (self.snapshot.last_index, &self.snapshot.config)
    }

    /// Compacts every entry up to `index` (which MUST be committed) into the snapshot.
    pub fn compact_to(&mut self, index: LogIndex) {
        if index <= self.snapshot.last_index || index > self.last_index() {
            return;
        }
        let Some(term) = self.term_at(index) else {
            return;
        };
        let config = self.config_at(index).1.clone();
        let drop = (index - self.snapshot.last_index) as usize;
        self.entries.drain(..drop);
        self.snapshot = Snapshot {
            last_index: index,
            last_term: term,
            config,
        };
    }

    /// Installs a snapshot from the leader: keeps the entries after it if the
    /// log already holds the snapshot's last entry, else drops them all.
    pub fn install_snapshot(&mut self, snapshot: Snapshot) {
        if self.term_at(snapshot.last_index) == Some(snapshot.last_term) {
            let drop = snapshot.last_index.saturating_sub(self.snapshot.last_index) as usize;
            self.entries.drain(..drop.min(self.entries.len()));
        } else {
            self.entries.clear();
        }
        self.snapshot = snapshot;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_with_terms(terms: &[u64]) -> RaftLog {
        let mut log = RaftLog::default();
        for t in terms {
            log.append(Term(*t), Payload::Noop);
        }
        log
    }

    #[test]
    fn up_to_date_compares_last_term_then_last_index() {
        let log = log_with_terms(&[1, 1, 2]);
        assert!(log.is_up_to_date(3, Term(2)));
        assert!(log.is_up_to_date(1, Term(3)), "higher last term wins");
        assert!(!log.is_up_to_date(5, Term(1)), "longer but older loses");
        assert!(!log.is_up_to_date(2, Term(2)), "same term, shorter loses");
    }

    #[test]
    fn compaction_keeps_terms_and_configuration() {
        let mut log = log_with_terms(&[1, 1]);
        let config = Configuration::default();
        log.append(Term(2), Payload::Config(config.clone()));
        log.append(Term(2), Payload::Noop);
        log.compact_to(3);
        assert_eq!(log.snapshot().last_index, 3);
        assert_eq!(log.term_at(3), Some(Term(2)));
        assert_eq!(log.term_at(2), None);
        assert_eq!(log.last_index(), 4);
        assert_eq!(log.latest_config().0, 3);
    }

    #[test]
    fn restore_refuses_gaps_and_falling_terms() {
        let entries = vec![Entry {
            index: 3,
            term: Term(1),
            payload: Payload::Noop,
        }];
        assert!(RaftLog::restore(Snapshot::default(), entries).is_err());
        let entries = vec![
            Entry {
                index: 1,
                term: Term(2),
                payload: Payload::Noop,
            },
            Entry {
                index: 2,
                term: Term(1),
                payload: Payload::Noop,
            },
        ];
        assert!(RaftLog::restore(Snapshot::default(), entries).is_err());
    }
}
