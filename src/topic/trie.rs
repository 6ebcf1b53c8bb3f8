//! A trie of subscription patterns, so that routing an event costs time in
//! proportion to the topic's length, not to the number of subscriptions.

use std::collections::BTreeMap;

use super::{Pattern, Token, Topic};

/// Maps patterns to values; finds every value whose pattern matches a topic.
#[derive(Debug)]
pub struct PatternTrie<V> {
    root: Node<V>,
}

#[derive(Debug)]
struct Node<V> {
    literals: BTreeMap<String, Node<V>>,
    /// Child for a `*` token.
    one: Option<Box<Node<V>>>,
    /// Value of a pattern ending in `>` at this depth.
    tail: Option<V>,
    /// Value of a pattern ending exactly here.
    value: Option<V>,
}

impl<V> Default for Node<V> {
    fn default() -> Self {
        Node {
            literals: BTreeMap::new(),
            one: None,
            tail: None,
            value: None,
        }
    }
}

impl<V> Node<V> {
    fn is_empty(&self) -> bool {
        self.literals.is_empty()
            && self.one.is_none()
            && self.tail.is_none()
            && self.value.is_none()
    }
}

impl<V> Default for PatternTrie<V> {
    fn default() -> Self {
        PatternTrie {
            root: Node::default(),
        }
    }
}

impl<V> PatternTrie<V> {
    /// The value stored for exactly this pattern, created by `make` if absent.
    pub fn entry(&mut self, pattern: &Pattern, make: impl FnOnce() -> V) -> &mut V {
        let mut node = &mut self.root;
        for token in pattern.tokens() {
            match token {
                Token::Literal(lit) => node = node.literals.entry(lit.to_string()).or_default(),
                Token::One => node = node.one.get_or_insert_with(Default::default),
                Token::Tail => return node.tail.get_or_insert_with(make),
            }
        }
        node.value.get_or_insert_with(make)
    }

    pub fn get_mut(&mut self, pattern: &Pattern) -> Option<&mut V> {
        let mut node = &mut self.root;
        for token in pattern.tokens() {
            match token {
                Token::Literal(lit) => node = node.literals.get_mut(lit)?,
                Token::One => node = node.one.as_deref_mut()?,
                Token::Tail => return node.tail.as_mut(),
            }
        }
        node.value.as_mut()
    }

    /// Removes this pattern's value and prunes branches left empty.
    pub fn remove(&mut self, pattern: &Pattern) -> Option<V> {
        let tokens: Vec<Token<'_>> = pattern.tokens().collect();
        remove_at(&mut self.root, &tokens)
    }

    /// Calls `visit` with the value of every pattern that matches `topic`.
    pub fn for_each_match(&mut self, topic: &Topic, mut visit: impl FnMut(&mut V)) {
        visit_matches(&mut self.root, topic.tokens(), &mut visit);
    }

    /// Calls `visit` with every value.
    pub fn for_each(&mut self, mut visit: impl FnMut(&mut V)) {
        visit_all(&mut self.root, &mut visit);
    }
}

fn remove_at<V>(node: &mut Node<V>, tokens: &[Token<'_>]) -> Option<V> {
    let Some((first, rest)) = tokens.split_first() else {
        return node.value.take();
    };
    match first {
        Token::Tail => node.tail.take(),
        Token::One => {
            let child = node.one.as_deref_mut()?;
            let removed = remove_at(child, rest);
            if child.is_empty() {
                node.one = None;
            }
            removed
        }
        Token::Literal(lit) => {
            let child = node.literals.get_mut(*lit)?;
            let removed = remove_at(child, rest);
            if child.is_empty() {
                node.literals.remove(*lit);
            }
            removed
        }
    }
}

/// `tokens` is an iterator, cloned where the walk branches, so matching
/// allocates nothing: it runs for every event.
fn visit_matches<'t, V>(
    node: &mut Node<V>,
    mut tokens: impl Iterator<Item = &'t str> + Clone,
    visit: &mut impl FnMut(&mut V),
) {
    let Some(first) = tokens.next() else {
        if let Some(value) = node.value.as_mut() {
            visit(value);
        }
        return;
    };
    if let Some(tail) = node.tail.as_mut() {
        visit(tail);
    }
    if let Some(one) = node.one.as_deref_mut() {
        visit_matches(one, tokens.clone(), visit);
    }
    if let Some(child) = node.literals.get_mut(first) {
        visit_matches(child, tokens, visit);
    }
}

