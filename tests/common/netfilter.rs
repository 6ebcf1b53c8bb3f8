//! nftables and network namespaces for tests that cut real links. Both
//! need root; callers skip with the returned reason when they fail.

use std::io::Write;
use std::process::{Command, Stdio};

/// Loads an nftables script, inside network namespace `netns` if given.
pub fn nft(netns: Option<&str>, script: &str) -> Result<(), String> {
    let mut command = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "nft"]);
            c
        }
        None => Command::new("nft"),
    };
    let mut nft = command
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("nft is not available ({e})"))?;
    nft.stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let output = nft.wait_with_output().unwrap();
    if !output.status.success() {
        return Err(format!(
            "nft refused the rules: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(())
}

/// Whether this process runs as root; the reason to skip if not.
pub fn need_root() -> Result<(), String> {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .map_err(|e| e.to_string())?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Err("needs root (nftables, network namespaces)".to_string());
    }
    Ok(())
}

/// Network namespaces joined by a bridge, each with one interface `eth0`
/// at 10.231.0.<i+1>/24. Everything is deleted on drop; stop the
/// processes inside first (declare them after the lab).
pub struct Lab {
    tag: String,
    namespaces: Vec<String>,
}

impl Lab {
    pub fn new(nodes: usize) -> Result<Lab, String> {
        need_root()?;
        // Interface names are at most 15 bytes, so the tag is short.
        let tag = format!("t{:06x}", rand::random::<u32>() & 0xff_ffff);
        let mut lab = Lab {
            tag: tag.clone(),
            namespaces: Vec::new(),
        };
        let bridge = lab.add_namespace("br")?;
        ip(&["-n", &bridge, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &bridge, "link", "set", "br0", "up"])?;
        for i in 0..nodes {
            let ns = lab.add_namespace(&format!("n{i}"))?;
            let (inside, outside) = (format!("{tag}a{i}"), format!("{tag}b{i}"));
            ip(&[
                "link", "add", &inside, "netns", &ns, "type", "veth", "peer", "name", &outside,
                "netns", &bridge,
            ])?;
            ip(&["-n", &ns, "link", "set", &inside, "name", "eth0"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("10.231.0.{}/24", i + 1),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&["-n", &ns, "route", "add", "224.0.0.0/4", "dev", "eth0"])?;
            ip(&["-n", &bridge, "link", "set", &outside, "master", "br0"])?;
            ip(&["-n", &bridge, "link", "set", &outside, "up"])?;
        }
        Ok(lab)
    }

    fn add_namespace(&mut self, role: &str) -> Result<String, String> {
        let name = format!("treescale-{}-{role}", self.tag);
        ip(&["netns", "add", &name])?;
        self.namespaces.push(name.clone());
        Ok(name)
    }

    /// The namespace holding the bridge.
    pub fn bridge(&self) -> &str {
        &self.namespaces[0]
    }

    /// The namespace of node `i`.
    pub fn node(&self, i: usize) -> &str {
        &self.namespaces[i + 1]
    }

    pub fn addr(&self, i: usize) -> String {
        format!("10.231.0.{}", i + 1)
    }

    /// A command run inside node `i`'s namespace.
    pub fn command(&self, i: usize, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", self.node(i), program]);
        command
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("iproute2 is not available ({e})"))?;
    if !output.status.success() {
        return Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(())
}
