//! A minimal QMP client (QEMU Machine Protocol, JSON lines over the lease's Unix socket).
//!
//! One short connection per request: QEMU serves one QMP client at a time, and a
//! connection that outlives a provider crash would only be in the way of the next one.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// A QMP request or its answer taking longer than this means QEMU is wedged.
const QMP_TIMEOUT: Duration = Duration::from_secs(5);
/// Lines longer than this are not QMP answers we asked for.
const MAX_LINE: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub(crate) enum QmpError {
    #[error("cannot connect to {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("unexpected message: {0}")]
    Protocol(String),
    #[error("command {command} failed: {class}: {desc}")]
    Command { command: String, class: String, desc: String },
}

/// Sends `command` (with `arguments`) and returns its `return` value.
pub(crate) async fn execute(socket: &Path, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
    tokio::time::timeout(QMP_TIMEOUT, execute_inner(socket, command, arguments))
        .await
        .map_err(|_| QmpError::Timeout(QMP_TIMEOUT))?
}

async fn execute_inner(socket: &Path, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
    let stream = UnixStream::connect(socket).await.map_err(|e| QmpError::Connect(socket.display().to_string(), e))?;
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);

    let greeting = read_message(&mut lines).await?;
    if greeting.get("QMP").is_none() {
        return Err(QmpError::Protocol(format!("greeting expected, got {greeting}")));
    }
    send(&mut write, &json!({"execute": "qmp_capabilities"})).await?;
    answer(&mut lines, "qmp_capabilities").await?;
    let mut req = json!({ "execute": command });
    if let Some(args) = arguments {
        req["arguments"] = args;
    }
    send(&mut write, &req).await?;
    answer(&mut lines, command).await
}

async fn send(write: &mut tokio::net::unix::OwnedWriteHalf, msg: &Value) -> Result<(), QmpError> {
    let mut line = msg.to_string();
    line.push('\n');
    write.write_all(line.as_bytes()).await?;
    Ok(())
}

/// The answer to the last request, skipping asynchronous events (e.g. POWERDOWN, which
/// QEMU may send before the `return` of system_powerdown).
async fn answer(lines: &mut BufReader<tokio::net::unix::OwnedReadHalf>, command: &str) -> Result<Value, QmpError> {
    loop {
        let msg = read_message(lines).await?;
        if let Some(ret) = msg.get("return") {
            return Ok(ret.clone());
        }
        if let Some(err) = msg.get("error") {
            return Err(QmpError::Command {
                command: command.to_string(),
                class: err.get("class").and_then(Value::as_str).unwrap_or("?").to_string(),
                desc: err.get("desc").and_then(Value::as_str).unwrap_or("?").to_string(),
            });
        }
        if msg.get("event").is_none() {
            return Err(QmpError::Protocol(msg.to_string()));
        }
    }
}

async fn read_message(lines: &mut BufReader<tokio::net::unix::OwnedReadHalf>) -> Result<Value, QmpError> {
    let mut line = String::new();
    let n = lines.read_line(&mut line).await?;
    if n == 0 {
        return Err(QmpError::Protocol("connection closed".into()));
    }
    if line.len() > MAX_LINE {
        return Err(QmpError::Protocol("oversized line".into()));
    }
    serde_json::from_str(&line).map_err(|e| QmpError::Protocol(format!("{e}: {}", line.trim())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    #[tokio::test]
    async fn speaks_qmp_and_skips_events() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut r = BufReader::new(r);
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n").await.unwrap();
            let mut l = String::new();
            r.read_line(&mut l).await.unwrap();
            assert!(l.contains("qmp_capabilities"));
            w.write_all(b"{\"return\": {}}\n").await.unwrap();
            l.clear();
            r.read_line(&mut l).await.unwrap();
            assert!(l.contains("query-status"));
            w.write_all(b"{\"event\": \"POWERDOWN\", \"timestamp\": {}}\n{\"return\": {\"status\": \"running\"}}\n")
                .await
                .unwrap();
        });
        let ret = execute(&path, "query-status", None).await.unwrap();
        assert_eq!(ret["status"], "running");
    }
}
