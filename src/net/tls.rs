//! Transport security for every scap connection: `scap serve`, the
//! agent's API, the controller's calls to agents and the agents' fetches.
//!
//! **TLS with client certificates (mTLS), from one site CA** is the
//! default: servers present a certificate the CA signed and ask clients
//! for one; what a client may do is decided by the names in its
//! certificate (see ARCHITECTURE.md, "Threat model"). Certificates and keys
//! are PEM files (rustls; no OpenSSL).
//!
//! **Plain HTTP with a bearer token** remains for a lab, only when asked
//! for (`--insecure-http`), and every process that uses it says so on
//! start.
//!
//! A server's listener ([`Listener`]) accepts TCP, runs each TLS handshake
//! in its own task (one slow client never holds up the others), answers a
//! plain-HTTP request on a TLS port with a 400 that says to use https, and
//! hands handlers the peer's verified certificate chain ([`Peer`]).

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use super::conns::{Limits, Slot, SlotGuard, Tracker};

/// How long a client has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {why}")]
    File { path: PathBuf, why: String },
    #[error("{what}: {why}")]
    Config { what: String, why: String },
}

/// Where a process's certificates are.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// The CA whose certificates this process trusts (PEM, one or more).
    pub ca: PathBuf,
    /// This process's certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// How a process talks: TLS with its certificates, or (lab only) plain
/// HTTP with a bearer token.
#[derive(Clone)]
pub enum Transport {
    Tls(Arc<TlsFiles>),
    Insecure { token: Arc<String> },
}

impl fmt::Debug for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Transport::Tls(files) => write!(f, "Tls({})", files.cert.display()),
            // Never the token.
            Transport::Insecure { .. } => f.write_str("Insecure"),
        }
    }
}

impl Transport {
    pub fn scheme(&self) -> &'static str {
        match self {
            Transport::Tls(_) => "https",
            Transport::Insecure { .. } => "http",
        }
    }

    /// The loud line a process prints on start when it is insecure.
    pub fn warning(&self, who: &str) -> Option<String> {
        matches!(self, Transport::Insecure { .. }).then(|| {
            format!(
                "{who}: WARNING: plain HTTP (--insecure-http): requests, the bearer token and every byte served cross the network in cleartext; for a lab only"
            )
        })
    }
}

fn file_err(path: &Path, why: impl fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        why: why.to_string(),
    }
}

/// Reads every certificate in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, format!("cannot read certificates: {e}")))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(path, format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(file_err(
            path,
            "no certificate in it (expected PEM, BEGIN CERTIFICATE)",
        ));
    }
    Ok(certs)
}

/// Reads a private key from a PEM file; refuses one others can read.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    check_private(path)?;
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        file_err(
            path,
            format!("no private key in it (PEM: PKCS#8, PKCS#1 or SEC1): {e}"),
        )
    })
}

/// A private key file must not be readable by group or others.
pub fn check_private(path: &Path) -> Result<(), TlsError> {
    crate::sys::check_private(path).map_err(|why| file_err(path, why))
}

fn roots(ca: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(ca)? {
        roots
            .add(c)
            .map_err(|e| file_err(ca, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server side: our certificate, and client certificates from the CA
/// asked for (and verified when given; handlers decide what needs one).
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots(&files.ca)?),
        provider(),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| TlsError::Config {
        what: files.ca.display().to_string(),
        why: e.to_string(),
    })?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config {
            what: "TLS".into(),
            why: e.to_string(),
        })?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&files.cert)?, load_key(&files.key)?)
        .map_err(|e| {
            file_err(
                &files.key,
                format!("does not match {}: {e}", files.cert.display()),
            )
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The client side: trust the CA, present our certificate.
pub fn client_config(files: &TlsFiles) -> Result<rustls::ClientConfig, TlsError> {
    rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config {
            what: "TLS".into(),
            why: e.to_string(),
        })?
        .with_root_certificates(roots(&files.ca)?)
        .with_client_auth_cert(load_certs(&files.cert)?, load_key(&files.key)?)
        .map_err(|e| {
            file_err(
                &files.key,
                format!("does not match {}: {e}", files.cert.display()),
            )
        })
}

/// A client that trusts the CA and presents no certificate (etcd with
/// TLS and no client authentication).
pub fn ca_client_config(ca: &Path) -> Result<rustls::ClientConfig, TlsError> {
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config {
            what: "TLS".into(),
            why: e.to_string(),
        })?
        .with_root_certificates(roots(ca)?)
        .with_no_client_auth())
}

