//! The client's publish stream: each publishing task encodes its frames
//! into one shared buffer, and a writer task hands all that has gathered to
//! quinn in one write.
//!
//! A channel of frames cost a channel operation and a move of the whole
//! event per publish, and left every encoding to the one writer task; the
//! bench client's profile showed both. Here a publish is a short lock and
//! an encode, on the publisher's own thread.
//!
//! The buffer outlives connections. While the client is disconnected it
//! keeps at-most-once events up to the reconnect bound (publishing fails
//! past it rather than wait for a node that may not come back), and the
//! next connection's writer sends them first.

use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};
use serde::Serialize;
use tokio::sync::Notify;

use crate::wire::frame;

/// Encoded bytes waiting to be written before publishing waits for the
/// writer. One frame is always taken, however large.
const LIMIT: usize = 64 << 10;

/// Frames encoded and not yet written to the publish stream.
pub struct PublishBuffer {
    state: Mutex<State>,
    /// Wakes the writer when the buffer gains its first bytes, or closes.
    has_data: Notify,
    /// Wakes publishers waiting for room.
    has_room: Notify,
}

struct State {
    buf: BytesMut,
    mode: Mode,
    /// Counts connections, so a writer of a lost one stops taking bytes.
    generation: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A writer takes what gathers; publishers wait while it is full.
    Connected,
    /// Frames gather up to this many bytes for the next connection.
    Disconnected { bound: usize },
    /// No more frames are taken: the client is closed.
    Closed,
}

/// Why a frame was not taken.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// The client is closed.
    Closed,
    /// Disconnected, and the reconnect buffer is full.
    Full { bound: usize },
}

/// Whether a frame waits in the buffer while the client is disconnected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offline {
    /// Kept for the next connection (at-most-once events).
    Keep,
    /// Not kept: it is sent again after a reconnect by other means
    /// (at-least-once events), or means nothing on another connection.
    Skip,
}

