//! Frames over QUIC streams: a buffered reader that yields whole frames in
//! batches, a writer that sends many frames in one stream write, and
//! batches of frames encoded by one task for another's writer. A stream is
//! a bare QUIC one or one inside a browser's WebTransport session: the
//! frames are the same.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};
use serde::Serialize;
use tokio::sync::mpsc;

use super::frame::{self, FrameError, Frames, Message};

/// Chunks taken from quinn per read: all that has arrived, up to this many,
/// so one batch of frames spans many packets when the stream is busy.
const READ_CHUNKS: usize = 32;

/// Why a stream stopped yielding frames.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("stream ended inside a frame")]
    Truncated,
    #[error("reading the stream failed: {0}")]
    Read(String),
    #[error("writing the stream failed: {0}")]
    Write(String),
}

/// A stream's receiving half.
pub enum RecvStream {
    Quic(quinn::RecvStream),
    Web(web_transport_quinn::RecvStream),
}

impl RecvStream {
    /// Chunks that have arrived, at most `chunks.len()`, or `None` at the
    /// stream's clean end.
    async fn read_chunks(&mut self, chunks: &mut [Bytes]) -> Result<Option<usize>, StreamError> {
        let read = match self {
            RecvStream::Quic(stream) => stream.read_chunks(chunks).await.map_err(|e| e.to_string()),
            RecvStream::Web(stream) => stream.read_chunks(chunks).await.map_err(|e| e.to_string()),
        };
        read.map_err(StreamError::Read)
    }
}

impl From<quinn::RecvStream> for RecvStream {
    fn from(stream: quinn::RecvStream) -> Self {
        RecvStream::Quic(stream)
    }
}

impl From<web_transport_quinn::RecvStream> for RecvStream {
    fn from(stream: web_transport_quinn::RecvStream) -> Self {
        RecvStream::Web(stream)
    }
}

/// A stream's sending half.
pub enum SendStream {
    Quic(quinn::SendStream),
    Web(web_transport_quinn::SendStream),
}

impl SendStream {
    /// Writes some of `chunks`, handing them over without a copy.
    pub async fn write_chunks(
        &mut self,
        chunks: &mut [Bytes],
    ) -> Result<quinn::Written, StreamError> {
        let written = match self {
            SendStream::Quic(stream) => {
                stream.write_chunks(chunks).await.map_err(|e| e.to_string())
            }
            SendStream::Web(stream) => stream.write_chunks(chunks).await.map_err(|e| e.to_string()),
        };
        written.map_err(StreamError::Write)
    }

    /// Data of streams with higher priority goes out first.
    /// A stream already closed has nothing left to order.
    pub fn set_priority(&self, priority: i32) {
        match self {
            SendStream::Quic(stream) => drop(stream.set_priority(priority)),
            SendStream::Web(stream) => drop(stream.set_priority(priority)),
        }
    }

    async fn write_all_chunks(&mut self, chunks: &mut [Bytes]) -> Result<(), StreamError> {
        let written = match self {
            SendStream::Quic(stream) => stream
                .write_all_chunks(chunks)
                .await
                .map_err(|e| e.to_string()),
            SendStream::Web(stream) => stream
                .write_all_chunks(chunks)
                .await
                .map_err(|e| e.to_string()),
        };
        written.map_err(StreamError::Write)
    }
}

impl From<quinn::SendStream> for SendStream {
    fn from(stream: quinn::SendStream) -> Self {
        SendStream::Quic(stream)
    }
}

impl From<web_transport_quinn::SendStream> for SendStream {
    fn from(stream: web_transport_quinn::SendStream) -> Self {
        SendStream::Web(stream)
    }
}

/// Reads length-prefixed frames from one receive stream.
pub struct FrameReader {
    stream: RecvStream,
    frames: Frames,
    /// Chunks read and not yet handed to `frames`, in stream order.
    chunks: VecDeque<Bytes>,
}

impl FrameReader {
    pub fn new(stream: impl Into<RecvStream>, max_frame: usize) -> Self {
        FrameReader {
            stream: stream.into(),
            frames: Frames::new(max_frame),
            chunks: VecDeque::new(),
        }
    }

