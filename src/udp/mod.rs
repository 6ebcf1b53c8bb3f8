//! The UDP socket under every QUIC endpoint: quinn's own socket code
//! (`quinn::udp`, with segmentation offload), with roomy kernel buffers,
//! and on Unix behind a tokio registration that wakes the endpoint for
//! arriving datagrams only ([`quiet`]).
//!
//! quinn's tokio socket registers for reading and writing at once, and
//! Linux reports a UDP socket writable again each time a datagram it sent
//! is freed: on loopback within the `sendmsg` itself, on a network card
//! when it has sent it, which can wake a sleeping runtime. In a node
//! forwarding a burst of events every millisecond, a quarter of its
//! `epoll_wait`s returned for that alone (strace of a 2-node latency run:
//! 906 of 3,406), each a turn of the runtime with nothing to do.
//! A send here is tried directly; only after one would have blocked does a
//! connection register for writability, until the socket has room again.

#[cfg(unix)]
mod quiet;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

/// Socket buffer size asked of the kernel (it caps it at `net.core.rmem_max`
/// and `wmem_max`). The default ~200 KB overflows under bursts of small
/// events, and every datagram lost there costs a retransmit and halves the
/// congestion window.
const SOCKET_BUFFER: usize = 4 << 20;

/// A socket bound to `addr` for a QUIC endpoint on `runtime`'s reactor.
pub fn bind(
    addr: SocketAddr,
    runtime: &dyn quinn::Runtime,
) -> io::Result<Arc<dyn quinn::AsyncUdpSocket>> {
    let socket = std::net::UdpSocket::bind(addr)?;
    let options = socket2::SockRef::from(&socket);
    // Best effort: a smaller buffer only costs throughput.
    let _ = options.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = options.set_send_buffer_size(SOCKET_BUFFER);
    #[cfg(unix)]
    {
        // Registered with the current tokio reactor, the one `runtime` is.
        let _ = runtime;
        Ok(quiet::Socket::new(socket)?)
    }
    #[cfg(not(unix))]
    runtime.wrap_udp_socket(socket)
}
