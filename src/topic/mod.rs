//! Topics and subscription patterns.
//!
//! A topic is a dot-separated name such as `orders.eu.paris`. A pattern may
//! also hold wildcards as whole tokens: `*` matches exactly one token and `>`,
//! allowed only last, matches one or more remaining tokens. Both types are
//! parsed once at the edge of the system ("parse, don't validate"), so the
//! routing code only ever sees well-formed names.

pub mod trie;

use std::fmt;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use smol_str::SmolStr;

/// Longest topic or pattern accepted, in bytes. Keeps interest tables and
/// frames bounded no matter what a client sends.
pub const MAX_TOPIC_LEN: usize = 256;

/// Why a string is not a valid topic or pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic is empty")]
    Empty,
    #[error("topic is longer than {MAX_TOPIC_LEN} bytes")]
    TooLong,
    #[error("topic has an empty token (two dots in a row, or a leading or trailing dot)")]
    EmptyToken,
    #[error("topic token {0:?} contains whitespace or a control character")]
    BadCharacter(String),
    #[error("wildcards (`*`, `>`) are allowed only in subscriptions, not when publishing")]
    WildcardInTopic,
    #[error("`>` must be the last token of a pattern")]
    TailNotLast,
    #[error("a wildcard must be a whole token, as in `orders.*`, not {0:?}")]
    PartialWildcard(String),
}

/// A concrete topic an event is published to: no wildcards. Up to 23
/// bytes it is stored inline, so making, cloning and dropping one touches
/// no allocator and no reference count shared between threads; a longer
/// one is shared behind a reference count.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Topic(SmolStr);

/// A subscription pattern: a topic that may contain `*` and a final `>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Pattern(String);

/// One token of a pattern, as the matcher sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Token<'a> {
    Literal(&'a str),
    /// `*`: exactly one token.
    One,
    /// `>`: one or more tokens, always last.
    Tail,
}

fn check_tokens(s: &str) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > MAX_TOPIC_LEN {
        return Err(TopicError::TooLong);
    }
    for token in s.split('.') {
        if token.is_empty() {
            return Err(TopicError::EmptyToken);
        }
        if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(TopicError::BadCharacter(token.to_string()));
        }
    }
    Ok(())
}

/// The rules, token by token.
fn check_topic_tokens(s: &str) -> Result<(), TopicError> {
    check_tokens(s)?;
    if s.split('.').any(|t| t.contains('*') || t.contains('>')) {
        return Err(TopicError::WildcardInTopic);
    }
    Ok(())
}

/// Checks a topic in one pass over its bytes while they are ASCII, as
/// nearly every topic's are (this runs for every event a node receives);
/// at the first other byte, token by token.
fn check_topic(s: &str) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > MAX_TOPIC_LEN {
        return Err(TopicError::TooLong);
    }
    let mut token_start = 0;
    let mut wildcard = false;
    for (i, &byte) in s.as_bytes().iter().enumerate() {
        match byte {
            b'.' => {
                if i == token_start {
                    return Err(TopicError::EmptyToken);
                }
                token_start = i + 1;
            }
            b'*' | b'>' => wildcard = true,
            byte if !byte.is_ascii() => return check_topic_tokens(s),
            byte if byte.is_ascii_whitespace() || byte.is_ascii_control() => {
                let token = s[token_start..].split('.').next().unwrap_or_default();
                return Err(TopicError::BadCharacter(token.to_string()));
            }
            _ => {}
        }
    }
    if token_start == s.len() {
        return Err(TopicError::EmptyToken);
    }
    if wildcard {
        return Err(TopicError::WildcardInTopic);
    }
    Ok(())
}

impl Topic {
    pub fn new(s: impl Into<String>) -> Result<Self, TopicError> {
        let s = s.into();
        check_topic(&s)?;
        Ok(Topic(SmolStr::from(s)))
    }

    /// A topic made from `s` without an allocation when it is short: the
    /// way received frames make theirs.
    pub fn parse(s: &str) -> Result<Self, TopicError> {
        check_topic(s)?;
        Ok(Topic(SmolStr::new(s)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn tokens(&self) -> impl Iterator<Item = &str> + Clone {
        DotTokens(Some(&self.0))
    }
}

/// The dot-separated tokens of a name. `str::split('.')` searches with
/// memchr, whose setup dominated for short topics (2% of a node, where the
/// trie walks every event's tokens).
#[derive(Clone)]
struct DotTokens<'a>(Option<&'a str>);

impl<'a> Iterator for DotTokens<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let rest = self.0?;
        // A '.' is ASCII, so the cut is on a character boundary.
        match rest.bytes().position(|byte| byte == b'.') {
            Some(dot) => {
                self.0 = Some(&rest[dot + 1..]);
                Some(&rest[..dot])
            }
            None => self.0.take(),
        }
    }
}

