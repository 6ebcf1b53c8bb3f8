//! The delivery core of several nodes, each with a store in memory, wired
//! by hand: what one node sends, the next receives, on a clock the tests
//! move.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::*;
use crate::store::writer::Writer;
use crate::store::{MemoryStore, Store};
use crate::topic::Topic;
use crate::wire::EventId;

/// A publisher's handle: the number of its publish.
type Publish = u32;

struct SimNode {
    core: DeliveryCore<Publish>,
    store: Arc<dyn Store>,
    writer: Writer<Commit<Publish>>,
    outcomes: mpsc::UnboundedReceiver<Outcome<Commit<Publish>>>,
    delivered: Vec<DurableDelivery>,
    answers: Vec<(Publish, Result<(), Refusal>)>,
    /// Release points told to client session 1.
    released: Vec<u64>,
    attached: Vec<(u64, u64)>,
}

enum Message {
    Control(DeliveryMessage),
    Custody(NodeEventFrame),
}

/// Nodes on a line, 0 – 1 – 2 – …, each linked to its neighbours.
struct Line {
    nodes: Vec<SimNode>,
    now: Instant,
    /// In flight: from, to, what.
    wire: VecDeque<(usize, usize, Message)>,
    /// Everything sent from the first node to the second is lost.
    lost: Option<(usize, usize)>,
    /// Reads kept out instead of answered at once, when set: as a reader
    /// thread that has not answered yet.
    held_reads: Option<Vec<(usize, QueueRead)>>,
}

fn id(i: usize) -> NodeId {
    NodeId::from_bytes([i as u8 + 1; 32])
}

impl Line {
    fn new(len: usize) -> Line {
        let now = Instant::now();
        let nodes = (0..len)
            .map(|i| {
                let store: Arc<dyn Store> = Arc::new(MemoryStore::new(id(i)));
                let recovered = store.recover().unwrap();
                let (tx, outcomes) = mpsc::unbounded_channel();
                let writer = Writer::start(store.clone(), &recovered, tx, true);
                let config = DeliveryConfig { unacked: 4 };
                SimNode {
                    core: DeliveryCore::new(id(i), config, recovered, now, 1_000_000),
                    store,
                    writer,
                    outcomes,
                    delivered: Vec::new(),
                    answers: Vec::new(),
                    released: Vec::new(),
                    attached: Vec::new(),
                }
            })
            .collect();
        let mut line = Line {
            nodes,
            now,
            wire: VecDeque::new(),
            lost: None,
            held_reads: None,
        };
        for i in 0..len {
            for peer in [i.wrapping_sub(1), i + 1] {
                if peer < len {
                    line.nodes[i].core.handle_link_up(id(peer));
                }
            }
        }
        line.settle();
        line
    }

    /// Runs every node's actions and delivers what they send until nothing
    /// moves.
    fn settle(&mut self) {
        loop {
            let mut moved = false;
            for i in 0..self.nodes.len() {
                moved |= self.run_actions(i);
            }
            while let Some((from, to, message)) = self.wire.pop_front() {
                moved = true;
                let (now, peer) = (self.now, id(from));
                let core = &mut self.nodes[to].core;
                match message {
                    Message::Control(message) => core.handle_message(peer, message, now),
                    Message::Custody(NodeEventFrame::Custody {
                        token,
                        event,
                        epoch,
                        targets,
                    }) => {
                        let frame = CustodyFrame {
                            token,
                            event,
                            epoch,
                            targets,
                        };
                        core.handle_custody(peer, vec![frame], now)
                    }
                    Message::Custody(other) => panic!("not a custody frame: {other:?}"),
                }
            }
            if !moved {
                return;
            }
        }
    }

