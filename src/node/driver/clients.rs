//! Client requests, and the sessions behind them.

use std::time::Duration;

use crate::node::connection::PeerConnection;
use crate::node::session::SessionHandle;
use crate::overlay::LocalSub;
use crate::topic::{Pattern, Topic};
use crate::wire::{ClientReply, ClientRequest, ErrorCode, RequestError};

use super::*;

impl Driver {
    pub(super) fn request(&mut self, session: u64, request: ClientRequest) {
        let reply = match request {
            ClientRequest::Hello { .. } | ClientRequest::HelloWithToken { .. } => return,
            ClientRequest::Subscribe {
                sub,
                pattern,
                group,
            } => self.subscribe(session, sub, pattern, group),
            ClientRequest::Unsubscribe { sub } => {
                let key = LocalSub { session, sub };
                match self.subscriptions.remove(&key) {
                    Some(Subscription { pattern, group, .. }) => {
                        if let Some(handle) = self.sessions.get_mut(&session) {
                            handle.subscriptions -= 1;
                        }
                        self.overlay.unsubscribe(&pattern, group.as_deref(), key);
                        ClientReply::Unsubscribed { sub }
                    }
                    // A durable subscription keeps its events; only its
                    // client goes.
                    None if self.delivery.detach(session, Some(sub)) => {
                        ClientReply::Unsubscribed { sub }
                    }
                    None => error_reply(
                        sub,
                        RequestError::UnknownSubscription,
                        format!("no subscription {sub}"),
                    ),
                }
            }
            ClientRequest::Tree { request } => ClientReply::Tree {
                request,
                nodes: self.overlay.tree(),
            },
            ClientRequest::Ask {
                request,
                node,
                question,
            } => return self.ask(session, request, node, question),
            ClientRequest::Status { request } => ClientReply::Status {
                request,
                status: Box::new(self.status()),
            },
            ClientRequest::WaitInterest {
                request,
                topic,
                timeout_ms,
            } => match Topic::new(topic) {
                Ok(topic) if self.overlay.has_interest(&topic) => ClientReply::Interest {
                    request,
                    present: true,
                },
                Ok(topic) => {
                    self.waits.push(InterestWait {
                        session,
                        request,
                        topic,
                        deadline: now() + Duration::from_millis(timeout_ms.into()),
                    });
                    return;
                }
                Err(e) => error_reply(request, RequestError::InvalidTopic, e.to_string()),
            },
            ClientRequest::SubscribeDurable {
                sub,
                name,
                pattern,
                limits,
                ack_wait_ms,
            } => {
                let ack_wait = Duration::from_millis(ack_wait_ms.max(1).into());
                if self.sub_in_use(session, sub) {
                    error_reply(
                        sub,
                        RequestError::DuplicateSubscription,
                        format!("subscription {sub} already exists"),
                    )
                } else {
                    let attach = self.delivery.subscribe(
                        session,
                        sub,
                        name.clone(),
                        pattern,
                        limits,
                        ack_wait,
                        now(),
                    );
                    match attach {
                        Ok(()) => return,
                        Err(refusal) => error_reply(sub, refusal.error, refusal.message),
                    }
                }
            }
            ClientRequest::AckDurable { sub, position } => {
                self.delivery.handle_ack(session, sub, position, now());
                return;
            }
        };
        self.reply(session, reply);
    }

    pub(super) fn subscribe(
        &mut self,
        session: u64,
        sub: u64,
        pattern: String,
        group: Option<String>,
    ) -> ClientReply {
        let pattern = match Pattern::new(pattern) {
            Ok(pattern) => pattern,
            Err(e) => return error_reply(sub, RequestError::InvalidPattern, e.to_string()),
        };
        if let Some(group) = &group {
            let valid = !group.is_empty()
                && group.len() <= MAX_GROUP_LEN
                && !group.chars().any(|c| c.is_whitespace() || c.is_control());
            if !valid {
                return error_reply(
                    sub,
                    RequestError::InvalidGroup,
                    format!("queue group must be 1 to {MAX_GROUP_LEN} bytes without whitespace"),
                );
            }
        }
        let key = LocalSub { session, sub };
        if self.sub_in_use(session, sub) {
            return error_reply(
                sub,
                RequestError::DuplicateSubscription,
                format!("subscription {sub} already exists"),
            );
        }
        let limit = self.shared.limits.subscriptions_per_client;
        let Some(handle) = self.sessions.get_mut(&session) else {
            return error_reply(
                sub,
                RequestError::UnknownSubscription,
                "session gone".into(),
            );
        };
        if handle.subscriptions >= limit {
            return error_reply(
                sub,
                RequestError::TooManySubscriptions,
                format!("this client already holds {limit} subscriptions, the node's --max-subscriptions-per-client"),
            );
        }
        handle.subscriptions += 1;
        self.overlay.subscribe(&pattern, group.as_deref(), key);
        let since = now();
        self.subscriptions.insert(
            key,
            Subscription {
                pattern,
                group,
                since,
            },
        );
        ClientReply::Subscribed { sub }
    }

