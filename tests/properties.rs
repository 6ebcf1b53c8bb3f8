//! Properties of what the network feeds a node: any bytes at all decode to
//! a message or to an error (never a panic), encoding a decoded message is
//! stable across a round trip, frames come out the same however the
//! stream is cut, and
//! topic patterns match exactly as a plain reference matcher says.

use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;
use treescale::topic::{Pattern, Topic};
use treescale::wire::frame::{decode, decode_shared, encode, split_frame, Frames};
use treescale::wire::{
    ClientReply, ClientRequest, Delivery, FrameError, Message, NodeEventFrame, NodeMessage,
    PublishFrame, PublishReply,
};

/// Decoding never panics; a message that decodes encodes to a body that
/// decodes to a message with the same encoding. Decoding in place (as a
/// node reads the network) gives what decoding by copying does.
fn decodes_canonically<T: Message + PartialEq + std::fmt::Debug>(body: &[u8]) {
    let copied = decode::<T>(body);
    let shared = decode_shared::<T>(&Bytes::copy_from_slice(body));
    assert_eq!(copied, shared);
    if let Ok(message) = copied {
        let mut first = BytesMut::new();
        encode(&message, &mut first);
        let again: T = decode(&first[4..]).expect("a re-encoded message decodes");
        let mut second = BytesMut::new();
        encode(&again, &mut second);
        assert_eq!(first, second);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn any_bytes_decode_or_fail_cleanly(body in prop::collection::vec(any::<u8>(), 0..300)) {
        decodes_canonically::<NodeMessage>(&body);
        decodes_canonically::<NodeEventFrame>(&body);
        decodes_canonically::<ClientRequest>(&body);
        decodes_canonically::<ClientReply>(&body);
        decodes_canonically::<PublishFrame>(&body);
        decodes_canonically::<PublishReply>(&body);
        decodes_canonically::<Delivery>(&body);
    }

    /// Bytes that start like a real message: a valid kind, then noise.
    #[test]
    fn noise_after_a_valid_kind_fails_cleanly(
        kind in 0u8..16,
        rest in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        let mut body = vec![kind];
        body.extend(rest);
        decodes_canonically::<NodeMessage>(&body);
        decodes_canonically::<ClientRequest>(&body);
        decodes_canonically::<PublishFrame>(&body);
    }

    #[test]
    fn frames_are_the_same_however_the_stream_is_cut(
        bodies in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..8),
        cuts in prop::collection::vec(1usize..40, 1..20),
    ) {
        let mut stream = Vec::new();
        for body in &bodies {
            stream.put_u32_le(body.len() as u32);
            stream.extend_from_slice(body);
        }
        let stream = Bytes::from(stream);
        let (mut buf, mut frames) = (BytesMut::new(), Frames::new(64));
        let (mut got, mut got_in_chunks) = (Vec::new(), Vec::new());
        let mut rest = stream.clone();
        let mut cut = cuts.iter().cycle();
        while !rest.is_empty() {
            let n = (*cut.next().unwrap()).min(rest.len());
            let chunk = rest.split_to(n);
            buf.extend_from_slice(&chunk);
            while let Some(frame) = split_frame(&mut buf, 64).unwrap() {
                got.push(frame.to_vec());
            }
            frames.push(chunk);
            while let Some(frame) = frames.next().unwrap() {
                got_in_chunks.push(frame.to_vec());
            }
        }
        prop_assert_eq!(&got, &bodies);
        prop_assert!(buf.is_empty());
        prop_assert_eq!(&got_in_chunks, &bodies);
        prop_assert!(!frames.mid_frame());
    }

    #[test]
    fn a_frame_over_the_limit_is_refused_from_its_header(len in 65u32..u32::MAX) {
        let mut buf = BytesMut::new();
        buf.put_u32_le(len);
        let refused = matches!(split_frame(&mut buf, 64), Err(FrameError::TooLarge { .. }));
        prop_assert!(refused);
        // Nothing was reserved for the announced length.
        prop_assert!(buf.capacity() < 1024);
    }

    #[test]
    fn patterns_match_as_the_reference_says(
        topic in topic_tokens(),
        pattern in pattern_tokens(),
    ) {
        let t = Topic::new(topic.join(".")).unwrap();
        let p = Pattern::new(pattern.join(".")).unwrap();
        let topic_refs: Vec<&str> = topic.iter().map(String::as_str).collect();
        let pattern_refs: Vec<&str> = pattern.iter().map(String::as_str).collect();
        prop_assert_eq!(p.matches(&t), reference(&pattern_refs, &topic_refs));
    }

    /// `covers` is what subscribe permissions rest on: it must hold exactly
    /// when every topic the narrower pattern matches, the wider one matches
    /// too. Topics one token longer than any pattern witness every case.
    #[test]
    fn covers_means_matching_everything_the_other_matches(
        wider in pattern_tokens(),
        narrower in pattern_tokens(),
    ) {
        let wider = Pattern::new(wider.join(".")).unwrap();
        let narrower = Pattern::new(narrower.join(".")).unwrap();
        let every_topic_too = all_topics(6)
            .iter()
            .all(|t| !narrower.matches(t) || wider.matches(t));
        prop_assert_eq!(wider.covers(&narrower), every_topic_too);
    }

    #[test]
    fn arbitrary_text_is_a_topic_or_a_clear_error(text in ".{0,40}") {
        // Either is fine; neither may panic, and a topic never has wildcards.
        if let Ok(topic) = Topic::new(text.clone()) {
            prop_assert!(!topic.as_str().contains('*') && !topic.as_str().contains('>'));
        }
        let _ = Pattern::new(text);
    }
}

