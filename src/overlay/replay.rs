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

use bytes::Bytes;

use crate::identity::NodeId;
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
const ENTRY_OVERHEAD: usize = 128;

/// How much later than the window's account a replayed event must be
/// published to count as new. Each node dates an event by when it reached
/// it, so the sender's date runs behind the receiver's by the event's path
/// to each: an event the receiver let go just now may come back dated a
/// little after it. Dropped instead, it is never taken twice.
const VOUCH_MARGIN: Duration = Duration::from_millis(50);

/// The share of its bytes a full window keeps once it has let events go.
const LOW_WATER: (usize, usize) = (15, 16);

/// The events a node routed recently.
pub struct ReplayWindow<E: Kept> {
    keep_for: Duration,
    max_bytes: usize,
    /// In the order they came.
    entries: VecDeque<Entry<E::Held>>,
    /// The ids in `entries`, so each event is taken once.
    seen: SeenIds,
    /// The entries' payloads, in their order.
    payloads: VecDeque<u8>,
    bytes: usize,
    /// When the first entry was published: checked on every event, and kept
    /// here because the entry itself is a window's length away in memory.
    oldest: Option<Instant>,
    /// Every event published since then that came here is in `entries`:
    /// a replayed event published earlier may have been taken and gone,
    /// so it is dropped rather than risk a duplicate.
    complete_since: Instant,
}

/// An event a window can keep. Its payload is kept apart, in one ring of
/// bytes for the whole window: a received payload is a view of its
/// receive buffer, shared with the thread that read it, and keeping views
/// (or copies with counts of their own) cost reference counts per event
/// twice, most of the window's cost in a profile.
pub trait Kept: Sized {
    /// What is kept of it beside its payload: as little as will make it
    /// again, since every entry is written once and read once as it leaves.
    type Held: Held;
    /// The event's id.
    fn id(&self) -> EventId;
    /// What the event counts for against the window's bound of bytes.
    fn bytes(&self) -> usize;
    /// Whether it may be sent again: a request is not, since an answer
    /// may be on its way.
    fn is_replayable(&self) -> bool;
    /// The event's payload.
    fn payload(&self) -> &[u8];
    /// What is kept of it beside its payload.
    fn held(&self) -> Self::Held;
    /// The event again from what was kept of it.
    fn restore(held: &Self::Held, payload: Bytes) -> Self;
}

/// What a window looks up in what it kept of an event.
pub trait Held {
    /// The event's id.
    fn id(&self) -> EventId;
    /// The event's topic.
    fn topic(&self) -> &Topic;
}

/// An event without its payload and its reply address (requests are not
/// kept): 88 bytes, where an `Event` takes 136.
pub struct HeldEvent {
    id: EventId,
    origin: NodeId,
    topic: Topic,
    headers: Box<[(String, String)]>,
}

impl Held for HeldEvent {
    fn id(&self) -> EventId {
        self.id
    }
    fn topic(&self) -> &Topic {
        &self.topic
    }
}

impl Kept for Event {
    type Held = HeldEvent;
    fn id(&self) -> EventId {
        self.id
    }
    fn bytes(&self) -> usize {
        let headers: usize = self.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        self.payload.len() + self.topic.as_str().len() + headers
    }
    fn is_replayable(&self) -> bool {
        self.reply.is_none()
    }
    fn payload(&self) -> &[u8] {
        &self.payload
    }
    fn held(&self) -> HeldEvent {
        HeldEvent {
            id: self.id,
            origin: self.origin,
            topic: self.topic.clone(),
            headers: self.headers.as_slice().into(),
        }
    }
    fn restore(held: &HeldEvent, payload: Bytes) -> Self {
        Event {
            id: held.id,
            origin: held.origin,
            topic: held.topic.clone(),
            headers: held.headers.to_vec(),
            payload,
            reply: None,
        }
    }
}

/// An event's id and topic, as the simulator keeps them.
impl Kept for (EventId, Topic) {
    type Held = Self;
    fn id(&self) -> EventId {
        self.0
    }
    fn bytes(&self) -> usize {
        0
    }
    fn is_replayable(&self) -> bool {
        true
    }
    fn payload(&self) -> &[u8] {
        &[]
    }
    fn held(&self) -> Self {
        self.clone()
    }
    fn restore(held: &Self, _: Bytes) -> Self {
        held.clone()
    }
}

