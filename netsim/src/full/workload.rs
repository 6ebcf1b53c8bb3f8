//! The applications of a scenario: each publisher and subscriber is a
//! client on a host of its own, connected to its node, that reconnects
//! when the node goes away. Everything they publish, get confirmed and
//! receive goes into the ledger, which the report is made from.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use treescale::client::{ClientOptions, DurableOptions};
use treescale::trust::TrustConfig;
use treescale::Client;

use super::network::Conditions;
use super::socket::SimSocket;
use crate::ledger::{EventKey, Ledger};
use crate::scenario::{Publisher, Qos, Subscriber};

/// How long an application waits before connecting again.
const RECONNECT_PAUSE: Duration = Duration::from_millis(500);

pub type SharedLedger = Rc<RefCell<Ledger>>;

fn now_ms() -> u64 {
    turmoil::sim_elapsed().unwrap_or_default().as_millis() as u64
}

fn payload(publisher: usize, seq: u64, size: usize) -> Bytes {
    let mut bytes = BytesMut::with_capacity(size);
    bytes.put_u64(publisher as u64);
    bytes.put_u64(seq);
    bytes.resize(size, 0);
    bytes.freeze()
}

fn key_of(payload: &[u8]) -> Option<EventKey> {
    let publisher = u64::from_be_bytes(payload.get(..8)?.try_into().ok()?);
    let seq = u64::from_be_bytes(payload.get(8..16)?.try_into().ok()?);
    Some((publisher as usize, seq))
}

/// How an application reaches its node.
pub struct Connector {
    pub node: SocketAddr,
    pub conditions: Arc<Conditions>,
    /// Seeds each attempt's QUIC endpoint, with the attempt's number.
    pub seed: [u8; 32],
    /// The cluster's certs dir.
    pub trust: TrustConfig,
}

/// Connects, retrying until it works. Each attempt's QUIC endpoint is
/// seeded from the connector's seed and the attempt's number.
async fn connect(connector: &Connector, name: &str, attempts: &mut u8) -> Client {
    let Connector {
        node,
        conditions,
        seed,
        trust,
    } = connector;
    loop {
        *attempts = attempts.wrapping_add(1);
        let mut seed = *seed;
        seed[0] ^= *attempts;
        let attempt = async {
            let socket = SimSocket::bind(([0, 0, 0, 0], 0).into(), name, conditions.clone())
                .await
                .map_err(|e| e.to_string())?;
            let endpoint = quinn::Endpoint::new_with_abstract_socket(
                super::seeded_endpoint(seed),
                None,
                socket,
                Arc::new(quinn::TokioRuntime),
            )
            .map_err(|e| e.to_string())?;
            let mut options = ClientOptions::to_node(*node);
            options.endpoint = Some(endpoint);
            options.name = name.to_string();
            options.trust = trust.clone();
            Client::connect(options).await.map_err(|e| e.to_string())
        };
        match attempt.await {
            Ok(client) => return client,
            Err(e) => {
                tracing::debug!(app = name, "cannot connect: {e}");
                tokio::time::sleep(RECONNECT_PAUSE).await;
            }
        }
    }
}

/// Publishes at the configured rate from `from` until `until`.
pub async fn publish(
    index: usize,
    spec: Publisher,
    until: Duration,
    connector: Connector,
    ledger: SharedLedger,
) {
    let name = format!("publisher-{index}");
    let mut attempts = 0;
    let interval = Duration::from_secs(1) / spec.rate;
    tokio::time::sleep(spec.from.saturating_sub(Duration::from_millis(now_ms()))).await;
    'connection: loop {
        let client = connect(&connector, &name, &mut attempts).await;
        let mut ticks = tokio::time::interval(interval);
        loop {
            ticks.tick().await;
            if Duration::from_millis(now_ms()) >= until {
                return;
            }
            let seq = ledger.borrow_mut().publish(index, now_ms());
            let body = payload(index, seq, spec.size);
            let sent = match spec.qos {
                Qos::AtMostOnce => client.publish(&spec.topic, body).await.map(|_| ()),
                Qos::AtLeastOnce => {
                    match client
                        .publish_at_least_once(&spec.topic, Vec::new(), body)
                        .await
                    {
                        Ok(confirmation) => {
                            let ledger = ledger.clone();
                            tokio::task::spawn_local(async move {
                                if confirmation.confirmed().await.is_ok() {
                                    ledger.borrow_mut().ack((index, seq));
                                }
                            });
                            Ok(())
                        }
                        Err(e) => Err(e),
                    }
                }
            };
            if sent.is_err() {
                tokio::time::sleep(RECONNECT_PAUSE).await;
                continue 'connection;
            }
        }
    }
}

/// Subscribes and records every event handed over, for the whole run.
pub async fn subscribe(index: usize, spec: Subscriber, connector: Connector, ledger: SharedLedger) {
    let name = format!("subscriber-{index}");
    let mut attempts = 0;
    let record = |payload: &[u8]| {
        if let Some(key) = key_of(payload) {
            ledger.borrow_mut().receive(index, key, now_ms());
        }
    };
    let ready = || ledger.borrow_mut().ready(index, now_ms());
    // The last durable position handed over, so a reconnect does not hand
    // it over again.
    let mut handled = 0;
    loop {
        let client = connect(&connector, &name, &mut attempts).await;
        match (&spec.durable, &spec.group) {
            (Some(durable), _) => {
                let options = DurableOptions {
                    handled,
                    ..DurableOptions::default()
                };
                if let Ok(mut subscription) = client
                    .subscribe_durable(durable, &spec.pattern, options)
                    .await
                {
                    ready();
                    while let Some(delivered) = subscription.next().await {
                        record(&delivered.event.payload);
                        handled = delivered.position;
                        subscription.ack(delivered.position);
                    }
                }
            }
            (None, group) => {
                let subscribed = match group {
                    Some(group) => client.subscribe_group(&spec.pattern, group).await,
                    None => client.subscribe(&spec.pattern).await,
                };
                if let Ok(mut subscription) = subscribed {
                    ready();
                    while let Some(event) = subscription.next().await {
                        record(&event.payload);
                    }
                }
            }
        }
        tokio::time::sleep(RECONNECT_PAUSE).await;
    }
}
