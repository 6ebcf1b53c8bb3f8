//! docs/protocol.md is what clients in other languages are written from:
//! every constant it states must be the code's. (A client filtering mDNS on
//! the documented `v` once found no node, because the doc said 1.)

use treescale::discovery::{txt_record, Announcement};
use treescale::wire::{ErrorCode, CLIENT_ALPN, DEFAULT_MAX_FRAME, NODE_ALPN, PROTOCOL_VERSION};
use treescale::NodeId;

const DOC: &str = include_str!("../docs/protocol.md");

/// The digits that follow each occurrence of `marker` in the doc.
fn numbers_after(marker: &str) -> Vec<&'static str> {
    DOC.match_indices(marker)
        .map(|(at, _)| {
            let rest = &DOC[at + marker.len()..];
            let end = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .collect()
}

#[test]
fn every_mention_of_the_current_version_is_the_code_s() {
    let version = PROTOCOL_VERSION.to_string();
    for marker in [
        "# The TreeScale wire protocol, version ",
        "with `version` ",
        "Hello { version: ",
        "| `v` | the protocol version, `",
    ] {
        let found = numbers_after(marker);
        assert!(!found.is_empty(), "protocol.md no longer says {marker:?}");
        for number in found {
            assert_eq!(
                number, version,
                "protocol.md: {marker:?} names another version"
            );
        }
    }
}

#[test]
fn the_mdns_txt_table_lists_exactly_what_a_node_announces() {
    let id = NodeId::from_bytes([7; 32]);
    let announced = txt_record(&Announcement {
        id,
        name: "n".into(),
        cluster: "c".into(),
        ca: "f".into(),
        addr: "127.0.0.1:7700".parse().unwrap(),
        root: id,
    });
    let table = &DOC[DOC.find("TXT entries:").expect("the TXT table")..];
    let documented: Vec<&str> = table
        .lines()
        .skip_while(|l| !l.starts_with("| key"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|l| l.split('`').nth(1).expect("a key in backquotes"))
        .collect();
    let keys: Vec<&str> = announced.iter().map(|(k, _)| *k).collect();
    assert_eq!(documented, keys);
    let v = announced.iter().find(|(k, _)| *k == "v").unwrap();
    assert_eq!(v.1, PROTOCOL_VERSION.to_string());
}

#[test]
fn error_codes_alpns_and_limits_are_the_code_s() {
    let codes = (0..).map_while(|code| {
        ErrorCode::from_varint(quinn::VarInt::from_u32(code)).map(|error| (code, error))
    });
    for (code, error) in codes {
        // MalformedFrame is documented as MALFORMED_FRAME.
        let mut name = String::new();
        for (i, c) in format!("{error:?}").chars().enumerate() {
            if c.is_ascii_uppercase() && i > 0 {
                name.push('_');
            }
            name.push(c.to_ascii_uppercase());
        }
        let row = format!("| 0x{code:X} | `{name}` |");
        assert!(DOC.contains(&row), "protocol.md lacks the row {row:?}");
    }
    for alpn in [NODE_ALPN, CLIENT_ALPN] {
        let alpn = format!("`{}`", String::from_utf8_lossy(alpn));
        assert!(DOC.contains(&alpn), "protocol.md lacks the ALPN {alpn}");
    }
    let digits = DEFAULT_MAX_FRAME.to_string();
    let (thousands, rest) = digits.split_at(digits.len() - 3);
    let (millions, thousands) = thousands.split_at(thousands.len() - 3);
    let max_frame = format!("{millions},{thousands},{rest} bytes");
    assert!(DOC.contains(&max_frame), "protocol.md lacks {max_frame:?}");
}

#[test]
fn the_control_message_examples_are_the_code_s() {
    use treescale::wire::{DeliveryMessage, NodeMessage, OverlayMessage};
    let hex = |message: &NodeMessage| {
        let bytes = postcard::to_allocvec(message).unwrap();
        bytes
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let join = hex(&NodeMessage::Overlay(OverlayMessage::Join));
    let ack = hex(&NodeMessage::Delivery(DeliveryMessage::CustodyAck(vec![7])));
    assert!(
        DOC.contains(&format!("a `Join` is the body `{join}`")),
        "{join}"
    );
    assert!(
        DOC.contains(&format!("token 7\nis `{ack}`")),
        "protocol.md should give the acknowledgement as {ack}"
    );
}
