//! Tokens: what a client that cannot show a certificate (a browser, a
//! program given a secret in its environment) shows instead.
//!
//! A token is a JSON Web Token (RFC 7519) signed with the cluster CA's
//! Ed25519 key (`"alg": "EdDSA"`, RFC 8037), so any JWT library can read
//! it. Its subject is the user `permissions.toml` grants rights to, its
//! issuer the CA's fingerprint, and it expires. Only a holder of `ca.key`
//! makes one; any node holding `ca.crt` checks it. They are made and checked
//! with ring, the project's cryptography, not a JWT crate: those bring a
//! second one (aws-lc-rs, or RustCrypto's).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rcgen::{KeyPair, SigningKey};
use serde::{Deserialize, Serialize};

/// The header of every token: the one algorithm a node accepts.
const HEADER: &str = r#"{"alg":"EdDSA","typ":"JWT"}"#;
/// Longer than any token this module makes by far; longer ones are not
/// decoded at all.
pub const MAX_TOKEN_LEN: usize = 4096;

/// What a token lets its holder do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenScope {
    /// What permissions.toml grants its user.
    Granted,
    /// Only to look (status, tree), whatever permissions.toml grants its
    /// user: the dashboard's.
    ReadOnly,
}

/// A verified token: who holds it, and what it lets them do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenHolder {
    pub user: String,
    pub scope: TokenScope,
}

/// The `scope` claim of a read-only token.
const READ_ONLY: &str = "read";

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    /// The user.
    sub: String,
    /// The fingerprint of the CA that signed it.
    iss: String,
    /// `read` for a read-only token; absent for the user's full grant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scope: Option<String>,
    /// Issued at, in seconds since the Unix epoch.
    iat: u64,
    /// Expires at, in seconds since the Unix epoch.
    exp: u64,
}

/// Why a token was refused (or not made), in words a user can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error(
        "the token was issued by another cluster's CA ({issuer:?}), not this cluster's ({ours})"
    )]
    OtherCa { issuer: String, ours: String },
    #[error("the token's signature does not match its contents: it was altered, or forged")]
    Forged,
    #[error("the token expired {ago} ago; issue a new one with `treescale certs issue token`")]
    Expired { ago: String },
    #[error("tokens need an Ed25519 cluster CA key (as `treescale certs init` makes); this CA's is another kind")]
    UnsupportedKey,
    #[error("a token's user name must be 1 to 255 characters, none of them a control character")]
    BadUser,
}

/// Makes a token for `user` with `scope`, valid for `ttl` from `now`,
/// signed with the CA's `key`; `issuer` is the CA's fingerprint.
pub fn issue(
    key: &KeyPair,
    issuer: &str,
    user: &str,
    scope: TokenScope,
    ttl: Duration,
    now: SystemTime,
) -> Result<String, TokenError> {
    if key.algorithm() != &rcgen::PKCS_ED25519 {
        return Err(TokenError::UnsupportedKey);
    }
    if user.is_empty() || user.len() > 255 || user.chars().any(char::is_control) {
        return Err(TokenError::BadUser);
    }
    let iat = seconds(now);
    let claims = Claims {
        sub: user.to_string(),
        iss: issuer.to_string(),
        scope: (scope == TokenScope::ReadOnly).then(|| READ_ONLY.to_string()),
        iat,
        exp: iat.saturating_add(ttl.as_secs()),
    };
    let claims = serde_json::to_vec(&claims).expect("claims serialize");
    let signed = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(HEADER),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let signature = key
        .sign(signed.as_bytes())
        .map_err(|_| TokenError::UnsupportedKey)?;
    Ok(format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature)))
}

/// Checks tokens against one CA's public key.
#[derive(Debug, Clone)]
pub struct TokenVerifier {
    /// The CA's raw Ed25519 public key.
    public_key: Vec<u8>,
    fingerprint: String,
}

impl TokenVerifier {
    /// The verifier of the CA whose certificate is `ca_cert`; `None` when
    /// its key is not Ed25519.
    pub fn new(ca_cert: &[u8], fingerprint: String) -> Option<Self> {
        let (_, cert) = x509_parser::parse_x509_certificate(ca_cert).ok()?;
        let key = cert.public_key();
        if key.algorithm.algorithm != x509_parser::oid_registry::OID_SIG_ED25519 {
            return None;
        }
        Some(TokenVerifier {
            public_key: key.subject_public_key.data.to_vec(),
            fingerprint,
        })
    }

    /// Who holds `token`, if this CA signed it and it has not expired at
    /// `now`.
    pub fn verify(&self, token: &str, now: SystemTime) -> Result<TokenHolder, TokenError> {
        let malformed = |what: &str| TokenError::Malformed(what.to_string());
        if token.len() > MAX_TOKEN_LEN {
            return Err(malformed("longer than any token"));
        }
        let token = token.trim();
        let Some((signed, signature)) = token.rsplit_once('.') else {
            return Err(malformed("not three parts separated by dots"));
        };
        let Some((header, claims)) = signed.split_once('.').filter(|(_, c)| !c.contains('.'))
        else {
            return Err(malformed("not three parts separated by dots"));
        };
        let decode = |part: &str| {
            URL_SAFE_NO_PAD
                .decode(part)
                .map_err(|_| malformed("a part is not base64url"))
        };
        let header_json: serde_json::Value = serde_json::from_slice(&decode(header)?)
            .map_err(|_| malformed("its header is not JSON"))?;
        if header_json.get("alg").and_then(|a| a.as_str()) != Some("EdDSA") {
            return Err(malformed("its algorithm is not EdDSA"));
        }
        let claims: Claims = serde_json::from_slice(&decode(claims)?)
            .map_err(|_| malformed("its claims are not the JSON of sub, iss, iat and exp"))?;
        if claims.iss != self.fingerprint {
            // Whoever made the token chose this text: a short piece of it
            // goes into logs and the close reason, quoted.
            return Err(TokenError::OtherCa {
                issuer: claims.iss.chars().take(32).collect(),
                ours: self.fingerprint.clone(),
            });
        }
        aws_lc_rs::signature::UnparsedPublicKey::new(
            &aws_lc_rs::signature::ED25519,
            &self.public_key,
        )
        .verify(signed.as_bytes(), &decode(signature)?)
        .map_err(|_| TokenError::Forged)?;
        let now = seconds(now);
        if now >= claims.exp {
            return Err(TokenError::Expired {
                ago: humantime::format_duration(Duration::from_secs(now - claims.exp)).to_string(),
            });
        }
        if claims.sub.is_empty() || claims.sub.chars().any(char::is_control) {
            return Err(TokenError::BadUser);
        }
        let scope = match claims.scope.as_deref() {
            None => TokenScope::Granted,
            Some(READ_ONLY) => TokenScope::ReadOnly,
            Some(_) => return Err(malformed("its scope is not one this node knows")),
        };
        Ok(TokenHolder {
            user: claims.sub,
            scope,
        })
    }
}

