//! Tree invariants over a snapshot of every node's parent, by index:
//! never a loop, and one tree per connected component.

/// A loop in the parent pointers of live nodes, if there is one.
pub fn find_loop(parent: &[Option<usize>], alive: &[bool]) -> Option<Vec<usize>> {
    // 0 unvisited, 1 on the current path, 2 known to end at a root.
    let mut state = vec![0u8; parent.len()];
    for start in 0..parent.len() {
        let mut path = Vec::new();
        let mut at = Some(start);
        while let Some(i) = at {
            if !alive[i] || state[i] == 2 {
                break;
            }
            if state[i] == 1 {
                let from = path.iter().position(|&p| p == i).unwrap_or(0);
                return Some(path[from..].to_vec());
            }
            state[i] = 1;
            path.push(i);
            at = parent[i];
        }
        for i in path {
            state[i] = 2;
        }
    }
    None
}

/// Why the live nodes are not one tree per component; nodes by number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TreeError {
    /// `node`'s chain of parents leaves its component.
    ParentOutside { node: usize },
    /// `node`'s chain of parents goes round.
    OnLoop { node: usize },
    /// The component of `node` has two roots.
    TwoRoots { node: usize, roots: [usize; 2] },
}

impl TreeError {
    /// The error in words, nodes by name.
    pub fn describe(&self, names: &[String]) -> String {
        let name = |i: usize| names.get(i).map_or_else(|| i.to_string(), Clone::clone);
        match *self {
            TreeError::ParentOutside { node } => {
                format!("node {} has a parent outside its component", name(node))
            }
            TreeError::OnLoop { node } => format!("node {} is on a loop", name(node)),
            TreeError::TwoRoots { node, roots } => format!(
                "component of node {} has two roots, {} and {}",
                name(node),
                name(roots[0]),
                name(roots[1])
            ),
        }
    }
}

/// Whether the live nodes of each component form exactly one tree inside
/// it; otherwise why not. `component[i]` is `None` for dead nodes.
pub fn one_tree_per_component(
    parent: &[Option<usize>],
    component: &[Option<usize>],
) -> Result<(), TreeError> {
    let n = parent.len();
    let mut root_of: Vec<Option<usize>> = vec![None; n];
    for i in 0..n {
        let Some(c) = component[i] else { continue };
        let mut at = i;
        for _ in 0..=n {
            match parent[at] {
                None => break,
                Some(p) if component[p] == Some(c) => at = p,
                Some(_) => return Err(TreeError::ParentOutside { node: i }),
            }
        }
        if parent[at].is_some() {
            return Err(TreeError::OnLoop { node: i });
        }
        match root_of[c] {
            None => root_of[c] = Some(at),
            Some(root) if root == at => {}
            Some(root) => {
                return Err(TreeError::TwoRoots {
                    node: i,
                    roots: [root, at],
                })
            }
        }
    }
    Ok(())
}

/// Connected components of live nodes, given which pairs can talk.
pub fn components(alive: &[bool], connected: impl Fn(usize, usize) -> bool) -> Vec<Option<usize>> {
    let n = alive.len();
    let mut component = vec![None; n];
    let mut next = 0;
    for start in 0..n {
        if !alive[start] || component[start].is_some() {
            continue;
        }
        component[start] = Some(next);
        let mut stack = vec![start];
        while let Some(i) = stack.pop() {
            for j in 0..n {
                if alive[j] && component[j].is_none() && connected(i, j) {
                    component[j] = Some(next);
                    stack.push(j);
                }
            }
        }
        next += 1;
    }
    component
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loop_is_found_and_a_tree_is_not_one() {
        let alive = [true; 4];
        assert_eq!(find_loop(&[None, Some(0), Some(1), Some(1)], &alive), None);
        let mut found = find_loop(&[None, Some(2), Some(3), Some(1)], &alive).unwrap();
        found.sort();
        assert_eq!(found, vec![1, 2, 3]);
        // A loop through a dead node is no loop of live nodes.
        let alive = [true, true, false, true];
        assert_eq!(find_loop(&[None, Some(2), Some(3), Some(1)], &alive), None);
    }

    #[test]
    fn each_component_needs_exactly_one_tree() {
        let one = [Some(0); 3];
        assert!(one_tree_per_component(&[None, Some(0), Some(1)], &one).is_ok());
        assert_eq!(
            one_tree_per_component(&[None, None, Some(1)], &one),
            Err(TreeError::TwoRoots {
                node: 1,
                roots: [0, 1]
            })
        );
        let split = [Some(0), Some(0), Some(1)];
        assert!(one_tree_per_component(&[None, Some(0), None], &split).is_ok());
        assert_eq!(
            one_tree_per_component(&[None, Some(0), Some(0)], &split),
            Err(TreeError::ParentOutside { node: 2 })
        );
        let names = ["a", "b", "c"].map(String::from);
        assert_eq!(
            TreeError::ParentOutside { node: 2 }.describe(&names),
            "node c has a parent outside its component"
        );
        let dead_child = [Some(0), Some(0), None];
        assert!(one_tree_per_component(&[None, Some(0), Some(1)], &dead_child).is_ok());
    }

    #[test]
    fn components_follow_connectivity() {
        let alive = [true, true, true, false];
        let c = components(&alive, |a, b| (a < 2) == (b < 2));
        assert_eq!(c, vec![Some(0), Some(0), Some(1), None]);
    }
}
