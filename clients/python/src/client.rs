//! The client: connecting, publishing, subscribing, requests.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pyo3::prelude::*;
use pyo3::pybacked::{PyBackedBytes, PyBackedStr};
use tokio::sync::broadcast;
use treescale::topic::Topic;
use treescale::trust::TrustConfig;
use treescale::wire::{Destination, RetentionLimits};
use treescale::{Client, ClientOptions, ConnectionEvent, DurableOptions, NodeId, Qos};

use crate::awaitable::awaitable;
use crate::errors::{invalid, raise, raise_on_connect};
use crate::event::Event;
use crate::feed::NativeSubscription;

type Headers = Option<Vec<(String, String)>>;

/// A payload as Python programs hold one: bytes, bytearray or str (sent
/// as UTF-8).
#[derive(FromPyObject)]
pub enum Payload {
    Bytes(PyBackedBytes),
    Text(PyBackedStr),
}

impl From<Payload> for Bytes {
    fn from(payload: Payload) -> Bytes {
        match payload {
            Payload::Bytes(bytes) => Bytes::copy_from_slice(&bytes),
            Payload::Text(text) => Bytes::copy_from_slice(text.as_bytes()),
        }
    }
}

/// Connects as `ClientOptions` says; an argument left `None` keeps the Rust
/// client's default.
#[pyfunction]
#[pyo3(signature = (*, nodes, interfaces, cluster, certs, insecure, token, name, connect_timeout, reconnect_for, buffer_bytes, retain_bytes, keep_alive, idle_timeout))]
#[allow(clippy::too_many_arguments)]
pub fn connect(
    py: Python<'_>,
    nodes: Vec<String>,
    interfaces: Vec<String>,
    cluster: Option<String>,
    certs: Option<PathBuf>,
    insecure: bool,
    token: Option<String>,
    name: Option<String>,
    connect_timeout: Option<f64>,
    reconnect_for: Option<f64>,
    buffer_bytes: Option<usize>,
    retain_bytes: Option<usize>,
    keep_alive: Option<f64>,
    idle_timeout: Option<f64>,
) -> PyResult<Bound<'_, PyAny>> {
    let mut options = ClientOptions {
        // Resolving a host name may block: not while holding the interpreter.
        nodes: py.detach(|| nodes.iter().map(|n| resolve(n)).collect::<PyResult<_>>())?,
        interfaces,
        trust: match (insecure, certs) {
            (true, _) => TrustConfig::Insecure,
            (false, Some(dir)) => TrustConfig::Dir(dir),
            (false, None) => TrustConfig::UserDefault,
        },
        token,
        ..ClientOptions::default()
    };
    if let Some(cluster) = cluster {
        options.cluster = cluster;
    }
    if let Some(name) = name {
        options.name = name;
    }
    if let Some(timeout) = connect_timeout {
        options.connect_timeout = seconds("connect_timeout", timeout)?;
    }
    options.reconnect.give_up = reconnect_for
        .map(|d| seconds("reconnect_for", d))
        .transpose()?;
    if let Some(bytes) = buffer_bytes {
        options.reconnect.buffer_bytes = bytes;
    }
    if let Some(bytes) = retain_bytes {
        options.reconnect.retain_bytes = bytes;
    }
    if let Some(every) = keep_alive {
        options.liveness.keep_alive = seconds("keep_alive", every)?;
    }
    if let Some(after) = idle_timeout {
        options.liveness.idle_timeout = seconds("idle_timeout", after)?;
    }
    awaitable(py, async move {
        let client = Client::connect(options).await.map_err(raise_on_connect)?;
        Ok(NativeClient {
            client: Arc::new(client),
        })
    })
}

/// `HOST:PORT` as the CLI's `--node` takes it.
fn resolve(node: &str) -> PyResult<SocketAddr> {
    if let Ok(addr) = node.parse() {
        return Ok(addr);
    }
    node.to_socket_addrs()
        .map_err(|e| invalid(format!("{node:?} is not HOST:PORT ({e})")))?
        .next()
        .ok_or_else(|| invalid(format!("{node:?} resolves to no address")))
}

/// A duration given in seconds, as Python's own APIs take them.
pub fn seconds(what: &str, value: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(value).map_err(|_| {
        invalid(format!(
            "{what} must be a number of seconds, 0 or more; got {value}"
        ))
    })
}

/// A node id given as 64 hex digits.
fn node_id(node: Option<String>) -> PyResult<Option<NodeId>> {
    node.map(|node| {
        node.parse::<NodeId>()
            .map_err(|e| invalid(format!("{node:?} is not a node id ({e})")))
    })
    .transpose()
}