fn seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA's key, and the verifier of its tokens.
    fn ca() -> (KeyPair, TokenVerifier) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let copy = KeyPair::try_from(key.serialize_der().as_slice()).unwrap();
        let ca = crate::trust::ClusterCa::generate(copy).unwrap();
        let verifier = TokenVerifier::new(ca.certificate(), ca.fingerprint()).unwrap();
        (key, verifier)
    }

    const DAY: Duration = Duration::from_secs(86_400);

    /// A token of `verifier`'s CA (whose key is `key`), valid a day.
    fn signed(
        key: &KeyPair,
        verifier: &TokenVerifier,
        user: &str,
        scope: TokenScope,
        now: SystemTime,
    ) -> String {
        issue(key, &verifier.fingerprint, user, scope, DAY, now).unwrap()
    }

    #[test]
    fn a_token_names_its_user_until_it_expires() {
        let (key, verifier) = ca();
        let now = SystemTime::now();
        let token = signed(&key, &verifier, "alice", TokenScope::Granted, now);
        let alice = TokenHolder {
            user: "alice".into(),
            scope: TokenScope::Granted,
        };
        assert_eq!(verifier.verify(&token, now).unwrap(), alice);
        assert_eq!(verifier.verify(&format!(" {token}\n"), now).unwrap(), alice);
        let look = signed(&key, &verifier, "viewer", TokenScope::ReadOnly, now);
        assert_eq!(
            verifier.verify(&look, now).unwrap().scope,
            TokenScope::ReadOnly
        );
        let later = now + DAY + Duration::from_secs(90);
        assert_eq!(
            verifier.verify(&token, later),
            Err(TokenError::Expired {
                ago: "1m 30s".into()
            })
        );
    }

    #[test]
    fn another_ca_an_altered_token_and_garbage_are_refused() {
        let (key, verifier) = ca();
        let (other_key, other) = ca();
        let now = SystemTime::now();
        let theirs = issue(
            &other_key,
            &other.fingerprint,
            "alice",
            TokenScope::Granted,
            DAY,
            now,
        )
        .unwrap();
        assert!(matches!(
            verifier.verify(&theirs, now),
            Err(TokenError::OtherCa { .. })
        ));
        // Their key, our fingerprint: the signature gives it away.
        let forged = issue(
            &other_key,
            &verifier.fingerprint,
            "admin",
            TokenScope::Granted,
            DAY,
            now,
        )
        .unwrap();
        assert_eq!(verifier.verify(&forged, now), Err(TokenError::Forged));
        // Our token with its user changed.
        let ours = signed(&key, &verifier, "alice", TokenScope::Granted, now);
        let parts: Vec<&str> = ours.split('.').collect();
        let claims = String::from_utf8(URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        let altered = URL_SAFE_NO_PAD.encode(claims.replace("alice", "admin"));
        let tampered = format!("{}.{altered}.{}", parts[0], parts[2]);
        assert_eq!(verifier.verify(&tampered, now), Err(TokenError::Forged));
        // A read-only token with its scope taken out.
        let look = signed(&key, &verifier, "viewer", TokenScope::ReadOnly, now);
        let parts: Vec<&str> = look.split('.').collect();
        let claims = String::from_utf8(URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        let widened = URL_SAFE_NO_PAD.encode(claims.replace(r#","scope":"read""#, ""));
        let widened = format!("{}.{widened}.{}", parts[0], parts[2]);
        assert_eq!(verifier.verify(&widened, now), Err(TokenError::Forged));
        for garbage in ["", "a.b", "a.b.c.d", "!!.??.##", &"x".repeat(5000)] {
            assert!(
                matches!(verifier.verify(garbage, now), Err(TokenError::Malformed(_))),
                "{garbage:?}"
            );
        }
        let none_alg = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#),
            parts[1]
        );
        assert!(matches!(
            verifier.verify(&none_alg, now),
            Err(TokenError::Malformed(_))
        ));
    }

    #[test]
    fn only_ed25519_keys_and_plain_names_make_tokens() {
        let (key, verifier) = ca();
        let now = SystemTime::now();
        for user in ["", "a\nb", &"u".repeat(256)] {
            assert_eq!(
                issue(
                    &key,
                    &verifier.fingerprint,
                    user,
                    TokenScope::Granted,
                    DAY,
                    now
                ),
                Err(TokenError::BadUser)
            );
        }
        let ecdsa = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        assert_eq!(
            issue(&ecdsa, "f", "alice", TokenScope::Granted, DAY, now),
            Err(TokenError::UnsupportedKey)
        );
    }
}
