//! The operator's side of the admin socket: one request, one reply.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::AdminError;
use super::protocol::{AdminReply, AdminRequest};

/// Sends one request to the provider at `path` and returns its reply.
pub async fn call(path: &Path, request: &AdminRequest) -> Result<AdminReply, AdminError> {
    let protocol = |reason: String| AdminError::Protocol { path: path.to_path_buf(), reason };
    let mut stream =
        UnixStream::connect(path).await.map_err(|source| AdminError::Connect { path: path.to_path_buf(), source })?;
    let mut line = serde_json::to_string(request).map_err(|e| protocol(e.to_string()))?;
    line.push('\n');
    // A refused connection is answered and closed at once: the write can then fail,
    // and the refusal is still there to read.
    let written = stream.write_all(line.as_bytes()).await;
    let mut reader = BufReader::new(stream);
    let mut answer = String::new();
    let read = tokio::time::timeout(Duration::from_secs(120), reader.read_line(&mut answer))
        .await
        .map_err(|_| protocol("no answer within 120 s".into()))?;
    if answer.trim().is_empty() {
        let reason = match (written, read) {
            (Err(e), _) | (_, Err(e)) => e.to_string(),
            _ => "the provider closed the connection without an answer".into(),
        };
        return Err(protocol(reason));
    }
    AdminReply::from_line(request, answer.trim()).map_err(|e| protocol(format!("bad answer {answer:?}: {e}")))
}
