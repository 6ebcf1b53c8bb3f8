//! Hand-written codecs for the frames that carry nearly every event.
//!
//! Decoded by hand: a client's [`PublishFrame::Event`], a link's
//! [`NodeEventFrame::Event`] without queue groups, and a node's
//! [`Delivery::Event`] to its client. Through serde, postcard builds a
//! message field by field in visitor calls and moves it between them;
//! these read the same bytes straight into the batch being decoded. They
//! only ever accept: anything they do not handle, or do not like, they
//! leave (`false`) for postcard to decode, so errors and rare shapes keep
//! one source of truth.
//!
//! Encoded by hand: [`NodeEventFrame::Event`] and [`Delivery::Event`],
//! from a borrowed event, so a node sending one event to several
//! destinations neither clones it nor moves it into a message per
//! destination.
//!
//! Property tests hold both directions to postcard's bytes and results;
//! docs/performance.md has the measurements.

use bytes::{BufMut, BytesMut};

use super::frame;
use super::messages::{
    Delivery, Event, EventId, GroupKey, NodeEventFrame, PublishFrame, Published,
};
use super::shared::view;
use crate::identity::NodeId;
use crate::topic::Topic;

/// Postcard's discriminant of the three: each is its enum's first variant.
const FIRST_VARIANT: u8 = 0;

/// Appends `body` to `out` as a [`PublishFrame::Event`] when it is one.
/// Each decoder builds its message in the push, so it is written once, in
/// place (returned, it was moved three times on its way into the batch).
pub(crate) fn publish_event(body: &[u8], out: &mut Vec<PublishFrame>) -> bool {
    let last_topic = match out.last() {
        Some(PublishFrame::Event(published)) => Some(&published.topic),
        _ => None,
    };
    let read = || {
        let mut reader = Reader(body.strip_prefix(&[FIRST_VARIANT])?);
        let fields = (
            reader.event_id()?,
            reader.topic(last_topic)?,
            reader.headers()?,
            reader.bytes()?,
        );
        reader.0.is_empty().then_some(fields)
    };
    let Some((id, topic, headers, payload)) = read() else {
        return false;
    };
    out.push(PublishFrame::Event(Published {
        id,
        topic,
        headers,
        payload: view(payload),
    }));
    true
}

/// Appends `body` to `out` as a [`NodeEventFrame::Event`] for no queue
/// group when it is one.
pub(crate) fn node_event(body: &[u8], out: &mut Vec<NodeEventFrame>) -> bool {
    let last_topic = match out.last() {
        Some(NodeEventFrame::Event { event, .. }) => Some(&event.topic),
        _ => None,
    };
    let read = || {
        let mut reader = Reader(body.strip_prefix(&[FIRST_VARIANT])?);
        let fields = reader.event_fields(last_topic)?;
        let no_groups = reader.length()? == 0;
        (no_groups && reader.0.is_empty()).then_some(fields)
    };
    let Some(fields) = read() else {
        return false;
    };
    out.push(NodeEventFrame::Event {
        event: fields.into_event(),
        groups: Vec::new(),
    });
    true
}

/// Appends `body` to `out` as a [`Delivery::Event`] when it is one.
pub(crate) fn delivery_event(body: &[u8], out: &mut Vec<Delivery>) -> bool {
    let last_topic = match out.last() {
        Some(Delivery::Event { event, .. }) => Some(&event.topic),
        _ => None,
    };
    let read = || {
        let mut reader = Reader(body.strip_prefix(&[FIRST_VARIANT])?);
        let sub = reader.varint()?;
        let fields = reader.event_fields(last_topic)?;
        reader.0.is_empty().then_some((sub, fields))
    };
    let Some((sub, fields)) = read() else {
        return false;
    };
    out.push(Delivery::Event {
        sub,
        event: fields.into_event(),
    });
    true
}

/// An event's fields as read, borrowing the frame until the event is made.
struct EventFields<'a> {
    id: EventId,
    origin: &'a [u8; 32],
    topic: Topic,
    headers: Vec<(String, String)>,
    payload: &'a [u8],
}

impl EventFields<'_> {
    fn into_event(self) -> Event {
        Event {
            id: self.id,
            origin: NodeId::from_bytes(*self.origin),
            topic: self.topic,
            headers: self.headers,
            payload: view(self.payload),
            reply: None,
        }
    }
}

/// Appends [`NodeEventFrame::Event`] `{ event, groups }` to `out` as one
/// frame.
pub(crate) fn encode_node_event(event: &Event, groups: &[GroupKey], out: &mut BytesMut) {
    debug_assert!(
        event.reply.is_none(),
        "a request goes as NodeEventFrame::Request"
    );
    frame::encode_with(out, |out| {
        out.put_u8(FIRST_VARIANT);
        put_event(event, out);
        if groups.is_empty() {
            put_varint(0, out);
        } else {
            frame::append(groups, out);
        }
    });
}

