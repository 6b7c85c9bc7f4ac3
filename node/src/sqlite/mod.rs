//! What every SQLite file of the node shares (docs/architecture.md, "Persistence"): the
//! file is created 0600 before SQLite opens it and refused when another user could read
//! it or its `-wal`/`-shm` companions (SECURITY.md invariant 10); WAL, `synchronous=FULL`,
//! a busy timeout, foreign keys; a schema versioned with `PRAGMA user_version`. The
//! provider's lease store and the requestor's store are both built on it.

pub mod block_table;

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use libp2p::PeerId;
use peervm_protocol::LeaseState;
use rusqlite::types::FromSql;
use rusqlite::{Connection, OpenFlags, Row, TransactionBehavior};
use thiserror::Error;

use crate::secure_fs::{SecureFsError, check_private};

/// How long a statement waits for another connection's lock before it fails.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// A SQLite error, with the database file it happened on.
#[derive(Debug, Error)]
#[error("{path}: {source}")]
pub struct SqliteError {
    pub path: PathBuf,
    #[source]
    pub source: rusqlite::Error,
}

/// A database file this program cannot use as it is.
#[derive(Debug, Error)]
pub enum UnusableDb {
    #[error("{path}: SQLite kept journal mode `{mode}` instead of wal; put the data directory on a local file system")]
    NotWal { path: PathBuf, mode: String },
    #[error("{path}: schema version {found} is not one this peervm knows (0 to {supported}); use a newer peervm")]
    UnknownSchema { path: PathBuf, found: i64, supported: i64 },
}

/// A number too large for SQLite's signed 64-bit integers: refused rather than wrapped.
#[derive(Debug, Error)]
#[error("{field} = {value} is over {max}, the largest value the database stores", max = i64::MAX)]
pub struct TooLarge {
    pub field: &'static str,
    pub value: u64,
}

/// An error inside a store operation: SQLite's own (the store adds the file's path) or
/// the store's error type.
pub(crate) enum TxError<E> {
    Sql(rusqlite::Error),
    Other(E),
}

impl<E> From<rusqlite::Error> for TxError<E> {
    fn from(e: rusqlite::Error) -> Self {
        TxError::Sql(e)
    }
}

/// A private SQLite file: one connection behind a mutex, and the path errors name.
pub(crate) struct PrivateSqlite {
    conn: Mutex<Connection>,
    path: PathBuf,
}

impl PrivateSqlite {
    /// [`open_private_sqlite`], then runs the `migrations` the file has not had yet:
    /// migration `i` brings the schema to version `i + 1` (`PRAGMA user_version`).
    pub(crate) fn open<E>(path: &Path, migrations: &[&str]) -> Result<Self, E>
    where
        E: From<SecureFsError> + From<SqliteError> + From<UnusableDb>,
    {
        let mut conn = open_private_sqlite::<E>(path)?;
        migrate::<E>(&mut conn, path, migrations)?;
        Ok(PrivateSqlite { conn: Mutex::new(conn), path: path.to_path_buf() })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the connection; SQLite errors come back naming the file.
    pub(crate) fn run<T, E: From<SqliteError>>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, TxError<E>>,
    ) -> Result<T, E> {
        // A panic while the lock was held rolled its transaction back when it unwound:
        // the connection is still usable.
        let mut conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut conn).map_err(|e| match e {
            TxError::Sql(source) => E::from(SqliteError { path: self.path.clone(), source }),
            TxError::Other(e) => e,
        })
    }
}

/// `path` with `suffix` appended to its file name: SQLite's `-wal`, `-shm`, `-journal`.
pub(crate) fn companion_path(path: &Path, suffix: &str) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(suffix);
    PathBuf::from(name)
}

/// Creates `path` 0600 if it does not exist (never chmod-ed afterwards), refuses it or its
/// `-wal`/`-shm`/`-journal` companions when another user could read them, and opens it
/// with WAL, `synchronous=FULL`, a busy timeout and foreign keys. SQLite creates the
/// companions with the main file's mode, so they are 0600 too.
pub(crate) fn open_private_sqlite<E>(path: &Path) -> Result<Connection, E>
where
    E: From<SecureFsError> + From<SqliteError> + From<UnusableDb>,
{
    let io = |source| SecureFsError::Io { path: path.to_path_buf(), source };
    match OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
        Ok(file) => {
            file.sync_all().map_err(io)?;
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                File::open(parent)
                    .and_then(|dir| dir.sync_all())
                    .map_err(|source| SecureFsError::Io { path: parent.to_path_buf(), source })?;
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io(e).into()),
    }
    check_private(path, 0o600)?;
    for suffix in ["-wal", "-shm", "-journal"] {
        let companion = companion_path(path, suffix);
        // symlink_metadata: a dangling symlink is checked (and refused), not skipped.
        if std::fs::symlink_metadata(&companion).is_ok() {
            check_private(&companion, 0o600)?;
        }
    }
    let sql = |source| SqliteError { path: path.to_path_buf(), source };
    // No SQLITE_OPEN_CREATE: SQLite only ever opens the file created above.
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(sql)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(sql)?;
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0)).map_err(sql)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(UnusableDb::NotWal { path: path.to_path_buf(), mode }.into());
    }
    conn.pragma_update(None, "synchronous", "FULL").map_err(sql)?;
    conn.pragma_update(None, "foreign_keys", true).map_err(sql)?;
    Ok(conn)
}

fn migrate<E>(conn: &mut Connection, path: &Path, migrations: &[&str]) -> Result<(), E>
where
    E: From<SqliteError> + From<UnusableDb>,
{
    let sql = |source| SqliteError { path: path.to_path_buf(), source };
    let supported = i64::try_from(migrations.len()).unwrap_or(i64::MAX);
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sql)?;
    let found: i64 = tx.pragma_query_value(None, "user_version", |row| row.get(0)).map_err(sql)?;
    let done = usize::try_from(found)
        .ok()
        .filter(|done| *done <= migrations.len())
        .ok_or_else(|| UnusableDb::UnknownSchema { path: path.to_path_buf(), found, supported })?;
    for step in &migrations[done..] {
        tx.execute_batch(step).map_err(sql)?;
    }
    if found != supported {
        tx.pragma_update(None, "user_version", supported).map_err(sql)?;
    }
    tx.commit().map_err(sql)?;
    Ok(())
}

/// `value` as SQLite's i64, or an error naming `field`: never wrapped.
pub(crate) fn to_i64(field: &'static str, value: u64) -> Result<i64, TooLarge> {
    i64::try_from(value).map_err(|_| TooLarge { field, value })
}

/// A column's value, or what is wrong with it.
pub(crate) fn column<T: FromSql>(row: &Row<'_>, name: &str) -> Result<T, String> {
    row.get(name).map_err(|e| format!("column {name}: {e}"))
}

/// A u64 stored as SQLite's i64 by [`to_i64`].
pub(crate) fn column_u64(row: &Row<'_>, name: &str) -> Result<u64, String> {
    let value: i64 = column(row, name)?;
    u64::try_from(value).map_err(|_| format!("column {name}: negative value {value}"))
}

pub(crate) fn column_peer(row: &Row<'_>, name: &str) -> Result<PeerId, String> {
    let bytes: Vec<u8> = column(row, name)?;
    PeerId::from_bytes(&bytes).map_err(|e| format!("column {name}: not a peer id: {e}"))
}

pub(crate) fn column_state(row: &Row<'_>, name: &str) -> Result<LeaseState, String> {
    let value: String = column(row, name)?;
    LeaseState::from_name(&value)
        .ok_or_else(|| format!("column {name}: unknown lease state `{}`", value.escape_debug()))
}