    fn run_actions(&mut self, i: usize) -> bool {
        let len = self.nodes.len();
        let now = self.now;
        let node = &mut self.nodes[i];
        while let Ok(outcome) = node.outcomes.try_recv() {
            node.core.handle_stored(outcome, now);
        }
        // The next hop along the line.
        let towards = |to: NodeId| {
            let to = (0..len).find(|&j| id(j) == to)?;
            Some(if to > i { i + 1 } else { i - 1 })
        };
        node.core.send_custody(now, |to| towards(to).map(id));
        let mut moved = false;
        while let Some(action) = node.core.poll_action() {
            moved = true;
            match action {
                DeliveryAction::Write(command) => node.writer.send(command),
                DeliveryAction::Read(read) => match &mut self.held_reads {
                    Some(held) => held.push((i, read)),
                    None => {
                        let result = node.store.read_queue(&read.durable, read.from, read.limit);
                        node.core.handle_read(read, result);
                    }
                },
                DeliveryAction::Send { peer, message } => {
                    let to = (0..len).find(|&j| id(j) == peer).unwrap();
                    if self.lost != Some((i, to)) {
                        self.wire.push_back((i, to, Message::Control(message)));
                    }
                }
                DeliveryAction::Route { remote, .. } => {
                    let to = towards(remote.to).unwrap();
                    if self.lost != Some((i, to)) {
                        let message = DeliveryMessage::Remote(remote);
                        self.wire.push_back((i, to, Message::Control(message)));
                    }
                }
                DeliveryAction::Forward { peer, frame, .. } => {
                    let to = (0..len).find(|&j| id(j) == peer).unwrap();
                    if self.lost != Some((i, to)) {
                        self.wire.push_back((i, to, Message::Custody(frame)));
                    }
                }
                DeliveryAction::Deliver(delivery) => node.delivered.push(delivery),
                DeliveryAction::Attached { session, sub, .. } => node.attached.push((session, sub)),
                DeliveryAction::Refuse { message, .. } => panic!("refused: {message}"),
                DeliveryAction::Published {
                    publisher, result, ..
                } => node.answers.push((publisher, result)),
                DeliveryAction::Released { session, up_to } => {
                    assert_eq!(session, 1);
                    node.released.push(up_to)
                }
            }
            while let Ok(outcome) = node.outcomes.try_recv() {
                node.core.handle_stored(outcome, now);
            }
        }
        moved
    }

    /// Node `at` creates durable `name` and attaches client session 1.
    fn durable(&mut self, at: usize, name: &str, limits: RetentionLimits) {
        self.attach(at, name, limits);
        self.settle();
        assert_eq!(self.nodes[at].attached, vec![(1, 1)]);
    }

    /// Node `at`'s client session 1 asks to attach to durable `name`
    /// (made there if new); the answer comes as the nodes run.
    fn attach(&mut self, at: usize, name: &str, limits: RetentionLimits) {
        let now = self.now;
        let ack_wait = Duration::from_secs(5);
        let pattern = "orders.>".to_string();
        let core = &mut self.nodes[at].core;
        let subscribe = core.subscribe(1, 1, name.into(), pattern, limits, ack_wait, now);
        assert_eq!(subscribe, Ok(()));
    }

    /// A client of node `at` publishes `payload` at least once, as publish
    /// number `n`.
    fn publish(&mut self, at: usize, n: Publish, payload: &str) -> Result<(), Refusal> {
        self.publish_in(at, n, payload, 1)
    }

    /// As [`Line::publish`], on a connection whose first at-least-once
    /// event was number `epoch`.
    fn publish_in(
        &mut self,
        at: usize,
        n: Publish,
        payload: &str,
        epoch: u64,
    ) -> Result<(), Refusal> {
        let event = Event {
            id: EventId {
                publisher: 7,
                seq: n.into(),
            },
            origin: id(at),
            topic: Topic::new("orders.eu").unwrap(),
            headers: Vec::new(),
            payload: Bytes::copy_from_slice(payload.as_bytes()),
            reply: None,
        };
        let now = self.now;
        let core = &mut self.nodes[at].core;
        let item = core.admit(event, Epoch::Given(epoch))?;
        let then = Commit::Publisher {
            publisher: n,
            session: 1,
            seqs: vec![n.into()],
        };
        core.take_custody(vec![item], then, now);
        self.settle();
        Ok(())
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
        for node in &mut self.nodes {
            node.core.handle_timeout(self.now);
        }
        self.settle();
    }

