use bytes::Bytes;
use tokio::sync::mpsc;

use super::writer::{Command, Custody, Done, Epoch, Outcome, Target, Writer};
use std::sync::Arc;

use super::*;
use crate::topic::{Pattern, Topic};
use crate::wire::{EventId, RetentionLimits};

fn node(n: u8) -> NodeId {
    NodeId::from_bytes([n; 32])
}

fn event(origin: NodeId, seq: u64, payload: &str) -> Event {
    Event {
        id: EventId { publisher: 1, seq },
        origin,
        topic: Topic::new("orders.eu").unwrap(),
        headers: Vec::new(),
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        reply: None,
    }
}

fn record(name: &str, home: NodeId) -> DurableRecord {
    DurableRecord {
        name: name.into(),
        pattern: Pattern::new("orders.>").unwrap(),
        home,
        version: 1,
        limits: RetentionLimits::default(),
        full: false,
    }
}

fn target(durable: &str, seq: Option<u64>) -> Target {
    Target {
        durable: durable.into(),
        seq,
    }
}

/// A store and its writer, run synchronously: each call waits for its
/// outcome.
struct Harness {
    store: Arc<dyn Store>,
    /// Keeps an LMDB store's directory.
    _dir: Option<tempfile::TempDir>,
    writer: Writer<u32>,
    outcomes: mpsc::UnboundedReceiver<Outcome<u32>>,
}

impl Harness {
    fn open(dir: &Path, me: NodeId, config: &StoreConfig) -> Result<Harness, StoreError> {
        Harness::start(Arc::new(LmdbStore::open(dir, me, config)?), None)
    }

    /// Each backend in turn: LMDB in a fresh directory, and memory.
    fn each(me: NodeId) -> [Harness; 2] {
        let dir = tempfile::tempdir().unwrap();
        let lmdb = LmdbStore::open(dir.path(), me, &StoreConfig::default()).unwrap();
        [
            Harness::start(Arc::new(lmdb), Some(dir)).unwrap(),
            Harness::start(Arc::new(MemoryStore::new(me)), None).unwrap(),
        ]
    }

    fn start(store: Arc<dyn Store>, dir: Option<tempfile::TempDir>) -> Result<Harness, StoreError> {
        let recovered = store.recover()?;
        let (tx, outcomes) = mpsc::unbounded_channel();
        let writer = Writer::start(store.clone(), &recovered, tx, false);
        Ok(Harness {
            store,
            _dir: dir,
            writer,
            outcomes,
        })
    }

    fn run(&mut self, command: Command<u32>) -> Result<writer::Done, StoreError> {
        self.writer.send(command);
        self.outcomes.blocking_recv().unwrap().result
    }

    fn take(&mut self, items: Vec<Custody>) -> Result<writer::Done, StoreError> {
        self.run(Command::Take {
            items,
            stored_ms: 1000,
            then: 0,
        })
    }

    fn queue(&self, name: &str) -> Vec<(u64, String)> {
        self.store
            .read_queue(name, 1, 1000)
            .unwrap()
            .into_iter()
            .map(|(p, e)| (p, String::from_utf8(e.payload.to_vec()).unwrap()))
            .collect()
    }

    /// The payloads queued for `name`, in queue order.
    fn payloads(&self, name: &str) -> Vec<String> {
        self.queue(name).into_iter().map(|(_, p)| p).collect()
    }
}

fn here(event: Event, durable: &str, seq: Option<u64>) -> Custody {
    Custody {
        event,
        epoch: Epoch::Given(1),
        here: vec![target(durable, seq)],
        onward: Vec::new(),
    }
}

#[test]
fn origin_numbers_events_and_queues_them_in_order() {
    for mut h in Harness::each(node(1)) {
        let done = h
            .take(vec![
                here(event(node(1), 1, "a"), "d", None),
                here(event(node(1), 2, "b"), "d", None),
            ])
            .unwrap();
        assert_eq!(done.queues.len(), 1);
        let (name, stats) = &done.queues[0];
        assert_eq!(name, "d");
        assert_eq!((stats.first, stats.next, stats.bytes), (1, 3, 2));
        assert_eq!(h.queue("d"), vec![(1, "a".into()), (2, "b".into())]);
    }
}

