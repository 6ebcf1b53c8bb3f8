//! A client's connection as a session sees it: bare QUIC
//! (`treescale-client/1`), or a browser's WebTransport session inside a
//! QUIC connection (`h3`). Streams, frames and messages are the same on
//! both; only opening, accepting and closing differ.

use rustls::pki_types::CertificateDer;

use crate::tls;
use crate::wire::stream::{RecvStream, SendStream};

/// One client's connection.
#[derive(Clone)]
pub enum ClientConnection {
    Quic(quinn::Connection),
    /// Boxed: a session is large, and handles move through the driver's inbox.
    Web(Box<web_transport_quinn::Session>),
}

impl ClientConnection {
    /// The QUIC connection underneath.
    pub(super) fn quic(&self) -> &quinn::Connection {
        match self {
            ClientConnection::Quic(connection) => connection,
            ClientConnection::Web(session) => session,
        }
    }

    /// The certificate the client showed in the handshake; browsers show
    /// none.
    pub fn peer_certificate(&self) -> Option<CertificateDer<'static>> {
        tls::peer_certificate(self.quic())
    }

    /// The next stream the client opens in both directions; `None` once
    /// the connection is gone.
    pub async fn accept_bi(&self) -> Option<(SendStream, RecvStream)> {
        match self {
            ClientConnection::Quic(connection) => {
                let (send, recv) = connection.accept_bi().await.ok()?;
                Some((send.into(), recv.into()))
            }
            ClientConnection::Web(session) => {
                let (send, recv) = session.accept_bi().await.ok()?;
                Some((send.into(), recv.into()))
            }
        }
    }
}