    /// Answers the reads held out, and stops holding them.
    fn answer_held_reads(&mut self) {
        for (i, read) in self.held_reads.take().unwrap_or_default() {
            let node = &mut self.nodes[i];
            let result = node.store.read_queue(&read.durable, read.from, read.limit);
            node.core.handle_read(read, result);
        }
        self.settle();
    }

    /// The queue positions handed to node `at`'s client, in order.
    fn positions(&self, at: usize) -> Vec<u64> {
        self.nodes[at]
            .delivered
            .iter()
            .map(|d| d.position)
            .collect()
    }

    fn payloads(&self, at: usize) -> Vec<(u64, String)> {
        self.nodes[at]
            .delivered
            .iter()
            .map(|d| {
                (
                    d.position,
                    String::from_utf8(d.event.payload.to_vec()).unwrap(),
                )
            })
            .collect()
    }
}

#[test]
fn an_event_reaches_a_durable_two_hops_away_and_each_hop_forgets_it_once_passed_on() {
    let mut line = Line::new(3);
    line.durable(2, "d", RetentionLimits::default());
    for node in &line.nodes {
        assert_eq!(node.core.durable_status().len(), 1, "every node knows it");
    }
    line.publish(0, 1, "one").unwrap();
    assert_eq!(
        line.nodes[0].answers,
        vec![(1, Ok(()))],
        "confirmed once stored"
    );
    assert_eq!(line.payloads(2), vec![(1, "one".to_string())]);
    for node in &line.nodes {
        assert_eq!(node.core.outbox_len(), (0, 0), "nothing left held");
    }
    assert_eq!(line.nodes[2].core.counters().events_stored, 1);
}

#[test]
fn custody_lost_on_a_link_goes_again_and_arrives_once() {
    let mut line = Line::new(3);
    line.durable(2, "d", RetentionLimits::default());
    line.lost = Some((1, 2));
    line.publish(0, 1, "one").unwrap();
    line.publish(0, 2, "two").unwrap();
    assert!(line.payloads(2).is_empty());
    assert_eq!(line.nodes[1].core.outbox_len().0, 2, "held by the middle");
    assert_eq!(line.nodes[0].core.outbox_len().0, 0, "the middle has it");
    // The link comes back as a new connection: what went over it goes
    // again. This time the events arrive and the acknowledgements are lost.
    line.lost = Some((2, 1));
    line.nodes[1].core.handle_link_replaced(id(2));
    line.settle();
    assert_eq!(
        line.payloads(2),
        vec![(1, "one".to_string()), (2, "two".to_string())]
    );
    assert_eq!(line.nodes[1].core.outbox_len().0, 2, "not acknowledged");
    // So they go a third time, and the home drops them as duplicates.
    line.lost = None;
    line.nodes[1].core.handle_link_replaced(id(2));
    line.settle();
    assert_eq!(line.nodes[1].core.outbox_len().0, 0);
    assert_eq!(line.payloads(2).len(), 2);
    assert_eq!(line.nodes[2].core.counters().events_stored, 2);
}

#[test]
fn an_event_is_released_to_its_publisher_once_the_next_node_holds_it() {
    let mut line = Line::new(3);
    line.durable(2, "d", RetentionLimits::default());
    line.lost = Some((0, 1));
    line.publish(0, 1, "one").unwrap();
    line.publish(0, 2, "two").unwrap();
    assert_eq!(line.nodes[0].answers, vec![(1, Ok(())), (2, Ok(()))]);
    assert!(line.nodes[0].released.is_empty(), "only node 0 holds them");
    line.lost = None;
    line.nodes[0].core.handle_link_replaced(id(1));
    line.settle();
    assert_eq!(line.nodes[0].released, vec![1, 2]);
    // At the home itself an event is released as it is committed.
    line.publish(2, 3, "three").unwrap();
    assert_eq!(line.nodes[2].released, vec![3]);
}

