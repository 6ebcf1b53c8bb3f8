//! Connecting: finding a node, the QUIC handshake and the hello; and what
//! a closed connection means.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinSet;

use super::{ClientError, ClientOptions};
use crate::discovery;
use crate::identity::{Identity, NodeId};
use crate::tls;
use crate::trust::{self, Grant, Trust};
use crate::wire::stream::{FrameReader, FrameWriter};
use crate::wire::{ClientReply, ClientRequest, ErrorCode, DEFAULT_MAX_FRAME, PROTOCOL_VERSION};

/// How long after dialling the preferred node the next one is dialled too:
/// a live node answers within it on a LAN, a dead one does not.
const STAGGER: Duration = Duration::from_millis(250);

/// The node a client is connected to, as its welcome named it.
pub(super) struct NodeLink {
    pub connection: quinn::Connection,
    pub id: NodeId,
    pub name: String,
    /// Who the node knows this client as; `None` in insecure mode.
    pub user: Option<String>,
    /// What the node lets this client do.
    pub grant: Grant,
}

impl NodeLink {
    /// The node as people know it: name, short id and address.
    pub fn describe(&self) -> String {
        let short = self.id.short();
        let addr = self.connection.remote_address();
        if self.name == short {
            format!("{short} at {addr}")
        } else {
            format!("{} ({short}) at {addr}", self.name)
        }
    }
}

/// A connection whose hello the node answered, with the client's streams.
pub(super) struct Dialed {
    pub node: Arc<NodeLink>,
    pub control: FrameWriter,
    pub replies: FrameReader,
    pub publish_send: quinn::SendStream,
    pub publish_recv: quinn::RecvStream,
}

/// Dials the nodes a client may use, for its first connection and every
/// reconnect.
pub(super) struct Dialer {
    options: ClientOptions,
    identity: Option<Identity>,
    trust: Trust,
    /// The endpoints dialled from, one per address family, kept so a
    /// reconnect does not open another socket.
    endpoints: Mutex<Vec<quinn::Endpoint>>,
}

impl Dialer {
    pub fn new(options: ClientOptions) -> Result<Self, ClientError> {
        let (identity, trust) = match options.token {
            Some(_) => (None, trust::server_trust(&options.trust)?),
            None => trust::client_credentials(&options.trust)?,
        };
        Ok(Dialer {
            options,
            identity,
            trust,
            endpoints: Mutex::new(Vec::new()),
        })
    }

    /// The first connection: retries until the connect timeout while no
    /// node answers (one may still be starting).
    pub async fn first(&self) -> Result<Dialed, ClientError> {
        let timeout = self.options.connect_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let attempts = async {
            loop {
                match self.any(None, timeout).await {
                    // A handshake gives up after the idle timeout, which may
                    // be shorter than the connect timeout: a node that is
                    // still starting gets the whole wait.
                    Err(ClientError::Unreachable { .. } | ClientError::NoneReachable { .. })
                        if tokio::time::Instant::now() < deadline =>
                    {
                        tokio::time::sleep(STAGGER / 5).await
                    }
                    other => return other,
                }
            }
        };
        tokio::time::timeout_at(deadline, attempts)
            .await
            .map_err(|_| self.unreachable(timeout))?
    }

    /// One round: dials every known node, `prefer` first and the others
    /// each a little later, and keeps the first that answers. With no
    /// addresses, asks mDNS for one.
    pub async fn any(
        &self,
        prefer: Option<SocketAddr>,
        timeout: Duration,
    ) -> Result<Dialed, ClientError> {
        let targets = self.targets(prefer, timeout).await?;
        let mut dials = JoinSet::new();
        for (i, (addr, expected)) in targets.into_iter().enumerate() {
            let config = tls::client_dial_config(
                self.identity.as_ref(),
                &self.trust,
                expected,
                self.options.liveness,
            );
            let endpoint = self.endpoint_for(addr)?;
            let hello = match &self.options.token {
                Some(token) => ClientRequest::HelloWithToken {
                    version: PROTOCOL_VERSION,
                    name: self.options.name.clone(),
                    token: token.clone(),
                },
                None => ClientRequest::Hello {
                    version: PROTOCOL_VERSION,
                    name: self.options.name.clone(),
                },
            };
            let waited = timeout;
            dials.spawn(async move {
                tokio::time::sleep(STAGGER * i as u32).await;
                let dial = dial(endpoint, addr, config, hello, waited);
                tokio::time::timeout(waited, dial)
                    .await
                    .unwrap_or(Err(ClientError::Unreachable { addr, waited }))
            });
        }
        let mut last = None;
        while let Some(joined) = dials.join_next().await {
            match joined {
                Ok(Ok(dialed)) => return Ok(dialed),
                Ok(Err(error)) => last = Some(error),
                Err(_) => {}
            }
        }
        Err(match (last, self.options.nodes.len()) {
            (Some(ClientError::Unreachable { .. }), n) if n > 1 => self.unreachable(timeout),
            (Some(error), _) => error,
            (None, _) => self.unreachable(timeout),
        })
    }

