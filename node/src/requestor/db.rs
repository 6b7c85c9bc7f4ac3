//! The requestor's lease store: for each lease, who the provider is and where it listens,
//! the guest spec, the lease's SSH key file, the last known state and, once granted, how
//! to reach the guest, its pinned host key and the signed grant (the receipt). Same file
//! rules as the provider's store (0600, WAL; see [`crate::sqlite`]).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use libp2p::{Multiaddr, PeerId};
use peervm_protocol::{GuestSpec, LeaseId, LeaseState};
use rusqlite::{Connection, Row, TransactionBehavior, params};
use thiserror::Error;

use crate::secure_fs::SecureFsError;
use crate::sqlite::block_table::{BlockEntry, BlockTable};
use crate::sqlite::{
    PrivateSqlite, SqliteError, TooLarge, TxError, UnusableDb, column, column_peer, column_state, column_u64, to_i64,
};

/// The shortest id prefix [`RequestorDb::find`] accepts.
pub const MIN_PREFIX_LEN: usize = 4;

#[derive(Debug, Error)]
pub enum RequestorDbError {
    #[error(transparent)]
    Sqlite(#[from] SqliteError),
    #[error(transparent)]
    Fs(#[from] SecureFsError),
    #[error(transparent)]
    Unusable(#[from] UnusableDb),
    #[error(transparent)]
    TooLarge(#[from] TooLarge),
    #[error("no lease matches `{0}`")]
    NotFound(String),
    #[error("`{prefix}` matches {matches} leases; give more of the id")]
    Ambiguous { prefix: String, matches: usize },
    #[error("`{0}` is not a lease id: give its 32 hex digits or a unique prefix of at least {MIN_PREFIX_LEN}")]
    InvalidId(String),
    #[error("lease {0} is already stored")]
    AlreadyExists(LeaseId),
    /// The operation needs the grant (access details) the lease does not have yet.
    #[error("lease {0} has not been granted")]
    NotGranted(LeaseId),
    /// A row that does not decode; the message names the lease.
    #[error("corrupt database row: {0}")]
    Corrupt(String),
}

impl From<RequestorDbError> for TxError<RequestorDbError> {
    fn from(e: RequestorDbError) -> Self {
        TxError::Other(e)
    }
}

/// One lease as the requestor remembers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredLease {
    pub id: LeaseId,
    pub provider: PeerId,
    pub provider_addrs: Vec<Multiaddr>,
    pub spec: GuestSpec,
    /// The lease's private SSH key.
    pub key_path: PathBuf,
    pub created_at_unix_ms: u64,
    /// Last known state.
    pub state: LeaseState,
    /// None until granted.
    pub access: Option<Access>,
    /// Why the lease is in its state, for people: a failure's cause, or why it ended.
    pub detail: String,
    /// When the lease ended or failed, when the requestor knows it (README "Requestor").
    pub ended_at_unix_ms: Option<u64>,
    /// The provider's signed reply that denied the request: the receipt of a refusal, as
    /// `access.grant` is of a lease.
    pub denial: Option<Vec<u8>>,
}

/// How to reach a granted guest, and the signed grant that proves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    pub ssh_host: String,
    pub ssh_port: u16,
    pub ssh_user: String,
    /// The guest's pinned raw ed25519 host key.
    pub host_key: [u8; 32],
    pub ends_at_unix_ms: u64,
    pub price_per_hour_micros: u64,
    pub currency: String,
    /// The provider's signed reply bytes.
    pub grant: Vec<u8>,
    /// Exposed guest ports and where they are reached (on `ssh_host`), from the grant.
    pub exposed: Vec<peervm_protocol::ExposedPort>,
}

/// `guest:host,guest:host` as stored.
fn encode_exposed(ports: &[peervm_protocol::ExposedPort]) -> String {
    ports.iter().map(|p| format!("{}:{}", p.guest_port, p.host_port)).collect::<Vec<_>>().join(",")
}

fn decode_exposed(text: &str) -> Result<Vec<peervm_protocol::ExposedPort>, String> {
    text.split(',')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (g, h) = pair.split_once(':').ok_or_else(|| format!("exposed port `{pair}` is not guest:host"))?;
            let port = |s: &str| s.parse::<u16>().map_err(|_| format!("exposed port `{pair}` is not guest:host"));
            Ok(peervm_protocol::ExposedPort { guest_port: port(g)?, host_port: port(h)? })
        })
        .collect()
}