#[test]
fn events_sent_again_through_another_node_reach_a_durable_once_in_order() {
    let mut line = Line::new(3);
    line.durable(2, "d", RetentionLimits::default());
    line.publish(0, 1, "one").unwrap();
    line.publish(0, 2, "two").unwrap();
    // Node 0 takes 3 and 4 but cannot pass them on; the client moves to
    // node 1 and sends them again, from the first unreleased, then 5.
    line.lost = Some((0, 1));
    line.publish(0, 3, "three").unwrap();
    line.publish(0, 4, "four").unwrap();
    assert_eq!(line.nodes[0].released, vec![1, 2], "not 3 and 4");
    for (n, payload) in [(3, "three"), (4, "four"), (5, "five")] {
        line.publish_in(1, n, payload, 3).unwrap();
    }
    // Node 0's copies arrive last, and are dropped.
    line.lost = None;
    line.nodes[0].core.handle_link_replaced(id(1));
    line.settle();
    assert_eq!(
        line.nodes[0].core.outbox_len().0,
        0,
        "node 0 handed them on"
    );
    // The client has room for 4 unacknowledged.
    line.nodes[2].core.handle_ack(1, 1, 4, line.now);
    line.settle();
    let expected: Vec<(u64, String)> = ["one", "two", "three", "four", "five"]
        .iter()
        .zip(1..)
        .map(|(p, n)| (n, p.to_string()))
        .collect();
    assert_eq!(line.payloads(2), expected);
    assert_eq!(line.nodes[2].core.counters().events_stored, 5);
}

#[test]
fn a_client_attached_at_another_node_gets_the_home_s_events_through_a_broken_path() {
    let mut line = Line::new(3);
    line.durable(2, "d", RetentionLimits::default());
    assert!(line.nodes[2].core.detach(1, Some(1)));
    line.publish(1, 1, "one").unwrap();
    // The client attaches at node 0; node 2 holds its queue.
    line.attach(0, "d", RetentionLimits::default());
    line.settle();
    assert_eq!(
        line.nodes[0].attached,
        vec![(1, 1)],
        "answered once the home has"
    );
    assert_eq!(line.payloads(0), vec![(1, "one".to_string())]);
    let status = &line.nodes[0].core.durable_status()[0];
    assert!(status.attached && !status.waiting_for_home);
    line.nodes[0].core.handle_ack(1, 1, 1, line.now);
    line.settle();
    assert_eq!(line.nodes[2].core.durable_status()[0].held, Some(0));

    // The path breaks: what the home sends is lost on the way.
    line.lost = Some((1, 0));
    line.publish(1, 2, "two").unwrap();
    line.publish(1, 3, "three").unwrap();
    assert_eq!(line.positions(0), [1]);
    // The tree around node 0 changes; its proxy attaches again and the
    // home sends again what was not acknowledged.
    line.lost = None;
    line.nodes[0].core.handle_link_replaced(id(1));
    line.advance(Duration::from_millis(300));
    assert_eq!(line.positions(0), [1, 2, 3]);
    line.nodes[0].core.handle_ack(1, 1, 3, line.now);
    line.settle();
    assert_eq!(line.nodes[2].core.durable_status()[0].held, Some(0));

    // Detaching frees the durable at its home for another client.
    assert!(line.nodes[0].core.detach(1, Some(1)));
    line.settle();
    assert!(!line.nodes[2].core.durable_status()[0].attached);
}

