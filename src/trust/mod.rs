//! Cluster trust: the CA that signs every node's and client's certificate,
//! where its files live, how handshakes check peers against it, and what
//! each client may publish and subscribe to. docs/security.md is the user's
//! view of this module.

mod ca;
mod permissions;
mod token;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rcgen::KeyPair;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, TrustAnchor, UnixTime};

pub use ca::{
    create_private_dir, pem_of, write_atomically, ClusterCa, Role, CA_CERT_FILE, DEFAULT_VALIDITY,
    NODE_ID_URI_PREFIX, NODE_SERVER_NAME,
};
pub use permissions::{Grant, Operation, Permissions, PermissionsError, PERMISSIONS_FILE};
pub use token::{TokenError, TokenHolder, TokenScope, TokenVerifier, MAX_TOKEN_LEN};

use crate::identity::{Identity, NodeId, NODE_CERT_FILE};

/// Files of a certs dir besides the CA's.
pub const CLIENT_CERT_FILE: &str = "client.crt";
pub const CLIENT_KEY_FILE: &str = "client.key";

/// The user a client holding the CA key connects as: it could issue itself
/// any name, so it gets the one that says so.
pub const CA_HOLDER_USER: &str = "admin";

/// Where a node or client finds the credentials of its cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrustConfig {
    /// The per-user certs dir, shared by every node and client of the user
    /// on this machine (see [`default_certs_dir`]).
    UserDefault,
    /// A certs dir given with `--certs` or `TREESCALE_CERTS`.
    Dir(PathBuf),
    /// No cluster CA: any certificate is accepted and any client may do
    /// anything. For labs only.
    Insecure,
}

impl TrustConfig {
    /// The certs dir, or `None` in insecure mode.
    pub fn dir(&self) -> Result<Option<PathBuf>, TrustError> {
        match self {
            TrustConfig::UserDefault => default_certs_dir().map(Some),
            TrustConfig::Dir(dir) => Ok(Some(dir.clone())),
            TrustConfig::Insecure => Ok(None),
        }
    }
}

/// `$XDG_CONFIG_HOME/treescale/certs`, or `~/.config/treescale/certs`.
pub fn default_certs_dir() -> Result<PathBuf, TrustError> {
    let base = match std::env::var_os("XDG_CONFIG_HOME") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => match std::env::var_os("HOME") {
            Some(home) if !home.is_empty() => PathBuf::from(home).join(".config"),
            _ => return Err(TrustError::NoHome),
        },
    };
    Ok(base.join("treescale/certs"))
}

/// Why credentials could not be loaded, created or issued.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("cannot find the per-user certs dir: neither XDG_CONFIG_HOME nor HOME is set; pass --certs DIR")]
    NoHome,
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
    #[error("{path} is damaged ({reason}); restore it from another machine of the cluster")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{0} already holds a cluster CA; use it, or choose another dir with --certs")]
    CaExists(PathBuf),
    #[error("no cluster credentials in {0}: start `treescale node` on this machine first (the first node creates them), copy the certs dir of your cluster here, or pass --certs DIR")]
    NoCredentials(PathBuf),
    #[error(
        "the cluster's CA key (ca.key) is not in the certs dir; issue certificates where it is"
    )]
    NoCaKey,
    #[error("{dir} holds the cluster's CA certificate but no client certificate: on a machine holding ca.key run `treescale certs issue client --name NAME --out DIR` and copy DIR's files here")]
    NoClientCert { dir: PathBuf },
    #[error("no certificate for this node in {data_dir}, and no CA key in {certs} to issue one: on a machine holding ca.key run `treescale certs issue node --data-dir DIR` and use DIR here as --data-dir, or copy the cluster's ca.key into {certs}")]
    NoNodeCert { data_dir: PathBuf, certs: PathBuf },
    #[error("{path} is not valid in this cluster: {reason}")]
    InvalidCertificate { path: PathBuf, reason: String },
    #[error("{cert} was issued by a cluster CA, but {certs} holds no ca.crt; copy the cluster's ca.crt there (a new CA would start a separate cluster)")]
    WouldSplit { cert: PathBuf, certs: PathBuf },
    #[error(transparent)]
    Permissions(#[from] PermissionsError),
    #[error("cannot create a certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error(transparent)]
    Token(#[from] TokenError),
}

/// How handshakes check the certificate a peer shows.
#[derive(Clone)]
pub enum Trust {
    /// It must chain to the cluster CA, be valid now, and suit its role.
    Cluster(Arc<ClusterAnchor>),
    /// Any certificate; the peer still proves it holds the key.
    Insecure,
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Trust({})", self.fingerprint())
    }
}

impl Trust {
    /// Announced over mDNS, so nodes and clients skip other clusters' nodes
    /// without dialling them.
    pub fn fingerprint(&self) -> String {
        match self {
            Trust::Cluster(anchor) => anchor.fingerprint.clone(),
            Trust::Insecure => "insecure".to_string(),
        }
    }
}

