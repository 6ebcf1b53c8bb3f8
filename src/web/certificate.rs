//! The certificate a node shows browsers. A browser cannot trust the
//! cluster CA, so for WebTransport the node shows either a publicly
//! trusted certificate given to it (`--web-cert`, `--web-key`) or one it
//! makes itself, which a page accepts by its SHA-256
//! (`serverCertificateHashes`). Browsers take such a hash only for an ECDSA
//! P-256 certificate whose whole validity is under 14 days, so the node
//! makes a new one well before the last expires; sessions already open
//! are not touched.

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// How long a certificate the node makes is valid from its start.
const VALIDITY: Duration = Duration::from_secs(10 * 24 * 3600);
/// Its start lies this far back, for clocks a little behind the node's.
/// The whole span stays under the browsers' 14 days.
const BACKDATE: Duration = Duration::from_secs(3600);
/// A new one is made when the current one has less than this left: a page
/// that fetched the hash just before still connects for days.
pub const RENEW_BEFORE: Duration = Duration::from_secs(5 * 24 * 3600);

/// Why the web certificate could not be had.
#[derive(Debug, thiserror::Error)]
pub enum WebCertificateError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{path} holds no certificate")]
    NoCertificate { path: String },
    #[error("the key in {path} is not one this node can sign with: {source}")]
    Key { path: String, source: rustls::Error },
    #[error("the key in {key} does not match the certificate in {cert}")]
    Mismatch { cert: String, key: String },
    #[error("making the WebTransport certificate failed: {0}")]
    Make(#[from] rcgen::Error),
}

/// One certificate with its key, as rustls shows it.
struct Shown {
    key: Arc<CertifiedKey>,
    /// SHA-256 of the certificate, for `serverCertificateHashes`; `None`
    /// for a certificate given to the node, which browsers trust as is.
    sha256: Option<[u8; 32]>,
    not_after: SystemTime,
}

/// The certificate browsers are shown, renewed in place.
pub struct WebCertificate {
    current: RwLock<Arc<Shown>>,
    /// Whether the node made it, and so must renew it.
    made_here: bool,
    provider: Arc<CryptoProvider>,
}

impl WebCertificate {
    /// A certificate of the node's own making, valid from `now`.
    pub fn made(
        provider: Arc<CryptoProvider>,
        now: SystemTime,
    ) -> Result<Self, WebCertificateError> {
        let shown = make(&provider, now)?;
        Ok(WebCertificate {
            current: RwLock::new(Arc::new(shown)),
            made_here: true,
            provider,
        })
    }

    /// The certificate chain and key in PEM files (`--web-cert`,
    /// `--web-key`), e.g. a publicly trusted one for the node's domain.
    pub fn from_files(
        provider: Arc<CryptoProvider>,
        cert: &Path,
        key: &Path,
    ) -> Result<Self, WebCertificateError> {
        let cert_name = cert.display().to_string();
        let key_name = key.display().to_string();
        let chain = CertificateDer::pem_file_iter(cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|source| WebCertificateError::Read {
                path: cert_name.clone(),
                source,
            })?;
        if chain.is_empty() {
            return Err(WebCertificateError::NoCertificate { path: cert_name });
        }
        let private =
            PrivateKeyDer::from_pem_file(key).map_err(|source| WebCertificateError::Read {
                path: key_name.clone(),
                source,
            })?;
        let signing = provider
            .key_provider
            .load_private_key(private)
            .map_err(|source| WebCertificateError::Key {
                path: key_name.clone(),
                source,
            })?;
        let certified = CertifiedKey::new(chain, signing);
        if certified.keys_match().is_err() {
            return Err(WebCertificateError::Mismatch {
                cert: cert_name,
                key: key_name,
            });
        }
        let shown = Shown {
            key: Arc::new(certified),
            sha256: None,
            not_after: SystemTime::UNIX_EPOCH,
        };
        Ok(WebCertificate {
            current: RwLock::new(Arc::new(shown)),
            made_here: false,
            provider,
        })
    }

    /// Whether the node made it (and renews it), rather than being given
    /// one browsers trust as is.
    pub fn made_here(&self) -> bool {
        self.made_here
    }