fn topic(topic: &str) -> PyResult<Topic> {
    Topic::new(topic).map_err(|e| invalid(e.to_string()))
}

#[pyclass(frozen, module = "treescale._native")]
pub struct NativeClient {
    client: Arc<Client>,
}

#[pymethods]
impl NativeClient {
    /// Publishes at most once, to every subscriber or (with `to`, a node id
    /// or name) to the subscribers of one node; returns the event's id.
    #[pyo3(signature = (topic, payload, headers=None, to=None))]
    fn publish<'py>(
        &self,
        py: Python<'py>,
        topic: &str,
        payload: Payload,
        headers: Headers,
        to: Option<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (client, topic) = (self.client.clone(), self::topic(topic)?);
        let payload = Bytes::from(payload);
        let headers = headers.unwrap_or_default();
        let to = to.map(|to| match to.parse::<NodeId>() {
            Ok(id) => Destination::Node(id),
            Err(_) => Destination::Named(to),
        });
        awaitable(py, async move {
            let id = match to {
                None => client.publish_with_headers(topic, headers, payload).await,
                Some(to) => {
                    client
                        .publish_to_with_headers(to, topic, headers, payload)
                        .await
                }
            };
            Ok(id.map_err(raise)?.to_string())
        })
    }

    /// Publishes at least once; returns the event's id once the node has
    /// stored it.
    #[pyo3(signature = (topic, payload, headers=None))]
    fn publish_at_least_once<'py>(
        &self,
        py: Python<'py>,
        topic: &str,
        payload: Payload,
        headers: Headers,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (client, topic) = (self.client.clone(), self::topic(topic)?);
        let payload = Bytes::from(payload);
        let headers = headers.unwrap_or_default();
        awaitable(py, async move {
            let id = client
                .publish_with_qos(Qos::AtLeastOnce, topic, headers, payload)
                .await
                .map_err(raise)?;
            Ok(id.to_string())
        })
    }

    #[pyo3(signature = (pattern, group=None))]
    fn subscribe<'py>(
        &self,
        py: Python<'py>,
        pattern: String,
        group: Option<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let client = self.client.clone();
        awaitable(py, async move {
            let subscription = match group {
                None => client.subscribe(&pattern).await,
                Some(group) => client.subscribe_group(&pattern, &group).await,
            };
            Ok(NativeSubscription::plain(subscription.map_err(raise)?))
        })
    }

    #[pyo3(signature = (name, pattern, *, max_events=None, max_bytes=None, max_age=None, ack_wait=None, handled=0))]
    #[allow(clippy::too_many_arguments)]
    fn subscribe_durable<'py>(
        &self,
        py: Python<'py>,
        name: String,
        pattern: String,
        max_events: Option<u64>,
        max_bytes: Option<u64>,
        max_age: Option<f64>,
        ack_wait: Option<f64>,
        handled: u64,
    ) -> PyResult<Bound<'py, PyAny>> {
        let mut options = DurableOptions {
            handled,
            ..DurableOptions::default()
        };
        let limits: &mut RetentionLimits = &mut options.limits;
        limits.max_events = max_events.unwrap_or(limits.max_events);
        limits.max_bytes = max_bytes.unwrap_or(limits.max_bytes);
        if let Some(age) = max_age {
            limits.max_age_ms = seconds("max_age", age)?.as_millis() as u64;
        }
        if let Some(wait) = ack_wait {
            options.ack_wait = seconds("ack_wait", wait)?;
        }
        let client = self.client.clone();
        awaitable(py, async move {
            let subscription = client
                .subscribe_durable(&name, &pattern, options)
                .await
                .map_err(raise)?;
            Ok(NativeSubscription::durable(subscription))
        })
    }

    /// Sends a request and returns the first answer, as an Event.
    #[pyo3(signature = (topic, payload, headers=None, timeout=5.0))]
    fn request<'py>(
        &self,
        py: Python<'py>,
        topic: &str,
        payload: Payload,
        headers: Headers,
        timeout: f64,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (client, topic) = (self.client.clone(), self::topic(topic)?);
        let payload = Bytes::from(payload);
        let headers = headers.unwrap_or_default();
        let timeout = seconds("timeout", timeout)?;
        awaitable(py, async move {
            let reply = client
                .request_with_headers(topic, headers, payload, timeout)
                .await
                .map_err(raise)?;
            Ok(Event::plain(reply))
        })
    }

    /// Answers `request`, an event a subscription received.
    #[pyo3(signature = (request, payload, headers=None))]
    fn respond<'py>(
        &self,
        py: Python<'py>,
        request: &Event,
        payload: Payload,
        headers: Headers,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (client, request) = (self.client.clone(), request.event.clone());
        let payload = Bytes::from(payload);
        let headers = headers.unwrap_or_default();
        awaitable(py, async move {
            client
                .respond_with_headers(&request, headers, payload)
                .await
                .map_err(raise)
        })
    }

    fn flush<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let client = self.client.clone();
        awaitable(py, async move { client.flush().await.map_err(raise) })
    }

    /// The status of the client's node, or of `node` (an id) anywhere in
    /// the tree, as the JSON `treescale status --json` prints.
    #[pyo3(signature = (node=None))]
    fn status<'py>(&self, py: Python<'py>, node: Option<String>) -> PyResult<Bound<'py, PyAny>> {
        let (client, node) = (self.client.clone(), node_id(node)?);
        awaitable(py, async move {
            let status = match node {
                None => client.status().await,
                Some(node) => client.status_of(node).await,
            };
            let status = status.map_err(raise)?;
            Ok(serde_json::to_string(&status).expect("a status serializes"))
        })
    }

    /// The subtree of the client's node, or of `node` anywhere in the tree
    /// (at the root, the whole tree), as JSON.
    #[pyo3(signature = (node=None))]
    fn tree<'py>(&self, py: Python<'py>, node: Option<String>) -> PyResult<Bound<'py, PyAny>> {
        let (client, node) = (self.client.clone(), node_id(node)?);
        awaitable(py, async move {
            let tree = match node {
                None => client.tree().await,
                Some(node) => client.tree_of(node).await,
            };
            let tree = tree.map_err(raise)?;
            Ok(serde_json::to_string(&tree).expect("a tree serializes"))
        })
    }

    fn wait_for_interest<'py>(
        &self,
        py: Python<'py>,
        topic: String,
        timeout: f64,
    ) -> PyResult<Bound<'py, PyAny>> {
        let client = self.client.clone();
        let timeout = seconds("timeout", timeout)?;
        awaitable(py, async move {
            client
                .wait_for_interest(&topic, timeout)
                .await
                .map_err(raise)
        })
    }

    fn close<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let client = self.client.clone();
        awaitable(py, async move {
            client.close().await;
            Ok(())
        })
    }

    /// Waits until the client has closed for good, and raises why.
    fn closed<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let client = self.client.clone();
        awaitable(
            py,
            async move { Err::<(), _>(raise(client.closed().await)) },
        )
    }

    fn connection_events(&self) -> ConnectionEvents {
        ConnectionEvents {
            events: Arc::new(tokio::sync::Mutex::new(self.client.connection_events())),
        }
    }

    #[getter]
    fn node_id(&self) -> String {
        self.client.node_id().to_string()
    }

    #[getter]
    fn node_name(&self) -> String {
        self.client.node_name()
    }

    #[getter]
    fn node_addr(&self) -> String {
        self.client.node_addr().to_string()
    }

    #[getter]
    fn user(&self) -> Option<String> {
        self.client.user()
    }

    /// What the node lets this client publish and subscribe to, as JSON.
    #[getter]
    fn grant(&self) -> String {
        serde_json::to_string(&self.client.grant()).expect("a grant serializes")
    }

    #[getter]
    fn is_connected(&self) -> bool {
        self.client.is_connected()
    }

    #[getter]
    fn late_replies(&self) -> u64 {
        self.client.late_replies()
    }
}

/// The changes of a client's connection, from when it was asked for.
#[pyclass(frozen, module = "treescale._native")]
pub struct ConnectionEvents {
    events: Arc<tokio::sync::Mutex<broadcast::Receiver<ConnectionEvent>>>,
}

/// One change: its kind, the reason (when lost or closed), and the node's
/// id, name and address (when reconnected).
type Change = (
    &'static str,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
);

#[pymethods]
impl ConnectionEvents {
    /// The next change; None once the client is gone.
    fn next<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let events = self.events.clone();
        awaitable(py, async move {
            let mut events = events.lock().await;
            loop {
                let change: Change = match events.recv().await {
                    Ok(ConnectionEvent::Disconnected { reason }) => {
                        ("disconnected", Some(reason), None, None, None)
                    }
                    Ok(ConnectionEvent::Reconnected { node, name, addr }) => (
                        "reconnected",
                        None,
                        Some(node.to_string()),
                        Some(name),
                        Some(addr.to_string()),
                    ),
                    Ok(ConnectionEvent::Closed { reason }) => {
                        ("closed", Some(reason), None, None, None)
                    }
                    // Changes missed by a slow reader: the next is current.
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return Ok(None),
                };
                return Ok(Some(change));
            }
        })
    }
}