/// How long a client keeps an idle connection for reuse: below a scap
/// server's default `--idle-timeout` (60 s), so that the client, not the
/// server, closes it, and no request is sent on a connection the server is
/// closing.
pub const CLIENT_IDLE: Duration = Duration::from_secs(45);

/// An HTTP client for `transport` (connections kept and reused for
/// [`CLIENT_IDLE`]; TLS sessions resumed).
pub fn http_client(
    transport: &Transport,
    builder: reqwest::ClientBuilder,
) -> Result<reqwest::Client, TlsError> {
    let builder = builder.pool_idle_timeout(CLIENT_IDLE);
    let builder = match transport {
        Transport::Tls(files) => builder.use_preconfigured_tls(client_config(files)?),
        Transport::Insecure { .. } => builder,
    };
    builder.build().map_err(|e| TlsError::Config {
        what: "HTTP client".into(),
        why: e.to_string(),
    })
}

/// Whether a verified certificate (the leaf of a chain the CA signed)
/// names `name` exactly: one of the DNS names in its subject alternative
/// names equals it (ASCII case aside). A wildcard name (`*.eqiad.wmnet`)
/// never matches: a deployer is one host, and a certificate that names a
/// whole domain names none of its hosts. The subject's common name is not
/// read.
pub fn cert_has_name(cert: &CertificateDer<'_>, name: &str) -> bool {
    if name.is_empty() || name.contains('*') {
        return false;
    }
    let Ok(ee) = webpki::EndEntityCert::try_from(cert) else {
        return false;
    };
    ee.valid_dns_names().any(|n| {
        !n.contains('*')
            && n.trim_end_matches('.')
                .eq_ignore_ascii_case(name.trim_end_matches('.'))
    })
}

/// What went wrong, for a person, when an error comes from TLS: which
/// certificate, and what to check. `None` for other errors.
pub fn explain(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    use rustls::{AlertDescription, CertificateError, Error as TlsErr};
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<TlsErr>() {
            return Some(match t {
                TlsErr::InvalidCertificate(c) => match c {
                    CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                        "its certificate is not signed by the CA this command trusts (--ca): give both sides certificates from the same site CA".into()
                    }
                    CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                        "its certificate has expired: issue it a new one".into()
                    }
                    CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                        "its certificate is not valid yet: check both clocks".into()
                    }
                    CertificateError::NotValidForName
                    | CertificateError::NotValidForNameContext { .. } => {
                        "its certificate is not valid for the name or address used to reach it: issue it one that names it, or reach it by a name its certificate has".into()
                    }
                    CertificateError::Revoked => "its certificate is revoked".into(),
                    other => format!("its certificate is refused: {other:?}"),
                },
                TlsErr::AlertReceived(a) => match a {
                    AlertDescription::BadCertificate
                    | AlertDescription::UnknownCA
                    | AlertDescription::CertificateExpired
                    | AlertDescription::CertificateUnknown
                    | AlertDescription::CertificateRevoked
                    | AlertDescription::AccessDenied => format!(
                        "it refused this command's certificate ({a:?}): is --cert signed by the site CA and still valid?"
                    ),
                    other => format!("it ended the handshake ({other:?})"),
                },
                TlsErr::NoCertificatesPresented => {
                    "it presented no certificate".into()
                }
                other => other.to_string(),
            });
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
            && let Some(why) = explain(inner)
        {
            return Some(why);
        }
        cur = err.source();
    }
    None
}