    fn current(&self) -> Arc<Shown> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The certificate's SHA-256 in lowercase hex, when a page needs it.
    pub fn sha256_hex(&self) -> Option<String> {
        let sha256 = self.current().sha256?;
        Some(sha256.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// Makes a new certificate if the node made the current one and it
    /// has less than [`RENEW_BEFORE`] left at `now`; says whether it did.
    pub fn renew_if_due(&self, now: SystemTime) -> Result<bool, WebCertificateError> {
        if !self.made_here || now + RENEW_BEFORE < self.current().not_after {
            return Ok(false);
        }
        let shown = make(&self.provider, now)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(shown);
        Ok(true)
    }

    fn key(&self) -> Arc<CertifiedKey> {
        self.current().key.clone()
    }
}

/// HTTPS on `--web` shows the web certificate too.
impl ResolvesServerCert for WebCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.key())
    }
}

impl std::fmt::Debug for WebCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebCertificate")
            .field("sha256", &self.sha256_hex())
            .finish()
    }
}

/// An ECDSA P-256 certificate valid from an hour before `now` for
/// [`VALIDITY`].
fn make(provider: &CryptoProvider, now: SystemTime) -> Result<Shown, WebCertificateError> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()])?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "treescale webtransport");
    let not_after = now + VALIDITY;
    params.not_before = (now - BACKDATE).into();
    params.not_after = not_after.into();
    let certificate = params.self_signed(&key)?;
    let der = certificate.der().clone();
    let sha256 = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &der);
    let private = PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let signing = provider
        .key_provider
        .load_private_key(private)
        .map_err(|_| rcgen::Error::RingUnspecified)?;
    Ok(Shown {
        key: Arc::new(CertifiedKey::new(vec![der], signing)),
        sha256: Some(sha256.as_ref().try_into().expect("SHA-256 is 32 bytes")),
        not_after,
    })
}

/// Chooses the certificate for a handshake: the web one for a client
/// that offers HTTP/3 (a browser), the node's own for everyone else.
#[derive(Debug)]
pub struct CertificateChooser {
    pub node: Arc<CertifiedKey>,
    pub web: Arc<WebCertificate>,
}

impl ResolvesServerCert for CertificateChooser {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let web = hello
            .alpn()
            .is_some_and(|mut offered| offered.any(|alpn| alpn == super::WEB_ALPN));
        Some(if web {
            self.web.key()
        } else {
            self.node.clone()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::aws_lc_rs::default_provider())
    }

    fn validity(certificate: &WebCertificate) -> (SystemTime, SystemTime) {
        let der = certificate.key().cert[0].clone();
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
        let at = |t: x509_parser::time::ASN1Time| {
            SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp() as u64)
        };
        (
            at(parsed.validity().not_before),
            at(parsed.validity().not_after),
        )
    }

    #[test]
    fn a_made_certificate_is_one_browsers_take_by_its_hash() {
        let now = SystemTime::now();
        let certificate = WebCertificate::made(provider(), now).unwrap();
        let der = certificate.key().cert[0].clone();
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
        // ECDSA with P-256 (OID 1.2.840.10045.3.1.7), as the browsers ask.
        let key = parsed.public_key();
        assert_eq!(key.algorithm.algorithm.to_id_string(), "1.2.840.10045.2.1");
        let curve = key.algorithm.parameters.as_ref().unwrap().as_oid().unwrap();
        assert_eq!(curve.to_id_string(), "1.2.840.10045.3.1.7");
        let (from, to) = validity(&certificate);
        assert!(to.duration_since(from).unwrap() < Duration::from_secs(14 * 24 * 3600));
        assert!(from <= now && now < to);
        let hash = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &der);
        let hex: String = hash.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(certificate.sha256_hex(), Some(hex));
    }

    #[test]
    fn a_made_certificate_is_renewed_only_when_little_time_is_left() {
        let start = SystemTime::now();
        let certificate = WebCertificate::made(provider(), start).unwrap();
        let first = certificate.sha256_hex();
        let day = Duration::from_secs(24 * 3600);
        assert!(!certificate.renew_if_due(start + 4 * day).unwrap());
        assert_eq!(certificate.sha256_hex(), first);
        assert!(certificate.renew_if_due(start + 6 * day).unwrap());
        assert_ne!(certificate.sha256_hex(), first, "a new one is shown");
        let (from, _) = validity(&certificate);
        assert!(from > start + 5 * day, "valid from its renewal");
    }
}
