//! TreeScale: a zero-configuration, QUIC-based peer-to-peer overlay for
//! publish/subscribe.
//!
//! # Layout
//!
//! - [`topic`]: topics and wildcard patterns.
//! - [`identity`]: a node's key, a key with its certificate, and [`NodeId`].
//! - [`trust`]: the cluster CA, certificates it issues, client permissions.
//! - [`wire`]: ALPNs, error codes, framing and every message on the wire.
//! - [`tls`]: rustls configs and what each handshake checks.
//! - [`udp`]: the UDP socket under every QUIC endpoint.
//! - [`overlay`]: the sans-IO core: membership, the tree, per-edge interest
//!   and routing. No sockets, clock or randomness inside.
//! - [`delivery`]: the second sans-IO core: delivery guarantees. The
//!   directory of durable subscriptions, custody from hop to hop, the
//!   outbox and its resends, delivery to durable subscribers.
//! - [`discovery`]: how nodes find each other (mDNS), behind a trait.
//! - [`node`]: the driver that runs both cores over quinn.
//! - [`store`]: the outbox, durable subscriptions' queues and the dedup
//!   state behind a trait: LMDB (heed) on disk, or memory; written by one
//!   group-committing thread.
//! - [`client`]: the client library, [`Client`].
//!
//! The `netsim` crate of this workspace drives the same node and client
//! code on a simulated network (see docs/netsim.md).
//!
//! One event's journey: a client's publish frame is decoded by its session
//! task ([`node`]), the driver asks the core for the event's [`overlay::Route`],
//! and the frames are batched onto the event streams of the chosen edges.
//! An at-least-once event also goes to the [`delivery`] core, which has the
//! [`store`] commit it, then confirms it and sends it on towards durable
//! subscriptions.

pub mod client;
pub mod delivery;
pub mod discovery;
pub mod identity;
pub mod node;
pub mod overlay;
pub mod store;
pub mod tls;
pub mod topic;
pub mod trust;
pub mod udp;
pub mod web;
pub mod wire;

pub use client::{
    Client, ClientError, ClientOptions, Confirmation, ConnectionEvent, DurableAcker, DurableEvent,
    DurableOptions, DurableSubscription, Qos, Reconnect, Subscription,
};
pub use identity::NodeId;
pub use node::{Node, NodeConfig, NodeError};
pub use wire::{Event, EventId};