#[test]
fn an_attachment_waits_while_the_home_is_unreachable_and_its_home_forgets_a_silent_one() {
    let mut line = Line::new(2);
    line.durable(1, "d", RetentionLimits::default());
    assert!(line.nodes[1].core.detach(1, Some(1)));
    line.lost = Some((0, 1));
    line.attach(0, "d", RetentionLimits::default());
    line.advance(Duration::from_secs(3));
    assert!(line.nodes[0].attached.is_empty(), "no answer yet");
    assert!(line.nodes[0].core.durable_status()[0].waiting_for_home);
    line.lost = None;
    line.advance(Duration::from_millis(1100));
    assert_eq!(
        line.nodes[0].attached,
        vec![(1, 1)],
        "asked again, answered"
    );
    assert!(line.nodes[1].core.durable_status()[0].attached);
    // Node 0 goes silent (its keepalives lost): the home lets go.
    line.lost = Some((0, 1));
    for _ in 0..45 {
        line.advance(Duration::from_millis(250));
    }
    assert!(!line.nodes[1].core.durable_status()[0].attached);
    // Heard again, the home says it does not know the attachment, and
    // node 0 attaches again.
    line.lost = None;
    for _ in 0..12 {
        line.advance(Duration::from_millis(250));
    }
    assert!(line.nodes[1].core.durable_status()[0].attached);
    assert_eq!(
        line.nodes[0].attached,
        vec![(1, 1)],
        "the client was told once"
    );
}

#[test]
fn an_attachment_refused_as_in_use_asks_again_until_the_home_lets_go() {
    let mut line = Line::new(2);
    // Node 1's own client holds it.
    line.durable(1, "d", RetentionLimits::default());
    line.attach(0, "d", RetentionLimits::default());
    line.advance(Duration::from_secs(2));
    assert!(line.nodes[0].attached.is_empty(), "in use: not yet");
    assert!(line.nodes[1].core.detach(1, Some(1)));
    line.advance(Duration::from_millis(1100));
    assert_eq!(line.nodes[0].attached, vec![(1, 1)]);
}

#[test]
fn an_unacknowledged_delivery_goes_again_after_the_ack_wait() {
    let mut line = Line::new(1);
    line.durable(0, "d", RetentionLimits::default());
    for n in 1..=6 {
        line.publish(0, n, &format!("e{n}")).unwrap();
    }
    assert_eq!(
        line.positions(0),
        [1, 2, 3, 4],
        "at most 4 beyond the last ack"
    );
    line.nodes[0].core.handle_ack(1, 1, 2, line.now);
    line.settle();
    assert_eq!(line.positions(0), [1, 2, 3, 4, 5, 6]);
    line.advance(Duration::from_secs(6));
    assert_eq!(line.positions(0), [1, 2, 3, 4, 5, 6, 3, 4, 5, 6]);
    assert_eq!(line.nodes[0].core.counters().events_redelivered, 4);
}

#[test]
fn a_full_durable_refuses_publishers_on_every_node_until_it_drains() {
    let mut line = Line::new(2);
    let limits = RetentionLimits {
        max_events: 3,
        ..RetentionLimits::default()
    };
    line.durable(1, "d", limits);
    for n in 1..=3 {
        line.publish(0, n, "x").unwrap();
    }
    let refusal = line.publish(0, 4, "x").unwrap_err();
    assert_eq!(refusal.reason, PublishRefusal::RetentionLimit);
    assert!(
        refusal.message.contains("max 3 events"),
        "{}",
        refusal.message
    );
    line.nodes[1].core.handle_ack(1, 1, 3, line.now);
    line.settle();
    line.publish(0, 4, "x").unwrap();
    assert_eq!(line.nodes[1].core.durable_status()[0].held, Some(1));
}

#[test]
fn a_read_answered_after_its_client_was_rewound_is_made_again_at_once() {
    let mut line = Line::new(1);
    line.durable(0, "d", RetentionLimits::default());
    line.publish(0, 1, "one").unwrap();
    line.publish(0, 2, "two").unwrap();
    // The read for the third event is out when the ack wait runs out and
    // the client is rewound to its last ack.
    line.held_reads = Some(Vec::new());
    line.publish(0, 3, "three").unwrap();
    line.advance(Duration::from_secs(6));
    assert_eq!(
        line.positions(0),
        [1, 2],
        "nothing more while the read is out"
    );
    // Its answer is stale; the core reads again without waiting for a tick.
    line.answer_held_reads();
    assert_eq!(line.positions(0), [1, 2, 1, 2, 3]);
}