const REQUESTOR_MIGRATIONS: &[&str] = &[
    "
    CREATE TABLE leases (
        id BLOB PRIMARY KEY NOT NULL CHECK (length(id) = 16),
        provider BLOB NOT NULL,
        vcpus INTEGER NOT NULL,
        memory_mib INTEGER NOT NULL,
        disk_gib INTEGER NOT NULL,
        image_name TEXT NOT NULL,
        image_sha256 BLOB NOT NULL,
        key_path BLOB NOT NULL,
        created_at_unix_ms INTEGER NOT NULL,
        state TEXT NOT NULL,
        detail TEXT NOT NULL,
        -- The access columns are all NULL until the lease is granted.
        ssh_host TEXT,
        ssh_port INTEGER,
        ssh_user TEXT,
        host_key BLOB,
        ends_at_unix_ms INTEGER,
        price_per_hour_micros INTEGER,
        currency TEXT,
        grant_reply BLOB
    ) STRICT;
    CREATE INDEX leases_created_at ON leases (created_at_unix_ms);
    CREATE TABLE provider_addrs (
        lease_id BLOB NOT NULL REFERENCES leases (id) ON DELETE CASCADE,
        pos INTEGER NOT NULL,
        addr BLOB NOT NULL,
        PRIMARY KEY (lease_id, pos)
    ) STRICT, WITHOUT ROWID;
",
    "
    CREATE TABLE blocked_providers (
        peer BLOB PRIMARY KEY,
        reason TEXT NOT NULL,
        at_unix_ms INTEGER NOT NULL
    ) STRICT, WITHOUT ROWID;
",
    "ALTER TABLE leases ADD COLUMN ended_at_unix_ms INTEGER;",
    "ALTER TABLE leases ADD COLUMN denial_reply BLOB;",
    "ALTER TABLE leases ADD COLUMN exposed TEXT NOT NULL DEFAULT '';",
];

/// The providers this requestor blocked.
const BLOCKED: BlockTable = BlockTable { table: "blocked_providers", at_column: "at_unix_ms" };

const COLUMNS: &str = "id, provider, vcpus, memory_mib, disk_gib, image_name, image_sha256, key_path, \
     created_at_unix_ms, state, detail, ssh_host, ssh_port, ssh_user, host_key, ends_at_unix_ms, \
     price_per_hour_micros, currency, grant_reply, ended_at_unix_ms, denial_reply, exposed";

/// The requestor's lease store. One connection behind a mutex: `Send + Sync`.
pub struct RequestorDb {
    db: PrivateSqlite,
}

/// Access values converted for SQLite before the connection is locked.
struct AccessParams<'a> {
    access: &'a Access,
    ends_at: i64,
    price: i64,
}

impl<'a> AccessParams<'a> {
    fn new(access: &'a Access) -> Result<Self, TooLarge> {
        Ok(AccessParams {
            access,
            ends_at: to_i64("ends_at_unix_ms", access.ends_at_unix_ms)?,
            price: to_i64("price_per_hour_micros", access.price_per_hour_micros)?,
        })
    }
}

const SET_ACCESS: &str = "UPDATE leases SET ssh_host = ?2, ssh_port = ?3, ssh_user = ?4, host_key = ?5, \
     ends_at_unix_ms = ?6, price_per_hour_micros = ?7, currency = ?8, grant_reply = ?9, exposed = ?10 WHERE id = ?1";

fn write_access(conn: &Connection, id: &LeaseId, p: &AccessParams<'_>) -> rusqlite::Result<usize> {
    let a = p.access;
    conn.execute(
        SET_ACCESS,
        params![
            id.0,
            a.ssh_host,
            a.ssh_port,
            a.ssh_user,
            a.host_key,
            p.ends_at,
            p.price,
            a.currency,
            a.grant,
            encode_exposed(&a.exposed)
        ],
    )
}