    pub(super) fn session_closed(&mut self, session: u64) {
        if let Some(handle) = self.sessions.remove(&session) {
            self.inboxes.remove(&handle.inbox);
            // Handed to its connection but never wholly written: lost to
            // it (a slow consumer's queue, or a client that left).
            self.counters.events_dropped += handle.backlog.events();
        }
        self.delivery.detach(session, None);
        self.delivery.publisher_gone(session);
        self.waits.retain(|w| w.session != session);
        let gone: Vec<LocalSub> = self
            .subscriptions
            .keys()
            .filter(|k| k.session == session)
            .copied()
            .collect();
        for key in gone {
            let Subscription { pattern, group, .. } =
                self.subscriptions.remove(&key).expect("listed above");
            self.overlay.unsubscribe(&pattern, group.as_deref(), key);
        }
    }

    pub(super) fn reply(&self, session: u64, reply: ClientReply) {
        if let Some(handle) = self.sessions.get(&session) {
            let _ = handle.replies.send(reply);
        }
    }

    pub(super) fn answer_waits(&mut self) {
        if self.waits.is_empty() {
            return;
        }
        let now = now();
        let mut waits = std::mem::take(&mut self.waits);
        waits.retain(|wait| {
            let present = self.overlay.has_interest(&wait.topic);
            if present || wait.deadline <= now {
                self.reply(
                    wait.session,
                    ClientReply::Interest {
                        request: wait.request,
                        present,
                    },
                );
                return false;
            }
            true
        });
        self.waits = waits;
    }

    /// Disconnects, as slow consumers, the clients that are congested and
    /// have written nothing for [`STALLED_AFTER`]: they hold every
    /// publisher back and do not drain.
    pub(super) fn find_stalled_clients(&mut self) {
        let now = now();
        for (session, handle) in self.sessions.iter_mut() {
            if handle.slow || !handle.backlog.is_congested() {
                handle.stalled = None;
                continue;
            }
            let written = handle.backlog.written();
            match handle.stalled {
                Some((seen, since)) if seen == written => {
                    if now.duration_since(since) >= STALLED_AFTER {
                        let why = format!(
                            "{} of deliveries waited and none were read for {STALLED_AFTER:?} (a quarter of --max-consumer-bytes holds every publisher back)",
                            mib(handle.backlog.bytes())
                        );
                        disconnect_slow_consumer(*session, handle, &why);
                    }
                }
                _ => handle.stalled = Some((written, now)),
            }
        }
    }

    /// Whether the client's subscription number `sub` is taken.
    pub(super) fn sub_in_use(&self, session: u64, sub: u64) -> bool {
        self.subscriptions.contains_key(&LocalSub { session, sub })
            || self.delivery.is_attached(session, sub)
    }
}

/// Closes a client's connection with `SLOW_CONSUMER`, saying `why`; what
/// was queued for it no longer holds publishers back.
pub(super) fn disconnect_slow_consumer(session: u64, handle: &mut SessionHandle, why: &str) {
    tracing::warn!(
        session,
        "client does not read its deliveries; disconnecting it: {why}"
    );
    let reason = format!("slow consumer: {why}");
    handle
        .connection
        .close_with(ErrorCode::SlowConsumer, reason.as_bytes());
    handle.slow = true;
    handle.backlog.abandon();
}

/// A byte count for people.
pub(super) fn mib(bytes: usize) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

pub(super) fn error_reply(request: u64, error: RequestError, message: String) -> ClientReply {
    ClientReply::Error {
        request,
        error,
        message,
    }
}
