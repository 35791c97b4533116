//! `scap keygen`, `scap sign` and `scap pki init`: deploy keys and the lab
//! PKI.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};

use super::ctx::Ctx;
use super::output::exit;
use crate::store::signature::SigningKey;

#[derive(Args, Debug)]
pub struct KeygenArgs {
    /// Where to write the private key (mode 600); the public key goes to FILE.pub
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// A comment in the public key, e.g. who or where
    #[arg(long, default_value = "scap deploy key")]
    comment: String,
}

/// `scap keygen`: a new ed25519 deploy key.
pub fn keygen(a: KeygenArgs) -> anyhow::Result<i32> {
    let pub_path = PathBuf::from(format!("{}.pub", a.out.display()));
    for p in [&a.out, &pub_path] {
        if p.exists() {
            bail!(
                "{} exists: a key is not overwritten; choose another --out or move it aside",
                p.display()
            );
        }
    }
    let (pem, public) = SigningKey::generate(&a.comment)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode_600()
        .open(&a.out)
        .with_context(|| a.out.display().to_string())?;
    f.write_all(pem.as_bytes())?;
    std::fs::write(&pub_path, format!("{}\n", public.to_line()))
        .with_context(|| pub_path.display().to_string())?;
    println!(
        "private key: {} (keep it on the deploy host)",
        a.out.display()
    );
    println!(
        "public key:  {} (key ID {}): give it to every agent with --trusted-key",
        pub_path.display(),
        public.id
    );
    Ok(exit::OK)
}

trait Mode600 {
    fn mode_600(&mut self) -> &mut Self;
}

impl Mode600 for std::fs::OpenOptions {
    fn mode_600(&mut self) -> &mut Self {
        std::os::unix::fs::OpenOptionsExt::mode(self, 0o600)
    }
}

#[derive(Args, Debug)]
pub struct SignArgs {
    /// Versions to sign (labels, IDs, prefixes)
    #[arg(required_unless_present = "desired")]
    versions: Vec<String>,
    /// Also sign every host's desired target anew with this key (after a key
    /// rotation: agents ignore targets signed by a key they revoked)
    #[arg(long)]
    desired: bool,
    /// The deploy key [default: scap.toml's sign_key]
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
}

/// `scap sign`: adds a signature to existing versions (after a key
/// rotation, or for a version built without a key).
pub fn sign(ctx: &Ctx, a: SignArgs) -> anyhow::Result<i32> {
    let store = ctx.open_deploy()?;
    let Some(key) = ctx.signer(a.key.as_deref())? else {
        bail!("no deploy key: pass --key or set sign_key in scap.toml");
    };
    for name in &a.versions {
        let v = store.resolve(name)?;
        let doc = crate::manifest::sign_version(&store, &v, &key)?;
        let keys: Vec<String> = doc.signatures.iter().map(|s| s.key.to_string()).collect();
        println!("{v} signed by {}", keys.join(", "));
    }
    if a.desired {
        let n = crate::fleet::desired::resign(&super::fleet_args::fleet_state(ctx)?, key)?;
        println!("the desired targets of {n} host(s) signed anew");
    }
    Ok(exit::OK)
}

#[derive(Args, Debug)]
pub struct PkiArgs {
    #[command(subcommand)]
    cmd: PkiCmd,
}

#[derive(Subcommand, Debug)]
enum PkiCmd {
    /// Make a lab PKI in DIR: a CA, certificates for scap serve, the deployer and the
    /// agents, and a deploy key
    Init {
        dir: PathBuf,
        /// Another name (DNS or IP) the agents' certificate is valid for (repeatable)
        #[arg(long = "host", value_name = "NAME")]
        hosts: Vec<String>,
        /// Days the certificates are valid
        #[arg(long, default_value_t = 365)]
        days: i64,
    },
}

pub fn pki(a: PkiArgs) -> anyhow::Result<i32> {
    match a.cmd {
        PkiCmd::Init { dir, hosts, days } => {
            let lab = crate::pki::init(&dir, &hosts, days)?;
            let d = lab.dir.display();
            println!("a lab PKI in {d} (valid {days} days); use it with:");
            println!(
                "  deploy host scap.toml:\n    sign_key = \"{d}/deploy.key\"\n    [tls]\n    ca = \"{d}/ca.pem\"\n    cert = \"{d}/deployer.pem\"\n    key = \"{d}/deployer.key\""
            );
            println!("  scap serve --ca {d}/ca.pem --cert {d}/server.pem --key {d}/server.key");
            println!(
                "  scap agent --ca {d}/ca.pem --cert {d}/agent.pem --key {d}/agent.key --trusted-key {d}/deploy.pub"
            );
            let _ = std::fs::set_permissions(&lab.dir, std::fs::Permissions::from_mode(0o700));
            Ok(exit::OK)
        }
    }
}
