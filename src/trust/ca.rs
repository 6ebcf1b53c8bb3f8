//! The cluster CA: its files in a certs dir, and the certificates it issues.
//!
//! `ca.crt` is the CA certificate, which every node and client needs.
//! `ca.key` holds the CA's private key and, after it, the certificate again,
//! so that creating a CA is one atomic file creation: two nodes starting at
//! once on a fresh machine end up with the same CA.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, TrustAnchor};

use super::TrustError;
use crate::identity::{key_pem, Identity, NodeId};

pub const CA_CERT_FILE: &str = "ca.crt";
/// The DNS name in every node certificate, and the server name clients send.
pub const NODE_SERVER_NAME: &str = "treescale";
/// A node certificate's URI name: this, then the node id in hex.
pub const NODE_ID_URI_PREFIX: &str = "urn:treescale:node:";
pub const CA_KEY_FILE: &str = "ca.key";

/// How long a new CA is valid.
const CA_VALIDITY: time::Duration = time::Duration::days(3650);
/// How long an issued node or client certificate is valid, unless asked.
pub const DEFAULT_VALIDITY: time::Duration = time::Duration::days(365);
/// Issued certificates start this long before now, so a peer whose clock
/// is a little behind still accepts them.
const CLOCK_SKEW: time::Duration = time::Duration::hours(1);

/// What an issued certificate lets its holder be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Serves and dials other nodes (TLS server and client auth).
    Node,
    /// Connects to nodes only (TLS client auth only): it cannot pose as a
    /// node, since dialling nodes require the server usage.
    Client,
}

/// A cluster CA: always its certificate, and its key where this machine
/// holds it.
pub struct ClusterCa {
    certificate: CertificateDer<'static>,
    key: Option<KeyPair>,
}

