//! Golden vectors for the JavaScript client (clients/js): every message of
//! the client protocol, as postcard bytes and as the value the JavaScript
//! codec gives for them. `clients/js/test/codec.test.js` decodes and encodes
//! each one. This test fails when the file is stale; run it with
//! `TREESCALE_WRITE_VECTORS=1` to write it again, then make the JavaScript
//! pass.

use std::path::Path;

use bytes::Bytes;
use serde::Serialize;
use serde_json::{json, Value};
use treescale::topic::{Pattern, Topic};
use treescale::trust::Grant;
use treescale::wire::*;
use treescale::NodeId;

const VECTORS: &str = "clients/js/test/vectors.json";

/// One message: its type's name, its value as the JavaScript client sees
/// it, and its postcard bytes in hex.
fn vector<T: Serialize>(type_name: &str, message: &T) -> Value {
    let bytes = postcard::to_allocvec(message).unwrap();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    json!({
        "type": type_name,
        "value": big_numbers_as_strings(serde_json::to_value(message).unwrap()),
        "hex": hex,
    })
}

/// JSON numbers past 2^53 lose precision in JavaScript: these are written
/// as strings, which the JavaScript test reads as BigInts.
fn big_numbers_as_strings(value: Value) -> Value {
    match value {
        Value::Number(n) if n.as_u64().is_some_and(|n| n > (1 << 53)) => {
            Value::String(n.to_string())
        }
        Value::Array(items) => {
            Value::Array(items.into_iter().map(big_numbers_as_strings).collect())
        }
        Value::Object(fields) => Value::Object(
            fields
                .into_iter()
                .map(|(k, v)| (k, big_numbers_as_strings(v)))
                .collect(),
        ),
        other => other,
    }
}

fn node(byte: u8) -> NodeId {
    NodeId::from_bytes(std::array::from_fn(|i| byte.wrapping_add(i as u8)))
}

fn pattern(s: &str) -> Pattern {
    Pattern::new(s).unwrap()
}

fn published() -> Published {
    Published {
        id: EventId {
            publisher: 0xfedc_ba98_7654_3210,
            seq: 300,
        },
        topic: Topic::new("orders.eu").unwrap(),
        headers: vec![("trace".into(), "ab-1".into()), ("é".into(), "✓".into())],
        payload: Bytes::from_static(b"\x00\x01hello\xff"),
    }
}

fn event() -> Event {
    published().at(node(1))
}

fn reply_to() -> ReplyTo {
    ReplyTo {
        node: node(2),
        inbox: u64::MAX,
        request: 9,
    }
}

fn status() -> NodeStatus {
    NodeStatus {
        id: node(3),
        name: "node-a".into(),
        cluster: "lab".into(),
        addr: "127.0.0.1:7700".into(),
        root: node(0),
        root_addrs: Some(vec![
            "127.1.2.3:7700".parse().unwrap(),
            "[fe80::1:2]:7701".parse().unwrap(),
        ]),
        parent: Some(node(0)),
        depth: 1,
        subtree: 3,
        peers: vec![PeerStatus {
            id: node(0),
            name: "root".into(),
            addr: "127.1.2.3:7700".into(),
            rtt_us: 412,
            role: "parent".into(),
            queued_bytes: 1 << 20,
            events_dropped: 0,
        }],
        subscriptions: vec![SubscriptionStatus {
            pattern: pattern("orders.>"),
            group: Some("workers".into()),
            local: 2,
            edges: vec![(node(0), 1)],
        }],
        durables: vec![DurableStatus {
            name: "audit".into(),
            pattern: pattern("orders.*"),
            home: node(3),
            full: false,
            attached: true,
            waiting_for_home: false,
            held: Some(17),
            held_bytes: None,
        }],
        outbox: 5,
        outbox_unreachable: 1,
        connections: 4,
        clients: 2,
        congested: 0,
        counters: Counters {
            events_published: 1_000_000_007,
            events_delivered: (1 << 53) - 1,
            ..Counters::default()
        },
    }
}

