//! Byte strings decoded as views of the frame they arrived in, not copies.
//!
//! Profiling showed a payload copy and an allocation per event on every
//! hop. While [`with_source`] runs, a byte string borrowed from the frame
//! body (or from the received chunk a batch of frames lies in) becomes a
//! slice of that `Bytes` (a reference count, no copy);
//! decoded from anything else (the store's pages, a plain slice) it is
//! copied as before. A view keeps the whole receive buffer it lies in
//! alive, so whatever holds events for long calls `Event::compact` first.

use std::cell::Cell;
use std::fmt;

use bytes::Bytes;
use serde::de::{self, Deserializer, Visitor};

thread_local! {
    /// The frame body, or chunk of frames, being decoded on this thread.
    static SOURCE: Cell<Option<Bytes>> = const { Cell::new(None) };
}

/// Runs `decode` with `body` (a frame body or a chunk of frames) as the
/// buffer views may point into.
pub fn with_source<R>(body: &Bytes, decode: impl FnOnce() -> R) -> R {
    let outer = SOURCE.replace(Some(body.clone()));
    let result = decode();
    SOURCE.set(outer);
    result
}

/// `slice` as a view of the current source when it lies inside it, else a
/// copy.
pub fn view(slice: &[u8]) -> Bytes {
    let source = SOURCE.take();
    let bytes = match &source {
        Some(body) if contains(body, slice) => body.slice_ref(slice),
        _ => Bytes::copy_from_slice(slice),
    };
    SOURCE.set(source);
    bytes
}

fn contains(body: &[u8], slice: &[u8]) -> bool {
    let outer = body.as_ptr_range();
    let inner = slice.as_ptr_range();
    outer.start <= inner.start && inner.end <= outer.end
}

/// Deserializes a byte string as a view where it can (serde
/// `deserialize_with`).
pub fn bytes<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Bytes, D::Error> {
    deserializer.deserialize_bytes(ViewVisitor)
}

struct ViewVisitor;

impl<'de> Visitor<'de> for ViewVisitor {
    type Value = Bytes;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a byte string")
    }

    fn visit_borrowed_bytes<E: de::Error>(self, v: &'de [u8]) -> Result<Bytes, E> {
        Ok(view(v))
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Bytes, E> {
        Ok(Bytes::copy_from_slice(v))
    }

    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Bytes, E> {
        Ok(Bytes::from(v))
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Bytes, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(byte) = seq.next_element()? {
            out.push(byte);
        }
        Ok(Bytes::from(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inside_the_source_a_slice_is_a_view_and_outside_a_copy() {
        let body = Bytes::from(b"0123456789".to_vec());
        let (inside, outside) = with_source(&body, || (view(&body[2..5]), view(b"234")));
        assert_eq!(inside, "234");
        assert_eq!(inside.as_ptr(), body[2..].as_ptr());
        assert_eq!(outside, "234");
        assert!(!contains(&body, &outside));
        // Without a source, everything is copied.
        assert_ne!(view(&body[2..5]).as_ptr(), body[2..].as_ptr());
    }

    #[test]
    fn a_nested_source_is_restored() {
        let (outer, inner) = (Bytes::from_static(b"outer"), Bytes::from_static(b"inner"));
        with_source(&outer, || {
            with_source(&inner, || ());
            assert_eq!(view(&outer[1..3]).as_ptr(), outer[1..].as_ptr());
        });
    }
}
