//! Node identity: a key pair kept in the data dir, and the certificate
//! that vouches for it.
//!
//! A node's [`NodeId`] is the SHA-256 of its certificate's public key
//! (SubjectPublicKeyInfo DER). It never changes while the key is kept, so a
//! restarted node is the same node to its peers, and any peer can check a
//! TLS certificate against the id that discovery announced.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::{Deserialize, Serialize};

/// File names inside the data dir.
const KEY_FILE: &str = "node.key";
/// The node's certificate from the cluster CA.
pub const NODE_CERT_FILE: &str = "node.crt";

/// The stable identity of a node: SHA-256 of its public key.
/// On the wire it is a byte string (a length, 32, then the bytes); in JSON,
/// 64 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct NodeId([u8; 32]);

/// The order of the bytes, compared eight at a time: the derived order
/// called `memcmp` for each comparison, and maps keyed by node id are on
/// every event's path (2.3% of a fan-out's nodes).
impl Ord for NodeId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        let words = |id: &NodeId| -> [u64; 4] {
            std::array::from_fn(|i| {
                u64::from_be_bytes(id.0[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
            })
        };
        words(self).cmp(&words(other))
    }
}

impl PartialOrd for NodeId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Serialize for NodeId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.collect_str(self)
        } else {
            // One slice rather than 32 separate bytes: ids are in every
            // event, and encoding them byte by byte showed in profiles.
            serializer.serialize_bytes(&self.0)
        }
    }
}

impl<'de> Deserialize<'de> for NodeId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            let hex = String::deserialize(deserializer)?;
            hex.parse().map_err(serde::de::Error::custom)
        } else {
            deserializer.deserialize_bytes(IdBytes)
        }
    }
}

/// Reads the 32 bytes of a [`NodeId`] from a byte string.
struct IdBytes;

impl serde::de::Visitor<'_> for IdBytes {
    type Value = NodeId;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("32 bytes of a node id")
    }

    fn visit_bytes<E: serde::de::Error>(self, bytes: &[u8]) -> Result<NodeId, E> {
        <[u8; 32]>::try_from(bytes)
            .map(NodeId)
            .map_err(|_| E::invalid_length(bytes.len(), &self))
    }
}

impl NodeId {
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        NodeId(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The id of whoever holds the key in `spki_der`.
    pub fn from_public_key(spki_der: &[u8]) -> Self {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, spki_der);
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(digest.as_ref());
        NodeId(bytes)
    }

    /// The id a certificate proves, or `None` when it does not parse.
    pub fn from_certificate(cert: &CertificateDer<'_>) -> Option<Self> {
        let parsed = webpki::EndEntityCert::try_from(cert).ok()?;
        Some(Self::from_public_key(
            parsed.subject_public_key_info().as_ref(),
        ))
    }

    /// First 10 hex digits: enough to tell nodes apart in logs and tables.
    pub fn short(&self) -> String {
        self.to_string()[..10].to_string()
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.short())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("node id must be 64 hex digits, got {0:?}")]
pub struct NodeIdParseError(String);

impl std::str::FromStr for NodeId {
    type Err = NodeIdParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || NodeIdParseError(s.to_string());
        if s.len() != 64 || !s.is_ascii() {
            return Err(err());
        }
        let mut bytes = [0u8; 32];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| err())?;
        }
        Ok(NodeId(bytes))
    }
}

/// Why the identity in a data dir could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot create data dir {path}: {source}; pass a writable --data-dir")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}; is the disk full or the dir read-only?")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a TreeScale node key ({reason}); move it away to create a new identity, or point --data-dir elsewhere")]
    CorruptKey { path: PathBuf, reason: String },
    #[error("cannot create a certificate: {0}")]
    Certificate(#[from] rcgen::Error),
}

/// A key pair and the certificate that vouches for it: a node's, or a
/// client's.
pub struct Identity {
    /// Derived from the key; what peers know a node by.
    pub id: NodeId,
    /// Presented in every TLS handshake, as server and as client.
    pub certificate: CertificateDer<'static>,
    key_der: Vec<u8>,
}

impl Identity {
    /// `key` with the certificate issued for it.
    pub fn new(certificate: CertificateDer<'static>, key: &rcgen::KeyPair) -> Self {
        Identity {
            id: NodeId::from_public_key(&rcgen::PublicKeyData::subject_public_key_info(key)),
            certificate,
            key_der: key.serialize_der(),
        }
    }

    /// `key` with a certificate it signed itself: for `--insecure` mode,
    /// where no CA vouches for anyone.
    pub fn self_signed(key: &rcgen::KeyPair) -> Result<Self, rcgen::Error> {
        let params =
            rcgen::CertificateParams::new(vec![crate::trust::NODE_SERVER_NAME.to_string()])?;
        Ok(Self::new(params.self_signed(key)?.der().clone(), key))
    }

    /// A fresh self-signed identity that lives only in memory (tests).
    pub fn ephemeral() -> Result<Self, rcgen::Error> {
        Self::self_signed(&rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)?)
    }

    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
}

/// `key` as PEM in the form every TLS stack reads: PKCS#8 v1 (`BEGIN
/// PRIVATE KEY`), without the public key aws-lc-rs adds to Ed25519 keys (v2),
/// which OpenSSL 3.0 and Python's `cryptography` refuse.
pub fn key_pem(key: &rcgen::KeyPair) -> String {
    let der = pkcs8_v1(&key.serialize_der());
    pem::encode(&pem::Pem::new("PRIVATE KEY", der))
}

