//! Connecting: finding a node, the QUIC handshake, the hello, and the
//! tasks that serve the connection; and what a closed connection means.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use tokio::sync::{mpsc, Semaphore};

use super::deliveries::{read_deliveries, read_publish_replies, read_replies};
use super::pending::Pending;
use super::publish_buffer::{self, PublishBuffer};
use super::{Client, ClientError, ClientOptions, MAX_UNCONFIRMED};
use crate::discovery;
use crate::tls;
use crate::trust;
use crate::wire::stream::{write_each, FrameReader, FrameWriter};
use crate::wire::{ClientReply, ClientRequest, ErrorCode, DEFAULT_MAX_FRAME, PROTOCOL_VERSION};

impl Client {
    /// Connects to the node `options` names, or to one found over mDNS,
    /// retrying until the connect timeout while the node is unreachable.
    pub async fn connect(options: ClientOptions) -> Result<Client, ClientError> {
        let (identity, trust) = trust::client_credentials(&options.trust)?;
        let (addr, expected) = match options.node {
            Some(addr) => (addr, None),
            None => {
                let found = discovery::find_node(
                    &options.cluster,
                    &trust.fingerprint(),
                    &options.interfaces,
                    options.connect_timeout,
                )
                .await?;
                let Some((id, addrs)) = found else {
                    return Err(ClientError::NoNodeFound {
                        cluster: options.cluster.clone(),
                        waited: options.connect_timeout,
                    });
                };
                (addrs[0], Some(id))
            }
        };
        let config = tls::client_dial_config(identity.as_ref(), &trust, expected, options.liveness);
        let deadline = tokio::time::Instant::now() + options.connect_timeout;
        let attempts = async {
            loop {
                match Self::connect_to(addr, config.clone(), &options).await {
                    // A handshake gives up after the idle timeout, which may
                    // be shorter than the connect timeout: a node that is
                    // still starting gets the whole wait.
                    Err(ClientError::Unreachable { .. })
                        if tokio::time::Instant::now() < deadline => {}
                    other => return other,
                }
            }
        };
        tokio::time::timeout_at(deadline, attempts)
            .await
            .map_err(|_| ClientError::Unreachable {
                addr,
                waited: options.connect_timeout,
            })?
    }

