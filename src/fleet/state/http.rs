//! One blocking HTTP/1.1 POST, for etcd's JSON gateway.
//!
//! The deploy state is read and written from synchronous code (a rollout
//! record saved between two steps, the lock's keepalive thread), some of it
//! running inside the controller's tokio runtime, where a blocking client
//! built on a runtime of its own must not run. A request is a few hundred
//! bytes to a cluster on the site's network, so one connection per request
//! (`Connection: close`) costs little and keeps this small: no pool, no
//! state between calls.
//!
//! Everything received is bounded: the whole answer by `max`, the header
//! block by [`MAX_HEAD`], and the wall time of the request by its deadline
//! (connect, write and every read).

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest header block accepted.
const MAX_HEAD: usize = 16 << 10;

/// An endpoint, `http://HOST:PORT` or `https://HOST:PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub url: String,
    tls: bool,
    host: String,
    port: u16,
}

impl Endpoint {
    pub fn parse(url: &str) -> Result<Endpoint, String> {
        let bad = |why: &str| {
            format!(
                "{url:?} is not an etcd client URL ({why}): give http://HOST:PORT or https://HOST:PORT"
            )
        };
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(bad("no http:// or https://"));
        };
        let rest = rest.trim_end_matches('/');
        if rest.contains('/') || rest.contains('@') || rest.is_empty() {
            return Err(bad("a path or user in it"));
        }
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
                (h, p.parse::<u16>().map_err(|_| bad("no port number"))?)
            }
            _ => (rest, 2379),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(bad("no host"));
        }
        Ok(Endpoint {
            url: format!(
                "{}://{}:{port}",
                if tls { "https" } else { "http" },
                if host.contains(':') {
                    format!("[{host}]")
                } else {
                    host.to_string()
                }
            ),
            tls,
            host: host.to_string(),
            port,
        })
    }

    pub fn is_tls(&self) -> bool {
        self.tls
    }
}

/// POSTs `body` (JSON) to `path` on `ep`; returns the status and the body.
/// `Err` is a transport failure (the request may or may not have been
/// applied).
pub fn post(
    ep: &Endpoint,
    path: &str,
    body: &[u8],
    timeout: Duration,
    tls: Option<&Arc<rustls::ClientConfig>>,
    max: usize,
) -> Result<(u16, Vec<u8>), String> {
    let deadline = Instant::now() + timeout;
    let addrs = (ep.host.as_str(), ep.port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {}: {e}", ep.host))?;
    let mut last = format!("{} resolves to no address", ep.host);
    let mut tcp = None;
    for a in addrs {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match TcpStream::connect_timeout(&a, left) {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(e) => last = format!("connect {a}: {e}"),
        }
    }
    let tcp = tcp.ok_or(last)?;
    let _ = tcp.set_nodelay(true);
    // Before any I/O: a TLS handshake reads and writes inside the first
    // write, and a peer that accepts and never answers must not hang it.
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err("timed out".into());
    }
    tcp.set_read_timeout(Some(left))
        .map_err(|e| e.to_string())?;
    tcp.set_write_timeout(Some(left))
        .map_err(|e| e.to_string())?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {}:{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        ep.host,
        ep.port,
        body.len()
    );
    let mut request = head.into_bytes();
    request.extend_from_slice(body);
    let answer = match (ep.tls, tls) {
        (false, _) => exchange(
            tcp.try_clone().map_err(|e| e.to_string())?,
            &tcp,
            &request,
            deadline,
            max,
        ),
        (true, Some(cfg)) => {
            let name = rustls::pki_types::ServerName::try_from(ep.host.clone())
                .map_err(|e| format!("{}: not a TLS server name: {e}", ep.host))?;
            let conn = rustls::ClientConnection::new(cfg.clone(), name)
                .map_err(|e| format!("TLS: {e}"))?;
            let stream =
                rustls::StreamOwned::new(conn, tcp.try_clone().map_err(|e| e.to_string())?);
            exchange(stream, &tcp, &request, deadline, max)
        }
        (true, None) => {
            return Err(format!(
                "{} is https, and no CA is configured for it: set [state] ca in scap.toml",
                ep.url
            ));
        }
    }?;
    parse(&answer)
}