impl Held for (EventId, Topic) {
    fn id(&self) -> EventId {
        self.0
    }
    fn topic(&self) -> &Topic {
        &self.1
    }
}

struct Entry<H> {
    /// When it was published, as far as this node can tell: when it first
    /// came, or on a replay, then less its age.
    published: Instant,
    bytes: u32,
    /// Of its payload, in `payloads`.
    payload_len: u32,
    event: H,
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
            payloads: VecDeque::new(),
            bytes: 0,
            oldest: None,
            complete_since: now,
        }
    }

    /// Whether events are kept at all.
    pub fn is_enabled(&self) -> bool {
        !self.keep_for.is_zero() && self.max_bytes > 0
    }

    /// Takes in an event that arrived to be routed now, when this node
    /// keeps what it routes (`keeping`: [`super::Overlay::keeps_replays`]);
    /// false if it was routed here before, a repeat, which then goes to
    /// queue groups only. Never taken: a copy for the groups only
    /// (`only_groups`), which must not make the plain subscribers' copy,
    /// coming later by another path, look like a repeat; and an event that
    /// is not [`Kept::is_replayable`].
    pub fn take_arrival(
        &mut self,
        event: &E,
        keeping: bool,
        only_groups: bool,
        now: Instant,
    ) -> bool {
        if only_groups || !keeping || !event.is_replayable() {
            return true;
        }
        self.record(event, event.bytes(), now, now)
    }

    /// Takes in an event a neighbour replayed, published at `published`;
    /// false if it was taken here before or is older than the window
    /// vouches for ([`Self::is_new`]): it then goes no further.
    pub fn take_replayed(
        &mut self,
        event: &E,
        keeping: bool,
        published: Instant,
        now: Instant,
    ) -> bool {
        if !self.is_new(event.id(), published) {
            return false;
        }
        if keeping {
            self.record(event, event.bytes(), published, now);
        }
        true
    }

    /// Keeps an event of `bytes` routed here now, published at
    /// `published`; false if it was here already (a repeat).
    fn record(&mut self, event: &E, bytes: usize, published: Instant, now: Instant) -> bool {
        if !self.is_enabled() {
            return true;
        }
        if !self.seen.insert(event.id()) {
            return false;
        }
        let held = event.held();
        let bytes = bytes + ENTRY_OVERHEAD;
        self.bytes += bytes;
        let payload = event.payload();
        self.payloads.extend(payload);
        // An event is at most a frame, far below 4 GiB.
        self.entries.push_back(Entry {
            published,
            bytes: bytes as u32,
            payload_len: payload.len() as u32,
            event: held,
        });
        self.oldest.get_or_insert(published);
        let cutoff = now.checked_sub(self.keep_for);
        if self.bytes > self.max_bytes || self.oldest < cutoff {
            self.expire(now);
        }
        true
    }

    /// Whether a replayed event, published at `published`, is new here:
    /// not taken already, and not older than what the window vouches for.
    /// A window that is off vouches for nothing.
    fn is_new(&self, id: EventId, published: Instant) -> bool {
        let vouched = self.complete_since + VOUCH_MARGIN;
        self.is_enabled() && published > vouched && !self.seen.contains(id)
    }

    /// The events kept whose topic `pattern` matches, oldest first. Sent
    /// again for a second pattern, an event is dropped by its receiver.
    pub fn replay(&mut self, pattern: &Pattern, now: Instant) -> Vec<Replay<E>> {
        self.expire(now);
        let mut replays = Vec::new();
        let mut at = 0;
        for entry in &self.entries {
            let payload = at..at + entry.payload_len as usize;
            at = payload.end;
            if !pattern.matches(entry.event.topic()) {
                continue;
            }
            let payload = copy_out(&self.payloads, payload);
            replays.push(Replay {
                event: E::restore(&entry.event, payload),
                age: now.saturating_duration_since(entry.published),
            });
        }
        replays
    }

    /// Events kept, and their bytes.
    #[cfg(test)]
    fn held(&self) -> (usize, usize) {
        (self.entries.len(), self.bytes)
    }

    /// Lets go of events older than the window or beyond its bytes. Over
    /// its bytes, it lets go down to [`LOW_WATER`] of them, so that at full
    /// speed events leave in runs, not one per event kept.
    fn expire(&mut self, now: Instant) {
        let cutoff = now.checked_sub(self.keep_for);
        let target = if self.bytes > self.max_bytes {
            self.max_bytes / LOW_WATER.1 * LOW_WATER.0
        } else {
            self.max_bytes
        };
        // Counted first, then dropped in place: popping moves each entry.
        let (mut gone, mut payload_bytes) = (0, 0);
        for entry in &self.entries {
            let old = Some(entry.published) < cutoff;
            if !old && self.bytes <= target {
                break;
            }
            gone += 1;
            payload_bytes += entry.payload_len as usize;
            self.bytes -= entry.bytes as usize;
            self.seen.remove(entry.event.id());
            self.complete_since = self.complete_since.max(entry.published);
        }
        self.entries.drain(..gone);
        self.payloads.drain(..payload_bytes);
        self.oldest = self.entries.front().map(|entry| entry.published);
        // Its room stays for the next events, up to a burst's worth.
        if self.entries.is_empty() {
            self.payloads.shrink_to(64 << 10);
        }
    }
}

