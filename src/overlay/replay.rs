//! The replay window: the events a node routed in the last moments, so
//! that interest which comes back after a repair gets what the failure
//! cost it (docs/delivery.md, "Gaps from repairs").
//!
//! When a node dies, what is published for the subtrees below it meets a
//! dead link until its neighbours notice (the idle timeout) and the
//! orphans join again. Their interest comes back marked as a repair
//! ([`crate::wire::InterestUpdate::repair`]); where it reaches a node
//! whose edge had none, that node sends the edge the matching events it
//! holds ([`super::Action::Replay`]), and the receiver takes only those it
//! has not seen. Kept for a short time and a bounded number of bytes.
//!
//! Generic over what is kept of an event, so the simulator runs it without
//! payloads.

mod seen;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::topic::{Pattern, Topic};
use crate::wire::{Event, EventId};
use seen::SeenIds;

/// How long events are kept by default: the idle timeout that detects a
/// failure, the re-join, and room to spare.
pub const DEFAULT_KEEP_FOR: Duration = Duration::from_secs(2);

/// The most bytes of events kept by default.
pub const DEFAULT_MAX_BYTES: usize = 16 << 20;

/// What each entry costs beyond its event's bytes: the event's fields,
/// the bookkeeping and the id's share of the seen runs.
pub const ENTRY_OVERHEAD: usize = 128;

/// The events a node routed recently.
pub struct ReplayWindow<E> {
    keep_for: Duration,
    max_bytes: usize,
    /// In the order they came.
    entries: VecDeque<Entry<E>>,
    /// The ids in `entries`, so each event is taken once.
    seen: SeenIds,
    bytes: usize,
    /// Every event published since then that came here is in `entries`:
    /// a replayed event published earlier may have been taken and gone,
    /// so it is dropped rather than risk a duplicate.
    complete_since: Instant,
}

/// What a window keeps of an event.
pub trait Kept: Clone {
    /// The event's id.
    fn id(&self) -> EventId;
    /// The event's topic.
    fn topic(&self) -> &Topic;
}

impl Kept for Event {
    fn id(&self) -> EventId {
        self.id
    }
    fn topic(&self) -> &Topic {
        &self.topic
    }
}

/// An event's id and topic, as the simulator keeps them.
impl Kept for (EventId, Topic) {
    fn id(&self) -> EventId {
        self.0
    }
    fn topic(&self) -> &Topic {
        &self.1
    }
}

struct Entry<E> {
    /// When it was published, as far as this node can tell: when it first
    /// came, or on a replay, then less its age.
    published: Instant,
    bytes: usize,
    event: E,
}

/// An event to send again, and how long ago it was published.
pub struct Replay<E> {
    /// What was kept of it.
    pub event: E,
    /// Since it was published.
    pub age: Duration,
}

impl<E: Kept> ReplayWindow<E> {
    /// Keeps events for `keep_for` and at most `max_bytes`; either at zero
    /// turns the window off. Made when the node starts, `now`: what it
    /// routes is kept from then on.
    pub fn new(keep_for: Duration, max_bytes: usize, now: Instant) -> Self {
        ReplayWindow {
            keep_for,
            max_bytes,
            entries: VecDeque::new(),
            seen: SeenIds::default(),
            bytes: 0,
            complete_since: now,
        }
    }

    /// Whether events are kept at all.
    pub fn is_enabled(&self) -> bool {
        !self.keep_for.is_zero() && self.max_bytes > 0
    }

    /// Keeps an event of `bytes` routed here now, published at
    /// `published`; false if it was here already (a repeat).
    pub fn record(&mut self, event: E, bytes: usize, published: Instant, now: Instant) -> bool {
        if !self.is_enabled() {
            return true;
        }
        if !self.seen.insert(event.id()) {
            return false;
        }
        let bytes = bytes + ENTRY_OVERHEAD;
        self.bytes += bytes;
        self.entries.push_back(Entry {
            published,
            bytes,
            event,
        });
        self.expire(now);
        true
    }

    /// Whether a replayed event, published at `published`, is new here:
    /// not taken already, and not older than what the window vouches for.
    /// A window that is off vouches for nothing.
    pub fn is_new(&self, id: EventId, published: Instant) -> bool {
        self.is_enabled() && published > self.complete_since && !self.seen.contains(id)
    }

