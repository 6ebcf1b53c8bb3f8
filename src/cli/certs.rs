//! `treescale certs`: create the cluster CA and issue certificates from it.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use treescale::identity::{self, NODE_CERT_FILE};
use treescale::trust::{
    self, pem_of, write_atomically, ClusterCa, Role, TokenScope, TrustError, CA_CERT_FILE,
    CLIENT_CERT_FILE, CLIENT_KEY_FILE,
};

use super::TrustArgs;

/// The long help of this command: on its variant in [`super::Command`],
/// where clap reads it.
pub const CERTS_ABOUT: &str = "Manage the cluster's credentials. Every node and client shows a \
certificate from the cluster CA; nodes and clients of another CA are refused.\n\n\
You rarely need these commands: the first `treescale node` on a machine creates a CA in the \
certs dir, and nodes and clients on machines holding the CA key issue their own certificates. \
To add a machine, copy the certs dir to it. Use `issue` for machines that must not hold the \
CA key. See docs/security.md.";

#[derive(Args, Debug)]
pub struct CertsArgs {
    #[command(subcommand)]
    command: CertsCommand,

    #[command(flatten)]
    trust: TrustArgs,
}

#[derive(Subcommand, Debug)]
enum CertsCommand {
    /// Create a new cluster CA in the certs dir (ca.crt, and ca.key readable by you only).
    Init,
    /// Issue a certificate from the CA; run it where ca.key is.
    #[command(subcommand)]
    Issue(IssueCommand),
    /// Show the CA's fingerprint and what the certs dir holds.
    Show,
}

#[derive(Subcommand, Debug)]
enum IssueCommand {
    /// A node certificate, into a data dir to move to a machine without the CA key.
    Node {
        /// Data dir of the node: its key is created there if it has none,
        /// and node.crt is written beside it.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// Days the certificate is valid.
        #[arg(long, value_name = "DAYS", default_value_t = 365, value_parser = clap::value_parser!(u16).range(1..))]
        days: u16,
    },
    /// A client certificate for user NAME, into a certs dir for that user.
    Client {
        /// The user name that permissions.toml grants rights to.
        #[arg(long, value_name = "NAME", value_parser = parse_user)]
        name: String,
        /// Dir to write ca.crt, client.crt and client.key into; use it as
        /// that user's --certs (or copy it to their ~/.config/treescale/certs).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Days the certificate is valid.
        #[arg(long, value_name = "DAYS", default_value_t = 365, value_parser = clap::value_parser!(u16).range(1..))]
        days: u16,
    },
    /// A token for user NAME, printed on stdout: for clients that cannot
    /// show a certificate (browsers, programs given a secret). Such a
    /// client needs only ca.crt, and passes the token with --token or
    /// TREESCALE_TOKEN; permissions.toml applies to NAME as to a
    /// certificate's user. Anyone holding the token is NAME until it
    /// expires: keep it secret, and short-lived.
    Token {
        /// The user name that permissions.toml grants rights to.
        #[arg(long, value_name = "NAME", value_parser = parse_user)]
        name: String,
        /// How long the token is valid, e.g. 1h, 24h, 30d.
        #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_ttl)]
        ttl: std::time::Duration,
        /// Let the token only look (status and tree, as the web dashboard
        /// does), whatever permissions.toml grants NAME.
        #[arg(long)]
        read_only: bool,
    },
}

fn parse_ttl(s: &str) -> Result<std::time::Duration, String> {
    match humantime::parse_duration(s) {
        Ok(ttl) if ttl.as_secs() > 0 => Ok(ttl),
        Ok(_) => Err("a token must be valid for a second at least".into()),
        Err(e) => Err(format!("{s:?} is not a duration such as 24h ({e})")),
    }
}

fn parse_user(name: &str) -> Result<String, String> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c));
    if valid {
        Ok(name.to_string())
    } else {
        Err("user names are 1 to 64 letters, digits, '-', '_', '.' or '@'".into())
    }
}

pub fn run(args: CertsArgs) -> anyhow::Result<()> {
    let Some(dir) = args.trust.config().dir()? else {
        anyhow::bail!("--insecure has no certificates to manage");
    };
    match args.command {
        CertsCommand::Init => init(&dir),
        CertsCommand::Issue(IssueCommand::Node { data_dir, days }) => {
            issue_node(&dir, &data_dir, days)
        }
        CertsCommand::Issue(IssueCommand::Client { name, out, days }) => {
            issue_client(&dir, &name, &out, days)
        }
        CertsCommand::Issue(IssueCommand::Token {
            name,
            ttl,
            read_only,
        }) => {
            let scope = match read_only {
                true => TokenScope::ReadOnly,
                false => TokenScope::Granted,
            };
            println!("{}", issuer(&dir)?.issue_scoped_token(&name, scope, ttl)?);
            Ok(())
        }
        CertsCommand::Show => show(&dir),
    }
}

