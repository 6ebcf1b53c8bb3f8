//! Drives several overlay cores against each other in memory, with a fake
//! clock and instant, lossless links.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::*;

struct Net {
    nodes: BTreeMap<NodeId, Overlay>,
    /// Control messages in flight, in send order.
    wire: VecDeque<(NodeId, NodeId, NodeMessage)>,
    links: BTreeSet<(NodeId, NodeId)>,
    now: Instant,
}

fn id(n: u8) -> NodeId {
    NodeId::from_bytes([n; 32])
}

fn addr(n: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 17000 + n as u16))
}

impl Net {
    fn new(ids: &[u8]) -> Self {
        let mut net = Net {
            nodes: BTreeMap::new(),
            wire: VecDeque::new(),
            links: BTreeSet::new(),
            now: Instant::now(),
        };
        for n in ids {
            net.nodes
                .insert(id(*n), Overlay::new(id(*n), OverlayConfig::default()));
        }
        net
    }

    fn discover_all(&mut self) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for a in &ids {
            for b in &ids {
                let addr = addr(b.as_bytes()[0]);
                self.nodes
                    .get_mut(a)
                    .unwrap()
                    .handle_discovered(*b, vec![addr], self.now);
            }
        }
    }

    fn link_key(a: NodeId, b: NodeId) -> (NodeId, NodeId) {
        (a.min(b), a.max(b))
    }

    /// Runs until no action or message is left, advancing the clock to
    /// each timeout.
    fn settle(&mut self) {
        for _ in 0..10_000 {
            let mut progressed = false;
            let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
            for me in &ids {
                while let Some(action) = self.nodes.get_mut(me).unwrap().poll_action() {
                    progressed = true;
                    match action {
                        Action::Send { peer, message } => self.wire.push_back((*me, peer, message)),
                        Action::Dial { target, .. } => {
                            let peer = match target {
                                DialTarget::Node(peer) => peer,
                                DialTarget::Static(a) => id((a.port() - 17000) as u8),
                            };
                            if self.links.insert(Self::link_key(*me, peer)) {
                                let now = self.now;
                                let (me_addr, peer_addr) =
                                    (addr(me.as_bytes()[0]), addr(peer.as_bytes()[0]));
                                let dialer = self.nodes.get_mut(me).unwrap();
                                dialer.handle_link_up(peer, peer_addr, Some(target), now);
                                let acceptor = self.nodes.get_mut(&peer).unwrap();
                                acceptor.handle_link_up(*me, me_addr, None, now);
                            } else {
                                self.nodes
                                    .get_mut(me)
                                    .unwrap()
                                    .handle_dial_failed(target, self.now);
                            }
                        }
                    }
                }
            }
            while let Some((from, to, message)) = self.wire.pop_front() {
                progressed = true;
                if self.links.contains(&Self::link_key(from, to)) {
                    let now = self.now;
                    self.nodes
                        .get_mut(&to)
                        .unwrap()
                        .handle_message(from, message, now);
                }
            }
            if !progressed {
                let next = self.nodes.values().filter_map(|n| n.poll_timeout()).min();
                match next {
                    Some(t) if t > self.now && t < self.now + Duration::from_secs(60) => {
                        self.now = t;
                        for node in self.nodes.values_mut() {
                            node.handle_timeout(t);
                        }
                    }
                    Some(t) if t <= self.now => {
                        for node in self.nodes.values_mut() {
                            node.handle_timeout(self.now);
                        }
                    }
                    _ => return,
                }
            }
        }
        panic!("network did not settle");
    }

    fn cut(&mut self, a: NodeId, b: NodeId) {
        self.links.remove(&Self::link_key(a, b));
        let now = self.now;
        self.nodes.get_mut(&a).unwrap().handle_link_down(b, now);
        self.nodes.get_mut(&b).unwrap().handle_link_down(a, now);
    }

    fn crash(&mut self, dead: NodeId) {
        let peers: Vec<NodeId> = self.nodes.keys().copied().filter(|n| *n != dead).collect();
        self.nodes.remove(&dead);
        for peer in peers {
            if self.links.remove(&Self::link_key(dead, peer)) {
                let now = self.now;
                let node = self.nodes.get_mut(&peer).unwrap();
                node.handle_link_down(dead, now);
                node.handle_vanished(dead);
            }
        }
    }

    /// Checks the tree invariants and returns the root.
    fn assert_one_tree(&self) -> NodeId {
        let min = *self.nodes.keys().next().unwrap();
        for (me, node) in &self.nodes {
            assert_eq!(node.position().root, min, "{me:?} has the wrong root");
            let mut depth = 0;
            let mut at = *me;
            while let Some(parent) = self.nodes[&at].parent() {
                assert!(parent < at, "parent must have the smaller id");
                assert!(
                    self.nodes[&parent].is_child(at),
                    "{parent:?} does not know child {at:?}"
                );
                at = parent;
                depth += 1;
            }
            assert_eq!(at, min);
            assert_eq!(node.position().depth, depth);
        }
        min
    }

    /// Publishes from `origin`, forwards hop by hop, and returns how many
    /// times each local subscription received the event.
    fn publish(&mut self, origin: NodeId, topic: &str) -> BTreeMap<(NodeId, LocalSub), usize> {
        let topic = Topic::new(topic).unwrap();
        let mut got = BTreeMap::new();
        let mut queue = VecDeque::from([(origin, Hop::Local, None::<Vec<GroupKey>>)]);
        while let Some((at, from, assigned)) = queue.pop_front() {
            let mut route = Route::default();
            self.nodes
                .get_mut(&at)
                .unwrap()
                .route(from, &topic, assigned.as_deref(), &mut route);
            for sub in route.local {
                *got.entry((at, sub)).or_default() += 1;
            }
            for (edge, groups) in route.edges {
                queue.push_back((edge, Hop::Edge(at), Some(groups)));
            }
        }
        got
    }
}

