//! Backpressure: what waits for each destination (a client's deliveries, a
//! link's events), and the congestion that holds event sources back.
//!
//! Each destination counts the bytes the driver has handed its writer and
//! the writer has not yet given to quinn: its [`Backlog`]. Past its
//! high-water mark a destination is congested, and the sources that could
//! feed it wait: client publish streams, and the event streams of every
//! link but the congested one, are not read (so QUIC flow control slows the
//! publishers) until no such destination is congested. The driver itself
//! never waits. A link's own event stream is read on while the link is
//! congested: its events cannot go back to it, and the two ends of a tree
//! edge, each waiting for the other to read, would never drain.
//!
//! A destination that stays congested is dealt with by the driver: a client
//! whose writer makes no progress is a slow consumer and is disconnected,
//! and a link past its bound drops at-most-once batches (custody resends
//! the rest).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::identity::NodeId;

/// A destination is congested, and holds event sources back, once this
/// share of its bound waits for it (a quarter: room to keep its writer
/// busy while the sources slow down, far from the bound).
pub const CONGESTED_SHARE: usize = 4;

/// What reads events into the node, and so may have to wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A client's publish stream: waits while anything is congested.
    Client,
    /// A link's event stream: waits while anything but that link is.
    Link(NodeId),
}

/// Which destinations are congested, shared by the driver, the writers and
/// the readers of one node.
#[derive(Debug)]
pub struct Pressure {
    congested: Mutex<Congested>,
    /// How many destinations are congested: the readers' fast path.
    count: AtomicUsize,
    /// Bumped whenever a destination stops being congested.
    eased: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct Congested {
    clients: usize,
    links: BTreeMap<NodeId, usize>,
}

impl Default for Pressure {
    fn default() -> Self {
        Pressure {
            congested: Mutex::new(Congested::default()),
            count: AtomicUsize::new(0),
            eased: watch::channel(0).0,
        }
    }
}

impl Pressure {
    /// Whether `source` must wait now.
    pub fn holds(&self, source: Source) -> bool {
        if self.count.load(Ordering::Acquire) == 0 {
            return false;
        }
        let congested = self.lock();
        match source {
            Source::Client => congested.clients > 0 || !congested.links.is_empty(),
            Source::Link(from) => {
                congested.clients > 0 || congested.links.keys().any(|link| *link != from)
            }
        }
    }

    /// Returns once `source` may hand the driver more events.
    pub async fn wait(&self, source: Source) {
        if self.count.load(Ordering::Acquire) == 0 {
            return;
        }
        // Subscribed before looking, so an easing in between is not missed.
        let mut eased = self.eased.subscribe();
        while self.holds(source) {
            if eased.changed().await.is_err() {
                return;
            }
        }
    }

