//! Length-prefixed framing.
//!
//! Every message on every stream is one frame: a 4-byte little-endian
//! length, then that many bytes of postcard. Decoding is split into a cheap
//! check of the header, which rejects oversized frames before any buffer
//! grows, and the parse of a complete frame.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::ErrorCode;

/// Size of the length prefix.
pub const HEADER_LEN: usize = 4;

/// Default largest frame body a peer may send: big enough for a 1 MiB event
/// plus its header fields.
pub const DEFAULT_MAX_FRAME: usize = 1024 * 1024 + 4096;

/// Why a byte sequence is not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("frame names an unknown message kind")]
    UnknownKind,
    #[error("frame does not decode: {0}")]
    Malformed(String),
}

impl FrameError {
    /// The QUIC application error code a connection is closed with.
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
            FrameError::UnknownKind => ErrorCode::UnknownMessage,
            FrameError::Malformed(_) => ErrorCode::MalformedFrame,
        }
    }
}

/// Appends `message` as one frame to `out`.
pub fn encode<T: Serialize>(message: &T, out: &mut BytesMut) {
    encode_with(out, |out| append(message, out));
}

/// Appends one frame to `out`, its body written by `body`.
pub fn encode_with(out: &mut BytesMut, body: impl FnOnce(&mut BytesMut)) {
    let start = out.len();
    out.put_u32_le(0);
    body(out);
    let len = u32::try_from(out.len() - start - HEADER_LEN)
        .expect("frame bodies are bounded well below 4 GiB");
    out[start..start + HEADER_LEN].copy_from_slice(&len.to_le_bytes());
}

/// Appends `value` in postcard to `out`, without a frame header.
pub fn append<T: Serialize + ?Sized>(value: &T, out: &mut BytesMut) {
    postcard::serialize_with_flavor(value, AppendTo(out))
        .expect("serializing into a growable buffer cannot fail");
}

/// A postcard output that appends to a `BytesMut` a slice at a time
/// (`to_extend` pushes byte by byte, which profiling showed was costly).
struct AppendTo<'a>(&'a mut BytesMut);

impl postcard::ser_flavors::Flavor for AppendTo<'_> {
    type Output = ();

    fn try_push(&mut self, byte: u8) -> postcard::Result<()> {
        self.0.put_u8(byte);
        Ok(())
    }

    fn try_extend(&mut self, bytes: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// Room to reserve for the next batch of frames, when a batch is cut once
/// it holds `limit` bytes and the last one held `last_len`. A cut batch
/// ends past the limit by part of its last frame; without room for that,
/// the buffer would grow by copying the whole batch once per batch.
pub fn batch_room(last_len: usize, limit: usize) -> usize {
    const LAST_FRAME_ROOM: usize = 4 << 10;
    if last_len >= limit {
        limit + LAST_FRAME_ROOM
    } else {
        last_len
    }
}

/// The body length a complete header at the start of `buf` announces.
pub fn body_len(buf: &[u8]) -> usize {
    u32::from_le_bytes(buf[..HEADER_LEN].try_into().expect("4 bytes")) as usize
}

/// The body length of the frame at the start of `buf` once all of it is
/// there. Errors as soon as the header announces more than `max` bytes.
pub fn complete_frame(buf: &[u8], max: usize) -> Result<Option<usize>, FrameError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = body_len(buf);
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok((buf.len() >= HEADER_LEN + len).then_some(len))
}

/// Takes the next complete frame's body out of `buf`, if one is there.
/// Errors as soon as the header announces more than `max` bytes, so a
/// hostile length never makes the buffer grow.
pub fn split_frame(buf: &mut BytesMut, max: usize) -> Result<Option<Bytes>, FrameError> {
    match complete_frame(buf, max)? {
        Some(len) => {
            buf.advance(HEADER_LEN);
            Ok(Some(buf.split_to(len).freeze()))
        }
        None => {
            if buf.len() >= HEADER_LEN {
                buf.reserve(HEADER_LEN + body_len(buf) - buf.len());
            }
            Ok(None)
        }
    }
}

