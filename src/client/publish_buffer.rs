//! The client's publish stream: each publishing task encodes its frames
//! into one shared buffer, and a writer task hands all that has gathered to
//! quinn in one write.
//!
//! A channel of frames cost a channel operation and a move of the whole
//! event per publish, and left every encoding to the one writer task; the
//! bench client's profile showed both. Here a publish is a short lock and
//! an encode, on the publisher's own thread.

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

#[derive(Default)]
struct State {
    buf: BytesMut,
    /// No more frames are taken: the client is gone or the stream failed.
    closed: bool,
}

/// The publish stream has closed.
#[derive(Debug)]
pub struct Closed;

impl PublishBuffer {
    pub fn new() -> Arc<Self> {
        Arc::new(PublishBuffer {
            state: Mutex::new(State::default()),
            has_data: Notify::new(),
            has_room: Notify::new(),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("no panics while holding the lock")
    }

    /// Encodes `message` as the stream's next frame, waiting while the
    /// buffer is full.
    pub async fn send<T: Serialize>(&self, message: &T) -> Result<(), Closed> {
        loop {
            let room = self.has_room.notified();
            tokio::pin!(room);
            {
                let mut state = self.state();
                if state.closed {
                    return Err(Closed);
                }
                if state.buf.len() < LIMIT {
                    let was_empty = state.buf.is_empty();
                    frame::encode(message, &mut state.buf);
                    drop(state);
                    if was_empty {
                        self.has_data.notify_one();
                    }
                    return Ok(());
                }
                // Registered before the lock is released, so the writer's
                // wake-up after emptying the buffer cannot be missed.
                room.as_mut().enable();
            }
            room.await;
        }
    }

    /// Everything buffered, and whether the buffer is closed; wakes the
    /// publishers waiting for room.
    fn take(&self) -> (Bytes, bool) {
        let (bytes, closed) = {
            let mut state = self.state();
            let bytes = state.buf.split().freeze();
            // The next batch is likely as big: growing a buffer copies it.
            state.buf.reserve(frame::batch_room(bytes.len(), LIMIT));
            (bytes, state.closed)
        };
        if !bytes.is_empty() {
            self.has_room.notify_waiters();
        }
        (bytes, closed)
    }

    /// Takes no more frames; what is buffered is still written.
    pub fn close(&self) {
        self.state().closed = true;
        self.has_data.notify_one();
        self.has_room.notify_waiters();
    }
}

/// Writes what publishers buffer to `stream` until the buffer is closed and
/// empty, or the stream fails (then publishing fails too).
pub async fn write(buffer: Arc<PublishBuffer>, mut stream: quinn::SendStream) {
    loop {
        let (bytes, closed) = buffer.take();
        if !bytes.is_empty() {
            // Handed over whole, so quinn keeps it without copying it.
            if stream.write_chunk(bytes).await.is_err() {
                buffer.close();
                return;
            }
            continue;
        }
        if closed {
            let _ = stream.finish();
            return;
        }
        buffer.has_data.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn publishers_wait_while_the_buffer_is_full_and_fail_once_closed() {
        let buffer = PublishBuffer::new();
        let big = vec![7u8; LIMIT / 4];
        while buffer.state().buf.len() < LIMIT {
            buffer.send(&big).await.unwrap();
        }
        let waiting = tokio::spawn({
            let buffer = buffer.clone();
            async move { buffer.send(&1u8).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "a full buffer takes no more");
        let (taken, closed) = buffer.take();
        assert!(taken.len() >= LIMIT && !closed);
        waiting.await.unwrap().unwrap();
        buffer.close();
        assert!(buffer.send(&1u8).await.is_err());
        // What was queued before the close is still handed over.
        let (rest, closed) = buffer.take();
        assert!(!rest.is_empty() && closed);
    }
}