/// Writes `request` and reads the answer to its end, every call bounded by
/// what is left of `deadline` (set on `tcp`, the socket under `stream`).
fn exchange(
    mut stream: impl Read + Write,
    tcp: &TcpStream,
    request: &[u8],
    deadline: Instant,
    max: usize,
) -> Result<Vec<u8>, String> {
    let left = || {
        let d = deadline.saturating_duration_since(Instant::now());
        if d.is_zero() {
            Err("timed out".to_string())
        } else {
            Ok(d)
        }
    };
    tcp.set_write_timeout(Some(left()?))
        .map_err(|e| e.to_string())?;
    stream.write_all(request).map_err(|e| e.to_string())?;
    stream.flush().map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let mut buf = [0u8; 16 << 10];
    loop {
        tcp.set_read_timeout(Some(left()?))
            .map_err(|e| e.to_string())?;
        match stream.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) => {
                if out.len() + n > max + MAX_HEAD {
                    return Err(format!("answer larger than {max} bytes"));
                }
                out.extend_from_slice(&buf[..n]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // A TLS peer that closes without close_notify, after the body.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !out.is_empty() => {
                return Ok(out);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err("timed out".into());
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Status and body of a whole HTTP/1.x answer (plain, `Content-Length` or
/// chunked).
fn parse(answer: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .filter(|&e| e <= MAX_HEAD)
        .ok_or("no complete HTTP header in the answer")?;
    let head =
        std::str::from_utf8(&answer[..end]).map_err(|_| "an HTTP header that is not text")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .filter(|_| status_line.starts_with("HTTP/1."))
        .ok_or_else(|| format!("not an HTTP answer: {}", crate::text::clip(status_line, 60)))?;
    let mut chunked = false;
    let mut length = None;
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let v = v.trim();
        if k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked") {
            chunked = true;
        } else if k.eq_ignore_ascii_case("content-length") {
            length = Some(v.parse::<usize>().map_err(|_| "a bad Content-Length")?);
        }
    }
    let rest = &answer[end + 4..];
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(n) = length {
        rest.get(..n)
            .ok_or("the answer ended before its Content-Length")?
            .to_vec()
    } else {
        rest.to_vec()
    };
    Ok((status, body))
}

fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("a chunked answer cut short")?;
        let size_text = std::str::from_utf8(&rest[..eol]).map_err(|_| "a bad chunk size")?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| "a bad chunk size")?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = rest.get(..size).ok_or("a chunked answer cut short")?;
        out.extend_from_slice(chunk);
        rest = rest.get(size + 2..).ok_or("a chunked answer cut short")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_or_say_what_to_give() {
        let e = Endpoint::parse("http://127.0.0.1:2379/").unwrap();
        assert_eq!(
            (e.url.as_str(), e.port, e.tls),
            ("http://127.0.0.1:2379", 2379, false)
        );
        let e = Endpoint::parse("https://conf1001.eqiad.wmnet").unwrap();
        assert_eq!((e.port, e.tls), (2379, true));
        let e = Endpoint::parse("http://[::1]:2380").unwrap();
        assert_eq!((e.host.as_str(), e.port), ("::1", 2380));
        for bad in [
            "conf1001:2379",
            "http://h:2379/v3",
            "http://u@h:1",
            "http://",
            "http://h:x",
        ] {
            let e = Endpoint::parse(bad).unwrap_err();
            assert!(e.contains("http://HOST:PORT"), "{bad}: {e}");
        }
    }

    #[test]
    fn answers_parse_plain_sized_and_chunked_and_never_panic() {
        let a = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}xx";
        assert_eq!(parse(a).unwrap(), (200, b"{}".to_vec()));
        let a = b"HTTP/1.1 503 x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{\"\r\n3;x\r\na\"}\r\n0\r\n\r\n";
        assert_eq!(parse(a).unwrap(), (503, b"{\"a\"}".to_vec()));
        assert_eq!(parse(b"HTTP/1.0 200 OK\r\n\r\nbody").unwrap().1, b"body");
        for bad in [
            &b"HTTP/1.1 200 OK\r\n"[..],
            b"SSH-2.0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nab",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        ] {
            assert!(parse(bad).is_err());
        }
        // Any bytes: an error or an answer, never a panic.
        let mut x = 7u64;
        for _ in 0..2000 {
            let mut b = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            for _ in 0..(x % 40) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b.push(b"0123456789abcdef\r\n;"[(x % 19) as usize]);
            }
            let _ = parse(&b);
        }
    }
}
