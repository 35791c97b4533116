//! What every command starts from: where the store is, what scap.toml
//! says, how to talk to other scap processes.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::config::ConfigFile;
use crate::store::Store;

/// The deploy host's store when neither --store nor SCAP_STORE nor
/// scap.toml say. Never the agent's (`/var/lib/scap/store`, under the
/// agent's `--dir`): a deploy-host command run on an app server must not
/// find the agent's store by default.
pub const DEFAULT_STORE: &str = "/srv/deployment/scap/store";

/// Default agent directory on a host.
pub const DEFAULT_AGENT_DIR: &str = "/var/lib/scap";
/// The deploy host's configuration, read when neither `--config`
/// (`$SCAP_CONFIG`) nor `./scap.toml` names one; the package installs it.
pub const SYSTEM_CONFIG: &str = "/etc/scap/scap.toml";

/// The agent's local socket, in its directory (`scap agent --socket`).
pub const AGENT_SOCKET: &str = "agent.sock";

/// Where the store is, what scap.toml says, and how to talk to others.
pub struct Ctx {
    pub store_path: PathBuf,
    pub config: ConfigFile,
    pub transport_args: TransportArgs,
    /// The deploy state, made once: the deploy lock a command takes fences
    /// its writes through this one value.
    state: std::sync::OnceLock<crate::fleet::state::DeployState>,
}

impl Ctx {
    pub fn new(
        store: Option<PathBuf>,
        config: Option<PathBuf>,
        transport_args: TransportArgs,
    ) -> anyhow::Result<Ctx> {
        let config_path = config.or_else(|| {
            [PathBuf::from("scap.toml"), PathBuf::from(SYSTEM_CONFIG)]
                .into_iter()
                .find(|p| p.exists())
        });
        let config = match &config_path {
            Some(p) => ConfigFile::load(p)?,
            None => ConfigFile::default(),
        };
        let store_path = store
            .or_else(|| config.store.clone())
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STORE));
        Ok(Ctx {
            store_path,
            config,
            transport_args,
            state: std::sync::OnceLock::new(),
        })
    }

    /// Where the deploy lock, history, desired state and rollout record
    /// live: scap.toml's `[state]` etcd, else files in `STORE/fleet`.
    pub fn state(&self) -> anyhow::Result<crate::fleet::state::DeployState> {
        if let Some(s) = self.state.get() {
            return Ok(s.clone());
        }
        let dir = self.store_path.join("fleet");
        let s = match &self.config.state {
            Some(cfg) => crate::fleet::state::DeployState::from_config(&dir, cfg)
                .map_err(anyhow::Error::msg)?,
            None => crate::fleet::state::DeployState::files(&dir),
        };
        Ok(self.state.get_or_init(|| s).clone())
    }

    /// TLS with certificates, or (`--insecure-http`) plain with a token.
    pub fn transport(&self) -> anyhow::Result<crate::net::tls::Transport> {
        self.transport_args.transport(&self.config)
    }

    /// The sources hosts fetch from: `given` (`--source`), else scap.toml's
    /// `sources`; each an https URL (http only with `--insecure-http`).
    pub fn sources(&self, given: &[String]) -> anyhow::Result<Vec<String>> {
        let sources = if given.is_empty() {
            self.config.sources.clone()
        } else {
            given.to_vec()
        };
        crate::host::api::check_sources(&sources, true, self.transport_args.insecure_http)
            .map_err(anyhow::Error::msg)?;
        Ok(sources)
    }

    /// scap.toml's `[caches]`, checked like [`Ctx::sources`].
    pub fn caches(&self) -> anyhow::Result<std::collections::BTreeMap<String, Vec<String>>> {
        for (dc, urls) in &self.config.caches {
            crate::host::api::check_sources(urls, true, self.transport_args.insecure_http)
                .map_err(|e| anyhow::anyhow!("scap.toml [caches] {dc}: {e}"))?;
        }
        Ok(self.config.caches.clone())
    }

    /// The deploy key to sign with: `--sign-key`, else scap.toml's
    /// `sign_key`; warns when there is none (agents refuse unsigned
    /// versions).
    pub fn signer(
        &self,
        flag: Option<&std::path::Path>,
    ) -> anyhow::Result<Option<std::sync::Arc<crate::store::signature::SigningKey>>> {
        match flag.or(self.config.sign_key.as_deref()) {
            Some(path) => Ok(Some(std::sync::Arc::new(
                crate::store::signature::SigningKey::load(path)?,
            ))),
            None => {
                eprintln!(
                    "scap: warning: no deploy key (--sign-key or sign_key in scap.toml): the version is not signed, and agents that trust a key will refuse it; `scap sign VERSION` signs it later"
                );
                Ok(None)
            }
        }
    }

    pub fn open(&self) -> anyhow::Result<Store> {
        self.shared(Store::open(&self.store_path)?)
    }

    /// `store` with the trains' heads shared through the deploy state,
    /// when it is in etcd (taken from there first).
    fn shared(&self, store: Store) -> anyhow::Result<Store> {
        match crate::fleet::state::EtcdLabels::of(&self.state()?) {
            Some(l) => Ok(store.with_shared_labels(std::sync::Arc::new(l))?),
            None => Ok(store),
        }
    }

    /// Opens (or creates) the deploy host's store for a command that builds
    /// versions: refused on a standby while another deploy host is the
    /// primary.
    pub fn open_for_build(&self) -> anyhow::Result<Store> {
        let store = Store::open_or_init(&self.store_path, crate::store::disk::Role::Deploy)?;
        store.check_deploy()?;
        crate::fleet::standby::may_build(&self.state()?, &self.store_path)
            .map_err(anyhow::Error::msg)?;
        self.shared(store)
    }

    /// Opens the store for a command that changes it on the deploy host:
    /// an agent's store is refused by name.
    pub fn open_deploy(&self) -> anyhow::Result<Store> {
        self.shared(Store::open_deploy(&self.store_path)?)
    }
}

