//! The wire protocol: ALPNs, error codes, framing and the messages of every
//! stream. docs/protocol.md is the prose version of this module; keep the
//! two in step.

pub mod frame;
pub(crate) mod hot;
mod messages;
pub mod shared;
pub mod stream;

pub use frame::{FrameError, Message, DEFAULT_MAX_FRAME};
pub use messages::*;

/// Protocol version carried in every hello. A peer speaking another version
/// is refused with [`ErrorCode::VersionMismatch`]. Version 2: clients
/// publish events without an origin (`Published`). Version 3: the status
/// says what waits for each peer and what is congested. Version 4:
/// requests and their replies. Version 5: a node's control messages are
/// split between its overlay and delivery cores. Version 6: custody frames
/// carry the publisher's epoch, and nodes release at-least-once events to
/// their publishers. Version 7: clients ask any node of the tree for its
/// status or subtree (`Ask`), and nodes pass the question along. Version
/// 8: deep nodes climb to shallower slots, directory entries carry epochs.
/// Version 9: a node changes parents make-before-break (`Settle`,
/// `Settled`, and `Assigned` for copies it already delivered). Version
/// 10: interest that comes back after a repair is marked (`repair`), and
/// nodes send it what their replay windows kept (`Replayed`).
pub const PROTOCOL_VERSION: u32 = 10;

/// ALPN of node-to-node connections.
pub const NODE_ALPN: &[u8] = b"treescale-node/1";
/// ALPN of client-to-node connections.
pub const CLIENT_ALPN: &[u8] = b"treescale-client/1";

/// QUIC application error codes a connection is closed with. The numbers
/// are part of the protocol: never reuse one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ErrorCode {
    /// Orderly close: the peer is going away or the work is done.
    Closed = 0x0,
    /// A frame's body does not decode as the message the stream carries.
    MalformedFrame = 0x1,
    /// A frame's length prefix exceeds the receiver's limit.
    FrameTooLarge = 0x2,
    /// A frame names a message kind the receiver does not know.
    UnknownMessage = 0x3,
    /// The hello named a protocol version the receiver does not speak.
    VersionMismatch = 0x4,
    /// Something other than a hello came first.
    HelloRequired = 0x5,
    /// The certificate does not hash to the node id announced for the peer.
    IdentityMismatch = 0x6,
    /// Both nodes dialled at once; this connection lost the tie-break.
    DuplicateConnection = 0x7,
    /// The peer belongs to another cluster.
    ClusterMismatch = 0x8,
    /// A message that is valid on its own arrived where the protocol does not
    /// allow it (a second hello, a stream of the wrong kind).
    ProtocolViolation = 0x9,
    /// A node-ALPN peer presented no certificate.
    CertificateRequired = 0xA,
    /// A client did not read its deliveries, and what waited for it reached
    /// the node's `--max-consumer-bytes`.
    SlowConsumer = 0xB,
    /// A certificate of the cluster that is not a node's (a client's) was
    /// shown on the node ALPN.
    NotANode = 0xC,
    /// The node is stopping. Unlike `Closed` (a link one side no longer
    /// needs), the peer should not count on it for a while.
    ShuttingDown = 0xD,
    /// A client showed no certificate and no valid token (missing, expired,
    /// malformed, or not signed by this cluster's CA); the close reason
    /// says which.
    TokenRefused = 0xE,
}

impl ErrorCode {
    pub fn varint(self) -> quinn::VarInt {
        quinn::VarInt::from_u32(self as u32)
    }

    /// The code a peer closed with, when it is one of ours.
    pub fn from_varint(code: quinn::VarInt) -> Option<Self> {
        use ErrorCode::*;
        [
            Closed,
            MalformedFrame,
            FrameTooLarge,
            UnknownMessage,
            VersionMismatch,
            HelloRequired,
            IdentityMismatch,
            DuplicateConnection,
            ClusterMismatch,
            ProtocolViolation,
            CertificateRequired,
            SlowConsumer,
            NotANode,
            ShuttingDown,
            TokenRefused,
        ]
        .into_iter()
        .find(|c| c.varint() == code)
    }

    /// The reason phrase sent in the CONNECTION_CLOSE frame.
    pub fn reason(self) -> &'static [u8] {
        match self {
            ErrorCode::Closed => b"closed",
            ErrorCode::MalformedFrame => b"malformed frame",
            ErrorCode::FrameTooLarge => b"frame too large",
            ErrorCode::UnknownMessage => b"unknown message kind",
            ErrorCode::VersionMismatch => b"protocol version mismatch",
            ErrorCode::HelloRequired => b"hello required first",
            ErrorCode::IdentityMismatch => b"certificate does not match node id",
            ErrorCode::DuplicateConnection => b"duplicate connection",
            ErrorCode::ClusterMismatch => b"cluster mismatch",
            ErrorCode::ProtocolViolation => b"protocol violation",
            ErrorCode::CertificateRequired => b"certificate required",
            ErrorCode::SlowConsumer => b"slow consumer: deliveries waiting exceed the node's limit",
            ErrorCode::NotANode => b"not a node: a client certificate on the node ALPN",
            ErrorCode::ShuttingDown => b"node shutting down",
            ErrorCode::TokenRefused => b"token refused",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_round_trip() {
        for code in 0..=0xE {
            let varint = quinn::VarInt::from_u32(code);
            let parsed = ErrorCode::from_varint(varint).expect("every code up to 0xE is defined");
            assert_eq!(parsed.varint(), varint);
        }
        assert_eq!(ErrorCode::from_varint(quinn::VarInt::from_u32(0xF)), None);
    }
}
