//! Every durable subscription of the cluster, as this node knows it. Each
//! record is flooded to every node; of two records of one name, the newer
//! version wins everywhere. An at-least-once event's targets are found
//! through a pattern trie, in time proportional to its topic.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::store::QueueStats;
use crate::topic::trie::PatternTrie;
use crate::topic::Topic;
use crate::wire::{DurableRecord, RetentionLimits};

/// A full durable subscription takes events again below this share of
/// each limit, so the flag does not flap on every event.
const RESUME_BELOW_PERCENT: u64 = 90;

#[derive(Default)]
pub struct Directory {
    records: BTreeMap<String, DurableRecord>,
    /// Names of the durable subscriptions of each pattern.
    by_pattern: PatternTrie<BTreeSet<String>>,
}

impl Directory {
    pub fn new(records: Vec<DurableRecord>) -> Directory {
        let mut directory = Directory::default();
        for record in records {
            directory.insert(record);
        }
        directory
    }

    pub fn get(&self, name: &str) -> Option<&DurableRecord> {
        self.records.get(name)
    }

    pub fn records(&self) -> impl Iterator<Item = &DurableRecord> {
        self.records.values()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Whether `record` is news: unknown, or newer than the one known.
    pub fn is_newer(&self, record: &DurableRecord) -> bool {
        self.records
            .get(&record.name)
            .is_none_or(|known| record.supersedes(known))
    }

    /// Keeps `record`, replacing any of its name.
    pub fn insert(&mut self, record: DurableRecord) {
        if let Some(old) = self.records.get(&record.name) {
            if old.pattern != record.pattern {
                let pattern = old.pattern.clone();
                if let Some(names) = self.by_pattern.get_mut(&pattern) {
                    names.remove(&record.name);
                    if names.is_empty() {
                        self.by_pattern.remove(&pattern);
                    }
                }
            }
        }
        self.by_pattern
            .entry(&record.pattern, BTreeSet::new)
            .insert(record.name.clone());
        self.records.insert(record.name.clone(), record);
    }

    /// The durable subscriptions whose pattern matches `topic`.
    pub fn matching(&mut self, topic: &Topic) -> Vec<&DurableRecord> {
        let mut names = Vec::new();
        self.by_pattern
            .for_each_match(topic, |found| names.extend(found.iter().cloned()));
        names.sort();
        names.dedup();
        names.iter().filter_map(|n| self.records.get(n)).collect()
    }
}

/// Whether a durable subscription holding `stats` is full by its limits at
/// `now_ms` (ms since the Unix epoch). Once full, it stays so until below
/// [`RESUME_BELOW_PERCENT`] of every limit.
pub fn is_full(record: &DurableRecord, stats: &QueueStats, now_ms: u64) -> bool {
    let limits = record.limits;
    let age_ms = if stats.is_empty() {
        0
    } else {
        now_ms.saturating_sub(stats.oldest_ms)
    };
    let percent = if record.full {
        RESUME_BELOW_PERCENT
    } else {
        100
    };
    let over = |value: u64, limit: u64| {
        limit > 0 && value.saturating_mul(100) >= limit.saturating_mul(percent)
    };
    over(stats.len(), limits.max_events)
        || over(stats.bytes, limits.max_bytes)
        || over(age_ms, limits.max_age_ms)
}

/// The limits, as a refused publisher reads them.
pub fn describe_limits(limits: &RetentionLimits) -> String {
    let mut parts = vec![
        format!("max {} events", limits.max_events),
        format!("max {} bytes", limits.max_bytes),
    ];
    if limits.max_age_ms > 0 {
        parts.push(format!(
            "max age {}",
            humantime::format_duration(Duration::from_millis(limits.max_age_ms))
        ));
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::NodeId;
    use crate::topic::Pattern;

    fn record(name: &str, pattern: &str, version: u64) -> DurableRecord {
        DurableRecord {
            name: name.into(),
            pattern: Pattern::new(pattern).unwrap(),
            home: NodeId::from_bytes([1; 32]),
            version,
            limits: RetentionLimits::default(),
            full: false,
        }
    }

    fn names(directory: &mut Directory, topic: &str) -> Vec<String> {
        let topic = Topic::new(topic).unwrap();
        let found = directory.matching(&topic);
        found.into_iter().map(|r| r.name.clone()).collect()
    }

    #[test]
    fn events_find_the_durables_whose_pattern_matches() {
        let mut directory = Directory::new(vec![
            record("all", "orders.>", 1),
            record("eu", "orders.eu", 1),
            record("other", "billing.*", 1),
        ]);
        assert_eq!(names(&mut directory, "orders.eu"), ["all", "eu"]);
        assert_eq!(names(&mut directory, "orders.us"), ["all"]);
        assert!(names(&mut directory, "shipping").is_empty());
    }

    #[test]
    fn a_newer_record_replaces_the_old_one_and_its_pattern() {
        let mut directory = Directory::new(vec![record("d", "orders.>", 1)]);
        assert!(!directory.is_newer(&record("d", "billing.>", 1)));
        let newer = record("d", "billing.>", 2);
        assert!(directory.is_newer(&newer));
        directory.insert(newer);
        assert!(names(&mut directory, "orders.eu").is_empty());
        assert_eq!(names(&mut directory, "billing.x"), ["d"]);
    }

    #[test]
    fn full_holds_until_below_the_resume_mark() {
        let mut record = record("d", "orders.>", 1);
        record.limits.max_events = 10;
        let stats = |len: u64| QueueStats {
            first: 1,
            next: 1 + len,
            bytes: 0,
            oldest_ms: 0,
        };
        assert!(!is_full(&record, &stats(9), 0));
        assert!(is_full(&record, &stats(10), 0));
        record.full = true;
        assert!(is_full(&record, &stats(9), 0), "9 is above 90% of 10");
        assert!(!is_full(&record, &stats(8), 0));
        record.limits.max_age_ms = 1000;
        let old = QueueStats {
            oldest_ms: 5000,
            ..stats(1)
        };
        assert!(is_full(&record, &old, 6000));
        assert!(!is_full(&record, &old, 5800));
    }
}