/// The cluster CA as handshakes use it.
pub struct ClusterAnchor {
    anchor: TrustAnchor<'static>,
    fingerprint: String,
    /// Checks clients' tokens; `None` when the CA's key cannot sign them.
    tokens: Option<TokenVerifier>,
    /// Keys already reported as refused, so a peer retrying every second
    /// costs one log line, not one per attempt.
    refused: Mutex<HashSet<NodeId>>,
}

/// Past this many refused keys the set starts over rather than grow.
const MAX_REFUSED_REMEMBERED: usize = 1024;

impl ClusterAnchor {
    pub fn new(ca: &ClusterCa) -> Result<Self, TrustError> {
        Ok(ClusterAnchor {
            anchor: ca.anchor()?,
            fingerprint: ca.fingerprint(),
            tokens: TokenVerifier::new(ca.certificate(), ca.fingerprint()),
            refused: Mutex::new(HashSet::new()),
        })
    }

    /// Who holds `token`, if this cluster's CA signed it and it has not
    /// expired.
    pub fn verify_token(&self, token: &str) -> Result<TokenHolder, TokenError> {
        self.tokens
            .as_ref()
            .ok_or(TokenError::UnsupportedKey)?
            .verify(token, std::time::SystemTime::now())
    }

    /// Checks that `cert` chains to the CA, is valid at `now` and was
    /// issued for `role`.
    pub fn verify(
        &self,
        cert: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        role: Role,
    ) -> Result<(), webpki::Error> {
        let end_entity = webpki::EndEntityCert::try_from(cert)?;
        let usage = match role {
            Role::Node => webpki::KeyUsage::server_auth(),
            Role::Client => webpki::KeyUsage::client_auth(),
        };
        let algorithms = rustls::crypto::aws_lc_rs::default_provider()
            .signature_verification_algorithms
            .all;
        end_entity
            .verify_for_usage(
                algorithms,
                std::slice::from_ref(&self.anchor),
                intermediates,
                now,
                usage,
                None,
                None,
            )
            .map(|_| ())
    }

    /// Logs a refused certificate, once per key.
    pub fn report_refused(&self, cert: &CertificateDer<'_>, error: &webpki::Error) {
        let Some(key) = NodeId::from_certificate(cert) else {
            return;
        };
        let mut refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        if refused.len() >= MAX_REFUSED_REMEMBERED {
            refused.clear();
        }
        if refused.insert(key) {
            let (role, name) = describe(cert).unwrap_or((Role::Client, String::new()));
            tracing::warn!(
                key = %key.short(),
                ?role,
                %name,
                "refused a peer: {}",
                explain(error)
            );
        }
    }
}

/// Why a certificate was refused, in words a user can act on.
pub fn explain(error: &webpki::Error) -> String {
    match error {
        webpki::Error::UnknownIssuer => {
            "its certificate is not signed by this cluster's CA (a node or client of another cluster?)".into()
        }
        webpki::Error::CertExpired { not_after, .. } => format!(
            "its certificate expired {} s after the epoch; issue a new one",
            not_after.as_secs()
        ),
        webpki::Error::CertNotValidYet { not_before, .. } => format!(
            "its certificate is not valid until {} s after the epoch; is a clock wrong?",
            not_before.as_secs()
        ),
        webpki::Error::RequiredEkuNotFoundContext(_) => {
            "its certificate is a client's, not a node's".into()
        }
        other => format!("its certificate is not valid here ({other:?})"),
    }
}

/// The role and name (common name) a certificate was issued with.
pub fn describe(cert: &CertificateDer<'_>) -> Option<(Role, String)> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    let node = parsed
        .extended_key_usage()
        .ok()
        .flatten()
        .is_some_and(|eku| eku.value.server_auth);
    let name = parsed
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or_default()
        .to_string();
    let role = if node { Role::Node } else { Role::Client };
    Some((role, name))
}

/// Whether `cert` was signed by someone other than its own subject.
fn issued_by_a_ca(cert: &[u8]) -> bool {
    CertificateDer::from_pem_slice(cert).is_ok_and(|der| {
        x509_parser::parse_x509_certificate(&der)
            .is_ok_and(|(_, parsed)| parsed.issuer() != parsed.subject())
    })
}

