//! A UDP socket for quinn that the runtime wakes for arriving datagrams
//! only (see the parent module for why).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// A UDP socket for quinn, registered with the runtime for reading only.
#[derive(Debug)]
pub struct Socket {
    io: AsyncFd<std::net::UdpSocket>,
    state: UdpSocketState,
    /// A send would have blocked, and no poller has seen room since.
    full: AtomicBool,
}

impl Socket {
    /// Takes `socket` over. Needs a tokio runtime.
    pub fn new(socket: std::net::UdpSocket) -> io::Result<Arc<Socket>> {
        socket.set_nonblocking(true)?;
        let state = UdpSocketState::new((&socket).into())?;
        let io = register(socket, Interest::READABLE)?;
        Ok(Arc::new(Socket {
            io,
            state,
            full: AtomicBool::new(false),
        }))
    }
}

fn register(
    socket: std::net::UdpSocket,
    interest: Interest,
) -> io::Result<AsyncFd<std::net::UdpSocket>> {
    // SAFETY: a `UdpSocket` owns its descriptor, open and unchanged, until
    // it is dropped, which the `AsyncFd` owning it does last.
    unsafe { AsyncFd::register_with_interest(socket, interest) }.map_err(io::Error::from)
}

impl AsyncUdpSocket for Socket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Writable {
            socket: self,
            waiting: None,
        })
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        for part in sends(transmit) {
            let sent = self.state.send(self.io.get_ref().into(), &part);
            if matches!(&sent, Err(e) if e.kind() == io::ErrorKind::WouldBlock) {
                self.full.store(true, Ordering::Relaxed);
            }
            // After a would-block quinn tries the whole batch again: the
            // parts already sent go twice, and the peer drops the copies
            // (a lost part would cost a retransmit and the congestion
            // window).
            sent?;
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [io::IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut ready = ready!(self.io.poll_read_ready(cx))?;
            // On `WouldBlock` the guard clears the readiness, and the next
            // poll waits for the next datagram.
            if let Ok(received) =
                ready.try_io(|socket| self.state.recv(socket.get_ref().into(), bufs, meta))
            {
                return Poll::Ready(received);
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.get_ref().local_addr()
    }

    fn may_fragment(&self) -> bool {
        self.state.may_fragment()
    }

    fn max_transmit_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.state.gro_segments()
    }
}

/// The most one UDP send carries: the kernel refuses a batch of datagrams
/// (segmentation offload) past an IPv4 packet's 65,535 bytes less its
/// headers.
const MAX_SEND: usize = 65_507;

/// `transmit` as the UDP sends that carry it. quinn batches up to 10
/// datagrams of the path's MTU in one transmit; once datagrams pass ~6,550
/// bytes (on loopback, where MTU discovery reaches the 16 KiB ceiling
/// `tls` sets) a batch is more than one send carries, and the kernel would
/// refuse it whole.
fn sends<'a>(transmit: &'a Transmit<'a>) -> impl Iterator<Item = Transmit<'a>> + 'a {
    let per_send = match transmit.segment_size {
        Some(size) if transmit.contents.len() > MAX_SEND => (MAX_SEND / size).max(1) * size,
        _ => transmit.contents.len(),
    };
    transmit
        .contents
        .chunks(per_send.max(1))
        .map(|part| Transmit {
            destination: transmit.destination,
            ecn: transmit.ecn,
            contents: part,
            segment_size: transmit.segment_size.filter(|&size| part.len() > size),
            src_ip: transmit.src_ip,
        })
}

/// Tells a connection whether to send. quinn asks before every send: the
/// socket counts as writable until a send would have blocked; then a
/// duplicate of its descriptor is registered for writability until the
/// kernel reports room.
#[derive(Debug)]
struct Writable {
    socket: Arc<Socket>,
    waiting: Option<AsyncFd<std::net::UdpSocket>>,
}

