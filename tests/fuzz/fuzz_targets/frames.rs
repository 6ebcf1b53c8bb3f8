//! Any bytes as a stream: cut into chunks as quinn might hand them over,
//! split into frames with a small limit by `Frames` (as every stream reader
//! does), and each body decoded in place as the event-carrying messages
//! are. Nothing may panic, an oversized header must be refused at once,
//! and decoding a chunk's frames in place (`decode_into`, as batch readers
//! do) must give what decoding them one by one gives, up to the first
//! frame that fails.

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
    // Publish frames decoded one by one until one fails, and in place.
    let (mut one_by_one, mut failed) = (Vec::new(), false);
    let (mut in_place, mut in_place_frames) = (Vec::new(), Frames::new(LIMIT));
    let mut in_place_failed = false;
    // Chunks of 1 to 16 bytes, as the first byte says.
    let size = usize::from(cut % 16) + 1;
    let mut offset = 0;
    while offset < stream.len() {
        let end = (offset + size).min(stream.len());
        let chunk = stream.slice(offset..end);
        offset = end;
        if !in_place_failed {
            in_place_frames.push(chunk.clone());
            in_place_failed = in_place_frames
                .decode_into::<PublishFrame>(&mut in_place)
                .is_err();
        }
        frames.push(chunk);
        loop {
            match frames.next() {
                Ok(Some(body)) => {
                    assert!(body.len() <= LIMIT);
                    let _ = decode_shared::<NodeMessage>(&body);
                    let _ = decode_shared::<NodeEventFrame>(&body);
                    let _ = decode_shared::<Delivery>(&body);
                    match decode_shared::<PublishFrame>(&body) {
                        Ok(frame) if !failed => one_by_one.push(frame),
                        Ok(_) => {}
                        Err(_) => failed = true,
                    }
                }
                Ok(None) => break,
                Err(FrameError::TooLarge { len, .. }) => {
                    assert!(len > LIMIT);
                    assert!(in_place_failed, "in place, the same header is refused");
                    assert_eq!(in_place, one_by_one);
                    return;
                }
                Err(other) => panic!("Frames only refuses sizes: {other}"),
            }
        }
        assert_eq!(in_place_failed, failed, "both fail at the same frame");
        assert_eq!(in_place, one_by_one);
    }
});