/// A PKCS#8 key in version 1: as it is, or without its public key.
pub fn pkcs8_v1(der: &[u8]) -> Vec<u8> {
    use pkcs8::der::{Decode, Encode};
    match pkcs8::PrivateKeyInfo::from_der(der) {
        Ok(mut info) if info.public_key.is_some() => {
            info.public_key = None;
            info.to_der().unwrap_or_else(|_| der.to_vec())
        }
        _ => der.to_vec(),
    }
}

/// The node key kept in `data_dir`, created on first start. It is the
/// node's identity: keep it and the node keeps its id.
pub fn load_or_create_key(data_dir: &Path) -> Result<rcgen::KeyPair, IdentityError> {
    fs::create_dir_all(data_dir).map_err(|source| IdentityError::CreateDir {
        path: data_dir.to_path_buf(),
        source,
    })?;
    let key_path = data_dir.join(KEY_FILE);
    match fs::read_to_string(&key_path) {
        Ok(pem) => rcgen::KeyPair::from_pem(&pem).map_err(|e| IdentityError::CorruptKey {
            path: key_path.clone(),
            reason: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
            write_private(&key_path, key_pem(&key).as_bytes())?;
            Ok(key)
        }
        Err(source) => Err(IdentityError::Read {
            path: key_path,
            source,
        }),
    }
}

fn write_private(path: &Path, contents: &[u8]) -> Result<(), IdentityError> {
    let err = |source| IdentityError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(err)?;
    file.write_all(contents).map_err(err)?;
    file.sync_all().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Node ids sort as their bytes do: elections and tie-breaks
        /// depend on it.
        #[test]
        fn node_ids_sort_as_their_bytes(
            a in proptest::prelude::any::<[u8; 32]>(),
            b in proptest::prelude::any::<[u8; 32]>(),
            same_prefix in 0usize..32,
        ) {
            let mut b = b;
            b[..same_prefix].copy_from_slice(&a[..same_prefix]);
            proptest::prop_assert_eq!(NodeId(a).cmp(&NodeId(b)), a.cmp(&b));
            proptest::prop_assert_eq!(NodeId(a).cmp(&NodeId(a)), std::cmp::Ordering::Equal);
        }
    }

    #[test]
    fn identity_survives_restart() {
        let dir = tempfile::tempdir().unwrap();
        let first = Identity::self_signed(&load_or_create_key(dir.path()).unwrap()).unwrap();
        let second = Identity::self_signed(&load_or_create_key(dir.path()).unwrap()).unwrap();
        assert_eq!(first.id, second.id);
        assert_eq!(
            NodeId::from_certificate(&second.certificate),
            Some(first.id)
        );
    }

    #[test]
    fn keys_are_written_as_pkcs8_v1_and_read_back() {
        use pkcs8::der::Decode;
        let dir = tempfile::tempdir().unwrap();
        let key = load_or_create_key(dir.path()).unwrap();
        let pem = fs::read_to_string(dir.path().join(KEY_FILE)).unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"), "{pem}");
        let der = pem::parse(&pem).unwrap().into_contents();
        let info = pkcs8::PrivateKeyInfo::from_der(&der).unwrap();
        assert_eq!(info.version(), pkcs8::Version::V1);
        // aws-lc-rs makes v2 (with the public key); the key stays the same key.
        let v2 = key.serialize_der();
        assert_eq!(
            pkcs8::PrivateKeyInfo::from_der(&v2).unwrap().version(),
            pkcs8::Version::V2
        );
        let again = load_or_create_key(dir.path()).unwrap();
        assert_eq!(again.public_key_raw(), key.public_key_raw());
    }

    #[test]
    fn different_keys_give_different_ids() {
        let a = Identity::ephemeral().unwrap();
        let b = Identity::ephemeral().unwrap();
        assert_ne!(a.id, b.id);
    }

    #[test]
    fn corrupt_key_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(KEY_FILE), "not a key").unwrap();
        let err = load_or_create_key(dir.path()).err().unwrap();
        assert!(matches!(err, IdentityError::CorruptKey { .. }), "{err}");
    }

    /// A byte string as postcard writes one.
    fn serde_bytes_of(bytes: &[u8]) -> Vec<u8> {
        let mut out = vec![bytes.len() as u8];
        out.extend_from_slice(bytes);
        out
    }

    #[test]
    fn node_id_round_trips_through_hex() {
        let id = Identity::ephemeral().unwrap().id;
        assert_eq!(id.to_string().parse::<NodeId>().unwrap(), id);
        assert_eq!(id.short().len(), 10);
        assert!("abc".parse::<NodeId>().is_err());
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{id}\""));
        assert_eq!(serde_json::from_str::<NodeId>(&json).unwrap(), id);
        let wire = postcard::to_allocvec(&id).unwrap();
        assert_eq!(wire.len(), 33);
        assert_eq!(postcard::from_bytes::<NodeId>(&wire).unwrap(), id);
        // Any other length is refused.
        let short = serde_bytes_of(&[7u8; 31]);
        assert!(postcard::from_bytes::<NodeId>(&short).is_err());
    }
}