/// A node's credentials: its certificate for `key`, and how it checks peers.
/// With the CA key at hand the certificate is issued afresh; without it,
/// the one in the data dir must be valid. A machine with no CA at all gets
/// a new one: the first node needs no set-up.
pub fn node_credentials(
    config: &TrustConfig,
    data_dir: &Path,
    key: KeyPair,
) -> Result<(Identity, Trust), TrustError> {
    let Some(dir) = config.dir()? else {
        tracing::warn!("INSECURE: --insecure accepts any node and any client, and enforces no permissions; use it only in a lab");
        return Ok((Identity::self_signed(&key)?, Trust::Insecure));
    };
    let cert_path = data_dir.join(NODE_CERT_FILE);
    let ca = match ClusterCa::load(&dir)? {
        Some(ca) => ca,
        None => {
            if ca::read_if_present(&cert_path)?.is_some_and(|pem| issued_by_a_ca(&pem)) {
                return Err(TrustError::WouldSplit {
                    cert: cert_path,
                    certs: dir,
                });
            }
            let (ca, created) = ClusterCa::load_or_init(&dir)?;
            if created {
                tracing::info!(certs = %dir.display(), ca = %ca.fingerprint(),
                    "created a new cluster CA; to add a machine, copy this dir to it (docs/security.md)");
            }
            ca
        }
    };
    let anchor = ClusterAnchor::new(&ca)?;
    let id = NodeId::from_public_key(&rcgen::PublicKeyData::subject_public_key_info(&key));
    let identity = if ca.can_issue() {
        let identity = ca.issue(
            &key,
            Role::Node,
            &format!("node {}", id.short()),
            DEFAULT_VALIDITY,
        )?;
        write_atomically(
            &cert_path,
            pem_of("CERTIFICATE", &identity.certificate).as_bytes(),
            false,
        )?;
        identity
    } else {
        let pem = ca::read_if_present(&cert_path)?.ok_or_else(|| TrustError::NoNodeCert {
            data_dir: data_dir.to_path_buf(),
            certs: dir.clone(),
        })?;
        let invalid = |reason: String| TrustError::InvalidCertificate {
            path: cert_path.clone(),
            reason,
        };
        let cert = CertificateDer::from_pem_slice(&pem).map_err(|e| invalid(e.to_string()))?;
        if NodeId::from_certificate(&cert) != Some(id) {
            return Err(invalid("it is for another key than this node's".into()));
        }
        anchor
            .verify(&cert, &[], UnixTime::now(), Role::Node)
            .map_err(|e| invalid(explain(&e)))?;
        Identity::new(cert, &key)
    };
    Ok((identity, Trust::Cluster(Arc::new(anchor))))
}

/// How a client that shows a token instead of a certificate checks nodes:
/// against the cluster CA's certificate, the one file of the certs dir it
/// needs.
pub fn server_trust(config: &TrustConfig) -> Result<Trust, TrustError> {
    Ok(match cluster_ca(config)? {
        Some((_, ca)) => Trust::Cluster(Arc::new(ClusterAnchor::new(&ca)?)),
        None => Trust::Insecure,
    })
}

/// A client's certs dir and the cluster CA in it; `None` in insecure mode.
fn cluster_ca(config: &TrustConfig) -> Result<Option<(PathBuf, ClusterCa)>, TrustError> {
    let Some(dir) = config.dir()? else {
        tracing::warn!(
            "INSECURE: this client accepts any node's certificate; use --insecure only in a lab"
        );
        return Ok(None);
    };
    let ca = ClusterCa::load(&dir)?.ok_or_else(|| TrustError::NoCredentials(dir.clone()))?;
    Ok(Some((dir, ca)))
}

/// A client's credentials: the certificate in the certs dir, or one issued
/// on the spot as [`CA_HOLDER_USER`] where the CA key is at hand; `None` in
/// insecure mode, where clients show no certificate.
pub fn client_credentials(config: &TrustConfig) -> Result<(Option<Identity>, Trust), TrustError> {
    let Some((dir, ca)) = cluster_ca(config)? else {
        return Ok((None, Trust::Insecure));
    };
    let anchor = ClusterAnchor::new(&ca)?;
    let cert_path = dir.join(CLIENT_CERT_FILE);
    let key_path = dir.join(CLIENT_KEY_FILE);
    let identity = match (
        ca::read_if_present(&cert_path)?,
        ca::read_if_present(&key_path)?,
    ) {
        (Some(cert), Some(key)) => {
            let invalid = |path: &Path, reason: String| TrustError::InvalidCertificate {
                path: path.to_path_buf(),
                reason,
            };
            let cert = CertificateDer::from_pem_slice(&cert)
                .map_err(|e| invalid(&cert_path, e.to_string()))?;
            let key = PrivateKeyDer::from_pem_slice(&key)
                .ok()
                .and_then(|der| KeyPair::try_from(&der).ok())
                .ok_or_else(|| invalid(&key_path, "not a private key".into()))?;
            let identity = Identity::new(cert, &key);
            if NodeId::from_certificate(&identity.certificate) != Some(identity.id) {
                return Err(invalid(&key_path, "it is not the key of client.crt".into()));
            }
            anchor
                .verify(&identity.certificate, &[], UnixTime::now(), Role::Client)
                .map_err(|e| invalid(&cert_path, explain(&e)))?;
            identity
        }
        _ if ca.can_issue() => ca.issue(
            &KeyPair::generate_for(&rcgen::PKCS_ED25519)?,
            Role::Client,
            CA_HOLDER_USER,
            time::Duration::days(1),
        )?,
        _ => return Err(TrustError::NoClientCert { dir }),
    };
    Ok((Some(identity), Trust::Cluster(Arc::new(anchor))))
}