    /// The events kept whose topic `pattern` matches, oldest first. Sent
    /// again for a second pattern, an event is dropped by its receiver.
    pub fn replay(&mut self, pattern: &Pattern, now: Instant) -> Vec<Replay<E>> {
        self.expire(now);
        self.entries
            .iter()
            .filter(|entry| pattern.matches(entry.event.topic()))
            .map(|entry| Replay {
                event: entry.event.clone(),
                age: now.saturating_duration_since(entry.published),
            })
            .collect()
    }

    /// Events kept, and their bytes.
    #[cfg(test)]
    fn held(&self) -> (usize, usize) {
        (self.entries.len(), self.bytes)
    }

    /// Lets go of events older than the window or beyond its bytes.
    fn expire(&mut self, now: Instant) {
        while let Some(front) = self.entries.front() {
            let old = now.saturating_duration_since(front.published) > self.keep_for;
            if !old && self.bytes <= self.max_bytes {
                break;
            }
            let gone = self.entries.pop_front().expect("front exists");
            self.bytes -= gone.bytes;
            self.seen.remove(gone.event.id());
            self.complete_since = self.complete_since.max(gone.published);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(seq: u64, topic: &str) -> (EventId, Topic) {
        (id(seq), Topic::new(topic).unwrap())
    }
    fn id(seq: u64) -> EventId {
        EventId { publisher: 7, seq }
    }
    fn pattern(s: &str) -> Pattern {
        Pattern::new(s).unwrap()
    }
    fn seqs(replays: &[Replay<(EventId, Topic)>]) -> Vec<u64> {
        replays.iter().map(|r| r.event.0.seq).collect()
    }

    #[test]
    fn an_event_is_taken_once_and_replayed_for_the_patterns_that_match() {
        let now = Instant::now();
        let mut window = ReplayWindow::new(Duration::from_secs(2), 1 << 20, now);
        assert!(window.record(kept(1, "orders.eu"), 10, now, now));
        assert!(window.record(kept(2, "invoices.eu"), 10, now, now));
        assert!(!window.record(kept(1, "orders.eu"), 10, now, now));
        assert!(!window.is_new(id(1), now));
        assert!(window.is_new(id(3), now + Duration::from_millis(1)));

        let later = now + Duration::from_millis(500);
        let sent = window.replay(&pattern("orders.>"), later);
        assert_eq!(seqs(&sent), vec![1]);
        assert_eq!(sent[0].age, Duration::from_millis(500));
        assert_eq!(seqs(&window.replay(&pattern(">"), later)), vec![1, 2]);
    }

    #[test]
    fn events_go_after_the_window_and_older_replays_are_dropped_as_unknown() {
        let now = Instant::now();
        let mut window = ReplayWindow::new(Duration::from_secs(2), 1 << 20, now);
        // Nothing came before the window began: that is vouched for too.
        assert!(window.is_new(id(9), now + Duration::from_millis(1)));
        assert!(!window.is_new(id(9), now));
        let early = now + Duration::from_secs(1);
        window.record(kept(1, "a"), 10, early, early);
        let later = early + Duration::from_secs(3);
        window.record(kept(2, "a"), 10, later, later);
        assert_eq!(window.held().0, 1, "the first is older than the window");
        // Taken and forgotten: a copy of it, or of anything as old, may be
        // a duplicate.
        assert!(!window.is_new(id(1), early));
        assert!(!window.is_new(id(9), early));
        assert!(window.is_new(id(9), early + Duration::from_millis(1)));
    }

    #[test]
    fn the_bytes_bound_the_window() {
        let now = Instant::now();
        let max = 3 * (100 + ENTRY_OVERHEAD);
        let mut window = ReplayWindow::new(Duration::from_secs(2), max, now);
        for seq in 0..10 {
            let at = now + Duration::from_millis(seq);
            window.record(kept(seq, "a"), 100, at, at);
        }
        assert_eq!(window.held(), (3, max));
        assert_eq!(seqs(&window.replay(&pattern("a"), now)), vec![7, 8, 9]);
    }

    #[test]
    fn a_window_of_zero_keeps_nothing_and_takes_no_replay() {
        let now = Instant::now();
        let mut window = ReplayWindow::new(Duration::ZERO, 1 << 20, now);
        assert!(window.record(kept(1, "a"), 10, now, now));
        assert!(window.record(kept(1, "a"), 10, now, now));
        assert_eq!(window.held().0, 0);
        // It cannot tell a replay it has seen from one it has not.
        assert!(!window.is_new(id(2), now + Duration::from_millis(1)));
    }
}
