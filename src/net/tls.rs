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
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

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

/// An HTTP client for `transport` (connections kept and reused; TLS
/// sessions resumed).
pub fn http_client(
    transport: &Transport,
    builder: reqwest::ClientBuilder,
) -> Result<reqwest::Client, TlsError> {
    let builder = match transport {
        Transport::Tls(files) => builder.use_preconfigured_tls(client_config(files)?),
        Transport::Insecure { .. } => builder,
    };
    builder.build().map_err(|e| TlsError::Config {
        what: "HTTP client".into(),
        why: e.to_string(),
    })
}

/// Whether a verified certificate (the leaf of a chain the CA signed) is
/// valid for `name` (a DNS name in its subject alternative names, or an IP
/// address).
pub fn cert_has_name(cert: &CertificateDer<'_>, name: &str) -> bool {
    let Ok(server_name) = ServerName::try_from(name) else {
        return false;
    };
    let Ok(ee) = webpki::EndEntityCert::try_from(cert) else {
        return false;
    };
    ee.verify_is_valid_for_subject_name(&server_name).is_ok()
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
    pub addr: SocketAddr,
    /// The client's certificate chain, verified against the CA during the
    /// handshake; `None` for no certificate, or a plain-HTTP connection.
    pub certs: Option<Arc<Vec<CertificateDer<'static>>>>,
}

impl Peer {
    /// The first of `names` the client's certificate is valid for.
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
}

/// A connection: TLS or plain.
pub enum Conn {
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    Plain(TcpStream),
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Tls(s) => s.is_write_vectored(),
            Conn::Plain(s) => s.is_write_vectored(),
        }
    }
}

/// A listener for `axum::serve`: plain, or TLS with handshakes off the
/// accept path.
pub struct Listener {
    local: SocketAddr,
    rx: tokio::sync::mpsc::Receiver<(Conn, Peer)>,
}

impl Listener {
    /// Serves TLS with `config` (or plain HTTP when `None`) on `tcp`.
    pub fn new(
        tcp: TcpListener,
        config: Option<Arc<rustls::ServerConfig>>,
    ) -> io::Result<Listener> {
        let local = tcp.local_addr()?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let acceptor = config.map(tokio_rustls::TlsAcceptor::from);
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
                // Responses are written as headers then body pieces: without
                // TCP_NODELAY, Nagle holds each small piece until the peer's
                // delayed ACK (40 ms on Linux).
                let _ = stream.set_nodelay(true);
                let tx = tx.clone();
                match &acceptor {
                    None => {
                        let peer = Peer { addr, certs: None };
                        if tx.send((Conn::Plain(stream), peer)).await.is_err() {
                            return;
                        }
                    }
                    Some(acceptor) => {
                        let acceptor = acceptor.clone();
                        tokio::spawn(async move {
                            if let Some(c) = handshake(acceptor, stream, addr).await {
                                let _ = tx.send(c).await;
                            }
                        });
                    }
                }
            }
        });
        Ok(Listener { local, rx })
    }
}

/// One TLS handshake; a plain-HTTP request gets a 400 that says what to
/// do instead.
async fn handshake(
    acceptor: tokio_rustls::TlsAcceptor,
    stream: TcpStream,
    addr: SocketAddr,
) -> Option<(Conn, Peer)> {
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
            let certs = tls
                .get_ref()
                .1
                .peer_certificates()
                .map(|c| Arc::new(c.iter().map(|c| c.clone().into_owned()).collect()));
            Some((Conn::Tls(Box::new(tls)), Peer { addr, certs }))
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

impl axum::serve::Listener for Listener {
    type Io = Conn;
    type Addr = Peer;

    async fn accept(&mut self) -> (Conn, Peer) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accept task is gone (the runtime is shutting down).
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Peer> {
        Ok(Peer {
            addr: self.local,
            certs: None,
        })
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, Listener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, Listener>) -> Peer {
        stream.remote_addr().clone()
    }
}