#[test]
fn duplicates_are_dropped_and_early_events_wait_for_their_turn() {
    for mut h in Harness::each(node(1)) {
        let from = node(9);
        h.take(vec![here(event(from, 3, "third"), "d", Some(3))])
            .unwrap();
        assert!(h.queue("d").is_empty(), "3 must wait for 1 and 2");
        h.take(vec![
            here(event(from, 1, "first"), "d", Some(1)),
            here(event(from, 1, "first"), "d", Some(1)),
        ])
        .unwrap();
        assert_eq!(h.queue("d"), vec![(1, "first".into())]);
        let done = h
            .take(vec![here(event(from, 2, "second"), "d", Some(2))])
            .unwrap();
        assert_eq!(done.queues[0].1.next, 4);
        assert_eq!(
            h.queue("d"),
            vec![
                (1, "first".into()),
                (2, "second".into()),
                (3, "third".into())
            ]
        );
        h.take(vec![here(event(from, 3, "third"), "d", Some(3))])
            .unwrap();
        assert_eq!(h.queue("d").len(), 3, "a late duplicate is dropped");
    }
}

/// Publisher 1's event `seq`, taken in through `origin` as that origin's
/// `origin_seq`th for durable d, on a connection whose epoch is `epoch`.
fn through(origin: NodeId, origin_seq: u64, seq: u64, epoch: u64) -> Custody {
    Custody {
        epoch: Epoch::Given(epoch),
        ..here(event(origin, seq, &seq.to_string()), "d", Some(origin_seq))
    }
}

#[test]
fn a_publisher_event_brought_twice_through_different_nodes_is_queued_once() {
    for mut h in Harness::each(node(1)) {
        let (a, b) = (node(8), node(9));
        // The client sent 1 to 3 through a; 2 and 3 were held up there, so
        // it sent them again through b (epoch 2), and went on with 4.
        h.take(vec![through(a, 1, 1, 1)]).unwrap();
        for (n, seq) in [(1, 2), (2, 3), (3, 4)] {
            h.take(vec![through(b, n, seq, 2)]).unwrap();
        }
        // a's copies come last: already here.
        h.take(vec![through(a, 2, 2, 1), through(a, 3, 3, 1)])
            .unwrap();
        assert_eq!(h.payloads("d"), ["1", "2", "3", "4"]);
    }
}

#[test]
fn publishers_long_idle_are_forgotten() {
    for mut h in Harness::each(node(1)) {
        let a = node(8);
        // Taken at stored_ms 1,000 (the harness's clock).
        h.take(vec![through(a, 1, 1, 1)]).unwrap();
        h.run(Command::ForgetPublishers {
            idle_before_ms: 1_000,
        })
        .unwrap();
        h.take(vec![through(node(9), 1, 1, 1)]).unwrap();
        assert_eq!(h.queue("d").len(), 1, "remembered: the copy is dropped");
        h.run(Command::ForgetPublishers {
            idle_before_ms: 1_001,
        })
        .unwrap();
        h.take(vec![through(node(7), 1, 1, 1)]).unwrap();
        assert_eq!(h.queue("d").len(), 2, "forgotten: taken as new");
    }
}

#[test]
fn what_no_epoch_brought_is_not_taken_for_a_duplicate() {
    for mut h in Harness::each(node(1)) {
        let (a, b) = (node(8), node(9));
        // 2 is on its way through a (released there, so not sent again);
        // the client's new connection to b starts at 3.
        h.take(vec![through(a, 1, 1, 1)]).unwrap();
        h.take(vec![through(b, 1, 3, 3), through(b, 2, 4, 3)])
            .unwrap();
        h.take(vec![through(a, 2, 2, 1)]).unwrap();
        // b's epoch never passed 2, so a's 2 is new; a going on to 3 and 4
        // then finds them brought.
        h.take(vec![through(a, 3, 3, 1), through(a, 4, 4, 1)])
            .unwrap();
        assert_eq!(h.payloads("d"), ["1", "3", "4", "2"]);
    }
}