impl ClusterCa {
    /// A new CA for `key`. The simulator passes a seeded key, so its runs
    /// replay; everything else passes a fresh one.
    pub fn generate(key: KeyPair) -> Result<Self, rcgen::Error> {
        let fingerprint = fingerprint_of(&key.subject_public_key_info());
        let mut params = CertificateParams::default();
        params.distinguished_name.push(
            DnType::CommonName,
            format!("TreeScale cluster CA {fingerprint}"),
        );
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, &key, CA_VALIDITY);
        let certificate = params.self_signed(&key)?.der().clone();
        Ok(ClusterCa {
            certificate,
            key: Some(key),
        })
    }

    /// The CA kept in `dir`, or `None` when `dir` holds none.
    pub fn load(dir: &Path) -> Result<Option<Self>, TrustError> {
        let key_path = dir.join(CA_KEY_FILE);
        let cert_path = dir.join(CA_CERT_FILE);
        if let Some(bundle) = read_if_present(&key_path)? {
            let corrupt = |reason: String| TrustError::Corrupt {
                path: key_path.clone(),
                reason,
            };
            let key_der = PrivateKeyDer::from_pem_slice(&bundle)
                .map_err(|e| corrupt(format!("no private key: {e}")))?;
            let key = KeyPair::try_from(&key_der).map_err(|e| corrupt(e.to_string()))?;
            let certificate = CertificateDer::from_pem_slice(&bundle)
                .map_err(|e| corrupt(format!("no certificate after the key: {e}")))?;
            let ca = ClusterCa {
                certificate,
                key: Some(key),
            };
            // A CA created by a process that stopped before writing ca.crt.
            if !cert_path.exists() {
                write_atomically(&cert_path, ca.certificate_pem().as_bytes(), false)?;
            }
            return Ok(Some(ca));
        }
        let Some(pem) = read_if_present(&cert_path)? else {
            return Ok(None);
        };
        let certificate =
            CertificateDer::from_pem_slice(&pem).map_err(|e| TrustError::Corrupt {
                path: cert_path,
                reason: e.to_string(),
            })?;
        Ok(Some(ClusterCa {
            certificate,
            key: None,
        }))
    }

    /// Creates a CA in `dir`. Fails with [`TrustError::CaExists`] when one
    /// is there already, even when another process created it a moment ago.
    pub fn init(dir: &Path, key: KeyPair) -> Result<Self, TrustError> {
        create_private_dir(dir)?;
        // A dir with only the certificate belongs to a cluster whose key is
        // elsewhere: a new CA here would split it.
        if dir.join(CA_CERT_FILE).exists() {
            return Err(TrustError::CaExists(dir.to_path_buf()));
        }
        let ca = Self::generate(key)?;
        let key = ca.key.as_ref().expect("a generated CA has its key");
        let bundle = format!("{}{}", key_pem(key), ca.certificate_pem());
        write_atomically(&dir.join(CA_KEY_FILE), bundle.as_bytes(), true)?;
        write_atomically(
            &dir.join(CA_CERT_FILE),
            ca.certificate_pem().as_bytes(),
            false,
        )?;
        Ok(ca)
    }

    /// The CA in `dir`, created there first if there is none. Whether it
    /// was created is the second value.
    pub fn load_or_init(dir: &Path) -> Result<(Self, bool), TrustError> {
        loop {
            if let Some(ca) = Self::load(dir)? {
                return Ok((ca, false));
            }
            match Self::init(dir, KeyPair::generate_for(&rcgen::PKCS_ED25519)?) {
                Ok(ca) => return Ok((ca, true)),
                // Another process won the race: load what it made.
                Err(TrustError::CaExists(_)) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.certificate
    }

    pub fn certificate_pem(&self) -> String {
        pem_of("CERTIFICATE", &self.certificate)
    }

    /// Whether this machine holds the CA key and can issue certificates.
    pub fn can_issue(&self) -> bool {
        self.key.is_some()
    }

    /// What handshakes check peers against.
    pub fn anchor(&self) -> Result<TrustAnchor<'static>, TrustError> {
        webpki::anchor_from_trusted_cert(&self.certificate)
            .map(|anchor| anchor.to_owned())
            .map_err(|e| TrustError::Corrupt {
                path: PathBuf::from(CA_CERT_FILE),
                reason: format!("not a usable CA certificate: {e:?}"),
            })
    }

    /// Short hash of the CA's public key: tells clusters apart in mDNS
    /// announcements and logs.
    pub fn fingerprint(&self) -> String {
        let spki = webpki::EndEntityCert::try_from(&self.certificate)
            .map(|cert| cert.subject_public_key_info().as_ref().to_vec())
            .unwrap_or_default();
        fingerprint_of(&spki)
    }

    /// A token for `user`, valid for `ttl` from now (see [`super::token`]).
    pub fn issue_token(&self, user: &str, ttl: std::time::Duration) -> Result<String, TrustError> {
        self.issue_scoped_token(user, super::TokenScope::Granted, ttl)
    }

    /// A token for `user` that lets its holder do only what `scope` says.
    pub fn issue_scoped_token(
        &self,
        user: &str,
        scope: super::TokenScope,
        ttl: std::time::Duration,
    ) -> Result<String, TrustError> {
        let key = self.key.as_ref().ok_or(TrustError::NoCaKey)?;
        Ok(super::token::issue(
            key,
            &self.fingerprint(),
            user,
            scope,
            ttl,
            std::time::SystemTime::now(),
        )?)
    }

    /// A certificate for `key`, valid from about now for `validity`.
    pub fn issue(
        &self,
        key: &KeyPair,
        role: Role,
        name: &str,
        validity: time::Duration,
    ) -> Result<Identity, TrustError> {
        let ca_key = self.key.as_ref().ok_or(TrustError::NoCaKey)?;
        let issuer = Issuer::from_ca_cert_der(&self.certificate, ca_key)?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match role {
            Role::Node => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            Role::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        if role == Role::Node {
            // What standard verifiers check: a foreign client connects with
            // server name `treescale`; the URI names the node id the
            // certificate's key proves (docs/protocol.md).
            let id = NodeId::from_public_key(&key.subject_public_key_info());
            params.subject_alt_names = vec![
                SanType::DnsName(NODE_SERVER_NAME.try_into()?),
                SanType::URI(format!("{NODE_ID_URI_PREFIX}{id}").try_into()?),
            ];
        }
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, key, validity);
        let certificate = params.signed_by(key, &issuer)?;
        Ok(Identity::new(certificate.der().clone(), key))
    }
}