impl RequestorDb {
    /// Opens (creating it 0600 if missing) the store at `path` and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Self, RequestorDbError> {
        Ok(RequestorDb { db: PrivateSqlite::open::<RequestorDbError>(path, REQUESTOR_MIGRATIONS)? })
    }

    pub fn path(&self) -> &Path {
        self.db.path()
    }

    /// Stores a new lease (with its access too, if it has one); `AlreadyExists` if the id is taken.
    pub fn insert_pending(&self, lease: &StoredLease) -> Result<(), RequestorDbError> {
        let memory_mib = to_i64("memory_mib", lease.spec.memory_mib)?;
        let disk_gib = to_i64("disk_gib", lease.spec.disk_gib)?;
        let created_at = to_i64("created_at_unix_ms", lease.created_at_unix_ms)?;
        let access = lease.access.as_ref().map(AccessParams::new).transpose()?;
        let addrs: Vec<Vec<u8>> = lease.provider_addrs.iter().map(|a| a.to_vec()).collect();
        self.db.run(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let inserted = tx.execute(
                "INSERT INTO leases (id, provider, vcpus, memory_mib, disk_gib, image_name, image_sha256, key_path, \
                 created_at_unix_ms, state, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) \
                 ON CONFLICT DO NOTHING",
                params![
                    lease.id.0,
                    lease.provider.to_bytes(),
                    lease.spec.vcpus,
                    memory_mib,
                    disk_gib,
                    lease.spec.image_name,
                    lease.spec.image_sha256,
                    lease.key_path.as_os_str().as_bytes(),
                    created_at,
                    LeaseState::as_str(lease.state),
                    lease.detail,
                ],
            )?;
            if inserted == 0 {
                return Err(RequestorDbError::AlreadyExists(lease.id).into());
            }
            for (pos, addr) in addrs.iter().enumerate() {
                let pos = i64::try_from(pos).unwrap_or(i64::MAX);
                tx.execute(
                    "INSERT INTO provider_addrs (lease_id, pos, addr) VALUES (?1, ?2, ?3)",
                    params![lease.id.0, pos, addr],
                )?;
            }
            if let Some(access) = &access {
                write_access(&tx, &lease.id, access)?;
            }
            tx.commit()?;
            Ok(())
        })
    }

    /// Records the grant: how to reach the guest, its host key, the receipt; state `Running`.
    pub fn set_granted(&self, id: &LeaseId, access: &Access) -> Result<(), RequestorDbError> {
        let access = AccessParams::new(access)?;
        self.db.run(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            if write_access(&tx, id, &access)? == 0 {
                return Err(RequestorDbError::NotFound(id.to_hex()).into());
            }
            tx.execute(
                "UPDATE leases SET state = ?2 WHERE id = ?1",
                params![id.0, LeaseState::as_str(LeaseState::Running)],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    pub fn set_state(&self, id: &LeaseId, state: LeaseState, detail: &str) -> Result<(), RequestorDbError> {
        self.db.run(|conn| {
            let changed = conn.execute(
                "UPDATE leases SET state = ?2, detail = ?3 WHERE id = ?1",
                params![id.0, LeaseState::as_str(state), detail],
            )?;
            if changed == 0 {
                return Err(RequestorDbError::NotFound(id.to_hex()).into());
            }
            Ok(())
        })
    }

    /// Records that the lease ended or failed: its state, why, and when (if known).
    pub fn set_finished(
        &self,
        id: &LeaseId,
        state: LeaseState,
        detail: &str,
        at_unix_ms: Option<u64>,
    ) -> Result<(), RequestorDbError> {
        let at = at_unix_ms.map(|at| to_i64("ended_at_unix_ms", at)).transpose()?;
        self.db.run(|conn| {
            let changed = conn.execute(
                "UPDATE leases SET state = ?2, detail = ?3, ended_at_unix_ms = ?4 WHERE id = ?1",
                params![id.0, LeaseState::as_str(state), detail, at],
            )?;
            if changed == 0 {
                return Err(RequestorDbError::NotFound(id.to_hex()).into());
            }
            Ok(())
        })
    }

    /// Records the provider's signed denial of the request: state `Failed`, why, when,
    /// and the signed reply bytes as the receipt.
    pub fn set_denied(
        &self,
        id: &LeaseId,
        detail: &str,
        at_unix_ms: u64,
        reply: &[u8],
    ) -> Result<(), RequestorDbError> {
        let at = to_i64("ended_at_unix_ms", at_unix_ms)?;
        self.db.run(|conn| {
            let changed = conn.execute(
                "UPDATE leases SET state = ?2, detail = ?3, ended_at_unix_ms = ?4, denial_reply = ?5 WHERE id = ?1",
                params![id.0, LeaseState::as_str(LeaseState::Failed), detail, at, reply],
            )?;
            if changed == 0 {
                return Err(RequestorDbError::NotFound(id.to_hex()).into());
            }
            Ok(())
        })
    }

    /// The new end of a granted lease (after an extension); `NotGranted` before the grant.
    pub fn set_ends_at(&self, id: &LeaseId, ends_at_unix_ms: u64) -> Result<(), RequestorDbError> {
        let ends_at = to_i64("ends_at_unix_ms", ends_at_unix_ms)?;
        self.update_access(
            id,
            "UPDATE leases SET ends_at_unix_ms = ?2 WHERE id = ?1 AND grant_reply IS NOT NULL",
            ends_at,
        )
    }

    /// Blocks a provider on this requestor's side: its offers are hidden and never leased.
    pub fn block(&self, peer: &PeerId, reason: &str, now_unix_ms: u64) -> Result<(), RequestorDbError> {
        let now = to_i64("now_unix_ms", now_unix_ms)?;
        self.db.run(|conn| BLOCKED.block(conn, peer, reason, now))
    }

    /// Lifts a block; false when the provider was not blocked.
    pub fn unblock(&self, peer: &PeerId) -> Result<bool, RequestorDbError> {
        self.db.run(|conn| BLOCKED.unblock(conn, peer))
    }

    /// The blocked providers with their reason and time, oldest first.
    pub fn blocked(&self) -> Result<Vec<BlockEntry>, RequestorDbError> {
        self.db.run(|conn| BLOCKED.list(conn, RequestorDbError::Corrupt))
    }

    /// Replaces the provider's addresses (it moved: found again through the swarm).
    pub fn set_provider_addrs(&self, id: &LeaseId, addrs: &[Multiaddr]) -> Result<(), RequestorDbError> {
        let addrs: Vec<Vec<u8>> = addrs.iter().map(|a| a.to_vec()).collect();
        self.db.run(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute("DELETE FROM provider_addrs WHERE lease_id = ?1", [id.0])?;
            for (pos, addr) in addrs.iter().enumerate() {
                let pos = i64::try_from(pos).unwrap_or(i64::MAX);
                tx.execute(
                    "INSERT INTO provider_addrs (lease_id, pos, addr) VALUES (?1, ?2, ?3)",
                    params![id.0, pos, addr],
                )?;
            }
            tx.commit()?;
            Ok(())
        })
    }

    /// Replaces the pinned host key of a granted lease; `NotGranted` before the grant.
    pub fn set_host_key(&self, id: &LeaseId, host_key: [u8; 32]) -> Result<(), RequestorDbError> {
        self.update_access(id, "UPDATE leases SET host_key = ?2 WHERE id = ?1 AND grant_reply IS NOT NULL", host_key)
    }

    fn update_access(&self, id: &LeaseId, sql: &str, value: impl rusqlite::ToSql) -> Result<(), RequestorDbError> {
        self.db.run(|conn| {
            if conn.execute(sql, params![id.0, value])? == 0 {
                let exists: bool =
                    conn.query_row("SELECT EXISTS (SELECT 1 FROM leases WHERE id = ?1)", [id.0], |row| row.get(0))?;
                return Err(if exists {
                    RequestorDbError::NotGranted(*id)
                } else {
                    RequestorDbError::NotFound(id.to_hex())
                }
                .into());
            }
            Ok(())
        })
    }

    pub fn get(&self, id: &LeaseId) -> Result<Option<StoredLease>, RequestorDbError> {
        let mut found = self.query(&format!("SELECT {COLUMNS} FROM leases WHERE id = ?1"), [id.0])?;
        Ok(found.pop())
    }

    /// A full 32-hex-digit id, or a unique prefix of at least [`MIN_PREFIX_LEN`] hex digits
    /// (like git; any case): `NotFound` when nothing matches, `Ambiguous` when several do,
    /// `InvalidId` when it is not hex or too short.
    pub fn find(&self, id_or_prefix: &str) -> Result<StoredLease, RequestorDbError> {
        let wanted = id_or_prefix.trim().to_ascii_lowercase();
        if wanted.len() < MIN_PREFIX_LEN || wanted.len() > 32 || !wanted.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(RequestorDbError::InvalidId(id_or_prefix.to_string()));
        }
        if let Some(id) = LeaseId::from_hex(&wanted) {
            return self.get(&id)?.ok_or(RequestorDbError::NotFound(wanted));
        }
        let matches = self.query(
            &format!("SELECT {COLUMNS} FROM leases WHERE substr(lower(hex(id)), 1, length(?1)) = ?1 LIMIT 2"),
            [&wanted],
        )?;
        match matches.len() {
            0 => Err(RequestorDbError::NotFound(wanted)),
            1 => matches.into_iter().next().ok_or(RequestorDbError::NotFound(wanted)),
            _ => {
                let count = self.db.run(|conn| {
                    Ok::<_, TxError<RequestorDbError>>(conn.query_row(
                        "SELECT count(*) FROM leases WHERE substr(lower(hex(id)), 1, length(?1)) = ?1",
                        [&wanted],
                        |row| row.get::<_, i64>(0),
                    )?)
                })?;
                Err(RequestorDbError::Ambiguous {
                    prefix: wanted,
                    matches: usize::try_from(count).unwrap_or(usize::MAX),
                })
            }
        }
    }

    /// Every lease, newest first.
    pub fn list(&self) -> Result<Vec<StoredLease>, RequestorDbError> {
        self.query(&format!("SELECT {COLUMNS} FROM leases ORDER BY created_at_unix_ms DESC, rowid DESC"), [])
    }

    /// The leases that were granted or may still be, newest first: requests that failed
    /// before a grant (denied, unanswered) are left out; [`Self::list`] has them, and a
    /// denied one keeps its signed denial.
    pub fn list_leased(&self) -> Result<Vec<StoredLease>, RequestorDbError> {
        self.query(
            &format!(
                "SELECT {COLUMNS} FROM leases WHERE NOT (state = 'failed' AND grant_reply IS NULL) \
                 ORDER BY created_at_unix_ms DESC, rowid DESC"
            ),
            [],
        )
    }

    fn query(&self, sql: &str, params: impl rusqlite::Params) -> Result<Vec<StoredLease>, RequestorDbError> {
        self.db.run(|conn| {
            let mut stmt = conn.prepare(sql)?;
            let mut rows = stmt.query(params)?;
            let mut out = Vec::new();
            while let Some(row) = rows.next()? {
                out.push(decode_lease(conn, row)?);
            }
            Ok(out)
        })
    }
}