    /// Where to dial, in order, with the node id expected there if known.
    async fn targets(
        &self,
        prefer: Option<SocketAddr>,
        timeout: Duration,
    ) -> Result<Vec<(SocketAddr, Option<NodeId>)>, ClientError> {
        if self.options.nodes.is_empty() {
            let found = discovery::find_node(
                &self.options.cluster,
                &self.trust.fingerprint(),
                &self.options.interfaces,
                timeout,
            )
            .await?;
            let Some((id, addrs)) = found else {
                return Err(ClientError::NoNodeFound {
                    cluster: self.options.cluster.clone(),
                    waited: timeout,
                });
            };
            return Ok(vec![(addrs[0], Some(id))]);
        }
        let mut targets: Vec<_> = self.options.nodes.iter().map(|a| (*a, None)).collect();
        if let Some(i) = targets.iter().position(|(a, _)| Some(*a) == prefer) {
            targets[..=i].rotate_right(1);
        }
        Ok(targets)
    }

    fn unreachable(&self, waited: Duration) -> ClientError {
        match self.options.nodes.as_slice() {
            [] => ClientError::NoNodeFound {
                cluster: self.options.cluster.clone(),
                waited,
            },
            [addr] => ClientError::Unreachable {
                addr: *addr,
                waited,
            },
            addrs => ClientError::NoneReachable {
                addrs: addrs.to_vec(),
                waited,
            },
        }
    }

    /// An endpoint of `addr`'s address family.
    fn endpoint_for(&self, addr: SocketAddr) -> Result<quinn::Endpoint, ClientError> {
        if let Some(endpoint) = &self.options.endpoint {
            return Ok(endpoint.clone());
        }
        let mut endpoints = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        let same_family =
            |e: &&quinn::Endpoint| e.local_addr().map(|l| l.is_ipv4()).ok() == Some(addr.is_ipv4());
        if let Some(endpoint) = endpoints.iter().find(same_family) {
            return Ok(endpoint.clone());
        }
        let bind: SocketAddr = if addr.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let endpoint = tls::endpoint(bind, None).map_err(|e| ClientError::Connect {
            addr,
            reason: e.to_string(),
        })?;
        endpoints.push(endpoint.clone());
        Ok(endpoint)
    }

    /// Waits (at most `timeout`) until the endpoints have told every node
    /// they are closing.
    pub async fn wait_idle(&self, timeout: Duration) {
        let endpoints = self
            .endpoints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let all = async {
            for endpoint in endpoints {
                endpoint.wait_idle().await;
            }
        };
        let _ = tokio::time::timeout(timeout, all).await;
    }
}

/// Connects to the node at `addr` and says `hello`.
async fn dial(
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    config: quinn::ClientConfig,
    hello: ClientRequest,
    waited: Duration,
) -> Result<Dialed, ClientError> {
    let connect_error = |reason: String| ClientError::Connect { addr, reason };
    let connection = endpoint
        .connect_with(config, addr, trust::NODE_SERVER_NAME)
        .map_err(|e| connect_error(e.to_string()))?
        .await
        .map_err(|e| match e {
            quinn::ConnectionError::TimedOut => ClientError::Unreachable { addr, waited },
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
    let mut replies = FrameReader::new(recv, DEFAULT_MAX_FRAME);
    let welcome = async {
        control.send(&hello).await.map_err(|e| e.to_string())?;
        replies
            .next::<ClientReply>()
            .await
            .map_err(|e| e.to_string())
    };
    let node = match welcome.await {
        Ok(Some(ClientReply::Welcome {
            node,
            name,
            user,
            grant,
            ..
        })) => NodeLink {
            connection: connection.clone(),
            id: node,
            name,
            user,
            grant,
        },
        Ok(_) | Err(_) => {
            let reason = connection.closed().await;
            return Err(closed(&reason));
        }
    };
    let (publish_send, publish_recv) = connection.open_bi().await.map_err(|e| closed(&e))?;
    Ok(Dialed {
        node: Arc::new(node),
        control,
        replies,
        publish_send,
        publish_recv,
    })
}

/// Whether a client should connect again after losing a connection this
/// way: the node or the network failed, rather than the node refusing
/// this client.
pub(super) fn worth_reconnecting(error: &quinn::ConnectionError) -> bool {
    match error {
        quinn::ConnectionError::TimedOut | quinn::ConnectionError::Reset => true,
        quinn::ConnectionError::ConnectionClosed(close) => !is_tls_alert(close.error_code),
        quinn::ConnectionError::ApplicationClosed(close) => matches!(
            ErrorCode::from_varint(close.error_code),
            Some(ErrorCode::Closed | ErrorCode::ShuttingDown)
        ),
        _ => false,
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
            if ErrorCode::from_varint(close.error_code) == Some(ErrorCode::TokenRefused) =>
        {
            ClientError::Closed(format!(
                "the node refused this client: {}",
                String::from_utf8_lossy(&close.reason)
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
