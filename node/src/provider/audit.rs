//! The audit log (SECURITY.md, "Hardening notes"; docs/architecture.md, "Admin API and
//! audit"): append-only JSON lines, one per security-relevant event (lease requests and
//! their outcome, control messages, admin calls, signature failures, bans), each with its
//! time and the peer. The file is created 0600 and rotated by size: `audit.log` ->
//! `audit.log.1` -> ... -> `audit.log.<keep>`, the oldest dropped.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::secure_fs::{self, SecureFsError};

/// Default size at which the log rotates.
pub const DEFAULT_MAX_BYTES: u64 = 16 * 1024 * 1024;
/// Rotated files kept.
pub const DEFAULT_KEEP: usize = 5;
/// A single entry is capped so that one event cannot grow the log without bound.
const MAX_LINE: usize = 4096;

pub struct AuditLog {
    path: PathBuf,
    max_bytes: u64,
    keep: usize,
    state: Mutex<State>,
}

struct State {
    file: File,
    size: u64,
}

fn open_append(path: &Path) -> Result<File, SecureFsError> {
    let io = |source| SecureFsError::Io { path: path.to_path_buf(), source };
    let file = OpenOptions::new().create(true).append(true).mode(0o600).open(path).map_err(io)?;
    secure_fs::check_private(path, 0o600)?;
    Ok(file)
}

impl AuditLog {
    /// Opens (or creates, 0600) the log; an existing file readable by others is refused.
    pub fn open(path: &Path, max_bytes: u64, keep: usize) -> Result<AuditLog, SecureFsError> {
        let file = open_append(path)?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(AuditLog { path: path.to_path_buf(), max_bytes, keep: keep.max(1), state: Mutex::new(State { file, size }) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `{"ts_unix_ms":..,"event":<event>, ..fields}`. An audit failure is logged,
    /// never turned into a failure of the operation it records.
    pub fn record(&self, event: &str, fields: serde_json::Value) {
        let mut entry = serde_json::Map::new();
        entry.insert("ts_unix_ms".into(), crate::clock::now_unix_ms().into());
        entry.insert("event".into(), event.into());
        if let serde_json::Value::Object(map) = fields {
            entry.extend(map);
        }
        let mut line = serde_json::Value::Object(entry).to_string();
        if line.len() > MAX_LINE {
            line = serde_json::json!({
                "ts_unix_ms": crate::clock::now_unix_ms(),
                "event": event,
                "truncated": true,
            })
            .to_string();
        }
        line.push('\n');
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.size + line.len() as u64 > self.max_bytes
            && let Err(e) = self.rotate(&mut state)
        {
            tracing::error!(error = %e, path = %self.path.display(), "cannot rotate the audit log");
        }
        match state.file.write_all(line.as_bytes()) {
            Ok(()) => state.size += line.len() as u64,
            Err(e) => tracing::error!(error = %e, path = %self.path.display(), "cannot write the audit log"),
        }
    }

    fn rotate(&self, state: &mut State) -> Result<(), SecureFsError> {
        let numbered = |n: usize| PathBuf::from(format!("{}.{n}", self.path.display()));
        let _ = std::fs::remove_file(numbered(self.keep));
        for n in (1..self.keep).rev() {
            let _ = std::fs::rename(numbered(n), numbered(n + 1));
        }
        std::fs::rename(&self.path, numbered(1))
            .map_err(|source| SecureFsError::Io { path: self.path.clone(), source })?;
        state.file = open_append(&self.path)?;
        state.size = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn lines(path: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    #[test]
    fn entries_are_json_lines_with_time_and_event_in_a_0600_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path, DEFAULT_MAX_BYTES, DEFAULT_KEEP).unwrap();
        log.record("lease_request", serde_json::json!({"peer": "12D3KooW", "outcome": "denied", "reason": "replay"}));
        log.record("ban", serde_json::json!({"peer": "12D3KooX"}));
        let entries = lines(&path);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0]["event"], "lease_request");
        assert_eq!(entries[0]["reason"], "replay");
        assert!(entries[0]["ts_unix_ms"].as_u64().unwrap() > 0);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        // Re-opening appends.
        drop(log);
        AuditLog::open(&path, DEFAULT_MAX_BYTES, DEFAULT_KEEP).unwrap().record("x", serde_json::json!({}));
        assert_eq!(lines(&path).len(), 3);
    }

    #[test]
    fn rotates_by_size_and_keeps_a_bounded_number_of_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path, 300, 2).unwrap();
        for i in 0..40 {
            log.record("admin", serde_json::json!({"n": i}));
        }
        assert!(std::fs::metadata(&path).unwrap().len() <= 300);
        let one = PathBuf::from(format!("{}.1", path.display()));
        let two = PathBuf::from(format!("{}.2", path.display()));
        let three = PathBuf::from(format!("{}.3", path.display()));
        assert!(one.exists() && two.exists() && !three.exists());
        for p in [&path, &one, &two] {
            assert_eq!(std::fs::metadata(p).unwrap().permissions().mode() & 0o777, 0o600);
        }
        // The newest entry is in the live file.
        assert_eq!(lines(&path).last().unwrap()["n"], 39);
    }

    #[test]
    fn an_audit_log_readable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        std::fs::write(&path, b"").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = AuditLog::open(&path, DEFAULT_MAX_BYTES, DEFAULT_KEEP).err().unwrap().to_string();
        assert!(err.contains("audit.log") && err.contains("chmod 600"), "{err}");
    }
}
