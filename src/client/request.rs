//! Request/reply: a request is an event that carries the address of the
//! requester's inbox; one answer comes straight back along the tree, with
//! no subscription for it anywhere.

use std::time::Duration;

use bytes::Bytes;

use super::publish_buffer::Offline;
use super::{Client, ClientError};
use crate::topic::IntoTopic;
use crate::wire::{Event, PublishFrame, RequestFailure};

/// What a waiting request receives.
pub(super) enum Answer {
    Reply(Event),
    Failed(RequestFailure, String),
}

impl Client {
    /// Sends a request to `topic` and waits up to `timeout` for the first
    /// answer. Every subscriber of the topic receives it (one member per
    /// queue group); the first answer wins and later ones are dropped. Fails
    /// at once with [`ClientError::NoResponders`] when no subscription
    /// anywhere in the overlay matches. Many requests may be in flight on
    /// one client.
    pub async fn request(
        &self,
        topic: impl IntoTopic,
        payload: impl Into<Bytes>,
        timeout: Duration,
    ) -> Result<Event, ClientError> {
        self.request_with_headers(topic, Vec::new(), payload, timeout)
            .await
    }

    pub async fn request_with_headers(
        &self,
        topic: impl IntoTopic,
        headers: Vec<(String, String)>,
        payload: impl Into<Bytes>,
        timeout: Duration,
    ) -> Result<Event, ClientError> {
        let event = self.event(topic, headers, payload.into())?;
        self.check_publish(&event.topic)?;
        let topic = event.topic.to_string();
        let request = self.number();
        let rx = self.pending.answer_to(request).map_err(|_| self.gone())?;
        self.send(&PublishFrame::Request { event, request }, Offline::Skip)
            .await?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Answer::Reply(event))) => Ok(event),
            Ok(Ok(Answer::Failed(RequestFailure::NoResponders, _))) => {
                Err(ClientError::NoResponders { topic })
            }
            Ok(Ok(Answer::Failed(RequestFailure::PermissionDenied, message))) => {
                Err(ClientError::PermissionDenied(message))
            }
            Ok(Err(_)) => Err(self.gone()),
            Err(_) => {
                // An answer arriving from now on is late: counted, dropped.
                self.pending.give_up(request);
                Err(ClientError::Timeout { topic, timeout })
            }
        }
    }

    /// Answers `request` (an event received by a subscription) with
    /// `payload`. The answer travels straight to the requester's node.
    /// Needs no permission to publish: only who received the request can
    /// address its answer.
    pub async fn respond(
        &self,
        request: &Event,
        payload: impl Into<Bytes>,
    ) -> Result<(), ClientError> {
        self.respond_with_headers(request, Vec::new(), payload)
            .await
    }

    pub async fn respond_with_headers(
        &self,
        request: &Event,
        headers: Vec<(String, String)>,
        payload: impl Into<Bytes>,
    ) -> Result<(), ClientError> {
        let Some(to) = request.reply.as_deref().copied() else {
            return Err(ClientError::NotARequest(request.id));
        };
        let event = self.event(request.topic.clone(), headers, payload.into())?;
        self.send(&PublishFrame::Reply { event, to }, Offline::Keep)
            .await
    }

    /// Answers that arrived after their request had timed out (or was
    /// answered by another responder first): dropped, and counted here.
    pub fn late_replies(&self) -> u64 {
        self.pending.late_replies()
    }
}