    /// How many destinations are congested now, for the status.
    pub fn congested(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    fn raise(&self, link: Option<NodeId>) {
        let mut congested = self.lock();
        match link {
            None => congested.clients += 1,
            Some(id) => *congested.links.entry(id).or_default() += 1,
        }
        self.count.fetch_add(1, Ordering::AcqRel);
    }

    fn lower(&self, link: Option<NodeId>) {
        {
            let mut congested = self.lock();
            match link {
                None => congested.clients = congested.clients.saturating_sub(1),
                Some(id) => {
                    if let Some(n) = congested.links.get_mut(&id) {
                        *n -= 1;
                        if *n == 0 {
                            congested.links.remove(&id);
                        }
                    }
                }
            }
            self.count.fetch_sub(1, Ordering::AcqRel);
        }
        self.eased.send_modify(|generation| *generation += 1);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Congested> {
        self.congested
            .lock()
            .expect("no panics while holding the lock")
    }
}

/// Bytes the driver has handed one destination's writer and the writer has
/// not yet written, against the destination's high-water mark.
#[derive(Debug)]
pub struct Backlog {
    state: Mutex<BacklogState>,
    /// Bytes written so far: progress, which tells a stalled destination
    /// from a slow one.
    written: AtomicU64,
    high_water: usize,
    /// The link this is the backlog of; `None` for a client.
    link: Option<NodeId>,
    pressure: Arc<Pressure>,
}

#[derive(Debug, Default)]
struct BacklogState {
    bytes: usize,
    /// Events queued and not yet wholly written: lost if the destination
    /// goes first.
    events: u64,
    /// Counted among the congested destinations.
    congested: bool,
    /// Given up on (a slow consumer being disconnected): no longer holds
    /// anyone back.
    abandoned: bool,
}

impl Backlog {
    pub fn new(high_water: usize, link: Option<NodeId>, pressure: Arc<Pressure>) -> Self {
        Backlog {
            state: Mutex::new(BacklogState::default()),
            written: AtomicU64::new(0),
            high_water,
            link,
            pressure,
        }
    }

    /// The driver queued `events` more, of `bytes`.
    pub fn add(&self, bytes: usize, events: u64) {
        let mut state = self.lock();
        state.bytes += bytes;
        state.events += events;
        if state.bytes > self.high_water && !state.congested && !state.abandoned {
            state.congested = true;
            self.pressure.raise(self.link);
        }
    }

    /// The writer wrote `bytes`, or the driver took back what it could not
    /// queue.
    pub fn remove(&self, bytes: usize) {
        self.written.fetch_add(bytes as u64, Ordering::Relaxed);
        let mut state = self.lock();
        state.bytes = state.bytes.saturating_sub(bytes);
        if state.bytes <= self.high_water && state.congested {
            state.congested = false;
            self.pressure.lower(self.link);
        }
    }

    /// The writer wrote `events` whole, or the driver took them back.
    pub fn remove_events(&self, events: u64) {
        let mut state = self.lock();
        state.events = state.events.saturating_sub(events);
    }

    /// Events queued and not yet wholly written.
    pub fn events(&self) -> u64 {
        self.lock().events
    }

    /// Stops holding sources back for this destination, whatever waits.
    pub fn abandon(&self) {
        let mut state = self.lock();
        state.abandoned = true;
        if state.congested {
            state.congested = false;
            self.pressure.lower(self.link);
        }
    }

    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Whether it is past its high-water mark.
    pub fn is_congested(&self) -> bool {
        self.lock().congested
    }

    /// Bytes written since the destination was opened.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BacklogState> {
        self.state.lock().expect("no panics while holding the lock")
    }
}

impl Drop for Backlog {
    /// A destination that is gone holds no one back.
    fn drop(&mut self) {
        self.abandon();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn id(n: u8) -> NodeId {
        NodeId::from_bytes([n; 32])
    }

    #[test]
    fn a_backlog_past_its_high_water_mark_holds_sources_until_it_drains() {
        let pressure = Arc::new(Pressure::default());
        let client = Backlog::new(100, None, pressure.clone());
        client.add(100, 1);
        assert!(!pressure.holds(Source::Client), "at the mark, not past it");
        client.add(1, 1);
        assert!(pressure.holds(Source::Client));
        assert!(pressure.holds(Source::Link(id(1))));
        client.add(50, 1);
        assert_eq!(pressure.congested(), 1, "counted once");
        client.remove(51);
        assert!(!pressure.holds(Source::Client));
        assert_eq!(client.written(), 51);
    }

    #[test]
    fn a_congested_link_does_not_hold_its_own_stream() {
        let pressure = Arc::new(Pressure::default());
        let link = Backlog::new(10, Some(id(1)), pressure.clone());
        link.add(11, 1);
        assert!(
            !pressure.holds(Source::Link(id(1))),
            "its events never go back to it"
        );
        assert!(pressure.holds(Source::Link(id(2))));
        assert!(pressure.holds(Source::Client));
        drop(link);
        assert!(
            !pressure.holds(Source::Link(id(2))),
            "a gone link holds no one"
        );
    }

    #[test]
    fn an_abandoned_backlog_holds_no_one() {
        let pressure = Arc::new(Pressure::default());
        let client = Backlog::new(10, None, pressure.clone());
        client.add(20, 1);
        client.abandon();
        assert!(!pressure.holds(Source::Client));
        client.add(20, 1);
        assert!(!pressure.holds(Source::Client));
        client.remove(40);
        assert_eq!(pressure.congested(), 0);
    }

    #[tokio::test]
    async fn a_waiting_source_goes_on_when_the_destination_drains() {
        let pressure = Arc::new(Pressure::default());
        let client = Arc::new(Backlog::new(10, None, pressure.clone()));
        client.add(20, 1);
        let waiting = tokio::spawn({
            let pressure = pressure.clone();
            async move { pressure.wait(Source::Client).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "held while congested");
        client.remove(15);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("released once drained")
            .unwrap();
    }
}