    async fn connect_to(
        addr: SocketAddr,
        config: quinn::ClientConfig,
        options: &ClientOptions,
    ) -> Result<Client, ClientError> {
        let connect_error = |reason: String| ClientError::Connect { addr, reason };
        let endpoint = match &options.endpoint {
            Some(endpoint) => endpoint.clone(),
            None => {
                let bind: SocketAddr = if addr.is_ipv4() {
                    ([0, 0, 0, 0], 0).into()
                } else {
                    (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
                };
                crate::tls::endpoint(bind, None).map_err(|e| connect_error(e.to_string()))?
            }
        };
        let connection = endpoint
            .connect_with(config, addr, trust::NODE_SERVER_NAME)
            .map_err(|e| connect_error(e.to_string()))?
            .await
            .map_err(|e| match e {
                quinn::ConnectionError::TimedOut => ClientError::Unreachable {
                    addr,
                    waited: options.connect_timeout,
                },
                quinn::ConnectionError::ConnectionClosed(close)
                    if close.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
                {
                    connect_error(
                        "the node refused the connection: this address holds as many as it allows (its --max-connections-per-address)".into(),
                    )
                }
                quinn::ConnectionError::TransportError(error) if is_tls_alert(error.code) => {
                    connect_error(format!(
                        "this client does not trust the node's certificate ({}): the node is of another cluster, or its certificate expired; check the certs dir (--certs, docs/security.md)",
                        error.reason
                    ))
                }
                quinn::ConnectionError::ConnectionClosed(close) if is_tls_alert(close.error_code) => {
                    closed_error(&quinn::ConnectionError::ConnectionClosed(close), addr.to_string())
                }
                other => connect_error(other.to_string()),
            })?;
        let closed = |e: &quinn::ConnectionError| closed_error(e, addr.to_string());
        let (send, recv) = connection.open_bi().await.map_err(|e| closed(&e))?;
        let mut control = FrameWriter::new(send);
        let hello = ClientRequest::Hello {
            version: PROTOCOL_VERSION,
            name: options.name.clone(),
        };
        let mut replies = FrameReader::new(recv, DEFAULT_MAX_FRAME);
        let welcome = async {
            control.send(&hello).await.map_err(|e| e.to_string())?;
            replies
                .next::<ClientReply>()
                .await
                .map_err(|e| e.to_string())
        };
        let (node, node_name, user, grant) = match welcome.await {
            Ok(Some(ClientReply::Welcome {
                node,
                name,
                user,
                grant,
                ..
            })) => (node, name, user, grant),
            Ok(_) | Err(_) => {
                let reason = connection.closed().await;
                return Err(closed(&reason));
            }
        };
        let (publish_send, publish_recv) = connection.open_bi().await.map_err(|e| closed(&e))?;
        let pending = Arc::new(Pending::default());
        let (requests_tx, requests_rx) = mpsc::unbounded_channel();
        let publishes = PublishBuffer::new();
        tokio::spawn(write_each(control.into_stream(), requests_rx));
        tokio::spawn(publish_buffer::write(publishes.clone(), publish_send));
        tokio::spawn(read_replies(replies, pending.clone()));
        tokio::spawn(read_publish_replies(
            FrameReader::new(publish_recv, DEFAULT_MAX_FRAME),
            pending.clone(),
        ));
        tokio::spawn(read_deliveries(
            connection.clone(),
            pending.clone(),
            publishes.clone(),
        ));
        Ok(Client {
            connection,
            endpoint,
            node,
            node_name,
            user,
            grant,
            requests: requests_tx,
            publishes,
            pending,
            next_number: AtomicU64::new(1),
            publisher: rand::random(),
            next_seq: AtomicU64::new(1),
            unconfirmed: Arc::new(Semaphore::new(MAX_UNCONFIRMED)),
            at_least_once_order: tokio::sync::Mutex::new(()),
        })
    }
}

/// Why the connection to `node` (a description for people) ended.
pub(super) fn closed_error(error: &quinn::ConnectionError, node: String) -> ClientError {
    match error {
        // The node judges a client certificate once the client's side of
        // the handshake is done, so a refusal arrives as a close.
        quinn::ConnectionError::ConnectionClosed(close) if is_tls_alert(close.error_code) => {
            ClientError::Closed(format!(
                "the node refused this client's certificate ({}): the client is of another cluster, shows no certificate, or its certificate expired; check the certs dir (--certs, docs/security.md)",
                close.reason.escape_ascii()
            ))
        }
        quinn::ConnectionError::ApplicationClosed(close)
            if ErrorCode::from_varint(close.error_code) == Some(ErrorCode::SlowConsumer) =>
        {
            let reason = String::from_utf8_lossy(&close.reason);
            ClientError::SlowConsumer {
                reason: reason.trim_start_matches("slow consumer: ").to_string(),
            }
        }
        quinn::ConnectionError::ApplicationClosed(close) => {
            let code = ErrorCode::from_varint(close.error_code)
                .map(|c| format!("{c:?}"))
                .unwrap_or_else(|| close.error_code.to_string());
            ClientError::Closed(format!(
                "{code} ({})",
                String::from_utf8_lossy(&close.reason)
            ))
        }
        quinn::ConnectionError::TimedOut => ClientError::NotAnswering { node },
        other => ClientError::ConnectionLost {
            node,
            reason: other.to_string(),
        },
    }
}

/// Whether a QUIC error code carries a TLS alert: the handshake refused a
/// certificate.
fn is_tls_alert(code: impl Into<u64>) -> bool {
    (0x100..0x200).contains(&code.into())
}
