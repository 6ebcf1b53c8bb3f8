//! Releases: when a publisher's at-least-once events no longer depend on
//! this node. A node confirms an event once it has committed it; it
//! releases it once the next node on the way to each durable home has
//! committed it too (or the home is this node). Until then the client
//! keeps the event, so that if this node dies for good the client can send
//! it again through another node, rather than wait for this one to return.
//!
//! Releases are cumulative per publish stream: "every event up to N",
//! which is what lets the client send again from the first unreleased
//! event, in order.

use std::collections::{BTreeMap, HashMap};

/// One client session's at-least-once events between commit and release.
#[derive(Default)]
struct Stream {
    /// The highest sequence number committed.
    committed: u64,
    /// The highest released so far.
    released: u64,
    /// Committed events still held in the outbox: how many outbox entries
    /// of each are not yet in the next node's custody.
    held: BTreeMap<u64, usize>,
}

impl Stream {
    /// The new release point, if it moved.
    fn advance(&mut self) -> Option<u64> {
        let up_to = match self.held.keys().next() {
            Some(first_held) => first_held.saturating_sub(1),
            None => self.committed,
        };
        (up_to > self.released).then(|| {
            self.released = up_to;
            up_to
        })
    }
}

#[derive(Default)]
pub struct Releases {
    streams: HashMap<u64, Stream>,
    /// Outbox entries made from a session's events: whose, and which.
    entries: HashMap<u64, (u64, u64)>,
}

impl Releases {
    /// Session `session`'s events `seqs` are committed; `outbox` holds the
    /// outbox keys made from them, with each one's sequence number.
    /// Returns the new release point, if it moved.
    pub fn committed(
        &mut self,
        session: u64,
        seqs: &[u64],
        outbox: impl Iterator<Item = (u64, u64)>,
    ) -> Option<u64> {
        let stream = self.streams.entry(session).or_insert_with(|| Stream {
            // What came before the session's first event is not its to
            // release: it was released, or is sent again, from it on.
            released: seqs.iter().min().map_or(0, |first| first.saturating_sub(1)),
            ..Stream::default()
        });
        if let Some(&highest) = seqs.iter().max() {
            stream.committed = stream.committed.max(highest);
        }
        for (key, seq) in outbox {
            *stream.held.entry(seq).or_default() += 1;
            self.entries.insert(key, (session, seq));
        }
        stream.advance()
    }

    /// The next nodes hold these outbox entries now. Returns each session
    /// whose release point moved, with the new point.
    pub fn forgotten(&mut self, keys: &[u64]) -> Vec<(u64, u64)> {
        let mut moved = Vec::new();
        for key in keys {
            let Some((session, seq)) = self.entries.remove(key) else {
                continue;
            };
            let Some(stream) = self.streams.get_mut(&session) else {
                continue;
            };
            if let Some(left) = stream.held.get_mut(&seq) {
                *left -= 1;
                if *left == 0 {
                    stream.held.remove(&seq);
                }
            }
            if let Some(up_to) = stream.advance() {
                moved.retain(|&(s, _)| s != session);
                moved.push((session, up_to));
            }
        }
        moved
    }

    /// The session ended: nobody waits for its releases. Its entries are
    /// forgotten as they leave the outbox.
    pub fn closed(&mut self, session: u64) {
        self.streams.remove(&session);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_released_in_order_once_the_next_node_holds_them() {
        let mut releases = Releases::default();
        // 1 and 3 went to the outbox (keys 10 and 11); 2 was for no one
        // elsewhere.
        assert_eq!(
            releases.committed(7, &[1, 2, 3], [(10, 1), (11, 3)].into_iter()),
            None
        );
        // 3 is handed on first: 1 still holds the release back.
        assert_eq!(releases.forgotten(&[11]), vec![]);
        assert_eq!(releases.forgotten(&[10]), vec![(7, 3)]);
        // Events for no other node are released as they are committed.
        assert_eq!(releases.committed(7, &[4], std::iter::empty()), Some(4));
    }

    #[test]
    fn an_event_for_several_homes_waits_for_each() {
        let mut releases = Releases::default();
        assert_eq!(
            releases.committed(1, &[5], [(1, 5), (2, 5)].into_iter()),
            None
        );
        assert_eq!(releases.forgotten(&[1]), vec![]);
        assert_eq!(releases.forgotten(&[2]), vec![(1, 5)]);
    }

    #[test]
    fn a_closed_session_is_told_nothing() {
        let mut releases = Releases::default();
        releases.committed(1, &[1], [(1, 1)].into_iter());
        releases.closed(1);
        assert_eq!(releases.forgotten(&[1]), vec![]);
        assert!(releases.entries.is_empty());
    }
}
