//! A throw-away PKI for a lab, the demo and the tests: `scap pki init DIR`.
//!
//! One CA, and certificates it signs for each role, plus the deploy key
//! that signs versions. A site with its own CA (or puppet's) issues the
//! same roles itself: what matters is that every server certificate names
//! the host it is reached by (DNS name or IP address), that the deploy
//! host's client certificate carries the name agents are told to accept
//! with `--deployer`, and that every party trusts the CA (README, "TLS
//! with your own certificates").
//!
//! ```text
//! DIR/ca.pem ca.key            the CA (keep ca.key off the fleet)
//! DIR/server.pem server.key    scap serve (and its dashboard's polling)
//! DIR/deployer.pem .key        the deploy host's client: name `scap-deployer`
//! DIR/agent.pem agent.key      every lab agent: localhost, 127.0.0.1, ::1, --host names
//! DIR/deploy.key deploy.pub    the deploy key (ed25519) that signs versions
//! ```

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

use crate::store::signature::SigningKey;

/// The name the lab deployer certificate carries (agents' `--deployer`).
pub const DEPLOYER: &str = "scap-deployer";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {why}")]
    File { path: PathBuf, why: String },
    #[error("generating {what}: {why}")]
    Generate { what: String, why: String },
}

/// What `init` wrote.
pub struct Lab {
    pub dir: PathBuf,
}

impl Lab {
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn cert(&self, role: &str) -> PathBuf {
        self.dir.join(format!("{role}.pem"))
    }
    pub fn key(&self, role: &str) -> PathBuf {
        self.dir.join(format!("{role}.key"))
    }
    pub fn deploy_key(&self) -> PathBuf {
        self.dir.join("deploy.key")
    }
    pub fn deploy_pub(&self) -> PathBuf {
        self.dir.join("deploy.pub")
    }
}

fn gen_err(what: &str) -> impl Fn(rcgen::Error) -> PkiError + '_ {
    move |e| PkiError::Generate {
        what: what.to_string(),
        why: e.to_string(),
    }
}

fn write(path: &Path, data: &str, private: bool) -> Result<(), PkiError> {
    let err = |e: std::io::Error| PkiError::File {
        path: path.to_path_buf(),
        why: e.to_string(),
    };
    fs::write(path, data).map_err(err)?;
    fs::set_permissions(
        path,
        fs::Permissions::from_mode(if private { 0o600 } else { 0o644 }),
    )
    .map_err(err)
}

/// A certificate the lab CA signs.
pub struct Leaf<'a> {
    pub role: &'a str,
    /// DNS names and IP addresses it is valid for.
    pub names: Vec<String>,
    pub server: bool,
    pub client: bool,
    /// Valid for this many days from now (negative: already expired).
    pub days: i64,
}

/// Makes a CA, the role certificates and a deploy key in `dir` (created;
/// existing files are replaced). `hosts` are extra names for the agents'
/// certificate.
pub fn init(dir: &Path, hosts: &[String], days: i64) -> Result<Lab, PkiError> {
    fs::create_dir_all(dir).map_err(|e| PkiError::File {
        path: dir.to_path_buf(),
        why: e.to_string(),
    })?;
    let (ca, ca_key) = new_ca(dir, "scap lab CA", days)?;
    let local = ["localhost", "127.0.0.1", "::1"].map(String::from);
    let mut serve_names = local.to_vec();
    serve_names.push(crate::sys::hostname());
    let mut agent_names = local.to_vec();
    agent_names.extend(hosts.iter().cloned());
    for leaf in [
        Leaf {
            role: "server",
            names: serve_names,
            server: true,
            client: true,
            days,
        },
        Leaf {
            role: "deployer",
            names: vec![DEPLOYER.into()],
            server: false,
            client: true,
            days,
        },
        Leaf {
            role: "agent",
            names: agent_names,
            server: true,
            client: true,
            days,
        },
    ] {
        issue(dir, &leaf, &ca, &ca_key)?;
    }
    let (pem, public) =
        SigningKey::generate("scap lab deploy key").map_err(|e| PkiError::Generate {
            what: "deploy key".into(),
            why: e.to_string(),
        })?;
    write(&dir.join("deploy.key"), &pem, true)?;
    write(
        &dir.join("deploy.pub"),
        &format!("{}\n", public.to_line()),
        false,
    )?;
    Ok(Lab {
        dir: dir.to_path_buf(),
    })
}

/// A new CA in `dir` (`ca.pem`, `ca.key`).
pub fn new_ca(
    dir: &Path,
    name: &str,
    days: i64,
) -> Result<(rcgen::Certificate, KeyPair), PkiError> {
    let key = KeyPair::generate().map_err(gen_err("CA key"))?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(gen_err("CA"))?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params, days);
    let cert = params.self_signed(&key).map_err(gen_err("CA"))?;
    write(&dir.join("ca.pem"), &cert.pem(), false)?;
    write(&dir.join("ca.key"), &key.serialize_pem(), true)?;
    Ok((cert, key))
}

/// Issues `leaf` into `dir/<role>.pem` and `<role>.key`.
pub fn issue(
    dir: &Path,
    leaf: &Leaf<'_>,
    ca: &rcgen::Certificate,
    ca_key: &KeyPair,
) -> Result<(), PkiError> {
    let key = KeyPair::generate().map_err(gen_err(leaf.role))?;
    let mut params = CertificateParams::new(leaf.names.clone()).map_err(gen_err(leaf.role))?;
    params.distinguished_name.push(
        DnType::CommonName,
        leaf.names.first().cloned().unwrap_or_default(),
    );
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    if leaf.server {
        params
            .extended_key_usages
            .push(ExtendedKeyUsagePurpose::ServerAuth);
    }
    if leaf.client {
        params
            .extended_key_usages
            .push(ExtendedKeyUsagePurpose::ClientAuth);
    }
    validity(&mut params, leaf.days);
    let cert = params
        .signed_by(&key, ca, ca_key)
        .map_err(gen_err(leaf.role))?;
    write(&dir.join(format!("{}.pem", leaf.role)), &cert.pem(), false)?;
    write(
        &dir.join(format!("{}.key", leaf.role)),
        &key.serialize_pem(),
        true,
    )?;
    Ok(())
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    if days >= 0 {
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(days);
    } else {
        params.not_before = now + time::Duration::days(days - 1);
        params.not_after = now + time::Duration::days(days);
    }
}