/// Splits the chunks of one stream into frame bodies. A frame that lies
/// wholly within a chunk is a slice of it, not a copy; only a frame split
/// across chunks is copied, into `buf`, and only its own bytes.
pub struct Frames {
    /// What is left of the last chunk.
    chunk: Bytes,
    /// The start of a frame that continues in the next chunk.
    buf: BytesMut,
    max_frame: usize,
}

impl Frames {
    pub fn new(max_frame: usize) -> Self {
        Frames {
            chunk: Bytes::new(),
            buf: BytesMut::new(),
            max_frame,
        }
    }

    /// Adds the stream's next chunk; call once [`Frames::next`] has
    /// returned `None`.
    pub fn push(&mut self, chunk: Bytes) {
        debug_assert!(self.chunk.is_empty(), "the last chunk is used up");
        self.chunk = chunk;
    }

    /// Whether a frame has begun and not ended.
    pub fn mid_frame(&self) -> bool {
        !self.buf.is_empty() || !self.chunk.is_empty()
    }

    /// The next complete frame's body, if all of it has been pushed.
    /// Errors as soon as a header announces more than the limit.
    #[allow(clippy::should_implement_trait)] // fallible: not an Iterator
    pub fn next(&mut self) -> Result<Option<Bytes>, FrameError> {
        if !self.buf.is_empty() {
            return self.stitch();
        }
        if let Some(len) = complete_frame(&self.chunk, self.max_frame)? {
            let mut body = self.chunk.split_to(HEADER_LEN + len);
            body.advance(HEADER_LEN);
            return Ok(Some(body));
        }
        // A frame that goes on in the next chunk.
        self.buf.extend_from_slice(&self.chunk);
        self.chunk.clear();
        Ok(None)
    }

    /// Decodes every complete frame pushed so far into `out`, payloads as
    /// views (see [`super::shared`]), and uses the chunk up. The frames
    /// wholly inside the chunk are decoded where they lie, the chunk the
    /// source of all their views: a reference count taken per chunk, where
    /// one per frame (and a body split off) was ~2% of a node.
    pub fn decode_into<T: Message>(&mut self, out: &mut Vec<T>) -> Result<(), FrameError> {
        if !self.buf.is_empty() {
            match self.stitch()? {
                Some(body) => super::shared::with_source(&body, || decode_into(&body, out))?,
                None => return Ok(()),
            }
        }
        let chunk = std::mem::take(&mut self.chunk);
        if chunk.is_empty() {
            return Ok(());
        }
        let (mut rest, max) = (&chunk[..], self.max_frame);
        super::shared::with_source(&chunk, || {
            while let Some(len) = complete_frame(rest, max)? {
                decode_into(&rest[HEADER_LEN..HEADER_LEN + len], out)?;
                rest = &rest[HEADER_LEN + len..];
            }
            Ok::<_, FrameError>(())
        })?;
        // The start of a frame that goes on in the next chunk.
        self.buf.extend_from_slice(rest);
        Ok(())
    }

    /// The frame begun in `buf`, completed from the chunk if it can be.
    fn stitch(&mut self) -> Result<Option<Bytes>, FrameError> {
        // Take from the chunk only the straddling frame's own bytes, so
        // whatever follows it is read in place.
        while !self.chunk.is_empty() {
            let wanted = match complete_frame(&self.buf, self.max_frame)? {
                Some(_) => break,
                None if self.buf.len() < HEADER_LEN => HEADER_LEN,
                None => HEADER_LEN + body_len(&self.buf),
            };
            let take = (wanted - self.buf.len()).min(self.chunk.len());
            self.buf.extend_from_slice(&self.chunk.split_to(take));
        }
        split_frame(&mut self.buf, self.max_frame)
    }
}