fn init(dir: &Path) -> anyhow::Result<()> {
    let key = rcgen_key()?;
    let ca = ClusterCa::init(dir, key)?;
    println!(
        "created cluster CA {} in {}",
        ca.fingerprint(),
        dir.display()
    );
    println!("to add a machine, copy this dir to it (its ca.key lets it issue certificates);");
    println!("for machines that must not hold ca.key, see `treescale certs issue --help`");
    Ok(())
}

fn issue_node(dir: &Path, data_dir: &Path, days: u16) -> anyhow::Result<()> {
    let ca = issuer(dir)?;
    let key = identity::load_or_create_key(data_dir)?;
    let id =
        treescale::NodeId::from_public_key(&rcgen::PublicKeyData::subject_public_key_info(&key));
    let identity = ca.issue(
        &key,
        Role::Node,
        &format!("node {}", id.short()),
        validity(days),
    )?;
    let cert_path = data_dir.join(NODE_CERT_FILE);
    write_atomically(
        &cert_path,
        pem_of("CERTIFICATE", &identity.certificate).as_bytes(),
        false,
    )?;
    println!(
        "issued node {} ({} days) into {}",
        id.short(),
        days,
        data_dir.display()
    );
    println!(
        "on the new machine: use that dir as the node's --data-dir, and put {} in its certs dir",
        dir.join(CA_CERT_FILE).display()
    );
    Ok(())
}

fn issue_client(dir: &Path, name: &str, out: &Path, days: u16) -> anyhow::Result<()> {
    let ca = issuer(dir)?;
    let identity = ca.issue(&rcgen_key()?, Role::Client, name, validity(days))?;
    trust::create_private_dir(out)?;
    write_atomically(
        &out.join(CA_CERT_FILE),
        ca.certificate_pem().as_bytes(),
        false,
    )?;
    write_atomically(
        &out.join(CLIENT_CERT_FILE),
        pem_of("CERTIFICATE", &identity.certificate).as_bytes(),
        false,
    )?;
    write_atomically(
        &out.join(CLIENT_KEY_FILE),
        pem_of(
            "PRIVATE KEY",
            &treescale::identity::pkcs8_v1(identity.private_key().secret_der()),
        )
        .as_bytes(),
        false,
    )?;
    println!(
        "issued client {name:?} ({days} days) into {}",
        out.display()
    );
    println!(
        "give that dir to the user: `treescale sub --certs {} ...`, or copy it to their ~/.config/treescale/certs",
        out.display()
    );
    Ok(())
}

fn show(dir: &Path) -> anyhow::Result<()> {
    let ca = ClusterCa::load(dir)?.ok_or_else(|| TrustError::NoCredentials(dir.to_path_buf()))?;
    println!("certs dir:   {}", dir.display());
    println!("cluster CA:  {}", ca.fingerprint());
    println!(
        "CA key:      {}",
        if ca.can_issue() {
            "here: nodes issue their own certificates; clients connect as `admin`"
        } else {
            "not here"
        }
    );
    match std::fs::read(dir.join(CLIENT_CERT_FILE)) {
        Ok(pem) => {
            let der = pem::parse(&pem).context("client.crt is not PEM")?;
            let (_, name) = trust::describe(&der.contents().to_vec().into())
                .context("client.crt is not a certificate")?;
            println!("client:      {name}");
        }
        Err(_) => println!("client:      no client.crt"),
    }
    Ok(())
}

/// The CA, which must hold its key here.
fn issuer(dir: &Path) -> anyhow::Result<ClusterCa> {
    let ca = ClusterCa::load(dir)?.ok_or_else(|| TrustError::NoCredentials(dir.to_path_buf()))?;
    if !ca.can_issue() {
        return Err(TrustError::NoCaKey.into());
    }
    Ok(ca)
}

fn validity(days: u16) -> time::Duration {
    time::Duration::days(days.into())
}

fn rcgen_key() -> anyhow::Result<rcgen::KeyPair> {
    Ok(rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)?)
}
