//! Any bytes as a stream: frames are split off with a small limit and each
//! body decoded as a node's control message, as a link's reader does.
//! Nothing may panic, and an oversized header must be refused at once.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use treescale::wire::frame::{decode, split_frame};
use treescale::wire::{FrameError, NodeMessage};

const LIMIT: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::new();
    // Fed in pieces of up to 7 bytes, as a stream arrives.
    for piece in data.chunks(7) {
        buf.extend_from_slice(piece);
        loop {
            match split_frame(&mut buf, LIMIT) {
                Ok(Some(body)) => {
                    assert!(body.len() <= LIMIT);
                    let _ = decode::<NodeMessage>(&body);
                }
                Ok(None) => break,
                Err(FrameError::TooLarge { len, .. }) => {
                    assert!(len > LIMIT);
                    return;
                }
                Err(other) => panic!("split_frame only refuses sizes: {other}"),
            }
        }
    }
});