    /// The next frame, or `None` when the stream ended cleanly.
    pub async fn next<T: Message>(&mut self) -> Result<Option<T>, StreamError> {
        loop {
            if let Some(body) = self.next_body()? {
                return Ok(Some(frame::decode_shared(&body)?));
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }

    /// Waits for at least one frame, then appends every complete frame
    /// already received to `out`. Returns `false` when the stream ended
    /// cleanly and nothing more will come.
    pub async fn next_batch<T: Message>(&mut self, out: &mut Vec<T>) -> Result<bool, StreamError> {
        loop {
            // What a single read left of the last chunk, then the rest.
            self.frames.decode_into(out)?;
            while let Some(chunk) = self.chunks.pop_front() {
                self.frames.push(chunk);
                self.frames.decode_into(out)?;
            }
            if !out.is_empty() {
                return Ok(true);
            }
            if !self.fill().await? {
                return Ok(false);
            }
        }
    }

    /// The next complete frame among the chunks read so far.
    fn next_body(&mut self) -> Result<Option<Bytes>, FrameError> {
        loop {
            if let Some(body) = self.frames.next()? {
                return Ok(Some(body));
            }
            match self.chunks.pop_front() {
                Some(chunk) => self.frames.push(chunk),
                None => return Ok(None),
            }
        }
    }

    /// Waits for more of the stream and takes all of it that has arrived;
    /// `false` at a clean end.
    async fn fill(&mut self) -> Result<bool, StreamError> {
        let mut chunks: [Bytes; READ_CHUNKS] = Default::default();
        match self.stream.read_chunks(&mut chunks).await? {
            Some(n) => {
                self.chunks.extend(chunks.into_iter().take(n));
                Ok(true)
            }
            None if self.frames.mid_frame() => Err(StreamError::Truncated),
            None => Ok(false),
        }
    }
}

/// Bytes encoded per stream write. Each write hands its buffer to quinn, so
/// the next needs a fresh one: kept this size, it comes from the allocator's
/// free lists, where a buffer of a whole large batch was fresh memory,
/// page-faulted in (7% of a node's time) and grown by copying.
const WRITE_CHUNK: usize = 64 << 10;

/// Writes frames to one send stream, a chunk of frames per write.
pub struct FrameWriter {
    stream: SendStream,
    /// Bytes of the last write: room reserved up front for the next, so a
    /// busy stream's buffer never grows by copying and a quiet stream's
    /// small messages do not each hold a chunk-sized buffer in quinn.
    last_len: usize,
}

impl FrameWriter {
    pub fn new(stream: impl Into<SendStream>) -> Self {
        FrameWriter {
            stream: stream.into(),
            last_len: 0,
        }
    }

    pub fn into_stream(self) -> SendStream {
        self.stream
    }

    /// Sends all `frames`, in chunks of about [`WRITE_CHUNK`] bytes.
    pub async fn send_all<'a, T: Serialize + 'a>(
        &mut self,
        frames: impl IntoIterator<Item = &'a T>,
    ) -> Result<(), StreamError> {
        let mut batch = FrameBatch::with_room(self.last_len);
        for message in frames {
            batch.push(message);
        }
        self.last_len = batch.bytes();
        let mut chunks = Vec::new();
        batch.into_chunks(&mut chunks);
        // Handed over whole, so quinn keeps them without copying them.
        self.stream.write_all_chunks(&mut chunks).await?;
        Ok(())
    }

    pub async fn send<T: Serialize>(&mut self, message: &T) -> Result<(), StreamError> {
        self.send_all([message]).await
    }
}

/// Frames encoded ahead of their writer, by the driver as it routes:
/// encoding is then the one copy a queued event's payload gets (instead
/// of a compaction copy and an encoding copy), and a queue holds about
/// the bytes it will write (see [`FrameBatch::fit`]).
#[derive(Debug, Default)]
pub struct FrameBatch {
    /// Full chunks of [`WRITE_CHUNK`] bytes; a batch of large events is
    /// never one huge buffer.
    full: Vec<Bytes>,
    buf: BytesMut,
    /// Reserved when a frame begins a buffer: growing copies.
    room: usize,
    frames: usize,
    bytes: usize,
}

impl FrameBatch {
    /// An empty batch that will reserve room for `bytes` (what the last
    /// one needed) once it takes a frame.
    pub fn with_room(bytes: usize) -> Self {
        FrameBatch {
            room: frame::batch_room(bytes, WRITE_CHUNK),
            ..FrameBatch::default()
        }
    }

    pub fn push<T: Serialize>(&mut self, message: &T) {
        self.push_with(|buf| frame::encode(message, buf));
    }

    /// Adds the frame (header and body) that `encode` appends.
    pub fn push_with(&mut self, encode: impl FnOnce(&mut BytesMut)) {
        if self.buf.is_empty() {
            self.buf.reserve(self.room);
        }
        let before = self.buf.len();
        encode(&mut self.buf);
        self.bytes += self.buf.len() - before;
        self.frames += 1;
        if self.buf.len() >= WRITE_CHUNK {
            self.full.push(self.buf.split().freeze());
            self.room = frame::batch_room(WRITE_CHUNK, WRITE_CHUNK);
        }
    }

    /// Gives back room the last buffer was begun with and did not use (a
    /// batch begun as large as the last may hold one small frame): before
    /// it is queued, the batch then holds at most twice what it encodes.
    pub fn fit(&mut self) {
        if self.buf.capacity() > 2 * self.buf.len() {
            self.buf = BytesMut::from(&self.buf[..]);
        }
    }

    pub fn frames(&self) -> usize {
        self.frames
    }

    /// Encoded size, headers included.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The encoded frames, in order, as chunks for a stream write.
    pub fn into_chunks(self, out: &mut Vec<Bytes>) {
        out.extend(self.full);
        if !self.buf.is_empty() {
            out.push(self.buf.freeze());
        }
    }
}

/// Messages (or the driver's batches) taken from a channel per write:
/// enough for few writes of many frames, and a bound on what one write
/// gathers.
pub const WRITE_BATCH: usize = 256;

/// Writes every message sent on `messages` to `stream`, as many per stream
/// write as are waiting. Ends when the channel closes or the stream fails.
pub async fn write_each<T: Serialize>(
    stream: impl Into<SendStream>,
    mut messages: mpsc::UnboundedReceiver<T>,
) {
    write_from(&mut FrameWriter::new(stream), &mut messages).await
}

/// [`write_each`] on a writer and channel that outlive it: a client's
/// requests channel is written to one connection after another.
pub async fn write_from<T: Serialize>(
    writer: &mut FrameWriter,
    messages: &mut mpsc::UnboundedReceiver<T>,
) {
    let mut batch = Vec::new();
    while messages.recv_many(&mut batch, WRITE_BATCH).await > 0 {
        if writer.send_all(&batch).await.is_err() {
            return;
        }
        batch.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{ClientReply, RequestError};

    /// Replies of `size` bytes of text each: any message kind will do.
    fn replies(count: u64, size: usize) -> Vec<ClientReply> {
        (0..count)
            .map(|request| ClientReply::Error {
                request,
                error: RequestError::InvalidTopic,
                message: "x".repeat(size),
            })
            .collect()
    }

    fn decoded(batch: FrameBatch) -> (Vec<usize>, Vec<ClientReply>) {
        let mut chunks = Vec::new();
        batch.into_chunks(&mut chunks);
        let mut frames = Frames::new(frame::DEFAULT_MAX_FRAME);
        let mut out = Vec::new();
        for chunk in &chunks {
            frames.push(chunk.clone());
            while let Some(body) = frames.next().expect("valid frames") {
                out.push(frame::decode(&body).expect("decodes"));
            }
        }
        assert!(!frames.mid_frame());
        (chunks.iter().map(Bytes::len).collect(), out)
    }

    #[test]
    fn a_frame_batch_holds_its_frames_in_order_and_counts_them() {
        let messages = replies(10, 100);
        let mut batch = FrameBatch::with_room(0);
        let mut expected_bytes = 0;
        for message in &messages {
            batch.push(message);
            let mut alone = BytesMut::new();
            frame::encode(message, &mut alone);
            expected_bytes += alone.len();
        }
        assert_eq!(batch.frames(), 10);
        assert_eq!(batch.bytes(), expected_bytes);
        let (chunks, out) = decoded(batch);
        assert_eq!(chunks, [expected_bytes]);
        assert_eq!(out, messages);
    }

    #[test]
    fn a_large_frame_batch_is_cut_into_write_chunks() {
        // 10 KiB frames: every seventh crosses 64 KiB and ends a chunk.
        let messages = replies(20, 10 << 10);
        let mut batch = FrameBatch::with_room(0);
        for message in &messages {
            batch.push(message);
        }
        let total = batch.bytes();
        let (chunks, out) = decoded(batch);
        assert_eq!(out, messages);
        assert_eq!(chunks.iter().sum::<usize>(), total);
        assert_eq!(chunks.len(), 3, "{chunks:?}");
        let full = |len: usize| (WRITE_CHUNK..WRITE_CHUNK + (11 << 10)).contains(&len);
        assert!(full(chunks[0]) && full(chunks[1]), "{chunks:?}");
    }

    #[test]
    fn a_fitted_batch_holds_at_most_twice_what_it_encodes() {
        // Begun as large as a busy last batch, it takes one small frame.
        let mut batch = FrameBatch::with_room(60 << 10);
        let messages = replies(1, 10);
        batch.push(&messages[0]);
        assert!(batch.buf.capacity() >= 60 << 10);
        batch.fit();
        assert!(batch.buf.capacity() <= 2 * batch.bytes());
        assert_eq!(decoded(batch).1, messages);
    }

    #[test]
    fn an_empty_frame_batch_writes_nothing() {
        let (chunks, out) = decoded(FrameBatch::with_room(1 << 20));
        assert!(chunks.is_empty() && out.is_empty());
    }
}