impl PublishBuffer {
    /// A buffer for a client not yet connected.
    pub fn new(bound: usize) -> Arc<Self> {
        Arc::new(PublishBuffer {
            state: Mutex::new(State {
                buf: BytesMut::new(),
                mode: Mode::Disconnected { bound },
                generation: 0,
            }),
            has_data: Notify::new(),
            has_room: Notify::new(),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("no panics while holding the lock")
    }

    /// Encodes `message` as the stream's next frame, waiting while the
    /// buffer is full and connected. Disconnected, an `Offline::Skip` frame
    /// is dropped (`Ok(false)`).
    pub async fn send<T: Serialize>(&self, message: &T, offline: Offline) -> Result<bool, Refused> {
        loop {
            let room = self.has_room.notified();
            tokio::pin!(room);
            {
                let mut state = self.state();
                match (state.mode, offline) {
                    (Mode::Closed, _) => return Err(Refused::Closed),
                    (Mode::Disconnected { .. }, Offline::Skip) => return Ok(false),
                    (Mode::Disconnected { bound }, Offline::Keep) => {
                        let before = state.buf.len();
                        frame::encode(message, &mut state.buf);
                        if state.buf.len() > bound {
                            state.buf.truncate(before);
                            return Err(Refused::Full { bound });
                        }
                        return Ok(true);
                    }
                    (Mode::Connected, _) => {}
                }
                if state.buf.len() < LIMIT {
                    let was_empty = state.buf.is_empty();
                    frame::encode(message, &mut state.buf);
                    drop(state);
                    if was_empty {
                        self.has_data.notify_one();
                    }
                    return Ok(true);
                }
                // Registered before the lock is released, so the writer's
                // wake-up after emptying the buffer cannot be missed.
                room.as_mut().enable();
            }
            room.await;
        }
    }

    /// Everything buffered, and whether the buffer is closed; wakes the
    /// publishers waiting for room. `None` once connection `generation` is
    /// lost: its writer stops.
    fn take(&self, generation: u64) -> Option<(Bytes, bool)> {
        let (bytes, closed) = {
            let mut state = self.state();
            if state.generation != generation || matches!(state.mode, Mode::Disconnected { .. }) {
                return None;
            }
            let bytes = state.buf.split().freeze();
            // The next batch is likely as big: growing a buffer copies it.
            state.buf.reserve(frame::batch_room(bytes.len(), LIMIT));
            (bytes, state.mode == Mode::Closed)
        };
        if !bytes.is_empty() {
            self.has_room.notify_waiters();
        }
        Some((bytes, closed))
    }

    /// A new connection's writer takes from now on (first what gathered
    /// while disconnected); returns the generation to hand to [`write`].
    pub fn connected(&self) -> u64 {
        let generation = {
            let mut state = self.state();
            if state.mode != Mode::Closed {
                state.mode = Mode::Connected;
            }
            state.generation += 1;
            state.generation
        };
        self.has_data.notify_waiters();
        generation
    }

    /// The connection is lost: what its writer had not taken is dropped
    /// (at-most-once events in flight are lost with a connection; the
    /// at-least-once ones go again), and frames gather up to `bound` bytes.
    pub fn disconnected(&self, bound: usize) {
        {
            let mut state = self.state();
            if state.mode == Mode::Closed {
                return;
            }
            state.mode = Mode::Disconnected { bound };
            state.generation += 1;
            state.buf.clear();
        }
        self.has_data.notify_waiters();
        self.has_room.notify_waiters();
    }

    /// Takes no more frames; what is buffered is still written if a writer
    /// is connected.
    pub fn close(&self) {
        {
            let mut state = self.state();
            if matches!(state.mode, Mode::Disconnected { .. }) {
                state.buf.clear();
            }
            state.mode = Mode::Closed;
        }
        self.has_data.notify_waiters();
        self.has_room.notify_waiters();
    }
}

/// Writes what publishers buffer to `stream` until the buffer is closed and
/// empty, the connection of `generation` is lost, or the stream fails.
pub async fn write(buffer: Arc<PublishBuffer>, generation: u64, mut stream: quinn::SendStream) {
    loop {
        let data = buffer.has_data.notified();
        tokio::pin!(data);
        data.as_mut().enable();
        let Some((bytes, closed)) = buffer.take(generation) else {
            return;
        };
        if !bytes.is_empty() {
            // Handed over whole, so quinn keeps it without copying it.
            if stream.write_chunk(bytes).await.is_err() {
                return;
            }
            continue;
        }
        if closed {
            let _ = stream.finish();
            return;
        }
        data.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn publishers_wait_while_the_buffer_is_full_and_fail_once_closed() {
        let buffer = PublishBuffer::new(1 << 20);
        let generation = buffer.connected();
        let big = vec![7u8; LIMIT / 4];
        while buffer.state().buf.len() < LIMIT {
            buffer.send(&big, Offline::Keep).await.unwrap();
        }
        let waiting = tokio::spawn({
            let buffer = buffer.clone();
            async move { buffer.send(&1u8, Offline::Keep).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "a full buffer takes no more");
        let (taken, closed) = buffer.take(generation).unwrap();
        assert!(taken.len() >= LIMIT && !closed);
        assert_eq!(waiting.await.unwrap(), Ok(true));
        buffer.close();
        assert_eq!(buffer.send(&1u8, Offline::Keep).await, Err(Refused::Closed));
        // What was queued before the close is still handed over.
        let (rest, closed) = buffer.take(generation).unwrap();
        assert!(!rest.is_empty() && closed);
    }

    #[tokio::test]
    async fn disconnected_it_keeps_what_may_wait_up_to_its_bound_for_the_next_writer() {
        let bound = LIMIT * 2;
        let buffer = PublishBuffer::new(bound);
        let lost = buffer.connected();
        buffer.send(&vec![1u8; 100], Offline::Keep).await.unwrap();
        buffer.disconnected(bound);
        assert!(
            buffer.take(lost).is_none(),
            "a lost connection's writer stops"
        );
        assert_eq!(buffer.send(&2u8, Offline::Skip).await, Ok(false));
        let big = vec![7u8; LIMIT / 4];
        let mut kept = 0;
        let refusal = loop {
            match buffer.send(&big, Offline::Keep).await {
                Ok(true) => kept += 1,
                other => break other,
            }
        };
        assert_eq!(refusal, Err(Refused::Full { bound }));
        let mut one = BytesMut::new();
        frame::encode(&big, &mut one);
        assert_eq!(
            kept,
            bound / one.len(),
            "kept up to the bound, without waiting"
        );
        let next = buffer.connected();
        let (taken, _) = buffer.take(next).unwrap();
        let mut frames = frame::Frames::new(usize::MAX);
        frames.push(taken);
        let mut count = 0;
        while let Some(body) = frames.next().unwrap() {
            assert_eq!(postcard::from_bytes::<Vec<u8>>(&body).unwrap(), big);
            count += 1;
        }
        assert_eq!(count, kept, "only what was published while disconnected");
    }
}
