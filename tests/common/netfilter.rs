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

/// Network namespaces joined by bridges, one node in each. Everything is
/// deleted on drop; stop the processes inside first (declare them after
/// the lab).
pub struct Lab {
    tag: String,
    namespaces: Vec<String>,
    /// Each node's address, on its first interface.
    addrs: Vec<String>,
}

impl Lab {
    /// `nodes` namespaces on one bridge, each with one interface `eth0` at
    /// 10.231.0.<i+1>/24.
    pub fn new(nodes: usize) -> Result<Lab, String> {
        let mut lab = Lab::empty()?;
        let bridge = lab.add_bridges(1)?;
        for i in 0..nodes {
            let ns = lab.add_namespace(&format!("n{i}"))?;
            let addr = format!("10.231.0.{}", i + 1);
            lab.plug(&ns, "eth0", &bridge, 0, &format!("{addr}/24"), i)?;
            ip(&["-n", &ns, "route", "add", "224.0.0.0/4", "dev", "eth0"])?;
            lab.addrs.push(addr);
        }
        Ok(lab)
    }

    /// LAN segments joined by one router: node `i < segments` alone on
    /// bridge `i` at 10.231.<i+1>.2/24, and node `segments` (the hub) on
    /// every bridge as 10.231.<i+1>.1, its `eth<i>`, forwarding between
    /// them. Every node reaches every other over UDP, but multicast (mDNS)
    /// does not cross the router: a node sees only the hub, and the hub
    /// sees everyone.
    pub fn segments(segments: usize) -> Result<Lab, String> {
        let mut lab = Lab::empty()?;
        let bridge = lab.add_bridges(segments)?;
        for i in 0..segments {
            let ns = lab.add_namespace(&format!("n{i}"))?;
            let net = format!("10.231.{}", i + 1);
            lab.plug(&ns, "eth0", &bridge, i, &format!("{net}.2/24"), i)?;
            ip(&["-n", &ns, "route", "add", "224.0.0.0/4", "dev", "eth0"])?;
            ip(&[
                "-n",
                &ns,
                "route",
                "add",
                "10.231.0.0/16",
                "via",
                &format!("{net}.1"),
            ])?;
            lab.addrs.push(format!("{net}.2"));
        }
        let hub = lab.add_namespace("hub")?;
        for i in 0..segments {
            let net = format!("10.231.{}", i + 1);
            let link = segments + 1 + i;
            lab.plug(
                &hub,
                &format!("eth{i}"),
                &bridge,
                i,
                &format!("{net}.1/24"),
                link,
            )?;
        }
        lab.addrs.push("10.231.1.1".to_string());
        let forward = Command::new("ip")
            .args([
                "netns",
                "exec",
                &hub,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ])
            .status()
            .map_err(|e| e.to_string())?;
        if !forward.success() {
            return Err("cannot turn on forwarding in the hub namespace".into());
        }
        Ok(lab)
    }

    fn empty() -> Result<Lab, String> {
        need_root()?;
        // Interface names are at most 15 bytes, so the tag is short.
        let tag = format!("t{:06x}", rand::random::<u32>() & 0xff_ffff);
        Ok(Lab {
            tag,
            namespaces: Vec::new(),
            addrs: Vec::new(),
        })
    }

    /// The namespace holding bridges `br0`.. `br<n-1>`, all up.
    fn add_bridges(&mut self, n: usize) -> Result<String, String> {
        let ns = self.add_namespace("br")?;
        for i in 0..n {
            let bridge = format!("br{i}");
            ip(&["-n", &ns, "link", "add", &bridge, "type", "bridge"])?;
            ip(&["-n", &ns, "link", "set", &bridge, "up"])?;
        }
        Ok(ns)
    }

    /// Gives namespace `ns` an interface `name` with address `cidr`, wired
    /// to bridge `br<bridge>`; `link` numbers the veth pair.
    fn plug(
        &self,
        ns: &str,
        name: &str,
        bridges: &str,
        bridge: usize,
        cidr: &str,
        link: usize,
    ) -> Result<(), String> {
        let (inside, outside) = (
            format!("{}a{link}", self.tag),
            format!("{}b{link}", self.tag),
        );
        ip(&[
            "link", "add", &inside, "netns", ns, "type", "veth", "peer", "name", &outside, "netns",
            bridges,
        ])?;
        ip(&["-n", ns, "link", "set", &inside, "name", name])?;
        ip(&["-n", ns, "addr", "add", cidr, "dev", name])?;
        ip(&["-n", ns, "link", "set", name, "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        let bridge = format!("br{bridge}");
        ip(&["-n", bridges, "link", "set", &outside, "master", &bridge])?;
        ip(&["-n", bridges, "link", "set", &outside, "up"])
    }

    fn add_namespace(&mut self, role: &str) -> Result<String, String> {
        let name = format!("treescale-{}-{role}", self.tag);
        ip(&["netns", "add", &name])?;
        self.namespaces.push(name.clone());
        Ok(name)
    }

    /// The namespace holding the bridges.
    pub fn bridge(&self) -> &str {
        &self.namespaces[0]
    }

    /// The namespace of node `i`.
    pub fn node(&self, i: usize) -> &str {
        &self.namespaces[i + 1]
    }

    pub fn addr(&self, i: usize) -> String {
        self.addrs[i].clone()
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