fn vectors() -> Value {
    let mut messages = vec![
        vector(
            "ClientRequest",
            &ClientRequest::Hello {
                version: PROTOCOL_VERSION,
                name: "cli".into(),
            },
        ),
        vector(
            "ClientRequest",
            &ClientRequest::Subscribe {
                sub: 1,
                pattern: "orders.*".into(),
                group: None,
            },
        ),
        vector(
            "ClientRequest",
            &ClientRequest::Subscribe {
                sub: 128,
                pattern: "jobs.>".into(),
                group: Some("workers".into()),
            },
        ),
        vector("ClientRequest", &ClientRequest::Unsubscribe { sub: 16384 }),
        vector("ClientRequest", &ClientRequest::Status { request: 3 }),
        vector(
            "ClientRequest",
            &ClientRequest::WaitInterest {
                request: 4,
                topic: "orders.eu".into(),
                timeout_ms: u32::MAX,
            },
        ),
        vector("ClientRequest", &ClientRequest::Tree { request: 5 }),
        vector(
            "ClientRequest",
            &ClientRequest::SubscribeDurable {
                sub: 6,
                name: "audit".into(),
                pattern: "orders.>".into(),
                limits: RetentionLimits::default(),
                ack_wait_ms: 30_000,
            },
        ),
        vector(
            "ClientRequest",
            &ClientRequest::AckDurable {
                sub: 6,
                position: 1 << 40,
            },
        ),
        vector(
            "ClientRequest",
            &ClientRequest::HelloWithToken {
                version: PROTOCOL_VERSION,
                name: "page".into(),
                token: "eyJhbGciOiJFZERTQSJ9.e30.c2ln".into(),
            },
        ),
        vector(
            "ClientRequest",
            &ClientRequest::Ask {
                request: 10,
                node: node(4),
                question: Question::Tree,
            },
        ),
        vector(
            "ClientRequest",
            &ClientRequest::Ask {
                request: 11,
                node: node(5),
                question: Question::Status,
            },
        ),
        vector(
            "ClientReply",
            &ClientReply::Welcome {
                version: PROTOCOL_VERSION,
                node: node(3),
                name: "node-a".into(),
                cluster: "lab".into(),
                user: Some("alice".into()),
                grant: Grant {
                    publish: vec![pattern("orders.>")],
                    subscribe: vec![pattern("orders.*"), pattern(">")],
                },
            },
        ),
        vector(
            "ClientReply",
            &ClientReply::Welcome {
                version: PROTOCOL_VERSION,
                node: node(3),
                name: "n".into(),
                cluster: "c".into(),
                user: None,
                grant: Grant {
                    publish: vec![],
                    subscribe: vec![],
                },
            },
        ),
        vector("ClientReply", &ClientReply::Subscribed { sub: 1 }),
        vector("ClientReply", &ClientReply::Unsubscribed { sub: 1 }),
        vector(
            "ClientReply",
            &ClientReply::Status {
                request: 3,
                status: Box::new(status()),
            },
        ),
        vector(
            "ClientReply",
            &ClientReply::Interest {
                request: 4,
                present: true,
            },
        ),
        vector(
            "ClientReply",
            &ClientReply::Tree {
                request: 5,
                nodes: vec![
                    DirectoryEntry {
                        id: node(3),
                        name: "node-a".into(),
                        parent: None,
                        rtt_us: 0,
                        max_children: 4,
                        addrs: vec![],
                        epoch: 7 << 10,
                    },
                    DirectoryEntry {
                        id: node(4),
                        name: "node-b".into(),
                        parent: Some(node(3)),
                        rtt_us: 250,
                        max_children: 4,
                        addrs: vec![
                            "127.0.0.1:7701".parse().unwrap(),
                            "[::1]:7701".parse().unwrap(),
                            "[::ffff:127.0.0.1]:7701".parse().unwrap(),
                            "[2001:db8::8:0:0:1]:1".parse().unwrap(),
                            "[1:2:3:4:5:6:7:8]:65535".parse().unwrap(),
                        ],
                        // A start time in ms × 2¹⁰ plus moves: under 2⁵³, a JS number.
                        epoch: (1_796_000_000_000 << 10) + 3,
                    },
                ],
            },
        ),
        vector(
            "ClientReply",
            &ClientReply::DurableAttached {
                sub: 6,
                first: 1,
                backlog: 0,
            },
        ),
        vector("PublishFrame", &PublishFrame::Event(published())),
        vector("PublishFrame", &PublishFrame::Flush(7)),
        vector(
            "PublishFrame",
            &PublishFrame::Directed {
                event: published(),
                to: Destination::Node(node(4)),
            },
        ),
        vector(
            "PublishFrame",
            &PublishFrame::Directed {
                event: published(),
                to: Destination::Named("node-b".into()),
            },
        ),
        vector("PublishFrame", &PublishFrame::AtLeastOnce(published())),
        vector(
            "PublishFrame",
            &PublishFrame::Request {
                event: published(),
                request: 8,
            },
        ),
        vector(
            "PublishFrame",
            &PublishFrame::Reply {
                event: published(),
                to: reply_to(),
            },
        ),
        vector("PublishReply", &PublishReply::Flushed(7)),
        vector("PublishReply", &PublishReply::Acked { up_to: 300 }),
        vector(
            "PublishReply",
            &PublishReply::Refused {
                seq: 301,
                reason: PublishRefusal::StoreFull,
                message: "the store is full".into(),
            },
        ),
        vector(
            "PublishReply",
            &PublishReply::RequestFailed {
                request: 8,
                reason: RequestFailure::NoResponders,
                message: "no responders".into(),
            },
        ),
        vector("PublishReply", &PublishReply::Released { up_to: 300 }),
        vector(
            "Delivery",
            &Delivery::Event {
                sub: 1,
                event: event(),
            },
        ),
        vector(
            "Delivery",
            &Delivery::Durable {
                sub: 6,
                position: 2,
                event: event(),
            },
        ),
        vector(
            "Delivery",
            &Delivery::Request {
                sub: 1,
                event: event(),
                reply: reply_to(),
            },
        ),
        vector(
            "Delivery",
            &Delivery::Reply {
                request: 8,
                event: event(),
            },
        ),
    ];
    for error in [
        RequestError::InvalidPattern,
        RequestError::DurableInUse,
        RequestError::PermissionDenied,
        RequestError::UnknownNode,
        RequestError::TooManyQuestions,
    ] {
        messages.push(vector(
            "ClientReply",
            &ClientReply::Error {
                request: 2,
                error,
                message: format!("{error:?}"),
            },
        ));
    }
    let error_codes: Vec<String> = (0u32..)
        .map_while(|code| ErrorCode::from_varint(quinn::VarInt::from_u32(code)))
        .map(|code| screaming_snake(&format!("{code:?}")))
        .collect();
    json!({
        "protocolVersion": PROTOCOL_VERSION,
        "maxFrame": DEFAULT_MAX_FRAME,
        "maxPayload": treescale::client::MAX_PAYLOAD,
        "errorCodes": error_codes,
        "messages": messages,
    })
}

/// `SlowConsumer` as `SLOW_CONSUMER`: the names docs/protocol.md gives.
fn screaming_snake(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

#[test]
fn the_javascript_clients_golden_vectors_are_up_to_date() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(VECTORS);
    let fresh = serde_json::to_string_pretty(&vectors()).unwrap() + "\n";
    if std::env::var_os("TREESCALE_WRITE_VECTORS").is_some() {
        std::fs::write(&path, &fresh).unwrap();
        return;
    }
    let stored = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        stored == fresh,
        "{VECTORS} is stale: the client protocol changed. Write it again with \
         `TREESCALE_WRITE_VECTORS=1 cargo test --test js_vectors`, then bring \
         clients/js/src/messages.js in step until `node --test clients/js/test` passes"
    );
}