/// The matching rules, stated plainly: `*` is one token, a final `>` one
/// or more.
fn reference(pattern: &[&str], topic: &[&str]) -> bool {
    match (pattern.split_first(), topic.split_first()) {
        (Some((&">", _)), Some(_)) => true,
        (Some((&"*", p)), Some((_, t))) => reference(p, t),
        (Some((literal, p)), Some((token, t))) => literal == token && reference(p, t),
        (None, None) => true,
        _ => false,
    }
}

/// Every topic of 1 to `longest` tokens from `a`, `b` and `c` (a token no
/// pattern names).
fn all_topics(longest: usize) -> Vec<Topic> {
    let mut all = Vec::new();
    let mut layer = vec![String::new()];
    for _ in 0..longest {
        layer = layer
            .iter()
            .flat_map(|prefix| {
                ["a", "b", "c"].map(|t| match prefix.is_empty() {
                    true => t.to_string(),
                    false => format!("{prefix}.{t}"),
                })
            })
            .collect();
        all.extend(layer.iter().map(|t| Topic::new(t.clone()).unwrap()));
    }
    all
}

/// A small alphabet, so that matches are common.
fn topic_tokens() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(prop::sample::select(vec!["a", "b", "c"]), 1..6)
        .prop_map(|t| t.into_iter().map(String::from).collect())
}

fn pattern_tokens() -> impl Strategy<Value = Vec<String>> {
    (
        prop::collection::vec(prop::sample::select(vec!["a", "b", "*"]), 1..6),
        any::<bool>(),
    )
        .prop_map(|(tokens, tail)| {
            let mut tokens: Vec<String> = tokens.into_iter().map(String::from).collect();
            if tail {
                *tokens.last_mut().expect("at least one token") = ">".to_string();
            }
            tokens
        })
}

/// The fuzzers' corpora (tests/fuzz/corpus), replayed on every test run:
/// inputs that once found new paths, and any crash kept as a regression.
#[test]
fn the_fuzz_corpora_replay_cleanly() {
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz/corpus");
    let mut replayed = 0;
    for target in ["decode", "frames"] {
        for entry in std::fs::read_dir(corpus.join(target)).unwrap() {
            let data = std::fs::read(entry.unwrap().path()).unwrap();
            decodes_canonically::<NodeMessage>(&data);
            decodes_canonically::<NodeEventFrame>(&data);
            decodes_canonically::<ClientRequest>(&data);
            decodes_canonically::<ClientReply>(&data);
            decodes_canonically::<PublishFrame>(&data);
            decodes_canonically::<PublishReply>(&data);
            decodes_canonically::<Delivery>(&data);
            let mut buf = BytesMut::from(&data[..]);
            while let Ok(Some(body)) = split_frame(&mut buf, 4096) {
                let _ = decode::<NodeMessage>(&body);
            }
            replayed += 1;
        }
    }
    assert!(replayed > 100, "only {replayed} corpus inputs");
}