#[test]
fn onward_targets_go_to_the_outbox_until_forgotten() {
    for mut h in Harness::each(node(1)) {
        let done = h
            .take(vec![Custody {
                event: event(node(1), 1, "x"),
                epoch: Epoch::Given(1),
                here: Vec::new(),
                onward: vec![target("a", None), target("b", Some(7))],
            }])
            .unwrap();
        let (key, entry) = &done.outbox[0];
        assert_eq!(
            entry.targets,
            vec![
                DurableTarget {
                    durable: "a".into(),
                    seq: 1
                },
                DurableTarget {
                    durable: "b".into(),
                    seq: 7
                }
            ]
        );
        assert_eq!(h.store.recover().unwrap().outbox.len(), 1);
        h.run(Command::Forget { keys: vec![*key] }).unwrap();
        assert!(h.store.recover().unwrap().outbox.is_empty());
    }
}

#[test]
fn everything_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut h = Harness::open(dir.path(), node(1), &StoreConfig::default()).unwrap();
        h.run(Command::PutDurables {
            records: vec![record("d", node(1))],
            then: 0,
        })
        .unwrap();
        h.take(vec![Custody {
            event: event(node(1), 1, "x"),
            epoch: Epoch::Given(1),
            here: vec![target("d", None)],
            onward: vec![target("far", None)],
        }])
        .unwrap();
        h.take(vec![here(event(node(1), 2, "y"), "d", None)])
            .unwrap();
        h.run(Command::Consumed {
            durable: "d".into(),
            position: 1,
        })
        .unwrap();
    }
    let mut h = Harness::open(dir.path(), node(1), &StoreConfig::default()).unwrap();
    let recovered = h.store.recover().unwrap();
    assert_eq!(recovered.durables, vec![record("d", node(1))]);
    assert_eq!(recovered.outbox.len(), 1);
    assert_eq!(recovered.queues["d"].first, 2);
    assert_eq!(recovered.queues["d"].next, 3);
    assert_eq!(h.queue("d"), vec![(2, "y".into())]);
    // Numbering continues where it stopped: no reused sequence numbers.
    let done = h
        .take(vec![Custody {
            event: event(node(1), 3, "z"),
            epoch: Epoch::Given(1),
            here: Vec::new(),
            onward: vec![target("far", None)],
        }])
        .unwrap();
    assert_eq!(done.outbox[0].1.targets[0].seq, 2);
    assert!(done.outbox[0].0 > recovered.outbox[0].0);
}

#[test]
fn consumed_frees_the_queue_and_positions_never_repeat() {
    for mut h in Harness::each(node(1)) {
        h.take(vec![here(event(node(1), 1, "abc"), "d", None)])
            .unwrap();
        let done = h
            .run(Command::Consumed {
                durable: "d".into(),
                position: 99,
            })
            .unwrap();
        let stats = done.queues[0].1;
        assert!(stats.is_empty());
        assert_eq!((stats.first, stats.bytes, stats.oldest_ms), (2, 0, 0));
        let done = h
            .take(vec![here(event(node(1), 2, "d"), "d", None)])
            .unwrap();
        assert_eq!(done.queues[0].1.first, 2);
        assert_eq!(h.queue("d"), vec![(2, "d".into())]);
    }
}

