//! `treescale tree`: the live tree as a picture, drawn from the root's
//! directory.

use std::collections::BTreeMap;

use clap::Args;
use serde::Serialize;
use treescale::wire::DirectoryEntry;
use treescale::{Client, NodeId};

use super::ConnectArgs;

/// The long help of this command: on its variant in [`super::Command`],
/// where clap reads it.
pub const TREE_ABOUT: &str =
    "Draw the live tree from any node: the node asks nothing of the others; \
the picture comes from the root, which knows every node in the tree. Each line shows a node's \
short id, name, and the round-trip time of the edge to its parent.";

#[derive(Args, Debug)]
pub struct TreeArgs {
    #[command(flatten)]
    connect: ConnectArgs,

    /// Print one JSON object (`root`, and `nodes` with `id`, `name`,
    /// `parent`, `depth`, `rtt_us`) instead of a picture.
    #[arg(long)]
    json: bool,
}

/// One node of the picture.
#[derive(Debug, Clone, Serialize)]
pub struct TreeNode {
    pub id: NodeId,
    pub name: String,
    pub parent: Option<NodeId>,
    pub depth: u32,
    pub rtt_us: u64,
}

/// The whole tree as `treescale tree --json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct Tree {
    pub root: NodeId,
    pub nodes: Vec<TreeNode>,
}

pub async fn run(args: TreeArgs) -> anyhow::Result<()> {
    let client = args.connect.connect("treescale tree").await?;
    let tree = fetch(&client).await?;
    client.close().await;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&tree)?);
    } else {
        print!("{}", render(&tree));
    }
    Ok(())
}

/// Asks the root for the tree, through the given client's node.
pub async fn fetch(client: &Client) -> anyhow::Result<Tree> {
    let status = client.status().await?;
    let entries = if status.root == status.id {
        client.tree().await?
    } else {
        client.tree_of(status.root).await?
    };
    Ok(from_entries(entries))
}

/// Depths from the parent pointers, root first.
pub fn from_entries(entries: Vec<DirectoryEntry>) -> Tree {
    let root = entries
        .first()
        .map(|e| e.id)
        .expect("a directory lists its own node first");
    let parents: BTreeMap<NodeId, Option<NodeId>> =
        entries.iter().map(|e| (e.id, e.parent)).collect();
    let depth_of = |mut id: NodeId| {
        let mut depth = 0u32;
        while id != root {
            match parents.get(&id).copied().flatten() {
                Some(parent) if (depth as usize) <= entries.len() => {
                    id = parent;
                    depth += 1;
                }
                _ => break,
            }
        }
        depth
    };
    let nodes = entries
        .iter()
        .map(|e| TreeNode {
            id: e.id,
            name: e.name.clone(),
            parent: if e.id == root { None } else { e.parent },
            depth: depth_of(e.id),
            rtt_us: e.rtt_us,
        })
        .collect();
    Tree { root, nodes }
}

/// An ASCII picture: one line per node, children indented under parents.
pub fn render(tree: &Tree) -> String {
    let mut children: BTreeMap<NodeId, Vec<&TreeNode>> = BTreeMap::new();
    for node in &tree.nodes {
        if let Some(parent) = node.parent {
            children.entry(parent).or_default().push(node);
        }
    }
    let depth = tree.nodes.iter().map(|n| n.depth).max().unwrap_or(0);
    let mut out = format!("{} node(s), depth {depth}\n", tree.nodes.len());
    let root = tree
        .nodes
        .iter()
        .find(|n| n.id == tree.root)
        .expect("the root is listed");
    out += &format!("{} {} (root)\n", root.id.short(), root.name);
    draw(&children, root.id, "", &mut out);
    out
}

fn draw(
    children: &BTreeMap<NodeId, Vec<&TreeNode>>,
    parent: NodeId,
    prefix: &str,
    out: &mut String,
) {
    let kids = children.get(&parent).map(Vec::as_slice).unwrap_or_default();
    for (i, node) in kids.iter().enumerate() {
        let last = i + 1 == kids.len();
        let rtt = if node.rtt_us == 0 {
            // Reported by the child; a link seconds old may not have yet.
            "rtt not measured yet".to_string()
        } else {
            format!("rtt {:.2}ms", node.rtt_us as f64 / 1000.0)
        };
        let branch = if last { "└── " } else { "├── " };
        out.push_str(&format!(
            "{prefix}{branch}{} {}  {rtt}\n",
            node.id.short(),
            node.name
        ));
        let deeper = format!("{prefix}{}", if last { "    " } else { "│   " });
        draw(children, node.id, &deeper, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: u8, parent: Option<u8>, rtt_us: u64) -> DirectoryEntry {
        DirectoryEntry {
            id: NodeId::from_bytes([n; 32]),
            name: format!("n{n}"),
            parent: parent.map(|p| NodeId::from_bytes([p; 32])),
            rtt_us,
            max_children: 8,
            addrs: Vec::new(),
            epoch: 0,
        }
    }

    #[test]
    fn edges_show_their_rtt_or_that_it_is_not_measured_yet() {
        let tree = from_entries(vec![
            entry(1, None, 0),
            entry(2, Some(1), 1500),
            entry(3, Some(1), 0),
        ]);
        let picture = render(&tree);
        assert!(picture.contains("n2  rtt 1.50ms"), "{picture}");
        assert!(picture.contains("n3  rtt not measured yet"), "{picture}");
        assert!(!picture.contains('?'), "{picture}");
    }
}
