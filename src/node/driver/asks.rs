//! Questions a client asks of another node of the tree
//! ([`ClientRequest::Ask`]): passed along the tree path to that node,
//! answered there, and the answer passed back the same way.

use crate::overlay::NextHop;
use crate::wire::{Answer, ClientReply, Destination, Question, RequestError};

use super::clients::error_reply;
use super::*;

/// How long a node waits for an answer before forgetting the question; the
/// client has given up by then.
const ASK_TIMEOUT: Duration = Duration::from_secs(10);

/// A question this node passed on for one of its clients.
pub(super) struct PendingAsk {
    session: u64,
    request: u64,
    deadline: Instant,
}

impl Driver {
    /// A client's question about `node`: answered here, sent on its way, or
    /// refused when the tree holds no such node.
    pub(super) fn ask(&mut self, session: u64, request: u64, node: NodeId, question: Question) {
        let reply = if node == self.overlay.id() {
            answer_reply(request, self.answer(question))
        } else {
            match self.overlay.next_hop(Hop::Local, &Destination::Node(node)) {
                NextHop::Edge(peer) => {
                    self.next_ask += 1;
                    let ask = self.next_ask;
                    let deadline = now() + ASK_TIMEOUT;
                    let pending = PendingAsk {
                        session,
                        request,
                        deadline,
                    };
                    self.asks.insert(ask, pending);
                    let from = self.overlay.id();
                    let frame = NodeEventFrame::Ask {
                        to: node,
                        from,
                        ask,
                        question,
                    };
                    self.forward(peer, frame);
                    return;
                }
                _ => error_reply(
                    request,
                    RequestError::UnknownNode,
                    format!("no node {} in this tree", node.short()),
                ),
            }
        };
        self.reply(session, reply);
    }

    /// A question from a client of node `from`: answered when it is for
    /// this node, else passed on towards `to`.
    pub(super) fn handle_ask(
        &mut self,
        hop: Hop,
        to: NodeId,
        from: NodeId,
        ask: u64,
        question: Question,
    ) {
        if to == self.overlay.id() {
            let answer = self.answer(question);
            self.handle_answer(Hop::Local, from, ask, answer);
        } else {
            self.pass_on(
                hop,
                to,
                NodeEventFrame::Ask {
                    to,
                    from,
                    ask,
                    question,
                },
            );
        }
    }

    /// An answer: handed to the client that asked when it is for this node,
    /// else passed on towards `to`.
    pub(super) fn handle_answer(&mut self, hop: Hop, to: NodeId, ask: u64, answer: Answer) {
        if to != self.overlay.id() {
            return self.pass_on(hop, to, NodeEventFrame::Answer { to, ask, answer });
        }
        // Gone when the answer is late or its client left.
        if let Some(pending) = self.asks.remove(&ask) {
            self.reply(pending.session, answer_reply(pending.request, answer));
        }
    }

    /// Forgets questions whose answers are overdue.
    pub(super) fn expire_asks(&mut self, now: Instant) {
        self.asks.retain(|_, pending| pending.deadline > now);
    }

    fn pass_on(&mut self, hop: Hop, to: NodeId, frame: NodeEventFrame) {
        match self.overlay.next_hop(hop, &Destination::Node(to)) {
            NextHop::Edge(peer) => self.forward(peer, frame),
            _ => {
                self.counters.events_unroutable += 1;
                tracing::debug!(node = %to.short(), "question or answer for a node not in this tree dropped");
            }
        }
    }

    fn answer(&mut self, question: Question) -> Answer {
        match question {
            Question::Status => Answer::Status(Box::new(self.status())),
            Question::Tree => Answer::Tree(self.overlay.tree()),
        }
    }
}

fn answer_reply(request: u64, answer: Answer) -> ClientReply {
    match answer {
        Answer::Status(status) => ClientReply::Status { request, status },
        Answer::Tree(nodes) => ClientReply::Tree { request, nodes },
    }
}