fn decode_lease(conn: &Connection, row: &Row<'_>) -> Result<StoredLease, TxError<RequestorDbError>> {
    let raw_id: Result<Vec<u8>, String> = column(row, "id");
    let label = match &raw_id {
        Ok(bytes) => hex::encode(bytes),
        Err(_) => "with an unreadable id".to_string(),
    };
    let corrupt = |problem: String| RequestorDbError::Corrupt(format!("lease {label}: {problem}"));
    let raw_id = raw_id.map_err(corrupt)?;
    let id = <[u8; 16]>::try_from(raw_id.as_slice())
        .map_err(|_| corrupt(format!("id is {} bytes, not 16", raw_id.len())))?;
    let mut addrs = Vec::new();
    let mut stmt = conn.prepare_cached("SELECT addr FROM provider_addrs WHERE lease_id = ?1 ORDER BY pos")?;
    let mut addr_rows = stmt.query([id])?;
    while let Some(addr_row) = addr_rows.next()? {
        let bytes: Vec<u8> = column(addr_row, "addr").map_err(corrupt)?;
        addrs.push(Multiaddr::try_from(bytes).map_err(|e| corrupt(format!("provider address: {e}")))?);
    }
    let decoded = (|| {
        Ok::<_, String>(StoredLease {
            id: LeaseId(id),
            provider: column_peer(row, "provider")?,
            provider_addrs: addrs,
            spec: GuestSpec {
                expose: Vec::new(),
                vcpus: column(row, "vcpus")?,
                memory_mib: column_u64(row, "memory_mib")?,
                disk_gib: column_u64(row, "disk_gib")?,
                image_name: column(row, "image_name")?,
                image_sha256: column(row, "image_sha256")?,
            },
            key_path: PathBuf::from(OsStr::from_bytes(&column::<Vec<u8>>(row, "key_path")?)),
            created_at_unix_ms: column_u64(row, "created_at_unix_ms")?,
            state: column_state(row, "state")?,
            access: decode_access(row)?,
            detail: column(row, "detail")?,
            ended_at_unix_ms: column::<Option<i64>>(row, "ended_at_unix_ms")?
                .map(|at| u64::try_from(at).map_err(|_| format!("column ended_at_unix_ms: negative value {at}")))
                .transpose()?,
            denial: column(row, "denial_reply")?,
        })
    })();
    Ok(decoded.map_err(corrupt)?)
}