/// Appends [`Delivery::Event`] `{ sub, event }` to `out` as one frame.
pub(crate) fn encode_delivery_event(sub: u64, event: &Event, out: &mut BytesMut) {
    debug_assert!(event.reply.is_none(), "a request goes as Delivery::Request");
    frame::encode_with(out, |out| {
        out.put_u8(FIRST_VARIANT);
        put_varint(sub, out);
        put_event(event, out);
    });
}

/// An [`Event`]'s fields in order (its reply address is not encoded).
fn put_event(event: &Event, out: &mut BytesMut) {
    put_varint(event.id.publisher, out);
    put_varint(event.id.seq, out);
    put_bytes(event.origin.as_bytes(), out);
    put_bytes(event.topic.as_str().as_bytes(), out);
    put_varint(event.headers.len() as u64, out);
    for (key, value) in &event.headers {
        put_bytes(key.as_bytes(), out);
        put_bytes(value.as_bytes(), out);
    }
    put_bytes(&event.payload, out);
}

fn put_varint(mut value: u64, out: &mut BytesMut) {
    if value < 0x80 {
        return out.put_u8(value as u8);
    }
    let mut bytes = [0u8; 10];
    let mut len = 0;
    while value >= 0x80 {
        bytes[len] = value as u8 | 0x80;
        value >>= 7;
        len += 1;
    }
    bytes[len] = value as u8;
    out.extend_from_slice(&bytes[..=len]);
}