/// Who is on the other end of a connection.
#[derive(Clone, Debug)]
pub struct Peer {
    /// Its address (`0.0.0.0:0` on the local socket).
    pub addr: SocketAddr,
    /// The client's certificate chain, verified against the CA during the
    /// handshake; `None` for no certificate, or a plain-HTTP connection.
    pub certs: Option<Arc<Vec<CertificateDer<'static>>>>,
    /// On the local (Unix) socket: the user ID of the process at the other
    /// end, from the kernel (`SO_PEERCRED`).
    pub local_uid: Option<u32>,
    /// The connection's standing in its server's [`Tracker`].
    pub slot: Option<Arc<Slot>>,
}

impl Peer {
    /// The first of `names` the client's certificate names exactly (see
    /// [`cert_has_name`]).
    pub fn named<'a>(&self, names: &'a [String]) -> Option<&'a str> {
        let leaf = self.certs.as_ref()?.first()?;
        names
            .iter()
            .find(|n| cert_has_name(leaf, n))
            .map(String::as_str)
    }

    pub fn has_cert(&self) -> bool {
        self.certs.is_some()
    }

    /// For logs: the address, or the local user.
    pub fn describe(&self) -> String {
        match self.local_uid {
            Some(uid) => format!("local uid {uid}"),
            None => self.addr.to_string(),
        }
    }
}

enum Io {
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    Plain(TcpStream),
    Unix(tokio::net::UnixStream),
}

/// A connection: TLS, plain, or the local socket. Every byte it moves
/// counts as activity in its slot; dropping it frees the slot.
pub struct Conn {
    io: Io,
    slot: Option<SlotGuard>,
}

impl Conn {
    fn touch(&self, moved: bool) {
        if moved && let Some(g) = &self.slot {
            g.slot.touch();
        }
    }

    /// A write could not go on (the client is not reading), or went on.
    fn write_waits(&self, waits: bool) {
        if let Some(g) = &self.slot {
            g.slot.waits_on_client(waits);
        }
    }
}

macro_rules! on_io {
    ($io:expr, $s:ident => $e:expr) => {
        match $io {
            Io::Tls($s) => {
                let $s = Pin::new($s.as_mut());
                $e
            }
            Io::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            Io::Unix($s) => {
                let $s = Pin::new($s);
                $e
            }
        }
    };
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = on_io!(&mut this.io, s => s.poll_read(cx, buf));
        this.touch(matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before);
        r
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = on_io!(&mut this.io, s => s.poll_write(cx, buf));
        this.write_waits(r.is_pending());
        this.touch(matches!(r, Poll::Ready(Ok(n)) if n > 0));
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_io!(&mut self.get_mut().io, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_io!(&mut self.get_mut().io, s => s.poll_shutdown(cx))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = on_io!(&mut this.io, s => s.poll_write_vectored(cx, bufs));
        this.write_waits(r.is_pending());
        this.touch(matches!(r, Poll::Ready(Ok(n)) if n > 0));
        r
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Tls(s) => s.is_write_vectored(),
            Io::Plain(s) => s.is_write_vectored(),
            Io::Unix(s) => s.is_write_vectored(),
        }
    }
}

/// A server's listener: TCP (plain, or TLS with handshakes off the accept
/// path) under a connection [`Tracker`], or a local Unix socket.
pub struct Listener {
    local: String,
    rx: tokio::sync::mpsc::Receiver<(Conn, Peer)>,
    tracker: Option<Arc<Tracker>>,
}

