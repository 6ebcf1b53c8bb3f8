//! What each client may publish and subscribe to, by topic pattern, from
//! `permissions.toml`. Users are the names in client certificates.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::topic::{Pattern, Topic};

/// The file a node reads from its certs dir, unless told another.
pub const PERMISSIONS_FILE: &str = "permissions.toml";

/// What one client may do. The node sends it to the client in its welcome,
/// so the client can refuse a denied operation before sending it; the node
/// checks every operation all the same.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Grant {
    /// Topics matching any of these may be published to.
    pub publish: Vec<Pattern>,
    /// Patterns covered by any of these may be subscribed to.
    pub subscribe: Vec<Pattern>,
}

/// An operation a grant allows or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Publish,
    Subscribe,
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Operation::Publish => "publish to",
            Operation::Subscribe => "subscribe to",
        })
    }
}

impl Grant {
    /// Publish and subscribe to every topic.
    pub fn everything() -> Self {
        let all = Pattern::new(">").expect("`>` is a pattern");
        Grant {
            publish: vec![all.clone()],
            subscribe: vec![all],
        }
    }

    pub fn may_publish(&self, topic: &Topic) -> bool {
        self.publish.iter().any(|allowed| allowed.matches(topic))
    }

    /// Whether every topic may be published to: a node then checks no
    /// publish frame (the check per frame was ~2% of a node).
    pub fn may_publish_anywhere(&self) -> bool {
        self.publish.iter().any(|allowed| allowed.as_str() == ">")
    }

    pub fn may_subscribe(&self, pattern: &Pattern) -> bool {
        self.subscribe.iter().any(|allowed| allowed.covers(pattern))
    }

    /// What to tell a client refused `operation` on `what`.
    pub fn denial(&self, user: &str, operation: Operation, what: &str) -> String {
        let allowed = match operation {
            Operation::Publish => &self.publish,
            Operation::Subscribe => &self.subscribe,
        };
        let allowed = match allowed.as_slice() {
            [] => "nothing".to_string(),
            list => list
                .iter()
                .map(Pattern::as_str)
                .collect::<Vec<_>>()
                .join(", "),
        };
        format!("permission denied: user {user:?} may not {operation} {what} (allowed: {allowed})")
    }
}

/// Why a permissions file was refused.
#[derive(Debug, thiserror::Error)]
pub enum PermissionsError {
    #[error("cannot read permissions file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("permissions file {path} is not valid: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// Every client's grant: by user name, and a default for the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    default: Grant,
    users: BTreeMap<String, Grant>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PermissionsFile {
    /// Users not listed get this; without it, nothing.
    #[serde(default)]
    default: Grant,
    #[serde(default)]
    users: BTreeMap<String, Grant>,
}

impl Permissions {
    /// Every client may do everything: a node without a permissions file.
    pub fn allow_all() -> Self {
        Permissions {
            default: Grant::everything(),
            users: BTreeMap::new(),
        }
    }

    /// Reads `path`. A missing file allows everything, unless `required`
    /// (a path given explicitly, where a typo must not open everything).
    pub fn load(path: &Path, required: bool) -> Result<Self, PermissionsError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text).map_err(|reason| PermissionsError::Invalid {
                path: path.to_path_buf(),
                reason,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                tracing::info!(file = %path.display(), "no permissions file: every client of the cluster may publish and subscribe to everything");
                Ok(Self::allow_all())
            }
            Err(source) => Err(PermissionsError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let file: PermissionsFile = toml::from_str(text).map_err(|e| e.to_string())?;
        Ok(Permissions {
            default: file.default,
            users: file.users,
        })
    }

    /// The grant of `user`; `None` is a client without a certificate
    /// (insecure mode), which gets the default.
    pub fn grant_for(&self, user: Option<&str>) -> Grant {
        user.and_then(|user| self.users.get(user))
            .unwrap_or(&self.default)
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
        [default]
        subscribe = ["public.>"]

        [users.alice]
        publish = ["orders.>"]
        subscribe = ["orders.*", "public.>"]
    "#;

    fn topic(s: &str) -> Topic {
        Topic::new(s).unwrap()
    }

    fn pattern(s: &str) -> Pattern {
        Pattern::new(s).unwrap()
    }

    #[test]
    fn users_get_their_grant_and_others_the_default() {
        let permissions = Permissions::parse(EXAMPLE).unwrap();
        let alice = permissions.grant_for(Some("alice"));
        assert!(alice.may_publish(&topic("orders.eu")));
        assert!(!alice.may_publish(&topic("public.news")));
        assert!(alice.may_subscribe(&pattern("orders.eu")));
        assert!(!alice.may_subscribe(&pattern("orders.>")));
        let bob = permissions.grant_for(Some("bob"));
        assert!(!bob.may_publish(&topic("orders.eu")));
        assert!(bob.may_subscribe(&pattern("public.*")));
        assert_eq!(permissions.grant_for(None), bob);
        assert!(!alice.may_publish_anywhere() && !bob.may_publish_anywhere());
    }

    #[test]
    fn only_a_grant_of_every_topic_publishes_anywhere() {
        assert!(Grant::everything().may_publish_anywhere());
        let permissions = Permissions::parse("[users.alice]\npublish = [\"a.>\", \">\"]").unwrap();
        assert!(permissions.grant_for(Some("alice")).may_publish_anywhere());
        assert!(!Grant::default().may_publish_anywhere());
    }

    #[test]
    fn without_a_default_unlisted_users_may_do_nothing() {
        let permissions = Permissions::parse("[users.alice]\npublish = [\">\"]").unwrap();
        let other = permissions.grant_for(Some("mallory"));
        assert_eq!(other, Grant::default());
        assert!(other
            .denial("mallory", Operation::Publish, "a.b")
            .ends_with("(allowed: nothing)"));
    }

    #[test]
    fn mistakes_in_the_file_are_named() {
        let typo = Permissions::parse("[users.alice]\npublsh = [\"a\"]").unwrap_err();
        assert!(typo.contains("publsh"), "{typo}");
        let bad_pattern = Permissions::parse("[default]\npublish = [\"a.>.b\"]").unwrap_err();
        assert!(bad_pattern.contains("last token"), "{bad_pattern}");
    }

    #[test]
    fn a_missing_file_allows_everything_unless_it_was_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(PERMISSIONS_FILE);
        assert_eq!(
            Permissions::load(&path, false).unwrap(),
            Permissions::allow_all()
        );
        // Named explicitly, it must be there.
        assert!(matches!(
            Permissions::load(&path, true),
            Err(PermissionsError::Read { .. })
        ));
    }
}