/// A length-prefixed byte string, as postcard writes `str` and `[u8]`.
fn put_bytes(bytes: &[u8], out: &mut BytesMut) {
    put_varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// What is left of a frame body, read front to back as postcard wrote it.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    /// A `u64` as postcard reads one.
    fn varint(&mut self) -> Option<u64> {
        self.varint_of(u64::BITS)
    }

    /// A length, a `usize` as postcard reads one on this platform.
    fn length(&mut self) -> Option<usize> {
        usize::try_from(self.varint_of(usize::BITS)?).ok()
    }

    /// A varint of an integer of `bits` bits, as postcard reads it: at
    /// most as many bytes as the bits need, the last holding no bits past
    /// them.
    fn varint_of(&mut self, bits: u32) -> Option<u64> {
        let max_bytes = bits.div_ceil(7) as usize;
        let max_last = (1u8 << (bits % 7)) - 1;
        let mut value = 0u64;
        for (i, &byte) in self.0.iter().enumerate().take(max_bytes) {
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                if i == max_bytes - 1 && byte > max_last {
                    return None;
                }
                self.0 = &self.0[i + 1..];
                return Some(value);
            }
        }
        None
    }

    fn take(&mut self, len: usize) -> Option<&'a [u8]> {
        if len > self.0.len() {
            return None;
        }
        let (taken, rest) = self.0.split_at(len);
        self.0 = rest;
        Some(taken)
    }

    /// A length-prefixed byte string.
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = self.length()?;
        self.take(len)
    }

    fn str(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.bytes()?).ok()
    }

    fn event_id(&mut self) -> Option<EventId> {
        Some(EventId {
            publisher: self.varint()?,
            seq: self.varint()?,
        })
    }

    fn event_fields(&mut self, last_topic: Option<&Topic>) -> Option<EventFields<'a>> {
        Some(EventFields {
            id: self.event_id()?,
            origin: self.bytes()?.try_into().ok()?,
            topic: self.topic(last_topic)?,
            headers: self.headers()?,
            payload: self.bytes()?,
        })
    }

    /// Events in a row mostly share their topic: one equal to the last
    /// frame's is cloned, not checked and built again.
    fn topic(&mut self, last: Option<&Topic>) -> Option<Topic> {
        let name = self.bytes()?;
        match last {
            Some(topic) if topic.as_str().as_bytes() == name => Some(topic.clone()),
            _ => Topic::parse(std::str::from_utf8(name).ok()?).ok(),
        }
    }

    fn headers(&mut self) -> Option<Vec<(String, String)>> {
        /// Room reserved up front: a hostile count in a large frame must
        /// not reserve far more than the frame holds (each header is 48
        /// bytes here and at least 2 on the wire).
        const ROOM: usize = 16;
        let count = self.length()?;
        let mut headers = Vec::with_capacity(count.min(ROOM));
        for _ in 0..count {
            headers.push((self.str()?.to_owned(), self.str()?.to_owned()));
        }
        Some(headers)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use proptest::prelude::*;

    use super::*;
    use crate::wire::frame::HEADER_LEN;
    use crate::wire::Message;

    fn frame_of<T: Message>(message: &T) -> BytesMut {
        let mut buf = BytesMut::new();
        frame::encode(message, &mut buf);
        buf
    }

    fn body_of<T: Message>(message: &T) -> Vec<u8> {
        frame_of(message)[HEADER_LEN..].to_vec()
    }

    fn frame_by(encode: impl FnOnce(&mut BytesMut)) -> BytesMut {
        let mut buf = BytesMut::new();
        encode(&mut buf);
        buf
    }

    /// What a hand decoder makes of `body`, or `None` when it leaves it.
    fn by_hand<T>(decode: fn(&[u8], &mut Vec<T>) -> bool, body: &[u8]) -> Option<T> {
        let mut out = Vec::new();
        let taken = decode(body, &mut out);
        assert_eq!(
            out.len(),
            usize::from(taken),
            "one message for a frame taken, none else"
        );
        out.pop()
    }

    /// What postcard makes of `body`, or `None` when it refuses it.
    fn by_postcard<T: Message>(body: &[u8]) -> Option<T> {
        match postcard::take_from_bytes::<T>(body) {
            Ok((message, [])) => Some(message),
            _ => None,
        }
    }

    fn topic() -> impl Strategy<Value = String> {
        // Valid and invalid: empty tokens, wildcards, spaces, non-ASCII.
        prop::collection::vec(
            prop::sample::select(vec!["a", "bb", "é", "*", ">", "", "x y", "orders"]),
            1..5,
        )
        .prop_map(|tokens| tokens.join("."))
    }

    fn published() -> impl Strategy<Value = Published> {
        (
            any::<u64>(),
            any::<u64>(),
            topic().prop_filter_map("a valid topic", |t| Topic::new(t).ok()),
            prop::collection::vec((".{0,4}", ".{0,4}"), 0..3),
            prop::collection::vec(any::<u8>(), 0..300),
        )
            .prop_map(|(publisher, seq, topic, headers, payload)| Published {
                id: EventId { publisher, seq },
                topic,
                headers,
                payload: Bytes::from(payload),
            })
    }

    fn event() -> impl Strategy<Value = Event> {
        (published(), any::<[u8; 32]>())
            .prop_map(|(published, origin)| published.at(NodeId::from_bytes(origin)))
    }

    /// No queue group, or one.
    fn groups() -> impl Strategy<Value = Vec<GroupKey>> {
        any::<bool>().prop_map(|grouped| {
            let group = GroupKey {
                pattern: crate::topic::Pattern::new("a.>").unwrap(),
                group: "workers".into(),
            };
            if grouped {
                vec![group]
            } else {
                Vec::new()
            }
        })
    }

    fn node_frame() -> impl Strategy<Value = NodeEventFrame> {
        (event(), groups()).prop_map(|(event, groups)| NodeEventFrame::Event { event, groups })
    }

    /// `body` with one byte changed, some cut off, or a topic swapped in:
    /// what a hostile or broken peer might send.
    fn damaged(mut body: Vec<u8>, at: usize, byte: u8, cut: bool) -> Vec<u8> {
        if body.is_empty() {
            return body;
        }
        let at = at % body.len();
        if cut {
            body.truncate(at);
        } else {
            body[at] = byte;
        }
        body
    }

    proptest! {
        /// A frame the fast path takes decodes to what postcard makes of
        /// it, and every event frame it should take, it takes.
        #[test]
        fn publish_events_decode_as_postcard_decodes_them(
            event in published(),
            at in any::<usize>(),
            byte in any::<u8>(),
            cut in any::<bool>(),
        ) {
            let body = body_of(&PublishFrame::Event(event.clone()));
            prop_assert_eq!(by_hand(publish_event, &body), Some(PublishFrame::Event(event)));
            let body = damaged(body, at, byte, cut);
            if let Some(fast) = by_hand(publish_event, &body) {
                prop_assert_eq!(Some(fast), by_postcard::<PublishFrame>(&body));
            }
        }

        #[test]
        fn node_events_decode_as_postcard_decodes_them(
            message in node_frame(),
            at in any::<usize>(),
            byte in any::<u8>(),
            cut in any::<bool>(),
        ) {
            let body = body_of(&message);
            let grouped = matches!(&message, NodeEventFrame::Event { groups, .. } if !groups.is_empty());
            let expected = (!grouped).then_some(message);
            prop_assert_eq!(by_hand(node_event, &body), expected);
            let body = damaged(body, at, byte, cut);
            if let Some(fast) = by_hand(node_event, &body) {
                prop_assert_eq!(Some(fast), by_postcard::<NodeEventFrame>(&body));
            }
        }

        #[test]
        fn deliveries_decode_as_postcard_decodes_them(
            sub in any::<u64>(),
            event in event(),
            at in any::<usize>(),
            byte in any::<u8>(),
            cut in any::<bool>(),
        ) {
            let delivery = Delivery::Event { sub, event };
            let body = body_of(&delivery);
            prop_assert_eq!(by_hand(delivery_event, &body), Some(delivery));
            let body = damaged(body, at, byte, cut);
            if let Some(fast) = by_hand(delivery_event, &body) {
                prop_assert_eq!(Some(fast), by_postcard::<Delivery>(&body));
            }
        }

        /// Frames decoded one after another into a batch, their topics often
        /// the same as the last one's, come out as they went in.
        #[test]
        fn a_batch_of_frames_decodes_frame_by_frame(events in prop::collection::vec(event(), 1..8)) {
            let sent: Vec<(PublishFrame, NodeEventFrame, Delivery)> = events
                .into_iter()
                .enumerate()
                .map(|(sub, event)| {
                    let published = PublishFrame::Event(Published {
                        id: event.id,
                        topic: event.topic.clone(),
                        headers: event.headers.clone(),
                        payload: event.payload.clone(),
                    });
                    let node_frame = NodeEventFrame::Event { event: event.clone(), groups: Vec::new() };
                    (published, node_frame, Delivery::Event { sub: sub as u64, event })
                })
                .collect();
            let (mut published, mut node_frames, mut deliveries) = (Vec::new(), Vec::new(), Vec::new());
            for (publish, node_frame, delivery) in &sent {
                prop_assert!(publish_event(&body_of(publish), &mut published));
                prop_assert!(node_event(&body_of(node_frame), &mut node_frames));
                prop_assert!(delivery_event(&body_of(delivery), &mut deliveries));
            }
            let received: Vec<_> = published.into_iter().zip(node_frames).zip(deliveries).map(|((p, n), d)| (p, n, d)).collect();
            prop_assert_eq!(received, sent);
        }

        /// The hand encoders write the bytes postcard writes.
        #[test]
        fn event_frames_encode_as_postcard_encodes_them(
            event in event(),
            groups in groups(),
            sub in any::<u64>(),
        ) {
            let node_frame = frame_by(|out| encode_node_event(&event, &groups, out));
            let delivery = frame_by(|out| encode_delivery_event(sub, &event, out));
            prop_assert_eq!(delivery, frame_of(&Delivery::Event { sub, event: event.clone() }));
            prop_assert_eq!(node_frame, frame_of(&NodeEventFrame::Event { event, groups }));
        }

        /// A topic that is not valid leaves the frame to postcard, which
        /// refuses it with the topic's error.
        #[test]
        fn invalid_topics_are_left_to_postcard(name in topic(), payload in any::<u8>()) {
            let mut body = postcard::to_extend(&name, vec![FIRST_VARIANT, 1, 2]).unwrap();
            body.extend([0, 1, payload]);
            let fast = by_hand(publish_event, &body);
            prop_assert_eq!(fast.is_some(), Topic::new(name.as_str()).is_ok());
            prop_assert_eq!(fast, by_postcard::<PublishFrame>(&body));
        }

        #[test]
        fn varints_write_as_postcard_writes_them(value in any::<u64>()) {
            let mut out = BytesMut::new();
            put_varint(value, &mut out);
            prop_assert_eq!(&out[..], &postcard::to_allocvec(&value).unwrap()[..]);
        }

        /// Varints as postcard reads them: overlong ones, the last byte's
        /// limit, and ones that run off the end, for 64 bits and for 32 (a
        /// length on a 32-bit platform).
        #[test]
        fn varints_read_as_postcard_reads_them(bytes in prop::collection::vec(any::<u8>(), 0..12)) {
            let fast = Reader(&bytes).varint();
            let postcard = postcard::take_from_bytes::<u64>(&bytes).ok().map(|(v, _)| v);
            prop_assert_eq!(fast, postcard);
            let fast = Reader(&bytes).varint_of(u32::BITS);
            let postcard = postcard::take_from_bytes::<u32>(&bytes).ok().map(|(v, _)| u64::from(v));
            prop_assert_eq!(fast, postcard);
        }
    }

    #[test]
    fn a_hostile_header_count_is_refused_without_allocating_for_it() {
        let body = postcard::to_extend(&u64::MAX, vec![FIRST_VARIANT, 1, 2, 1, b'a']).unwrap();
        assert_eq!(by_hand(publish_event, &body), None);
    }
}