#[test]
fn a_connection_s_epoch_starts_at_its_first_event_and_ends_where_one_fails() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        map_size: 1 << 20,
        sync: SyncMode::Never,
        inline_io: false,
    };
    let mut h = Harness::open(dir.path(), node(1), &config).unwrap();
    let connection = Epoch::Connection {
        session: 1,
        generation: 0,
    };
    let onward = |seq, payload: &str| Custody {
        event: event(node(1), seq, payload),
        epoch: connection,
        here: Vec::new(),
        onward: vec![target("far", None)],
    };
    let epoch_of = |done: Done| done.outbox[0].1.epoch;
    assert_eq!(epoch_of(h.take(vec![onward(5, "a")]).unwrap()), 5);
    assert_eq!(epoch_of(h.take(vec![onward(6, "b")]).unwrap()), 5);
    let too_big = "x".repeat(2 << 20);
    assert!(h.take(vec![onward(7, &too_big)]).is_err());
    let after = epoch_of(h.take(vec![onward(8, "c")]).unwrap());
    assert_eq!(after, 8, "7 is missing here: a new epoch");
    h.run(Command::ConnectionGone { session: 1 }).unwrap();
    assert_eq!(epoch_of(h.take(vec![onward(9, "d")]).unwrap()), 9);
}

#[test]
fn a_full_map_refuses_only_what_does_not_fit() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        map_size: 1 << 20,
        sync: SyncMode::Never,
        inline_io: false,
    };
    let mut h = Harness::open(dir.path(), node(1), &config).unwrap();
    let big = "x".repeat(200_000);
    let mut refused = None;
    for seq in 1..=20 {
        match h.take(vec![here(event(node(1), seq, &big), "d", None)]) {
            Ok(_) => {}
            Err(e) => {
                refused = Some((seq, e));
                break;
            }
        }
    }
    let (seq, error) = refused.expect("a 1 MiB map cannot hold 20 events of 200 kB");
    assert!(error.is_full(), "{error}");
    assert!(error.to_string().contains("--store-size"), "{error}");
    let held = h.queue("d");
    assert_eq!(held.len() as u64, seq - 1, "everything accepted is kept");
    // Consuming makes room again.
    h.run(Command::Consumed {
        durable: "d".into(),
        position: seq,
    })
    .unwrap();
    h.take(vec![here(event(node(1), seq, "small"), "d", None)])
        .unwrap();
}

#[test]
fn a_store_of_another_node_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(LmdbStore::open(dir.path(), node(1), &StoreConfig::default()).unwrap());
    let error = LmdbStore::open(dir.path(), node(2), &StoreConfig::default())
        .err()
        .unwrap();
    assert!(matches!(error, StoreError::Foreign { .. }), "{error}");
}

#[test]
fn a_corrupt_store_is_refused_with_advice() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("store")).unwrap();
    std::fs::write(dir.path().join("store/data.mdb"), vec![0x5a; 64 * 1024]).unwrap();
    let error = LmdbStore::open(dir.path(), node(1), &StoreConfig::default())
        .err()
        .unwrap();
    assert!(matches!(error, StoreError::Corrupt { .. }), "{error}");
    assert!(error.to_string().contains("move it aside"), "{error}");
}

#[test]
fn a_failed_memory_transaction_keeps_nothing() {
    let store = MemoryStore::new(node(1));
    store
        .write(&mut |tables| tables.put(Table::Positions, b"kept", &1u64.to_be_bytes()))
        .unwrap();
    let failed = store.write(&mut |tables| {
        tables.put(Table::Positions, b"kept", &2u64.to_be_bytes())?;
        tables.put(Table::Positions, b"new", &3u64.to_be_bytes())?;
        tables.delete(Table::Positions, b"kept")?;
        Err(StoreError::DiskFull)
    });
    assert!(matches!(failed, Err(StoreError::DiskFull)));
    let mut seen = Vec::new();
    store
        .read(&mut |tables| {
            tables.scan(Table::Positions, &[], &[], &mut |key, value| {
                seen.push((key.to_vec(), decode_u64(value)));
                Ok(true)
            })
        })
        .unwrap();
    assert_eq!(seen, vec![(b"kept".to_vec(), Some(1))]);
}

#[test]
fn durable_names_are_checked() {
    assert!(valid_durable_name("orders-eu_1.x"));
    assert!(!valid_durable_name(""));
    assert!(!valid_durable_name("has space"));
    assert!(!valid_durable_name("nul\0"));
    assert!(!valid_durable_name(&"x".repeat(65)));
}