/// From a little before now, for `validity`; the serial number is derived
/// from the key and the time, so it is unique without a random source.
fn set_validity(params: &mut CertificateParams, key: &KeyPair, validity: time::Duration) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + validity;
    let mut input = key.subject_public_key_info();
    input.extend_from_slice(&now.unix_timestamp_nanos().to_be_bytes());
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &input);
    let mut serial = digest.as_ref()[..16].to_vec();
    // Positive, and always 16 bytes long once DER-encoded.
    serial[0] = (serial[0] & 0x3f) | 0x40;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
}

fn fingerprint_of(spki: &[u8]) -> String {
    NodeId::from_public_key(spki).short()
}

pub fn pem_of(label: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(label, der.to_vec()))
}

pub fn read_if_present(path: &Path) -> Result<Option<Vec<u8>>, TrustError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TrustError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Creates `dir` readable by its owner only, as it may hold keys.
pub fn create_private_dir(dir: &Path) -> Result<(), TrustError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(|source| TrustError::Write {
        path: dir.to_path_buf(),
        source,
    })
}

/// Writes `contents` to a private temporary file beside `path`, then moves
/// it into place: readers never see half a file. With `exclusive`, an
/// existing `path` is left alone and the result is [`TrustError::CaExists`].
pub fn write_atomically(path: &Path, contents: &[u8], exclusive: bool) -> Result<(), TrustError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let err = |source| TrustError::Write {
        path: path.to_path_buf(),
        source,
    };
    // tempfile creates the file with mode 0600.
    let mut file = tempfile::NamedTempFile::new_in(dir).map_err(err)?;
    file.write_all(contents).map_err(err)?;
    file.as_file().sync_all().map_err(err)?;
    if exclusive {
        file.persist_noclobber(path).map_err(|e| {
            if e.error.kind() == std::io::ErrorKind::AlreadyExists {
                TrustError::CaExists(dir.to_path_buf())
            } else {
                err(e.error)
            }
        })?;
    } else {
        file.persist(path).map_err(|e| err(e.error))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::ServerName;

    fn ca() -> ClusterCa {
        ClusterCa::generate(KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap()).unwrap()
    }

    #[test]
    fn node_certificates_name_the_server_name_and_the_node_id() {
        let ca = ca();
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let node = ca
            .issue(&key, Role::Node, "node x", DEFAULT_VALIDITY)
            .unwrap();
        let cert = webpki::EndEntityCert::try_from(&node.certificate).unwrap();
        let name = ServerName::try_from(NODE_SERVER_NAME).unwrap();
        cert.verify_is_valid_for_subject_name(&name).unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(&node.certificate).unwrap();
        let names = parsed.subject_alternative_name().unwrap().unwrap();
        let uri = format!("{NODE_ID_URI_PREFIX}{}", node.id);
        assert!(
            names.value.general_names.iter().any(|n| matches!(
                n,
                x509_parser::extensions::GeneralName::URI(u) if *u == uri
            )),
            "{:?}",
            names.value.general_names
        );

        // A client's certificate names no server: it cannot pose as one.
        let client = ca
            .issue(&key, Role::Client, "alice", DEFAULT_VALIDITY)
            .unwrap();
        let cert = webpki::EndEntityCert::try_from(&client.certificate).unwrap();
        assert!(cert.verify_is_valid_for_subject_name(&name).is_err());
    }
}
