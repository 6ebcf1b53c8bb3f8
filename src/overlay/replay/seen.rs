//! The ids of the events in a replay window, as runs of sequence numbers
//! per publisher. A publisher's events reach a node mostly in order, so
//! taking one in, or letting the oldest go, touches the end of one short
//! list: a hash set of every id cost the node a quarter of its time in
//! cache misses at half a million events a second.

use std::collections::{BTreeMap, VecDeque};

use crate::wire::EventId;

#[derive(Default)]
pub(super) struct SeenIds {
    /// Per publisher, disjoint runs `(first, last)` in ascending order.
    runs: BTreeMap<u64, VecDeque<(u64, u64)>>,
}

impl SeenIds {
    /// Takes `id` in; false if it was in already.
    pub fn insert(&mut self, id: EventId) -> bool {
        let runs = self.runs.entry(id.publisher).or_default();
        let seq = id.seq;
        match runs.back_mut() {
            Some((_, last)) if last.checked_add(1) == Some(seq) => {
                *last = seq;
                return true;
            }
            Some((_, last)) if seq <= *last => {}
            _ => {
                runs.push_back((seq, seq));
                return true;
            }
        }
        // Out of order: find its place.
        let at = runs.partition_point(|(first, _)| *first <= seq);
        if at > 0 && runs[at - 1].1 >= seq {
            return false;
        }
        let joins_before = at > 0 && runs[at - 1].1 + 1 == seq;
        let joins_after = runs
            .get(at)
            .is_some_and(|(first, _)| seq.checked_add(1) == Some(*first));
        match (joins_before, joins_after) {
            (true, true) => {
                runs[at - 1].1 = runs[at].1;
                runs.remove(at);
            }
            (true, false) => runs[at - 1].1 = seq,
            (false, true) => runs[at].0 = seq,
            (false, false) => runs.insert(at, (seq, seq)),
        }
        true
    }

    pub fn contains(&self, id: EventId) -> bool {
        let Some(runs) = self.runs.get(&id.publisher) else {
            return false;
        };
        let at = runs.partition_point(|(first, _)| *first <= id.seq);
        at > 0 && runs[at - 1].1 >= id.seq
    }

    /// Lets `id` go; the oldest of its publisher's, as a rule.
    pub fn remove(&mut self, id: EventId) {
        let Some(runs) = self.runs.get_mut(&id.publisher) else {
            return;
        };
        let seq = id.seq;
        let at = runs.partition_point(|(first, _)| *first <= seq);
        if at == 0 || runs[at - 1].1 < seq {
            return;
        }
        let (first, last) = runs[at - 1];
        match (first == seq, last == seq) {
            (true, true) => {
                runs.remove(at - 1);
            }
            (true, false) => runs[at - 1].0 = seq + 1,
            (false, true) => runs[at - 1].1 = seq - 1,
            (false, false) => {
                runs[at - 1].1 = seq - 1;
                runs.insert(at, (seq + 1, last));
            }
        }
        if runs.is_empty() {
            self.runs.remove(&id.publisher);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn id(publisher: u64, seq: u64) -> EventId {
        EventId { publisher, seq }
    }

    #[test]
    fn holds_what_a_set_would_in_and_out_of_order() {
        let mut rng = StdRng::seed_from_u64(7);
        let (mut seen, mut model) = (SeenIds::default(), BTreeSet::new());
        for step in 0..20_000u64 {
            let publisher = rng.random_range(0..3);
            // Mostly in order, sometimes far back or ahead.
            let seq = match rng.random_range(0..10) {
                0 => rng.random_range(0..step + 1),
                1 => step + rng.random_range(0..50),
                _ => step,
            };
            let key = id(publisher, seq);
            if rng.random_range(0..4) == 0 {
                seen.remove(key);
                model.remove(&key);
            } else {
                assert_eq!(seen.insert(key), model.insert(key), "{key:?}");
            }
            let probe = id(rng.random_range(0..3), rng.random_range(0..step + 60));
            assert_eq!(seen.contains(probe), model.contains(&probe), "{probe:?}");
        }
    }

    #[test]
    fn letting_the_oldest_go_keeps_one_run() {
        let mut seen = SeenIds::default();
        for seq in 1..=1000 {
            seen.insert(id(9, seq));
            if seq > 10 {
                seen.remove(id(9, seq - 10));
            }
        }
        assert_eq!(seen.runs[&9], VecDeque::from([(991, 1000)]));
        assert!(!seen.contains(id(9, 990)) && seen.contains(id(9, 991)));
    }

    #[test]
    fn the_largest_sequence_numbers_do_not_overflow() {
        let mut seen = SeenIds::default();
        for seq in [u64::MAX, u64::MAX - 1, 0, u64::MAX] {
            seen.insert(id(1, seq));
        }
        assert!(seen.contains(id(1, u64::MAX)) && seen.contains(id(1, 0)));
        seen.remove(id(1, u64::MAX));
        assert!(!seen.contains(id(1, u64::MAX)) && seen.contains(id(1, u64::MAX - 1)));
    }
}
