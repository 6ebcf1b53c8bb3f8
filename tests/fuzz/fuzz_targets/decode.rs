//! Any bytes as the body of a frame, for every message type a node or
//! client reads: decoding returns a message or an error, never panics, and
//! encoding a decoded message is stable across a round trip.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use treescale::wire::frame::{decode, encode};
use treescale::wire::{
    ClientReply, ClientRequest, Delivery, Message, NodeEventFrame, NodeMessage, PublishFrame,
    PublishReply,
};

fn canonical<T: Message>(body: &[u8]) {
    if let Ok(message) = decode::<T>(body) {
        let mut first = BytesMut::new();
        encode(&message, &mut first);
        let again: T = decode(&first[4..]).expect("a re-encoded message decodes");
        let mut second = BytesMut::new();
        encode(&again, &mut second);
        assert_eq!(first, second);
    }
}

fuzz_target!(|data: &[u8]| {
    canonical::<NodeMessage>(data);
    canonical::<NodeEventFrame>(data);
    canonical::<ClientRequest>(data);
    canonical::<ClientReply>(data);
    canonical::<PublishFrame>(data);
    canonical::<PublishReply>(data);
    canonical::<Delivery>(data);
});