impl UdpPoller for Writable {
    fn poll_writable(self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        let Writable { socket, waiting } = self.get_mut();
        let registered = match waiting {
            Some(registered) => registered,
            None if !socket.full.load(Ordering::Relaxed) => return Poll::Ready(Ok(())),
            None => {
                let duplicate = socket.io.get_ref().try_clone()?;
                // Registering reports a socket that already has room at once.
                waiting.insert(register(duplicate, Interest::WRITABLE)?)
            }
        };
        let room = ready!(registered.poll_write_ready(cx)).map(drop);
        *waiting = None;
        socket.full.store(false, Ordering::Relaxed);
        Poll::Ready(room)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A batch of large datagrams goes in as many sends as it needs: 10 of
    /// 16 KiB in sends of 3, 3, 3 and 1; a batch that fits stays one send.
    #[test]
    fn a_batch_past_one_send_is_split_at_datagram_bounds() {
        let contents = vec![0u8; 10 * 16_384];
        let batch = |contents, segment_size| Transmit {
            destination: "127.0.0.1:9".parse().unwrap(),
            ecn: None,
            contents,
            segment_size: Some(segment_size),
            src_ip: None,
        };
        let large = batch(&contents, 16_384);
        let parts: Vec<_> = sends(&large)
            .map(|part| (part.contents.len(), part.segment_size))
            .collect();
        let three = (3 * 16_384, Some(16_384));
        assert_eq!(parts, [three, three, three, (16_384, None)]);
        let ethernet = batch(&contents[..10 * 1_452], 1_452);
        let parts: Vec<_> = sends(&ethernet)
            .map(|part| (part.contents.len(), part.segment_size))
            .collect();
        assert_eq!(parts, [(10 * 1_452, Some(1_452))]);
    }

    /// Such a batch arrives whole, where the kernel refuses it as one send.
    #[tokio::test]
    async fn a_batch_of_large_datagrams_arrives() {
        let bind = || Socket::new(std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        let (a, b) = (bind(), bind());
        if a.max_transmit_segments() < 2 {
            eprintln!("skipped: no UDP segmentation offload here");
            return;
        }
        let payload = vec![7u8; 10 * 16_384];
        a.try_send(&Transmit {
            destination: b.local_addr().unwrap(),
            ecn: None,
            contents: &payload,
            segment_size: Some(16_384),
            src_ip: None,
        })
        .unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut received = 0;
        while received < payload.len() {
            let mut meta = [RecvMeta::default()];
            let read = std::future::poll_fn(|cx| {
                let mut bufs = [io::IoSliceMut::new(&mut buf)];
                b.poll_recv(cx, &mut bufs, &mut meta)
            });
            tokio::time::timeout(Duration::from_secs(5), read)
                .await
                .expect("every datagram arrives")
                .unwrap();
            received += meta[0].len;
        }
        assert_eq!(received, payload.len());
    }

    /// A datagram sent arrives, and a sender refused once is told when the
    /// kernel has room again.
    #[tokio::test]
    async fn datagrams_arrive_and_a_refused_sender_waits_for_room() {
        let bind = || Socket::new(std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        let (a, b) = (bind(), bind());
        let payload = [7u8; 1200];
        let transmit = |to| Transmit {
            destination: to,
            ecn: None,
            contents: &payload,
            segment_size: None,
            src_ip: None,
        };
        let to_b = transmit(b.local_addr().unwrap());
        a.try_send(&to_b).unwrap();

        let mut buf = vec![0u8; 64 << 10];
        let mut meta = [RecvMeta::default()];
        let received = std::future::poll_fn(|cx| {
            let mut bufs = [io::IoSliceMut::new(&mut buf)];
            b.poll_recv(cx, &mut bufs, &mut meta)
        });
        let count = tokio::time::timeout(Duration::from_secs(5), received)
            .await
            .expect("the datagram arrives")
            .unwrap();
        assert_eq!(count, 1);
        assert_eq!(meta[0].len, payload.len());
        assert_eq!(&buf[..payload.len()], &payload);

        // Loopback never refuses a send, so the refusal is set by hand.
        let mut poller = a.clone().create_io_poller();
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert!(
            poller.as_mut().poll_writable(&mut cx).is_ready(),
            "room is assumed before a refusal"
        );
        a.full.store(true, Ordering::Relaxed);
        let mut first = poller.as_mut().poll_writable(&mut cx);
        if first.is_pending() {
            // Registered: the kernel reports the room the socket has.
            let room = std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx));
            let room = tokio::time::timeout(Duration::from_secs(5), room).await;
            first = Poll::Ready(room.expect("room is reported"));
        }
        assert!(matches!(first, Poll::Ready(Ok(()))));
        assert!(
            !a.full.load(Ordering::Relaxed),
            "room seen clears the refusal"
        );
        a.try_send(&to_b).unwrap();
    }
}