impl Pattern {
    pub fn new(s: impl Into<String>) -> Result<Self, TopicError> {
        let s = s.into();
        check_tokens(&s)?;
        let count = s.split('.').count();
        for (i, token) in s.split('.').enumerate() {
            match token {
                "*" => {}
                ">" if i + 1 == count => {}
                ">" => return Err(TopicError::TailNotLast),
                t if t.contains('*') || t.contains('>') => {
                    return Err(TopicError::PartialWildcard(t.to_string()))
                }
                _ => {}
            }
        }
        Ok(Pattern(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn tokens(&self) -> impl Iterator<Item = Token<'_>> {
        DotTokens(Some(&self.0)).map(|t| match t {
            "*" => Token::One,
            ">" => Token::Tail,
            t => Token::Literal(t),
        })
    }

    /// Whether an event published to `topic` is wanted by this pattern.
    pub fn matches(&self, topic: &Topic) -> bool {
        let mut topic_tokens = topic.tokens();
        for token in self.tokens() {
            match token {
                Token::Tail => return topic_tokens.next().is_some(),
                Token::One => {
                    if topic_tokens.next().is_none() {
                        return false;
                    }
                }
                Token::Literal(lit) => {
                    if topic_tokens.next() != Some(lit) {
                        return false;
                    }
                }
            }
        }
        topic_tokens.next().is_none()
    }

    /// Whether every topic `other` matches is matched by this pattern too:
    /// what a permission to subscribe to this pattern allows.
    pub fn covers(&self, other: &Pattern) -> bool {
        let (mut mine, mut theirs) = (self.tokens(), other.tokens());
        loop {
            match (mine.next(), theirs.next()) {
                (None, None) => return true,
                // `>` takes one or more tokens, whatever they are.
                (Some(Token::Tail), Some(_)) => return true,
                (Some(Token::One), Some(Token::Literal(_) | Token::One)) => {}
                (Some(Token::Literal(a)), Some(Token::Literal(b))) if a == b => {}
                _ => return false,
            }
        }
    }
}

macro_rules! string_conversions {
    ($ty:ident) => {
        impl TryFrom<String> for $ty {
            type Error = TopicError;
            fn try_from(s: String) -> Result<Self, Self::Error> {
                $ty::new(s)
            }
        }
        impl From<$ty> for String {
            fn from(t: $ty) -> String {
                t.0.into()
            }
        }
        impl std::str::FromStr for $ty {
            type Err = TopicError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                $ty::new(s)
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}
string_conversions!(Topic);
string_conversions!(Pattern);

/// A topic, or text to check as one. Publishing takes either, so a
/// publisher that sends to the same topic again and again can parse it once
/// and skip the check on every event.
pub trait IntoTopic {
    fn into_topic(self) -> Result<Topic, TopicError>;
}

impl IntoTopic for Topic {
    fn into_topic(self) -> Result<Topic, TopicError> {
        Ok(self)
    }
}

impl IntoTopic for &Topic {
    fn into_topic(self) -> Result<Topic, TopicError> {
        Ok(self.clone())
    }
}

impl IntoTopic for &str {
    fn into_topic(self) -> Result<Topic, TopicError> {
        Topic::new(self)
    }
}

impl IntoTopic for String {
    fn into_topic(self) -> Result<Topic, TopicError> {
        Topic::new(self)
    }
}

impl IntoTopic for &String {
    fn into_topic(self) -> Result<Topic, TopicError> {
        Topic::new(self.as_str())
    }
}

impl Serialize for Topic {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

/// Checked on decode like [`Topic::new`].
impl<'de> Deserialize<'de> for Topic {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(TopicVisitor)
    }
}

struct TopicVisitor;

impl de::Visitor<'_> for TopicVisitor {
    type Value = Topic;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a topic")
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Topic, E> {
        Topic::parse(s).map_err(E::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_tokens_split_as_str_split_does() {
        for name in [
            "",
            "a",
            "a.b",
            "a..b",
            ".a",
            "a.",
            "orders.eu.paris",
            "é.ü.>",
        ] {
            let ours: Vec<&str> = DotTokens(Some(name)).collect();
            let std: Vec<&str> = name.split('.').collect();
            assert_eq!(ours, std, "{name:?}");
        }
    }

    fn matches(pattern: &str, topic: &str) -> bool {
        Pattern::new(pattern)
            .unwrap()
            .matches(&Topic::new(topic).unwrap())
    }

    #[test]
    fn literal_patterns_match_only_the_same_topic() {
        assert!(matches("orders.eu", "orders.eu"));
        assert!(!matches("orders.eu", "orders.us"));
        assert!(!matches("orders.eu", "orders.eu.paris"));
        assert!(!matches("orders.eu.paris", "orders.eu"));
    }

    #[test]
    fn star_matches_exactly_one_token() {
        assert!(matches("orders.*", "orders.eu"));
        assert!(matches("*.eu", "orders.eu"));
        assert!(matches("orders.*.paris", "orders.eu.paris"));
        assert!(!matches("orders.*", "orders"));
        assert!(!matches("orders.*", "orders.eu.paris"));
    }

    #[test]
    fn tail_matches_one_or_more_tokens() {
        assert!(matches("orders.>", "orders.eu"));
        assert!(matches("orders.>", "orders.eu.paris.17"));
        assert!(!matches("orders.>", "orders"));
        assert!(matches(">", "anything.at.all"));
        assert!(matches("*.>", "a.b"));
        assert!(!matches("*.>", "a"));
    }

    fn covers(pattern: &str, other: &str) -> bool {
        Pattern::new(pattern)
            .unwrap()
            .covers(&Pattern::new(other).unwrap())
    }

    #[test]
    fn a_pattern_covers_only_narrower_patterns() {
        assert!(covers("orders.>", "orders.eu"));
        assert!(covers("orders.>", "orders.*.paris"));
        assert!(covers("orders.>", "orders.>"));
        assert!(covers("orders.*", "orders.eu"));
        assert!(covers("orders.*", "orders.*"));
        assert!(covers(">", "*"));
        assert!(!covers("orders.*", "orders.>"));
        assert!(!covers("orders.>", "orders"));
        assert!(!covers("orders.eu", "orders.*"));
        assert!(!covers("orders.*", "orders.eu.paris"));
        assert!(!covers("*", ">"));
    }

    #[test]
    fn bad_topics_are_rejected_with_a_reason() {
        assert_eq!(Topic::new(""), Err(TopicError::Empty));
        assert_eq!(Topic::new("a..b"), Err(TopicError::EmptyToken));
        assert_eq!(Topic::new(".a"), Err(TopicError::EmptyToken));
        assert_eq!(Topic::new("a.*"), Err(TopicError::WildcardInTopic));
        assert_eq!(Topic::new("a.>"), Err(TopicError::WildcardInTopic));
        assert!(matches!(
            Topic::new("a b"),
            Err(TopicError::BadCharacter(_))
        ));
        assert_eq!(
            Topic::new("a".repeat(MAX_TOPIC_LEN + 1)),
            Err(TopicError::TooLong)
        );
    }

    #[test]
    fn the_one_pass_check_agrees_with_the_rules_token_by_token() {
        // 'é' is not ASCII: from there the one pass hands over.
        const ALPHABET: &[char] = &['a', '.', '*', '>', ' ', '\t', '\x0b', '\x7f', 'é'];
        let mut layer = vec![String::new()];
        for _ in 0..5 {
            let mut next = Vec::new();
            for s in &layer {
                for &c in ALPHABET {
                    let t = format!("{s}{c}");
                    assert_eq!(check_topic(&t), check_topic_tokens(&t), "{t:?}");
                    next.push(t);
                }
            }
            layer = next;
        }
        let long = "a".repeat(MAX_TOPIC_LEN + 1);
        assert_eq!(check_topic(&long), check_topic_tokens(&long));
    }

    #[test]
    fn bad_patterns_are_rejected_with_a_reason() {
        assert_eq!(Pattern::new("a.>.b"), Err(TopicError::TailNotLast));
        assert!(matches!(
            Pattern::new("a.b*"),
            Err(TopicError::PartialWildcard(_))
        ));
        assert!(matches!(
            Pattern::new("a.>x"),
            Err(TopicError::PartialWildcard(_))
        ));
    }

    #[test]
    fn serde_rejects_invalid_names_on_decode() {
        let bytes = postcard::to_allocvec(&"a..b".to_string()).unwrap();
        assert!(postcard::from_bytes::<Topic>(&bytes).is_err());
        let bytes = postcard::to_allocvec(&"a.*".to_string()).unwrap();
        assert!(postcard::from_bytes::<Pattern>(&bytes).is_ok());
        assert!(postcard::from_bytes::<Topic>(&bytes).is_err());
    }
}
