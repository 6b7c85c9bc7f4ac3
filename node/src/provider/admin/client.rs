//! The operator's side of the admin socket: one request, one reply.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::AdminError;
use super::protocol::{AdminReply, AdminRequest};

/// Sends one request to the provider at `path` and returns its reply.
pub async fn call(path: &Path, request: &AdminRequest) -> Result<AdminReply, AdminError> {
    let path_buf = || path.to_path_buf();
    let mut stream =
        UnixStream::connect(path).await.map_err(|source| AdminError::Connect { path: path_buf(), source })?;
    let mut line = serde_json::to_string(request).map_err(|source| AdminError::Request { path: path_buf(), source })?;
    line.push('\n');
    // A refused connection is answered and closed at once: the write can then fail,
    // and the refusal is still there to read.
    let written = stream.write_all(line.as_bytes()).await;
    let mut reader = BufReader::new(stream);
    let mut answer = String::new();
    let read = tokio::time::timeout(Duration::from_secs(120), reader.read_line(&mut answer))
        .await
        .map_err(|_| AdminError::Protocol { path: path_buf(), reason: "no answer within 120 s".into() })?;
    if answer.trim().is_empty() {
        return Err(match (written, read) {
            (Err(source), _) | (_, Err(source)) => AdminError::Io { path: path_buf(), source },
            _ => AdminError::Protocol {
                path: path_buf(),
                reason: "the provider closed the connection without an answer".into(),
            },
        });
    }
    AdminReply::from_line(request, answer.trim()).map_err(|source| AdminError::BadAnswer {
        path: path_buf(),
        answer,
        source,
    })
}