#[test]
fn a_full_mesh_settles_into_one_tree_rooted_at_the_smallest_id() {
    let mut net = Net::new(&[5, 3, 9, 1, 7, 2]);
    net.discover_all();
    net.settle();
    assert_eq!(net.assert_one_tree(), id(1));
}

#[test]
fn every_subscriber_gets_each_event_exactly_once() {
    let mut net = Net::new(&[4, 2, 8, 6, 1]);
    net.discover_all();
    net.settle();
    let sub = LocalSub { session: 1, sub: 1 };
    for n in [2, 6, 8] {
        let pattern = Pattern::new("orders.*").unwrap();
        net.nodes
            .get_mut(&id(n))
            .unwrap()
            .subscribe(&pattern, None, sub);
    }
    net.settle();
    for origin in [1, 4, 8] {
        let got = net.publish(id(origin), "orders.eu");
        let expected: BTreeMap<_, _> = [2, 6, 8].iter().map(|n| ((id(*n), sub), 1)).collect();
        assert_eq!(got, expected, "published on {origin}");
    }
    assert!(net.publish(id(4), "invoices.eu").is_empty());
}

#[test]
fn orphans_reattach_and_interest_follows_when_the_root_dies() {
    let mut net = Net::new(&[1, 2, 3, 4]);
    net.discover_all();
    net.settle();
    let sub = LocalSub { session: 9, sub: 1 };
    net.nodes
        .get_mut(&id(4))
        .unwrap()
        .subscribe(&Pattern::new(">").unwrap(), None, sub);
    net.settle();
    net.crash(id(1));
    net.settle();
    assert_eq!(net.assert_one_tree(), id(2));
    let got = net.publish(id(3), "any.topic");
    assert_eq!(got, BTreeMap::from([((id(4), sub), 1)]));
}

#[test]
fn a_lost_link_is_redialled_with_backoff() {
    let mut net = Net::new(&[1, 2]);
    net.discover_all();
    net.settle();
    let start = net.now;
    net.cut(id(1), id(2));
    net.settle();
    assert!(net.now > start, "the redial waited for its backoff");
    assert_eq!(net.assert_one_tree(), id(1));
}

#[test]
fn queue_group_events_reach_one_member_each() {
    let mut net = Net::new(&[1, 2, 3, 4, 5]);
    net.discover_all();
    net.settle();
    let pattern = Pattern::new("jobs").unwrap();
    for n in [2, 3, 5] {
        let sub = LocalSub {
            session: n as u64,
            sub: 1,
        };
        net.nodes
            .get_mut(&id(n))
            .unwrap()
            .subscribe(&pattern, Some("w"), sub);
    }
    net.settle();
    let mut shares: BTreeMap<NodeId, usize> = BTreeMap::new();
    for _ in 0..3000 {
        let got = net.publish(id(4), "jobs");
        assert_eq!(got.values().sum::<usize>(), 1);
        *shares.entry(got.keys().next().unwrap().0).or_default() += 1;
    }
    for n in [2, 3, 5] {
        assert_eq!(shares[&id(n)], 1000, "{shares:?}");
    }
}

#[test]
fn unreachable_discovered_peers_expire_but_static_ones_do_not() {
    let mut overlay = Overlay::new(id(5), OverlayConfig::default());
    let mut now = Instant::now();
    overlay.handle_discovered(id(2), vec![addr(2)], now);
    overlay.add_static_peer(addr(3), now);
    let mut dials = 0;
    while now < Instant::now() + Duration::from_secs(30) {
        while let Some(action) = overlay.poll_action() {
            if let Action::Dial { target, .. } = action {
                dials += 1;
                overlay.handle_dial_failed(target, now);
            }
        }
        now = overlay.poll_timeout().expect("static peer keeps a timer");
        overlay.handle_timeout(now);
    }
    assert!(!overlay.candidates.contains_key(&DialTarget::Node(id(2))));
    assert!(overlay
        .candidates
        .contains_key(&DialTarget::Static(addr(3))));
    assert!(dials < 40, "backoff keeps redials rare: {dials}");
}

#[test]
fn nodes_reached_through_one_static_peer_learn_the_rest() {
    // A chain of static peers where the middle node has the largest id:
    // without peer exchange the two ends would each stay a root.
    let mut net = Net::new(&[1, 9, 2]);
    let now = net.now;
    net.nodes
        .get_mut(&id(9))
        .unwrap()
        .add_static_peer(addr(1), now);
    net.nodes
        .get_mut(&id(2))
        .unwrap()
        .add_static_peer(addr(9), now);
    net.settle();
    assert_eq!(net.assert_one_tree(), id(1));
}

#[test]
fn of_two_discovered_nodes_only_the_larger_id_dials() {
    let now = Instant::now();
    let mut small = Overlay::new(id(1), OverlayConfig::default());
    let mut large = Overlay::new(id(2), OverlayConfig::default());
    small.handle_discovered(id(2), vec![addr(2)], now);
    large.handle_discovered(id(1), vec![addr(1)], now);
    assert_eq!(small.poll_action(), None);
    assert_eq!(
        large.poll_action(),
        Some(Action::Dial {
            target: DialTarget::Node(id(1)),
            addrs: vec![addr(1)]
        })
    );
}
