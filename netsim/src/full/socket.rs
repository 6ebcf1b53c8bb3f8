//! quinn on turmoil's virtual network: an `AsyncUdpSocket` over
//! `turmoil::net::UdpSocket`, one datagram per transmit, with the packet
//! loss of the scenario's lossy links applied on send.

use std::fmt;
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

use super::network::Conditions;

type Readable = Pin<Box<dyn Future<Output = io::Result<()>> + Send>>;

pub struct SimSocket {
    inner: Arc<turmoil::net::UdpSocket>,
    /// The host's address. The socket is bound to 0.0.0.0, which turmoil
    /// reports as its local address, so loss is looked up by this.
    host: IpAddr,
    /// turmoil's `readable()` holds the receive queue's lock while it
    /// waits, so it is kept across polls: dropping it would lose the wakeup.
    readable: Mutex<Option<Readable>>,
    conditions: Arc<Conditions>,
}

impl fmt::Debug for SimSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimSocket")
            .field("local", &self.inner.local_addr().ok())
            .finish()
    }
}

impl SimSocket {
    /// Binds `addr` on the current simulated host, named `host`.
    pub async fn bind(
        addr: SocketAddr,
        host: &str,
        conditions: Arc<Conditions>,
    ) -> io::Result<Arc<Self>> {
        let inner = turmoil::net::UdpSocket::bind(addr).await?;
        Ok(Arc::new(SimSocket {
            inner: Arc::new(inner),
            host: turmoil::lookup(host),
            readable: Mutex::new(None),
            conditions,
        }))
    }
}

/// turmoil's sockets never push back on sends.
#[derive(Debug)]
struct AlwaysWritable;

impl UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncUdpSocket for SimSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(AlwaysWritable)
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        if self.conditions.drops(self.host, transmit.destination.ip()) {
            return Ok(());
        }
        match self
            .inner
            .try_send_to(transmit.contents, transmit.destination)
        {
            Ok(_) => Ok(()),
            // Unreachable or cut off: on a real network the datagram would
            // be lost silently too.
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut readable = self.readable.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(waiting) = readable.as_mut() {
                match waiting.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(result) => {
                        *readable = None;
                        result?;
                    }
                }
            }
            let mut received = 0;
            for (buf, meta) in bufs.iter_mut().zip(meta.iter_mut()) {
                match self.inner.try_recv_from(buf) {
                    Ok((len, addr)) => {
                        *meta = RecvMeta {
                            addr,
                            len,
                            stride: len,
                            ecn: None,
                            dst_ip: None,
                        };
                        received += 1;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
            if received > 0 {
                return Poll::Ready(Ok(received));
            }
            let socket = self.inner.clone();
            *readable = Some(Box::pin(async move { socket.readable().await }));
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn may_fragment(&self) -> bool {
        false
    }
}