impl Listener {
    /// Serves TLS with `config` (or plain HTTP when `None`) on `tcp`,
    /// within `limits` ([`super::conns`]).
    pub fn new(
        tcp: TcpListener,
        config: Option<Arc<rustls::ServerConfig>>,
        limits: Limits,
    ) -> io::Result<Listener> {
        let local = tcp.local_addr()?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let acceptor = config.map(tokio_rustls::TlsAcceptor::from);
        let tracker = Tracker::new(limits);
        let t = tracker.clone();
        tokio::spawn(async move {
            loop {
                let (stream, addr) = match tcp.accept().await {
                    Ok(s) => s,
                    Err(e) => {
                        // Out of file descriptors, say: wait, do not spin.
                        tracing::warn!("accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Some(guard) = t.admit(Some(super::conns::peer_key(addr.ip()))) else {
                    tracing::debug!("{addr}: every connection is busy: closed this one");
                    continue;
                };
                // Responses are written as headers then body pieces: without
                // TCP_NODELAY, Nagle holds each small piece until the peer's
                // delayed ACK (40 ms on Linux).
                let _ = stream.set_nodelay(true);
                let tx = tx.clone();
                let peer = Peer {
                    addr,
                    certs: None,
                    local_uid: None,
                    slot: Some(guard.slot.clone()),
                };
                match &acceptor {
                    None => {
                        let conn = Conn {
                            io: Io::Plain(stream),
                            slot: Some(guard),
                        };
                        if tx.send((conn, peer)).await.is_err() {
                            return;
                        }
                    }
                    Some(acceptor) => {
                        let acceptor = acceptor.clone();
                        tokio::spawn(async move {
                            let slot = guard.slot.clone();
                            let shaken = tokio::select! {
                                c = handshake(acceptor, stream, peer) => c,
                                () = slot.killed() => None,
                            };
                            if let Some((io, peer)) = shaken {
                                let conn = Conn {
                                    io,
                                    slot: Some(guard),
                                };
                                let _ = tx.send((conn, peer)).await;
                            }
                        });
                    }
                }
            }
        });
        Ok(Listener {
            local: local.to_string(),
            rx,
            tracker: Some(tracker),
        })
    }

    /// Serves the local socket `path`, which only this process's user
    /// (root) may connect to: it is created mode 0600 under a temporary
    /// name and renamed into place, replacing a socket a previous run left.
    pub fn unix(path: &Path) -> io::Result<Listener> {
        use std::os::unix::fs::PermissionsExt;
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let unix = tokio::net::UnixListener::bind(&tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&tmp, path)?;
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tokio::spawn(async move {
            loop {
                let stream = match unix.accept().await {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!("accept on the local socket: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(cred) = stream.peer_cred() else {
                    continue;
                };
                let peer = Peer {
                    addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                    certs: None,
                    local_uid: Some(cred.uid()),
                    slot: None,
                };
                let conn = Conn {
                    io: Io::Unix(stream),
                    slot: None,
                };
                if tx.send((conn, peer)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Listener {
            local: path.display().to_string(),
            rx,
            tracker: None,
        })
    }

    /// The next connection, handshake done.
    pub async fn accept(&mut self) -> Option<(Conn, Peer)> {
        self.rx.recv().await
    }

    /// Where it listens.
    pub fn local(&self) -> &str {
        &self.local
    }

    /// Its connections' tracker (TCP only).
    pub fn tracker(&self) -> Option<&Arc<Tracker>> {
        self.tracker.as_ref()
    }
}

/// One TLS handshake; a plain-HTTP request gets a 400 that says what to
/// do instead.
async fn handshake(
    acceptor: tokio_rustls::TlsAcceptor,
    stream: TcpStream,
    mut peer: Peer,
) -> Option<(Io, Peer)> {
    let addr = peer.addr;
    let mut first = [0u8; 8];
    let n = tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.peek(&mut first))
        .await
        .ok()?
        .ok()?;
    if looks_like_http(&first[..n]) {
        let local = stream.local_addr().ok();
        let body = format!(
            "this port speaks HTTPS: use https://{}/ (and a client certificate from the site CA)\n",
            local.map(|a| a.to_string()).unwrap_or_default()
        );
        let mut stream = stream;
        let _ = stream
            .write_all(
                format!(
                    "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            )
            .await;
        return None;
    }
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => {
            peer.certs = tls
                .get_ref()
                .1
                .peer_certificates()
                .map(|c| Arc::new(c.iter().map(|c| c.clone().into_owned()).collect()));
            Some((Io::Tls(Box::new(tls)), peer))
        }
        Ok(Err(e)) => {
            tracing::info!("{addr}: TLS handshake failed: {e}");
            None
        }
        Err(_) => {
            tracing::info!("{addr}: TLS handshake took too long");
            None
        }
    }
}

fn looks_like_http(b: &[u8]) -> bool {
    [
        &b"GET "[..],
        b"POST",
        b"HEAD",
        b"PUT ",
        b"DELE",
        b"OPTI",
        b"PATC",
        b"CONN",
    ]
    .iter()
    .any(|m| b.starts_with(m))
}
