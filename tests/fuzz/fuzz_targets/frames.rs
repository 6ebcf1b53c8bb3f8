//! Any bytes as a stream: cut into chunks as quinn might hand them over,
//! split into frames with a small limit by `Frames` (as every stream reader
//! does), and each body decoded in place as the event-carrying messages
//! are. Nothing may panic, and an oversized header must be refused at once.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use treescale::wire::frame::{decode_shared, Frames};
use treescale::wire::{Delivery, FrameError, NodeEventFrame, NodeMessage, PublishFrame};

const LIMIT: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, stream)) = data.split_first() else {
        return;
    };
    let stream = Bytes::copy_from_slice(stream);
    let mut frames = Frames::new(LIMIT);
    // Chunks of 1 to 16 bytes, as the first byte says.
    let size = usize::from(cut % 16) + 1;
    let mut offset = 0;
    while offset < stream.len() {
        let end = (offset + size).min(stream.len());
        frames.push(stream.slice(offset..end));
        offset = end;
        loop {
            match frames.next() {
                Ok(Some(body)) => {
                    assert!(body.len() <= LIMIT);
                    let _ = decode_shared::<NodeMessage>(&body);
                    let _ = decode_shared::<NodeEventFrame>(&body);
                    let _ = decode_shared::<PublishFrame>(&body);
                    let _ = decode_shared::<Delivery>(&body);
                }
                Ok(None) => break,
                Err(FrameError::TooLarge { len, .. }) => {
                    assert!(len > LIMIT);
                    return;
                }
                Err(other) => panic!("Frames only refuses sizes: {other}"),
            }
        }
    }
});