/// All access columns NULL: not granted yet; all set: granted; anything else is corrupt.
fn decode_access(row: &Row<'_>) -> Result<Option<Access>, String> {
    let grant: Option<Vec<u8>> = column(row, "grant_reply")?;
    let ssh_host: Option<String> = column(row, "ssh_host")?;
    let ssh_port: Option<u16> = column(row, "ssh_port")?;
    let ssh_user: Option<String> = column(row, "ssh_user")?;
    let host_key: Option<[u8; 32]> = column(row, "host_key")?;
    let ends_at: Option<i64> = column(row, "ends_at_unix_ms")?;
    let price: Option<i64> = column(row, "price_per_hour_micros")?;
    let currency: Option<String> = column(row, "currency")?;
    match (grant, ssh_host, ssh_port, ssh_user, host_key, ends_at, price, currency) {
        (None, None, None, None, None, None, None, None) => Ok(None),
        (
            Some(grant),
            Some(ssh_host),
            Some(ssh_port),
            Some(ssh_user),
            Some(host_key),
            Some(_),
            Some(_),
            Some(currency),
        ) => Ok(Some(Access {
            ssh_host,
            ssh_port,
            ssh_user,
            host_key,
            ends_at_unix_ms: column_u64(row, "ends_at_unix_ms")?,
            price_per_hour_micros: column_u64(row, "price_per_hour_micros")?,
            currency,
            grant,
            exposed: decode_exposed(&column::<String>(row, "exposed")?)?,
        })),
        _ => Err("access columns are partly set".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::sqlite::companion_path;

    fn lease(id: [u8; 16], created_at_unix_ms: u64) -> StoredLease {
        StoredLease {
            id: LeaseId(id),
            provider: PeerId::random(),
            provider_addrs: vec![
                "/ip4/192.0.2.7/tcp/4001".parse().unwrap(),
                "/ip6/2001:db8::1/udp/4001/quic-v1".parse().unwrap(),
            ],
            spec: GuestSpec {
                expose: Vec::new(),
                vcpus: 1,
                memory_mib: 1024,
                disk_gib: 10,
                image_name: "alpine".into(),
                image_sha256: [3; 32],
            },
            key_path: PathBuf::from("/home/alice/.local/share/peervm/leases/k\u{e9}y"),
            created_at_unix_ms,
            state: LeaseState::Requested,
            access: None,
            detail: String::new(),
            ended_at_unix_ms: None,
            denial: None,
        }
    }

    fn access() -> Access {
        Access {
            ssh_host: "192.0.2.7".into(),
            ssh_port: 40_022,
            ssh_user: "alice".into(),
            host_key: [4; 32],
            ends_at_unix_ms: 7_200_000,
            price_per_hour_micros: 30_000,
            currency: "EUR".into(),
            grant: vec![0xa1, 0xb2, 0xc3],
            exposed: vec![peervm_protocol::ExposedPort { guest_port: 8080, host_port: 30_001 }],
        }
    }

    fn fresh() -> (tempfile::TempDir, RequestorDb) {
        let dir = tempfile::tempdir().unwrap();
        let db = RequestorDb::open(&dir.path().join("requestor.db")).unwrap();
        (dir, db)
    }

    fn id_from_hex(s: &str) -> [u8; 16] {
        LeaseId::from_hex(s).unwrap().0
    }

    #[test]
    fn blocked_providers_and_moved_addresses_persist() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("requestor.db");
        let p = PeerId::random();
        let l = lease([9; 16], 1_000);
        {
            let db = RequestorDb::open(&path).unwrap();
            db.block(&p, "sold a dead VM", 5).unwrap();
            db.block(&p, "twice", 6).unwrap(); // updates, never duplicates
            db.insert_pending(&l).unwrap();
            db.set_provider_addrs(&l.id, &["/ip4/192.0.2.9/tcp/4002".parse().unwrap()]).unwrap();
        }
        let db = RequestorDb::open(&path).unwrap();
        assert_eq!(db.blocked().unwrap(), vec![BlockEntry { peer: p, reason: "twice".into(), at_unix_ms: 6 }]);
        let got = db.get(&l.id).unwrap().unwrap();
        assert_eq!(got.provider_addrs, vec!["/ip4/192.0.2.9/tcp/4002".parse::<Multiaddr>().unwrap()]);
        assert!(db.unblock(&p).unwrap());
        assert!(!db.unblock(&p).unwrap());
        assert!(db.blocked().unwrap().is_empty());
    }

    #[test]
    fn store_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<RequestorDb>();
    }

    #[test]
    fn insert_then_get_round_trips_also_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("requestor.db");
        let pending = lease([1; 16], 1_000);
        let mut granted = lease([2; 16], 2_000);
        granted.access = Some(access());
        granted.state = LeaseState::Running;
        granted.provider_addrs.clear();
        {
            let db = RequestorDb::open(&path).unwrap();
            db.insert_pending(&pending).unwrap();
            db.insert_pending(&granted).unwrap();
            assert_eq!(db.get(&pending.id).unwrap().unwrap(), pending);
            let err = db.insert_pending(&pending).unwrap_err();
            assert!(matches!(err, RequestorDbError::AlreadyExists(id) if id == pending.id), "{err}");
        }
        let db = RequestorDb::open(&path).unwrap();
        assert_eq!(db.get(&pending.id).unwrap().unwrap(), pending);
        assert_eq!(db.get(&granted.id).unwrap().unwrap(), granted);
        assert!(db.get(&LeaseId([9; 16])).unwrap().is_none());
    }

    #[test]
    fn granted_state_ends_at_and_host_key() {
        let (_dir, db) = fresh();
        let l = lease([1; 16], 1_000);
        db.insert_pending(&l).unwrap();
        assert!(matches!(db.set_ends_at(&l.id, 9), Err(RequestorDbError::NotGranted(id)) if id == l.id));
        assert!(matches!(db.set_host_key(&l.id, [0; 32]), Err(RequestorDbError::NotGranted(_))));

        db.set_granted(&l.id, &access()).unwrap();
        let got = db.get(&l.id).unwrap().unwrap();
        assert_eq!(got.state, LeaseState::Running);
        assert_eq!(got.access, Some(access()));

        db.set_ends_at(&l.id, 10_800_000).unwrap();
        db.set_host_key(&l.id, [0xee; 32]).unwrap();
        let got = db.get(&l.id).unwrap().unwrap().access.unwrap();
        assert_eq!((got.ends_at_unix_ms, got.host_key), (10_800_000, [0xee; 32]));
        assert_eq!(got.grant, access().grant);

        db.set_finished(&l.id, LeaseState::Ended, "terminated by you", Some(5_000)).unwrap();
        let got = db.get(&l.id).unwrap().unwrap();
        assert_eq!((got.state, got.detail.as_str()), (LeaseState::Ended, "terminated by you"));
        assert_eq!(got.ended_at_unix_ms, Some(5_000), "when it ended is kept");
        assert!(got.access.is_some(), "the receipt outlives the lease");
        db.set_finished(&l.id, LeaseState::Failed, "gone", None).unwrap();
        assert_eq!(db.get(&l.id).unwrap().unwrap().ended_at_unix_ms, None);
    }

    #[test]
    fn updates_of_unknown_leases_refused() {
        let (_dir, db) = fresh();
        let id = LeaseId([5; 16]);
        let not_found =
            |r: Result<(), RequestorDbError>| matches!(r, Err(RequestorDbError::NotFound(s)) if s == id.to_hex());
        assert!(not_found(db.set_granted(&id, &access())));
        assert!(not_found(db.set_state(&id, LeaseState::Failed, "")));
        assert!(not_found(db.set_finished(&id, LeaseState::Failed, "", Some(1))));
        assert!(not_found(db.set_ends_at(&id, 1)));
        assert!(not_found(db.set_host_key(&id, [1; 32])));
    }

    #[test]
    fn values_over_i64_refused() {
        let (_dir, db) = fresh();
        let l = lease([1; 16], 1_000);
        db.insert_pending(&l).unwrap();
        let mut a = access();
        a.price_per_hour_micros = u64::MAX;
        let err = db.set_granted(&l.id, &a).unwrap_err();
        assert!(matches!(err, RequestorDbError::TooLarge(TooLarge { field: "price_per_hour_micros", .. })), "{err}");
        assert!(db.get(&l.id).unwrap().unwrap().access.is_none());
        let mut big = lease([2; 16], u64::MAX);
        assert!(matches!(db.insert_pending(&big), Err(RequestorDbError::TooLarge(_))));
        big.created_at_unix_ms = 5;
        db.insert_pending(&big).unwrap();
    }

    #[test]
    fn find_by_full_id_and_unique_prefix() {
        let (_dir, db) = fresh();
        let a = lease(id_from_hex("abcd0123000000000000000000000000"), 1_000);
        let b = lease(id_from_hex("abcd4567000000000000000000000000"), 2_000);
        let c = lease(id_from_hex("0123ffff000000000000000000000000"), 3_000);
        for l in [&a, &b, &c] {
            db.insert_pending(l).unwrap();
        }
        assert_eq!(db.find(&a.id.to_hex()).unwrap(), a);
        assert_eq!(db.find("ABCD0123000000000000000000000000").unwrap(), a);
        assert_eq!(db.find("abcd0").unwrap(), a);
        assert_eq!(db.find("ABCD4").unwrap(), b);
        assert_eq!(db.find("0123").unwrap(), c);
        assert_eq!(db.find(" 0123f ").unwrap(), c);

        let err = db.find("abcd").unwrap_err();
        assert!(matches!(&err, RequestorDbError::Ambiguous { prefix, matches: 2 } if prefix == "abcd"), "{err}");
        assert!(matches!(db.find("abce"), Err(RequestorDbError::NotFound(s)) if s == "abce"));
        assert!(matches!(db.find("abcd0123000000000000000000000001"), Err(RequestorDbError::NotFound(_))));
        for bad in ["abc", "", "abcz", "lease-1", "abcd01230000000000000000000000000", "abcd%"] {
            assert!(matches!(db.find(bad), Err(RequestorDbError::InvalidId(_))), "{bad}");
        }
    }

    #[test]
    fn list_newest_first() {
        let (_dir, db) = fresh();
        assert!(db.list().unwrap().is_empty());
        for (n, at) in [(1u8, 2_000u64), (2, 3_000), (3, 1_000)] {
            db.insert_pending(&lease([n; 16], at)).unwrap();
        }
        let ids: Vec<u8> = db.list().unwrap().into_iter().map(|l| l.id.0[0]).collect();
        assert_eq!(ids, vec![2, 1, 3]);
    }

    #[test]
    fn denied_requests_keep_their_signed_denial_and_stay_out_of_the_leased_list() {
        let (_dir, db) = fresh();
        let denied = lease([1; 16], 1_000);
        let unanswered = lease([2; 16], 2_000);
        let granted = lease([3; 16], 3_000);
        let failed_after_grant = lease([4; 16], 4_000);
        let pending = lease([5; 16], 5_000);
        for l in [&denied, &unanswered, &granted, &failed_after_grant, &pending] {
            db.insert_pending(l).unwrap();
        }
        db.set_denied(&denied.id, "denied: no_capacity: 1 vCPU free", 1_500, &[0xd1, 0xe2]).unwrap();
        db.set_finished(&unanswered.id, LeaseState::Failed, "cannot reach the provider", Some(2_500)).unwrap();
        db.set_granted(&granted.id, &access()).unwrap();
        db.set_granted(&failed_after_grant.id, &access()).unwrap();
        db.set_finished(&failed_after_grant.id, LeaseState::Failed, "gone", None).unwrap();

        let ids = |v: Vec<StoredLease>| v.into_iter().map(|l| l.id.0[0]).collect::<Vec<u8>>();
        assert_eq!(ids(db.list_leased().unwrap()), vec![5, 4, 3], "requests that never got a lease are left out");
        assert_eq!(ids(db.list().unwrap()), vec![5, 4, 3, 2, 1], "--all shows them");
        let got = db.get(&denied.id).unwrap().unwrap();
        assert_eq!(got.state, LeaseState::Failed);
        assert_eq!(got.denial.as_deref(), Some(&[0xd1, 0xe2][..]), "the signed denial is the receipt");
        assert_eq!((got.detail.as_str(), got.ended_at_unix_ms), ("denied: no_capacity: 1 vCPU free", Some(1_500)));
        assert_eq!(db.get(&granted.id).unwrap().unwrap().denial, None);
    }

    #[test]
    fn corrupt_rows_are_errors_naming_the_lease() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("requestor.db");
        let l = lease([0xcd; 16], 1_000);
        {
            let db = RequestorDb::open(&path).unwrap();
            db.insert_pending(&l).unwrap();
            db.set_granted(&l.id, &access()).unwrap();
        }
        let raw = Connection::open(&path).unwrap();
        raw.execute("UPDATE leases SET ssh_port = 70000", []).unwrap();
        drop(raw);
        let db = RequestorDb::open(&path).unwrap();
        let err = db.find("cdcd").unwrap_err();
        assert!(
            matches!(&err, RequestorDbError::Corrupt(m) if m.contains(&l.id.to_hex()) && m.contains("ssh_port")),
            "{err}"
        );
        drop(db);
        let raw = Connection::open(&path).unwrap();
        raw.execute("UPDATE leases SET ssh_port = 22, currency = NULL", []).unwrap();
        raw.execute("UPDATE provider_addrs SET addr = x'ff00' WHERE pos = 1", []).unwrap();
        drop(raw);
        let db = RequestorDb::open(&path).unwrap();
        let err = db.list().unwrap_err().to_string();
        assert!(err.contains(&l.id.to_hex()) && err.contains("provider address"), "{err}");
    }

    #[test]
    fn files_private_and_open_ones_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("requestor.db");
        let db = RequestorDb::open(&path).unwrap();
        db.insert_pending(&lease([1; 16], 1)).unwrap();
        for file in [path.clone(), companion_path(&path, "-wal"), companion_path(&path, "-shm")] {
            assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600, "{}", file.display());
        }
        drop(db);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = RequestorDb::open(&path).err().unwrap();
        assert!(matches!(&err, RequestorDbError::Fs(SecureFsError::TooOpen { path: p, .. }) if *p == path), "{err}");
        assert!(err.to_string().contains(&path.display().to_string()));
    }
}