/// How a command talks to other scap processes.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TransportArgs {
    /// The site CA's certificate (PEM): whom to trust [default: scap.toml [tls] ca]
    #[arg(long, value_name = "FILE", global = true)]
    ca: Option<PathBuf>,
    /// This process's certificate (PEM) [default: scap.toml [tls] cert]
    #[arg(long, value_name = "FILE", global = true)]
    cert: Option<PathBuf>,
    /// Its private key (PEM, mode 600) [default: scap.toml [tls] key]
    #[arg(long, value_name = "FILE", global = true)]
    key: Option<PathBuf>,
    /// Lab only: plain HTTP with a bearer token instead of TLS (says so on every start)
    #[arg(long, global = true)]
    insecure_http: bool,
    /// With --insecure-http: the bearer token file (mode 600) [default: scap.toml token_file]
    #[arg(long, value_name = "FILE", global = true)]
    token_file: Option<PathBuf>,
}

impl TransportArgs {
    /// The transport flags and scap.toml ask for: TLS with certificates
    /// unless `--insecure-http`.
    pub fn transport(
        &self,
        config: &crate::config::ConfigFile,
    ) -> anyhow::Result<crate::net::tls::Transport> {
        use crate::net::tls::{TlsFiles, Transport};
        if self.insecure_http {
            let file = self
                .token_file
                .clone()
                .or_else(|| config.token_file.clone())
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "--insecure-http needs a bearer token: pass --token-file (or set token_file in scap.toml)"
                    )
                })?;
            let token = read_token(&file)?;
            return Ok(Transport::Insecure {
                token: std::sync::Arc::new(token),
            });
        }
        let tls = config.tls.as_ref();
        let pick = |flag: &Option<PathBuf>, from: Option<&PathBuf>, what: &str| {
            flag.clone().or_else(|| from.cloned()).ok_or_else(|| {
                anyhow::anyhow!(
                    "no TLS {what}: pass --ca, --cert and --key (or set [tls] in scap.toml; `scap pki init DIR` makes a lab set), or --insecure-http for a lab"
                )
            })
        };
        Ok(Transport::Tls(std::sync::Arc::new(TlsFiles {
            ca: pick(&self.ca, tls.map(|t| &t.ca), "CA certificate")?,
            cert: pick(&self.cert, tls.map(|t| &t.cert), "certificate")?,
            key: pick(&self.key, tls.map(|t| &t.key), "key")?,
        })))
    }
}

/// Reads a bearer token file, refusing one that others can read.
pub fn read_token(path: &Path) -> anyhow::Result<String> {
    let meta = std::fs::metadata(path).with_context(|| format!("token file {}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "token file {} is readable by others (mode {mode:o}): run `chmod 600 {}`",
            path.display(),
            path.display()
        );
    }
    let token =
        std::fs::read_to_string(path).with_context(|| format!("token file {}", path.display()))?;
    let token = token.trim().to_string();
    if token.is_empty() {
        bail!(
            "token file {} is empty: put a long random string in it",
            path.display()
        );
    }
    Ok(token)
}