fn visit_all<V>(node: &mut Node<V>, visit: &mut impl FnMut(&mut V)) {
    if let Some(value) = node.value.as_mut() {
        visit(value);
    }
    if let Some(tail) = node.tail.as_mut() {
        visit(tail);
    }
    if let Some(one) = node.one.as_deref_mut() {
        visit_all(one, visit);
    }
    for child in node.literals.values_mut() {
        visit_all(child, visit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matching(trie: &mut PatternTrie<String>, topic: &str) -> Vec<String> {
        let mut found = Vec::new();
        trie.for_each_match(&Topic::new(topic).unwrap(), |v| found.push(v.clone()));
        found.sort();
        found
    }

    #[test]
    fn trie_agrees_with_pattern_matching() {
        let patterns = [
            "a", "a.b", "a.*", "a.>", "*.b", ">", "a.b.c", "*.*.c", "b.>",
        ];
        let topics = ["a", "a.b", "a.c", "a.b.c", "b", "b.b", "x.y.c", "b.c.d"];
        let mut trie = PatternTrie::default();
        for p in patterns {
            trie.entry(&Pattern::new(p).unwrap(), || p.to_string());
        }
        for t in topics {
            let topic = Topic::new(t).unwrap();
            let mut expected: Vec<String> = patterns
                .iter()
                .filter(|p| Pattern::new(**p).unwrap().matches(&topic))
                .map(|p| p.to_string())
                .collect();
            expected.sort();
            assert_eq!(matching(&mut trie, t), expected, "topic {t}");
        }
    }

    fn pattern() -> impl proptest::strategy::Strategy<Value = Pattern> {
        use proptest::prelude::*;
        (
            prop::collection::vec(prop::sample::select(vec!["a", "b", "*"]), 1..5),
            any::<bool>(),
        )
            .prop_map(|(mut tokens, tail)| {
                if tail {
                    *tokens.last_mut().expect("at least one token") = ">";
                }
                Pattern::new(tokens.join(".")).expect("built from valid tokens")
            })
    }

    proptest::proptest! {
        /// Whatever is added and removed, the trie finds exactly the
        /// patterns that match, as `Pattern::matches` says.
        #[test]
        fn trie_finds_exactly_the_matching_patterns(
            patterns in proptest::collection::vec(pattern(), 0..16),
            removed in proptest::collection::vec(proptest::prelude::any::<bool>(), 16),
            topic in proptest::collection::vec(proptest::sample::select(vec!["a", "b", "c"]), 1..5),
        ) {
            let mut trie = PatternTrie::default();
            for p in &patterns {
                trie.entry(p, || p.as_str().to_string());
            }
            let mut kept = Vec::new();
            for (p, remove) in patterns.iter().zip(&removed) {
                if *remove {
                    trie.remove(p);
                } else {
                    kept.push(p.clone());
                }
            }
            // A pattern both removed and kept (listed twice) is gone.
            kept.retain(|p| !patterns.iter().zip(&removed).any(|(q, r)| *r && q == p));
            let topic = Topic::new(topic.join(".")).unwrap();
            let mut expected: Vec<String> = kept
                .iter()
                .filter(|p| p.matches(&topic))
                .map(|p| p.as_str().to_string())
                .collect();
            expected.sort();
            expected.dedup();
            let mut found = Vec::new();
            trie.for_each_match(&topic, |v| found.push(v.clone()));
            found.sort();
            proptest::prop_assert_eq!(found, expected);
        }
    }

    #[test]
    fn removal_prunes_and_leaves_siblings() {
        let mut trie = PatternTrie::default();
        let ab = Pattern::new("a.b").unwrap();
        let astar = Pattern::new("a.*").unwrap();
        trie.entry(&ab, || "ab".to_string());
        trie.entry(&astar, || "a*".to_string());
        assert_eq!(trie.remove(&ab).as_deref(), Some("ab"));
        assert_eq!(trie.remove(&ab), None);
        assert_eq!(matching(&mut trie, "a.b"), vec!["a*".to_string()]);
        assert_eq!(trie.remove(&astar).as_deref(), Some("a*"));
        assert!(trie.root.is_empty());
    }
}
