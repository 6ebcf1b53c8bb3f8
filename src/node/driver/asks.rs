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

/// Questions one client may have on their way at once: each holds memory
/// here until answered or forgotten.
pub(super) const MAX_QUESTIONS_PER_CLIENT: usize = 256;

/// A question this node passed on for one of its clients.
pub(super) struct PendingAsk {
    session: u64,
    request: u64,
    /// The node asked.
    node: NodeId,
    deadline: Instant,
}

impl Driver {
    /// A client's question about `node`: answered here, or sent on its way.
    pub(super) fn ask(&mut self, session: u64, request: u64, node: NodeId, question: Question) {
        let Some(questions) = self.sessions.get(&session).map(|handle| handle.questions) else {
            return;
        };
        if node == self.overlay.id() {
            let answer = self.answer(question);
            return self.reply(session, answer_reply(request, node, answer));
        }
        if questions >= MAX_QUESTIONS_PER_CLIENT {
            let message = format!(
                "{MAX_QUESTIONS_PER_CLIENT} questions to other nodes are unanswered; wait for their answers"
            );
            let refusal = error_reply(request, RequestError::TooManyQuestions, message);
            return self.reply(session, refusal);
        }
        if let Some(handle) = self.sessions.get_mut(&session) {
            handle.questions += 1;
        }
        self.next_ask += 1;
        let ask = self.next_ask;
        let pending = PendingAsk {
            session,
            request,
            node,
            deadline: now() + ASK_TIMEOUT,
        };
        self.asks.insert(ask, pending);
        let from = self.overlay.id();
        self.handle_ask(Hop::Local, node, from, ask, question);
    }

    /// A question from a client of node `from`: answered when it is for
    /// this node, else passed on towards `to`; answered `Unknown` where
    /// the way to `to` ends (at the root, when the tree holds no such node).
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
            return self.handle_answer(Hop::Local, from, ask, answer);
        }
        match self.overlay.next_hop(hop, &Destination::Node(to)) {
            NextHop::Edge(peer) => {
                let frame = NodeEventFrame::Ask {
                    to,
                    from,
                    ask,
                    question,
                };
                self.forward(peer, frame);
            }
            _ => self.handle_answer(Hop::Local, from, ask, Answer::Unknown),
        }
    }

    /// An answer: handed to the client that asked when it is for this node,
    /// else passed on towards `to`.
    pub(super) fn handle_answer(&mut self, hop: Hop, to: NodeId, ask: u64, answer: Answer) {
        if to != self.overlay.id() {
            match self.overlay.next_hop(hop, &Destination::Node(to)) {
                NextHop::Edge(peer) => {
                    self.forward(peer, NodeEventFrame::Answer { to, ask, answer })
                }
                _ => {
                    self.counters.events_unroutable += 1;
                    tracing::debug!(node = %to.short(), "answer for a node not in this tree dropped");
                }
            }
            return;
        }
        // Gone when the answer is late or its client left.
        if let Some(pending) = self.asks.remove(&ask) {
            self.answered(pending.session);
            let reply = answer_reply(pending.request, pending.node, answer);
            self.reply(pending.session, reply);
        }
    }

    /// Forgets questions whose answers are overdue.
    pub(super) fn expire_asks(&mut self, now: Instant) {
        let overdue: Vec<u64> = self
            .asks
            .iter()
            .filter(|(_, pending)| pending.deadline <= now)
            .map(|(&ask, _)| ask)
            .collect();
        for ask in overdue {
            if let Some(pending) = self.asks.remove(&ask) {
                self.answered(pending.session);
            }
        }
    }

    fn answered(&mut self, session: u64) {
        if let Some(handle) = self.sessions.get_mut(&session) {
            handle.questions -= 1;
        }
    }

    fn answer(&mut self, question: Question) -> Answer {
        match question {
            Question::Status => Answer::Status(Box::new(self.status())),
            Question::Tree => Answer::Tree(self.overlay.tree()),
        }
    }
}

/// The client's reply to its question `request` about `node`.
fn answer_reply(request: u64, node: NodeId, answer: Answer) -> ClientReply {
    match answer {
        Answer::Status(status) => ClientReply::Status { request, status },
        Answer::Tree(nodes) => ClientReply::Tree { request, nodes },
        Answer::Unknown => error_reply(
            request,
            RequestError::UnknownNode,
            format!("no node {} in this tree", node.short()),
        ),
    }
}
