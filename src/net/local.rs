//! The client side of an agent's local socket (`scap pull` on the host):
//! HTTP/1.1 over a Unix socket that only root can connect to.

use std::path::Path;
use std::time::Duration;

use axum::body::Body;
use http_body::Body as _;

/// Asks the agent behind `socket` to pull now (`POST /v1/pull`): its
/// outcome, or an error naming the socket and the agent's own words.
pub async fn pull(socket: &Path, timeout: Duration) -> Result<crate::proto::PullOutcome, String> {
    let (status, body) = post(socket, "/v1/pull", &serde_json::json!({}), timeout).await?;
    if status != 200 {
        let msg = serde_json::from_slice::<crate::proto::ErrorResponse>(&body)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
        return Err(format!("{}: HTTP {status}: {msg}", socket.display()));
    }
    serde_json::from_slice(&body)
        .map_err(|e| format!("{}: not a pull outcome: {e}", socket.display()))
}

/// Longest answer read from the local socket.
const MAX_ANSWER: usize = 1 << 20;

/// `POST`s `body` (JSON) to `path` on the agent behind `socket`; the
/// status and the answer's bytes. The error names the socket and what to
/// do.
pub async fn post(
    socket: &Path,
    path: &str,
    body: &serde_json::Value,
    timeout: Duration,
) -> Result<(u16, Vec<u8>), String> {
    let run = async {
        let stream = tokio::net::UnixStream::connect(socket).await.map_err(|e| {
            let hint = match e.kind() {
                std::io::ErrorKind::PermissionDenied => "run scap pull as root",
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                    "is the agent running (systemctl status scap-agent), and is --socket (or --dir) the agent's?"
                }
                _ => "is the agent running?",
            };
            format!("{}: {e}: {hint}", socket.display())
        })?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| format!("{}: {e}", socket.display()))?;
        tokio::spawn(conn);
        let req = axum::http::Request::post(path)
            .header("host", "localhost")
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(body).expect("serializes")))
            .expect("a valid request");
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| format!("{}: {e}", socket.display()))?;
        let status = resp.status().as_u16();
        let mut body = resp.into_body();
        let mut out = Vec::new();
        while let Some(frame) =
            std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await
        {
            let frame = frame.map_err(|e| format!("{}: {e}", socket.display()))?;
            if let Some(data) = frame.data_ref() {
                if out.len() + data.len() > MAX_ANSWER {
                    return Err(format!(
                        "{}: an answer longer than {MAX_ANSWER} bytes",
                        socket.display()
                    ));
                }
                out.extend_from_slice(data);
            }
        }
        Ok((status, out))
    };
    tokio::time::timeout(timeout, run).await.map_err(|_| {
        format!(
            "{}: no answer within {} s",
            socket.display(),
            timeout.as_secs()
        )
    })?
}