/// The bytes of `ring` in `range`, copied out.
fn copy_out(ring: &VecDeque<u8>, range: std::ops::Range<usize>) -> Bytes {
    let (front, back) = ring.as_slices();
    let split = front.len();
    let (start, end) = (range.start, range.end);
    let mut payload = Vec::with_capacity(end - start);
    payload.extend_from_slice(&front[start.min(split)..end.min(split)]);
    payload.extend_from_slice(&back[start.max(split) - split..end.max(split) - split]);
    payload.into()
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
    fn replayed_events_carry_their_own_payloads_across_the_ring_s_wrap() {
        let now = Instant::now();
        let event = |seq: u64| Event {
            id: id(seq),
            origin: crate::identity::NodeId::from_bytes([1; 32]),
            topic: Topic::new("orders.eu").unwrap(),
            headers: vec![("k".into(), seq.to_string())],
            payload: Bytes::from(vec![seq as u8; seq as usize % 7 + 1]),
            reply: None,
        };
        // Room for about three: the ring's front is let go of while its
        // back is written, so the later payloads wrap around its end.
        let mut window = ReplayWindow::new(Duration::from_secs(2), 3 * (ENTRY_OVERHEAD + 8), now);
        for seq in 1..=40 {
            let kept = event(seq);
            assert!(window.record(&kept, kept.payload.len(), now, now));
            let replays = window.replay(&pattern("orders.>"), now);
            // The newest ones, in order, each with its own payload.
            let first = seq + 1 - replays.len() as u64;
            assert!(seq < 3 || (2..=3).contains(&replays.len()));
            for (replay, seq) in replays.into_iter().zip(first..) {
                assert_eq!(replay.event, event(seq));
            }
        }
    }

    #[test]
    fn arrivals_are_kept_by_the_rules_a_driver_and_the_simulator_share() {
        let now = Instant::now();
        let mut window = ReplayWindow::new(Duration::from_secs(2), 1 << 20, now);
        // A copy for the groups only is not kept, so the full copy after
        // it is no repeat; a second full copy is.
        assert!(window.take_arrival(&kept(1, "a"), true, true, now));
        assert!(window.take_arrival(&kept(1, "a"), true, false, now));
        assert!(!window.take_arrival(&kept(1, "a"), true, false, now));
        // A node that keeps nothing (alone, no repair under way) routes
        // each copy in full.
        assert!(window.take_arrival(&kept(2, "a"), false, false, now));
        assert!(window.take_arrival(&kept(2, "a"), false, false, now));
        // A request is never kept.
        let request = Event {
            id: id(3),
            origin: crate::identity::NodeId::from_bytes([1; 32]),
            topic: Topic::new("a").unwrap(),
            headers: Vec::new(),
            payload: Bytes::from_static(b"question"),
            reply: Some(Box::new(crate::wire::ReplyTo {
                node: crate::identity::NodeId::from_bytes([1; 32]),
                inbox: 1,
                request: 1,
            })),
        };
        let mut events = ReplayWindow::new(Duration::from_secs(2), 1 << 20, now);
        assert!(events.take_arrival(&request, true, false, now));
        assert_eq!(events.held().0, 0);
        assert_eq!(seqs(&window.replay(&pattern("a"), now)), vec![1]);

        // A replay is taken once, and kept when the node keeps events:
        // the copy that arrives after it is then a repeat.
        let later = now + Duration::from_millis(500);
        let published = now + VOUCH_MARGIN + Duration::from_millis(1);
        assert!(!window.take_replayed(&kept(1, "a"), true, published, later));
        assert!(window.take_replayed(&kept(4, "a"), true, published, later));
        assert!(!window.take_replayed(&kept(4, "a"), true, published, later));
        assert!(!window.take_arrival(&kept(4, "a"), true, false, later));
        assert!(window.take_replayed(&kept(5, "a"), false, published, later));
        assert!(window.take_replayed(&kept(5, "a"), false, published, later));
        assert_eq!(seqs(&window.replay(&pattern("a"), later)), vec![1, 4]);
    }

    #[test]
    fn an_event_is_taken_once_and_replayed_for_the_patterns_that_match() {
        let now = Instant::now();
        let mut window = ReplayWindow::new(Duration::from_secs(2), 1 << 20, now);
        assert!(window.record(&kept(1, "orders.eu"), 10, now, now));
        assert!(window.record(&kept(2, "invoices.eu"), 10, now, now));
        assert!(!window.record(&kept(1, "orders.eu"), 10, now, now));
        let after_start = now + VOUCH_MARGIN + Duration::from_millis(1);
        assert!(!window.is_new(id(1), after_start));
        assert!(window.is_new(id(3), after_start));

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
        assert!(window.is_new(id(9), now + VOUCH_MARGIN + Duration::from_millis(1)));
        assert!(!window.is_new(id(9), now));
        let early = now + Duration::from_secs(1);
        window.record(&kept(1, "a"), 10, early, early);
        let later = early + Duration::from_secs(3);
        window.record(&kept(2, "a"), 10, later, later);
        assert_eq!(window.held().0, 1, "the first is older than the window");
        // Taken and forgotten: a copy of it, or of anything as old, may be
        // a duplicate, as may one dated a little later by a sender it
        // reached later.
        assert!(!window.is_new(id(1), early));
        assert!(!window.is_new(id(9), early));
        assert!(!window.is_new(id(1), early + Duration::from_millis(20)));
        assert!(window.is_new(id(9), early + VOUCH_MARGIN + Duration::from_millis(1)));
    }

    #[test]
    fn the_bytes_bound_the_window_and_a_full_one_lets_go_to_its_low_water() {
        let now = Instant::now();
        let entry = 100 + ENTRY_OVERHEAD;
        let mut window = ReplayWindow::new(Duration::from_secs(2), 3 * entry, now);
        for seq in 0..9 {
            let at = now + Duration::from_millis(seq);
            window.record(&kept(seq, "a"), 100, at, at);
            assert!(window.held().1 <= 3 * entry);
        }
        // The 4th, 6th and 8th overflowed it: each time it kept only the
        // two newest, under 15/16 of its bytes.
        assert_eq!(window.held(), (3, 3 * entry));
        assert_eq!(seqs(&window.replay(&pattern("a"), now)), vec![6, 7, 8]);
        window.record(&kept(9, "a"), 100, now, now);
        assert_eq!(window.held(), (2, 2 * entry));
        assert_eq!(seqs(&window.replay(&pattern("a"), now)), vec![8, 9]);
    }

    #[test]
    fn a_window_of_zero_keeps_nothing_and_takes_no_replay() {
        let now = Instant::now();
        let mut window = ReplayWindow::new(Duration::ZERO, 1 << 20, now);
        assert!(window.record(&kept(1, "a"), 10, now, now));
        assert!(window.record(&kept(1, "a"), 10, now, now));
        assert_eq!(window.held().0, 0);
        // It cannot tell a replay it has seen from one it has not.
        assert!(!window.is_new(id(2), now + Duration::from_secs(1)));
    }
}