/// A message enum carried in frames. Its postcard discriminant (a varint at
/// the start of the body) is the message kind; `KINDS` is how many exist, so
/// a kind from a newer peer is told apart from a garbled frame.
pub trait Message: Serialize + DeserializeOwned {
    const KINDS: u32;

    /// Appends the message to `out` when `body` is of a kind decoded by
    /// hand (see [`super::hot`]); `false` leaves it to postcard.
    fn decode_hot(_body: &[u8], _out: &mut Vec<Self>) -> bool {
        false
    }
}

/// Decodes one frame body received from the network: its payloads are
/// views of `body` (see [`super::shared`]), not copies.
pub fn decode_shared<T: Message>(body: &Bytes) -> Result<T, FrameError> {
    super::shared::with_source(body, || decode(body))
}

/// Decodes one frame body into `out`, by hand where it can.
fn decode_into<T: Message>(body: &[u8], out: &mut Vec<T>) -> Result<(), FrameError> {
    if !T::decode_hot(body, out) {
        out.push(decode(body)?);
    }
    Ok(())
}

/// Decodes one frame body. A body with bytes left over is malformed: a
/// frame holds exactly one message.
pub fn decode<T: Message>(body: &[u8]) -> Result<T, FrameError> {
    match postcard::take_from_bytes(body) {
        Ok((message, [])) => Ok(message),
        Ok((_, rest)) => Err(FrameError::Malformed(format!(
            "{} trailing bytes after the message",
            rest.len()
        ))),
        // An unknown kind is told apart once decoding has failed: checking
        // it first cost every frame a second call into postcard.
        Err(e) => match postcard::take_from_bytes::<u32>(body) {
            Ok((kind, _)) if kind >= T::KINDS => Err(FrameError::UnknownKind),
            _ => Err(FrameError::Malformed(e.to_string())),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Sample {
        Small(u8),
        Text(String),
    }

    impl Message for Sample {
        const KINDS: u32 = 2;
    }

    #[test]
    fn frames_round_trip_in_one_buffer() {
        let mut buf = BytesMut::new();
        encode(&Sample::Small(7), &mut buf);
        encode(&Sample::Text("hello".into()), &mut buf);
        let first = split_frame(&mut buf, 1024).unwrap().unwrap();
        let second = split_frame(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(decode::<Sample>(&first).unwrap(), Sample::Small(7));
        assert_eq!(
            decode::<Sample>(&second).unwrap(),
            Sample::Text("hello".into())
        );
        assert!(buf.is_empty());
        assert_eq!(split_frame(&mut buf, 1024).unwrap(), None);
    }

    #[test]
    fn frames_inside_a_chunk_are_read_in_place() {
        let mut stream = BytesMut::new();
        for text in ["first", "second", "third"] {
            encode(&Sample::Text(text.into()), &mut stream);
        }
        let stream = stream.freeze();
        let mut frames = Frames::new(1024);
        // The second frame straddles the two chunks.
        frames.push(stream.slice(..15));
        let first = frames.next().unwrap().unwrap();
        assert_eq!(first.as_ptr(), stream[HEADER_LEN..].as_ptr());
        assert_eq!(frames.next().unwrap(), None);
        assert!(frames.mid_frame());
        frames.push(stream.slice(15..));
        let second = frames.next().unwrap().unwrap();
        assert_eq!(
            decode::<Sample>(&second).unwrap(),
            Sample::Text("second".into())
        );
        let third = frames.next().unwrap().unwrap();
        assert_eq!(
            third.as_ptr(),
            stream[stream.len() - third.len()..].as_ptr()
        );
        assert_eq!(frames.next().unwrap(), None);
        assert!(!frames.mid_frame());
    }

    #[test]
    fn decoding_in_place_gives_what_frame_by_frame_decoding_gives() {
        let messages: Vec<Sample> = (0..20u8)
            .map(|i| match i % 3 {
                0 => Sample::Small(i),
                _ => Sample::Text("x".repeat(usize::from(i))),
            })
            .collect();
        let mut stream = BytesMut::new();
        for message in &messages {
            encode(message, &mut stream);
        }
        let stream = stream.freeze();
        // Every chunk size: frames inside chunks, across two, across many.
        for size in 1..=stream.len() {
            let mut frames = Frames::new(1024);
            let mut out: Vec<Sample> = Vec::new();
            for chunk in stream.chunks(size) {
                frames.push(stream.slice_ref(chunk));
                frames.decode_into(&mut out).unwrap();
            }
            assert_eq!(out, messages, "chunks of {size} bytes");
            assert!(!frames.mid_frame());
        }
    }

    #[test]
    fn payloads_decoded_in_place_are_views_of_their_chunk() {
        use crate::topic::Topic;
        use crate::wire::{EventId, PublishFrame, Published};
        let published = |seq| {
            PublishFrame::Event(Published {
                id: EventId { publisher: 1, seq },
                topic: Topic::new("a.b").unwrap(),
                headers: Vec::new(),
                payload: Bytes::from(vec![seq as u8; 100]),
            })
        };
        let mut stream = BytesMut::new();
        encode(&published(1), &mut stream);
        encode(&published(2), &mut stream);
        let stream = stream.freeze();
        let mut frames = Frames::new(1024);
        // The second frame straddles the chunks: it is copied, the first not.
        let cut = stream.len() - 10;
        let mut out = Vec::new();
        frames.push(stream.slice(..cut));
        frames.decode_into(&mut out).unwrap();
        frames.push(stream.slice(cut..));
        frames.decode_into(&mut out).unwrap();
        let payloads: Vec<&Bytes> = out
            .iter()
            .map(|frame| match frame {
                PublishFrame::Event(event) => &event.payload,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(out, [published(1), published(2)]);
        let inside = |payload: &Bytes| stream.as_ptr_range().contains(&payload.as_ptr());
        assert!(inside(payloads[0]));
        assert!(!inside(payloads[1]));
    }

    #[test]
    fn partial_frames_wait_for_more_bytes() {
        let mut whole = BytesMut::new();
        encode(&Sample::Text("abcdef".into()), &mut whole);
        let mut buf = BytesMut::new();
        for (i, byte) in whole.iter().enumerate() {
            buf.put_u8(*byte);
            let got = split_frame(&mut buf, 1024).unwrap();
            assert_eq!(got.is_some(), i + 1 == whole.len());
        }
    }

    #[test]
    fn oversized_header_is_rejected_before_the_body_arrives() {
        let mut buf = BytesMut::new();
        buf.put_u32_le(10_000_000);
        let err = split_frame(&mut buf, 1024).unwrap_err();
        assert_eq!(
            err,
            FrameError::TooLarge {
                len: 10_000_000,
                max: 1024
            }
        );
        assert_eq!(err.code(), ErrorCode::FrameTooLarge);
        assert!(buf.capacity() < 1024, "buffer grew for a rejected frame");
    }

    #[test]
    fn a_frame_exactly_at_the_limit_is_accepted() {
        let mut buf = BytesMut::new();
        encode(&Sample::Text("x".repeat(100)), &mut buf);
        let len = buf.len() - HEADER_LEN;
        assert!(split_frame(&mut buf.clone(), len).unwrap().is_some());
        assert!(split_frame(&mut buf, len - 1).is_err());
    }

    #[test]
    fn unknown_kind_and_garbage_are_told_apart() {
        assert_eq!(decode::<Sample>(&[9, 0]), Err(FrameError::UnknownKind));
        assert_eq!(
            decode::<Sample>(&[0x80, 0x01]),
            Err(FrameError::UnknownKind)
        );
        assert!(matches!(
            decode::<Sample>(&[1, 200]),
            Err(FrameError::Malformed(_))
        ));
        assert!(matches!(
            decode::<Sample>(&[0, 1, 2]),
            Err(FrameError::Malformed(_))
        ));
        assert!(matches!(
            decode::<Sample>(&[]),
            Err(FrameError::Malformed(_))
        ));
    }
}
