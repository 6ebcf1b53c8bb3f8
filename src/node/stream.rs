//! Frames over QUIC streams: a buffered reader that yields whole frames in
//! batches, and a writer that sends many frames in one stream write.

use bytes::{Buf, Bytes, BytesMut};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::wire::frame::{self, FrameError, Message};

/// Bytes asked of quinn per read; frames larger than this span several reads.
const READ_CHUNK: usize = 64 * 1024;

/// Why a stream stopped yielding frames.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("stream ended inside a frame")]
    Truncated,
    #[error(transparent)]
    Read(#[from] quinn::ReadError),
    #[error(transparent)]
    Write(#[from] quinn::WriteError),
}

/// Reads length-prefixed frames from one receive stream. Frames that lie
/// wholly within a chunk quinn hands over are read from it in place; only
/// a frame split across chunks is copied, into `buf`.
pub struct FrameReader {
    stream: quinn::RecvStream,
    /// What is left of the last chunk; only ever set while `buf` is empty.
    chunk: Bytes,
    /// The start of a frame that continues in the next chunk.
    buf: BytesMut,
    max_frame: usize,
}

impl FrameReader {
    pub fn new(stream: quinn::RecvStream, max_frame: usize) -> Self {
        FrameReader {
            stream,
            chunk: Bytes::new(),
            buf: BytesMut::new(),
            max_frame,
        }
    }

    /// The next frame, or `None` when the stream ended cleanly.
    pub async fn next<T: Message>(&mut self) -> Result<Option<T>, StreamError> {
        loop {
            if let Some(body) = self.take_frame()? {
                return Ok(Some(frame::decode(&body)?));
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
            while let Some(body) = self.take_frame()? {
                out.push(frame::decode(&body)?);
            }
            if !out.is_empty() {
                return Ok(true);
            }
            if !self.fill().await? {
                return Ok(false);
            }
        }
    }

    /// The next complete frame's body, if one has been received.
    fn take_frame(&mut self) -> Result<Option<Bytes>, FrameError> {
        if self.buf.is_empty() {
            if let Some(len) = frame::complete_frame(&self.chunk, self.max_frame)? {
                let mut body = self.chunk.split_to(frame::HEADER_LEN + len);
                body.advance(frame::HEADER_LEN);
                return Ok(Some(body));
            }
            // A frame that goes on in the next chunk.
            self.buf.extend_from_slice(&self.chunk);
            self.chunk.clear();
        }
        frame::split_frame(&mut self.buf, self.max_frame)
    }

    /// Reads one more chunk; `false` at a clean end.
    async fn fill(&mut self) -> Result<bool, StreamError> {
        match self.stream.read_chunk(READ_CHUNK, true).await? {
            Some(chunk) if self.buf.is_empty() => {
                self.chunk = chunk.bytes;
                Ok(true)
            }
            Some(chunk) => {
                self.buf.extend_from_slice(&chunk.bytes);
                Ok(true)
            }
            None if self.buf.is_empty() => Ok(false),
            None => Err(StreamError::Truncated),
        }
    }
}

/// Writes frames to one send stream, reusing its buffer between writes.
pub struct FrameWriter {
    stream: quinn::SendStream,
    buf: BytesMut,
}

impl FrameWriter {
    pub fn new(stream: quinn::SendStream) -> Self {
        FrameWriter {
            stream,
            buf: BytesMut::new(),
        }
    }

    pub fn into_stream(self) -> quinn::SendStream {
        self.stream
    }

    /// Sends all `frames` in one stream write.
    pub async fn send_all<'a, T: Serialize + 'a>(
        &mut self,
        frames: impl IntoIterator<Item = &'a T>,
    ) -> Result<(), StreamError> {
        for message in frames {
            frame::encode(message, &mut self.buf);
        }
        // Handed over whole, so quinn keeps it without copying it.
        self.stream.write_chunk(self.buf.split().freeze()).await?;
        Ok(())
    }

    pub async fn send<T: Serialize>(&mut self, message: &T) -> Result<(), StreamError> {
        self.send_all([message]).await
    }
}

/// Frames taken from a channel per write: enough to batch, few enough that
/// one write never holds a huge buffer.
const WRITE_BATCH: usize = 256;

/// A channel's receiving end, bounded or not.
pub trait Inbox<T>: Send {
    fn recv_many(
        &mut self,
        buf: &mut Vec<T>,
        limit: usize,
    ) -> impl std::future::Future<Output = usize> + Send;
}

impl<T: Send> Inbox<T> for mpsc::Receiver<T> {
    fn recv_many(
        &mut self,
        buf: &mut Vec<T>,
        limit: usize,
    ) -> impl std::future::Future<Output = usize> + Send {
        mpsc::Receiver::recv_many(self, buf, limit)
    }
}

impl<T: Send> Inbox<T> for mpsc::UnboundedReceiver<T> {
    fn recv_many(
        &mut self,
        buf: &mut Vec<T>,
        limit: usize,
    ) -> impl std::future::Future<Output = usize> + Send {
        mpsc::UnboundedReceiver::recv_many(self, buf, limit)
    }
}

/// Writes every message sent on `messages` to `stream`, as many per stream
/// write as are waiting. Ends when the channel closes or the stream fails.
pub async fn write_each<T: Serialize>(stream: quinn::SendStream, mut messages: impl Inbox<T>) {
    let mut writer = FrameWriter::new(stream);
    let mut batch = Vec::new();
    while messages.recv_many(&mut batch, WRITE_BATCH).await > 0 {
        if writer.send_all(&batch).await.is_err() {
            return;
        }
        batch.clear();
    }
}

/// Writes batches of frames to a unidirectional stream opened on the first
/// batch, and tells `written` each time some have gone out. Ends when the
/// channel closes or the connection fails.
pub async fn write_batches_on_uni<T: Serialize>(
    connection: quinn::Connection,
    mut batches: mpsc::Receiver<Vec<T>>,
    mut written: impl FnMut(&[Vec<T>]) + Send,
) {
    let mut writer = None;
    let mut pending = Vec::new();
    while batches.recv_many(&mut pending, WRITE_BATCH).await > 0 {
        let writer = match &mut writer {
            Some(writer) => writer,
            None => match connection.open_uni().await {
                Ok(stream) => writer.insert(FrameWriter::new(stream)),
                Err(_) => return,
            },
        };
        if writer.send_all(pending.iter().flatten()).await.is_err() {
            return;
        }
        written(&pending);
        pending.clear();
    }
}
