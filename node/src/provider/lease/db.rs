//! The provider's lease store (docs/architecture.md, "Persistence"): every lease and its
//! state transitions, the (requestor, nonce) pairs already seen, the operator's block
//! list and the network slot each live lease holds. A state change is committed here
//! before the provider acts on it, so a crash at any point leaves a record the next start
//! can reconcile from. The file rules (0600, WAL, versioned schema) are
//! [`crate::sqlite`]'s.

use std::collections::BTreeSet;
use std::path::Path;

use libp2p::PeerId;
use peervm_protocol::{GuestSpec, LeaseId, LeaseState};
use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};
use thiserror::Error;

use crate::secure_fs::SecureFsError;
use crate::sqlite::block_table::{BlockEntry, BlockTable};
use crate::sqlite::{
    PrivateSqlite, SqliteError, TooLarge, TxError, UnusableDb, column, column_peer, column_state, column_u64, to_i64,
};

#[derive(Debug, Error)]
pub enum DbError {
    #[error(transparent)]
    Sqlite(#[from] SqliteError),
    #[error(transparent)]
    Fs(#[from] SecureFsError),
    #[error(transparent)]
    Unusable(#[from] UnusableDb),
    #[error(transparent)]
    TooLarge(#[from] TooLarge),
    /// `what` is "nonce" or "lease id".
    #[error("replay: this {what} was seen before")]
    Replay { what: &'static str },
    #[error("no free network slot")]
    NoSlot,
    #[error("unknown lease {0}")]
    UnknownLease(LeaseId),
    /// A lease that ended or failed cannot come back: its slot may be another lease's now.
    #[error("lease {id} is {} and cannot become {}", .state, .to)]
    Finished { id: LeaseId, state: LeaseState, to: LeaseState },
    /// The start path may only move a lease forward from where it left it: a lease that
    /// was stopped while its guest started must not become booting or running again.
    #[error("lease {id} is {} and cannot become {} any more", .state, .to)]
    Overtaken { id: LeaseId, state: LeaseState, to: LeaseState },
    /// A row that does not decode; the message names the lease.
    #[error("corrupt database row: {0}")]
    Corrupt(String),
}

/// Everything the provider keeps about one lease.
#[derive(Clone, PartialEq, Eq)]
pub struct LeaseRecord {
    pub id: LeaseId,
    pub requestor: PeerId,
    pub state: LeaseState,
    pub spec: GuestSpec,
    pub ssh_user: String,
    pub ssh_public_key: [u8; 32],
    /// Secret: the seed of the guest's SSH host key. Never printed.
    pub host_key_seed: [u8; 32],
    /// The network slot; allocated by [`ProviderDb::admit`], which ignores the value given.
    pub slot: u32,
    pub price_per_hour_micros: u64,
    pub currency: String,
    pub requested_at_unix_ms: u64,
    pub started_at_unix_ms: Option<u64>,
    pub ends_at_unix_ms: u64,
    pub request_digest: [u8; 32],
    /// The signed request bytes, kept as evidence.
    pub request: Vec<u8>,
    /// The last failure or end reason, "" if none.
    pub detail: String,
    pub isolated: bool,
}

impl std::fmt::Debug for LeaseRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseRecord")
            .field("id", &self.id)
            .field("requestor", &self.requestor)
            .field("state", &self.state)
            .field("spec", &self.spec)
            .field("ssh_user", &self.ssh_user)
            .field("ssh_public_key", &hex::encode(self.ssh_public_key))
            .field("host_key_seed", &"<redacted>")
            .field("slot", &self.slot)
            .field("price_per_hour_micros", &self.price_per_hour_micros)
            .field("currency", &self.currency)
            .field("requested_at_unix_ms", &self.requested_at_unix_ms)
            .field("started_at_unix_ms", &self.started_at_unix_ms)
            .field("ends_at_unix_ms", &self.ends_at_unix_ms)
            .field("request_digest", &hex::encode(self.request_digest))
            .field("request", &format_args!("<{} bytes>", self.request.len()))
            .field("detail", &self.detail)
            .field("isolated", &self.isolated)
            .finish()
    }
}

/// The provider's lease store. One connection behind a mutex: `Send + Sync`.
pub struct ProviderDb {
    db: PrivateSqlite,
}

/// Version `i + 1` of the provider schema is reached by running `PROVIDER_MIGRATIONS[i]`.
const PROVIDER_MIGRATIONS: &[&str] = &[
    "
    CREATE TABLE leases (
        id BLOB PRIMARY KEY NOT NULL CHECK (length(id) = 16),
        requestor BLOB NOT NULL,
        state TEXT NOT NULL,
        vcpus INTEGER NOT NULL,
        memory_mib INTEGER NOT NULL,
        disk_gib INTEGER NOT NULL,
        image_name TEXT NOT NULL,
        image_sha256 BLOB NOT NULL,
        ssh_user TEXT NOT NULL,
        ssh_public_key BLOB NOT NULL,
        host_key_seed BLOB NOT NULL,
        slot INTEGER NOT NULL,
        price_per_hour_micros INTEGER NOT NULL,
        currency TEXT NOT NULL,
        requested_at_unix_ms INTEGER NOT NULL,
        started_at_unix_ms INTEGER,
        ends_at_unix_ms INTEGER NOT NULL,
        request_digest BLOB NOT NULL,
        request BLOB NOT NULL,
        detail TEXT NOT NULL,
        isolated INTEGER NOT NULL
    ) STRICT;
    -- Two live leases never share a slot, whatever the code above does.
    CREATE UNIQUE INDEX leases_live_slot ON leases (slot) WHERE state NOT IN ('ended', 'failed');
    CREATE INDEX leases_requested_at ON leases (requested_at_unix_ms);
    CREATE TABLE lease_transitions (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        lease_id BLOB NOT NULL REFERENCES leases (id),
        at_unix_ms INTEGER NOT NULL,
        state TEXT NOT NULL,
        detail TEXT NOT NULL
    ) STRICT;
    CREATE INDEX lease_transitions_lease ON lease_transitions (lease_id, seq);
    CREATE TABLE seen_nonces (
        requestor BLOB NOT NULL,
        nonce BLOB NOT NULL,
        expires_unix_ms INTEGER NOT NULL,
        PRIMARY KEY (requestor, nonce)
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX seen_nonces_expiry ON seen_nonces (expires_unix_ms);
    CREATE TABLE blocked_peers (
        peer BLOB PRIMARY KEY NOT NULL,
        reason TEXT NOT NULL,
        blocked_at_unix_ms INTEGER NOT NULL
    ) STRICT;
",
    "
    -- the guest ports a lease exposes, comma-separated (docs/architecture.md, \"Exposed ports\")
    ALTER TABLE leases ADD COLUMN expose TEXT NOT NULL DEFAULT '';
",
];

const LEASE_COLUMNS: &str = "id, requestor, state, vcpus, memory_mib, disk_gib, image_name, image_sha256, ssh_user, \
     ssh_public_key, host_key_seed, slot, price_per_hour_micros, currency, requested_at_unix_ms, started_at_unix_ms, \
     ends_at_unix_ms, request_digest, request, detail, isolated, expose";

/// The operator's blocked requestors.
const BLOCKED: BlockTable = BlockTable { table: "blocked_peers", at_column: "blocked_at_unix_ms" };

/// Leases whose slot is held: neither ended nor failed.
const LIVE: &str = "state NOT IN ('ended', 'failed')";

impl From<DbError> for TxError<DbError> {
    fn from(e: DbError) -> Self {
        TxError::Other(e)
    }
}

impl ProviderDb {
    /// Opens (creating it 0600 if missing) the store at `path` and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Self, DbError> {
        Ok(ProviderDb { db: PrivateSqlite::open::<DbError>(path, PROVIDER_MIGRATIONS)? })
    }

    pub fn path(&self) -> &Path {
        self.db.path()
    }

    /// One transaction: refuses (`Replay`) if (requestor, nonce) was seen or the lease id
    /// exists; allocates the lowest slot in `0..max_slots` not held by a live lease
    /// (`NoSlot` if none); stores the nonce (kept until `nonce_expires_unix_ms`) and the
    /// lease in state `Requested` (whatever `record.state` and `record.slot` say); appends
    /// a transition. Returns the slot.
    pub fn admit(
        &self,
        record: &LeaseRecord,
        nonce: [u8; 16],
        nonce_expires_unix_ms: u64,
        max_slots: u32,
        now_unix_ms: u64,
    ) -> Result<u32, DbError> {
        let expires = to_i64("nonce_expires_unix_ms", nonce_expires_unix_ms)?;
        let now = to_i64("now_unix_ms", now_unix_ms)?;
        let memory_mib = to_i64("memory_mib", record.spec.memory_mib)?;
        let disk_gib = to_i64("disk_gib", record.spec.disk_gib)?;
        let price = to_i64("price_per_hour_micros", record.price_per_hour_micros)?;
        let requested_at = to_i64("requested_at_unix_ms", record.requested_at_unix_ms)?;
        let started_at = record.started_at_unix_ms.map(|v| to_i64("started_at_unix_ms", v)).transpose()?;
        let ends_at = to_i64("ends_at_unix_ms", record.ends_at_unix_ms)?;
        let requestor = record.requestor.to_bytes();
        let state = LeaseState::as_str(LeaseState::Requested);
        self.db.run(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let nonce_seen: bool = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM seen_nonces WHERE requestor = ?1 AND nonce = ?2)",
                params![requestor, nonce],
                |row| row.get(0),
            )?;
            if nonce_seen {
                return Err(DbError::Replay { what: "nonce" }.into());
            }
            let id_seen: bool =
                tx.query_row("SELECT EXISTS (SELECT 1 FROM leases WHERE id = ?1)", [record.id.0], |row| row.get(0))?;
            if id_seen {
                return Err(DbError::Replay { what: "lease id" }.into());
            }
            let slot = lowest_free_slot(&tx, max_slots)?;
            tx.execute(
                "INSERT INTO seen_nonces (requestor, nonce, expires_unix_ms) VALUES (?1, ?2, ?3)",
                params![requestor, nonce, expires],
            )?;
            tx.execute(
                &format!(
                    "INSERT INTO leases ({LEASE_COLUMNS}) VALUES \
                     (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22)"
                ),
                params![
                    record.id.0,
                    requestor,
                    state,
                    record.spec.vcpus,
                    memory_mib,
                    disk_gib,
                    record.spec.image_name,
                    record.spec.image_sha256,
                    record.ssh_user,
                    record.ssh_public_key,
                    record.host_key_seed,
                    slot,
                    price,
                    record.currency,
                    requested_at,
                    started_at,
                    ends_at,
                    record.request_digest,
                    record.request,
                    record.detail,
                    record.isolated,
                    record.spec.expose.iter().map(u16::to_string).collect::<Vec<_>>().join(","),
                ],
            )?;
            append_transition(&tx, &record.id, now, state, "")?;
            tx.commit()?;
            Ok(slot)
        })
    }

    /// Records (requestor, nonce) of a control message; `Replay` if it was seen before.
    pub fn record_nonce(&self, requestor: &PeerId, nonce: [u8; 16], expires_unix_ms: u64) -> Result<(), DbError> {
        let expires = to_i64("expires_unix_ms", expires_unix_ms)?;
        let requestor = requestor.to_bytes();
        self.db.run(|conn| {
            let inserted = conn.execute(
                "INSERT INTO seen_nonces (requestor, nonce, expires_unix_ms) VALUES (?1, ?2, ?3) \
                 ON CONFLICT DO NOTHING",
                params![requestor, nonce, expires],
            )?;
            if inserted == 0 {
                return Err(DbError::Replay { what: "nonce" }.into());
            }
            Ok(())
        })
    }

    /// Forgets nonces that expired before `now_unix_ms`; returns how many.
    pub fn prune_nonces(&self, now_unix_ms: u64) -> Result<usize, DbError> {
        let now = to_i64("now_unix_ms", now_unix_ms)?;
        self.db.run(|conn| Ok(conn.execute("DELETE FROM seen_nonces WHERE expires_unix_ms < ?1", [now])?))
    }

    /// Moves the lease to `state` with `detail` and appends a transition. A lease that
    /// ended or failed may only move to `Ended` or `Failed` again (`Finished` otherwise).
    pub fn set_state(&self, id: &LeaseId, state: LeaseState, detail: &str, now_unix_ms: u64) -> Result<(), DbError> {
        let now = to_i64("now_unix_ms", now_unix_ms)?;
        self.db.run(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            check_may_become(&tx, id, state)?;
            tx.execute(
                "UPDATE leases SET state = ?2, detail = ?3 WHERE id = ?1",
                params![id.0, LeaseState::as_str(state), detail],
            )?;
            append_transition(&tx, id, now, LeaseState::as_str(state), detail)?;
            tx.commit()?;
            Ok(())
        })
    }

    /// Moves the lease to `Running` with its start and end times; appends a transition.
    pub fn set_running(
        &self,
        id: &LeaseId,
        started_at_unix_ms: u64,
        ends_at_unix_ms: u64,
        now_unix_ms: u64,
    ) -> Result<(), DbError> {
        let started_at = to_i64("started_at_unix_ms", started_at_unix_ms)?;
        let ends_at = to_i64("ends_at_unix_ms", ends_at_unix_ms)?;
        let now = to_i64("now_unix_ms", now_unix_ms)?;
        let running = LeaseState::as_str(LeaseState::Running);
        self.db.run(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            check_may_become(&tx, id, LeaseState::Running)?;
            tx.execute(
                "UPDATE leases SET state = ?2, started_at_unix_ms = ?3, ends_at_unix_ms = ?4 WHERE id = ?1",
                params![id.0, running, started_at, ends_at],
            )?;
            append_transition(&tx, id, now, running, "")?;
            tx.commit()?;
            Ok(())
        })
    }

    pub fn set_ends_at(&self, id: &LeaseId, ends_at_unix_ms: u64) -> Result<(), DbError> {
        let ends_at = to_i64("ends_at_unix_ms", ends_at_unix_ms)?;
        self.update_one(id, "UPDATE leases SET ends_at_unix_ms = ?2 WHERE id = ?1", ends_at)
    }

    /// Whether the lease's network isolation is in place.
    pub fn set_isolated(&self, id: &LeaseId, isolated: bool) -> Result<(), DbError> {
        self.update_one(id, "UPDATE leases SET isolated = ?2 WHERE id = ?1", isolated)
    }

    fn update_one(&self, id: &LeaseId, sql: &str, value: impl rusqlite::ToSql) -> Result<(), DbError> {
        self.db.run(|conn| {
            if conn.execute(sql, params![id.0, value])? == 0 {
                return Err(DbError::UnknownLease(*id).into());
            }
            Ok(())
        })
    }

    pub fn get(&self, id: &LeaseId) -> Result<Option<LeaseRecord>, DbError> {
        let mut leases = self.query_leases(&format!("SELECT {LEASE_COLUMNS} FROM leases WHERE id = ?1"), [id.0])?;
        Ok(leases.pop())
    }

    /// Leases neither ended nor failed, oldest first.
    pub fn active(&self) -> Result<Vec<LeaseRecord>, DbError> {
        self.query_leases(
            &format!("SELECT {LEASE_COLUMNS} FROM leases WHERE {LIVE} ORDER BY requested_at_unix_ms, rowid"),
            [],
        )
    }

    /// The `limit` most recent leases, newest first.
    pub fn list(&self, limit: usize) -> Result<Vec<LeaseRecord>, DbError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.query_leases(
            &format!("SELECT {LEASE_COLUMNS} FROM leases ORDER BY requested_at_unix_ms DESC, rowid DESC LIMIT ?1"),
            [limit],
        )
    }

    fn query_leases(&self, sql: &str, params: impl rusqlite::Params) -> Result<Vec<LeaseRecord>, DbError> {
        self.db.run(|conn| {
            let mut stmt = conn.prepare(sql)?;
            let mut rows = stmt.query(params)?;
            let mut out = Vec::new();
            while let Some(row) = rows.next()? {
                out.push(decode_lease(row)?);
            }
            Ok(out)
        })
    }

    /// The lease's state changes in the order they happened: (time, state, detail).
    /// Empty for an unknown lease.
    pub fn transitions(&self, id: &LeaseId) -> Result<Vec<(u64, LeaseState, String)>, DbError> {
        self.db.run(|conn| {
            let mut stmt = conn
                .prepare("SELECT at_unix_ms, state, detail FROM lease_transitions WHERE lease_id = ?1 ORDER BY seq")?;
            let mut rows = stmt.query([id.0])?;
            let mut out = Vec::new();
            while let Some(row) = rows.next()? {
                let decoded = (|| {
                    let at = column_u64(row, "at_unix_ms")?;
                    let state = column_state(row, "state")?;
                    Ok::<_, String>((at, state, column(row, "detail")?))
                })();
                out.push(decoded.map_err(|problem| DbError::Corrupt(format!("lease {id} transition: {problem}")))?);
            }
            Ok(out)
        })
    }

    /// Blocks `peer` (or updates the reason of an existing block).
    pub fn block(&self, peer: &PeerId, reason: &str, now_unix_ms: u64) -> Result<(), DbError> {
        let now = to_i64("now_unix_ms", now_unix_ms)?;
        self.db.run(|conn| BLOCKED.block(conn, peer, reason, now))
    }

    /// Lifts a block; false if `peer` was not blocked.
    pub fn unblock(&self, peer: &PeerId) -> Result<bool, DbError> {
        self.db.run(|conn| BLOCKED.unblock(conn, peer))
    }

    pub fn is_blocked(&self, peer: &PeerId) -> Result<bool, DbError> {
        self.db.run(|conn| BLOCKED.contains(conn, peer))
    }

    /// Every blocked peer with its reason and when it was blocked, oldest block first.
    pub fn blocked(&self) -> Result<Vec<BlockEntry>, DbError> {
        self.db.run(|conn| BLOCKED.list(conn, DbError::Corrupt))
    }
}

fn lowest_free_slot(conn: &Connection, max_slots: u32) -> Result<u32, TxError<DbError>> {
    let mut stmt = conn.prepare(&format!("SELECT slot FROM leases WHERE {LIVE}"))?;
    let mut rows = stmt.query([])?;
    let mut held = BTreeSet::new();
    while let Some(row) = rows.next()? {
        // A slot outside u32 cannot collide with one we hand out.
        if let Ok(slot) = row.get::<_, u32>(0) {
            held.insert(slot);
        }
    }
    (0..max_slots).find(|slot| !held.contains(slot)).ok_or(TxError::Other(DbError::NoSlot))
}

fn check_may_become(conn: &Connection, id: &LeaseId, to: LeaseState) -> Result<(), TxError<DbError>> {
    let name: Option<String> =
        conn.query_row("SELECT state FROM leases WHERE id = ?1", [id.0], |row| row.get(0)).optional()?;
    let name = name.ok_or(DbError::UnknownLease(*id))?;
    let state = LeaseState::from_name(&name)
        .ok_or_else(|| DbError::Corrupt(format!("lease {id}: column state: unknown state `{name}`")))?;
    if state.is_finished() && !to.is_finished() {
        return Err(DbError::Finished { id: *id, state, to }.into());
    }
    // Checked in the same immediate transaction as the write, so a terminate that lands
    // between the start path's read and its write cannot be overwritten.
    let from_ok = match to {
        LeaseState::Booting => state == LeaseState::Provisioning,
        LeaseState::Running => matches!(state, LeaseState::Provisioning | LeaseState::Booting),
        _ => true,
    };
    if !from_ok {
        return Err(DbError::Overtaken { id: *id, state, to }.into());
    }
    Ok(())
}

fn append_transition(conn: &Connection, id: &LeaseId, at: i64, state: &str, detail: &str) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO lease_transitions (lease_id, at_unix_ms, state, detail) VALUES (?1, ?2, ?3, ?4)",
        params![id.0, at, state, detail],
    )?;
    Ok(())
}

fn decode_lease(row: &Row<'_>) -> Result<LeaseRecord, DbError> {
    let raw_id: Result<Vec<u8>, String> = column(row, "id");
    let label = match &raw_id {
        Ok(bytes) => hex::encode(bytes),
        Err(_) => "with an unreadable id".to_string(),
    };
    let decoded = (|| {
        let raw_id = raw_id?;
        let id =
            <[u8; 16]>::try_from(raw_id.as_slice()).map_err(|_| format!("id is {} bytes, not 16", raw_id.len()))?;
        Ok::<_, String>(LeaseRecord {
            id: LeaseId(id),
            requestor: column_peer(row, "requestor")?,
            state: column_state(row, "state")?,
            spec: GuestSpec {
                expose: column::<String>(row, "expose")?
                    .split(',')
                    .filter(|p| !p.is_empty())
                    .map(|p| p.parse::<u16>().map_err(|_| format!("expose holds `{p}`, not a port")))
                    .collect::<Result<_, _>>()?,
                vcpus: column(row, "vcpus")?,
                memory_mib: column_u64(row, "memory_mib")?,
                disk_gib: column_u64(row, "disk_gib")?,
                image_name: column(row, "image_name")?,
                image_sha256: column(row, "image_sha256")?,
            },
            ssh_user: column(row, "ssh_user")?,
            ssh_public_key: column(row, "ssh_public_key")?,
            host_key_seed: column(row, "host_key_seed")?,
            slot: column(row, "slot")?,
            price_per_hour_micros: column_u64(row, "price_per_hour_micros")?,
            currency: column(row, "currency")?,
            requested_at_unix_ms: column_u64(row, "requested_at_unix_ms")?,
            started_at_unix_ms: column::<Option<i64>>(row, "started_at_unix_ms")?
                .map(|v| u64::try_from(v).map_err(|_| format!("column started_at_unix_ms: negative value {v}")))
                .transpose()?,
            ends_at_unix_ms: column_u64(row, "ends_at_unix_ms")?,
            request_digest: column(row, "request_digest")?,
            request: column(row, "request")?,
            detail: column(row, "detail")?,
            isolated: column(row, "isolated")?,
        })
    })();
    decoded.map_err(|problem| DbError::Corrupt(format!("lease {label}: {problem}")))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::sqlite::companion_path;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    fn record(id: u8, requestor: PeerId, requested_at_unix_ms: u64) -> LeaseRecord {
        LeaseRecord {
            id: LeaseId([id; 16]),
            requestor,
            state: LeaseState::Running,
            spec: GuestSpec {
                expose: Vec::new(),
                vcpus: 2,
                memory_mib: 2048,
                disk_gib: 20,
                image_name: "debian-12".into(),
                image_sha256: [7; 32],
            },
            ssh_user: "alice".into(),
            ssh_public_key: [8; 32],
            host_key_seed: [0x5c; 32],
            slot: 99,
            price_per_hour_micros: 12_500,
            currency: "EUR".into(),
            requested_at_unix_ms,
            started_at_unix_ms: None,
            ends_at_unix_ms: requested_at_unix_ms + 3_600_000,
            request_digest: [9; 32],
            request: vec![1, 2, 3, 4],
            detail: String::new(),
            isolated: false,
        }
    }

    fn fresh() -> (tempfile::TempDir, ProviderDb) {
        let dir = tempfile::tempdir().unwrap();
        let db = ProviderDb::open(&dir.path().join("provider.db")).unwrap();
        (dir, db)
    }

    #[test]
    fn store_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<ProviderDb>();
    }

    #[test]
    fn admit_then_get_round_trips() {
        let (_dir, db) = fresh();
        let mut rec = record(1, PeerId::random(), 1_000);
        rec.started_at_unix_ms = Some(1_500);
        rec.detail = "note".into();
        rec.isolated = true;
        assert_eq!(db.admit(&rec, [1; 16], 61_000, 8, 1_000).unwrap(), 0);
        let got = db.get(&rec.id).unwrap().unwrap();
        // admit stores the lease as Requested in the slot it allocated.
        let want = LeaseRecord { state: LeaseState::Requested, slot: 0, ..rec };
        assert_eq!(got, want);
        assert!(db.get(&LeaseId([2; 16])).unwrap().is_none());
    }

    #[test]
    fn replayed_nonce_and_lease_id_refused_also_after_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("provider.db");
        let peer = PeerId::random();
        {
            let db = ProviderDb::open(&path).unwrap();
            db.admit(&record(1, peer, 1_000), [1; 16], 61_000, 8, 1_000).unwrap();
            let err = db.admit(&record(2, peer, 1_000), [1; 16], 61_000, 8, 1_000).unwrap_err();
            assert!(matches!(err, DbError::Replay { what: "nonce" }), "{err:?}");
            let err = db.admit(&record(1, peer, 1_000), [2; 16], 61_000, 8, 1_000).unwrap_err();
            assert!(matches!(err, DbError::Replay { what: "lease id" }), "{err:?}");
            // The same nonce from another requestor is a different pair.
            db.admit(&record(3, PeerId::random(), 1_000), [1; 16], 61_000, 8, 1_000).unwrap();
            // A refused admit changed nothing.
            assert!(db.get(&LeaseId([2; 16])).unwrap().is_none());
            assert_eq!(db.transitions(&LeaseId([1; 16])).unwrap().len(), 1);
        }
        let db = ProviderDb::open(&path).unwrap();
        let err = db.admit(&record(4, peer, 2_000), [1; 16], 62_000, 8, 2_000).unwrap_err();
        assert!(matches!(err, DbError::Replay { what: "nonce" }), "{err:?}");
        let err = db.admit(&record(1, PeerId::random(), 2_000), [9; 16], 62_000, 8, 2_000).unwrap_err();
        assert!(matches!(err, DbError::Replay { what: "lease id" }), "{err:?}");
        // Control-message nonces share the table.
        let err = db.record_nonce(&peer, [1; 16], 62_000).unwrap_err();
        assert!(matches!(err, DbError::Replay { what: "nonce" }), "{err:?}");
        db.record_nonce(&peer, [5; 16], 62_000).unwrap();
        drop(db);
        let db = ProviderDb::open(&path).unwrap();
        assert!(matches!(db.record_nonce(&peer, [5; 16], 62_000), Err(DbError::Replay { what: "nonce" })));
    }

    #[test]
    fn slots_lowest_free_reused_after_end_and_bounded() {
        let (_dir, db) = fresh();
        let peer = PeerId::random();
        for n in 0..3u8 {
            assert_eq!(
                db.admit(&record(n, peer, 1_000 + u64::from(n)), [n; 16], 61_000, 3, 1_000).unwrap(),
                u32::from(n)
            );
        }
        let err = db.admit(&record(10, peer, 2_000), [10; 16], 61_000, 3, 2_000).unwrap_err();
        assert!(matches!(err, DbError::NoSlot), "{err:?}");
        assert!(matches!(db.admit(&record(11, peer, 2_000), [11; 16], 61_000, 0, 2_000), Err(DbError::NoSlot)));
        // A refused admit burns neither the nonce nor the lease id.
        db.set_state(&LeaseId([1; 16]), LeaseState::Ended, "expired", 3_000).unwrap();
        assert_eq!(db.admit(&record(10, peer, 3_000), [10; 16], 61_000, 3, 3_000).unwrap(), 1);
        db.set_state(&LeaseId([0; 16]), LeaseState::Failed, "boot timeout", 3_000).unwrap();
        db.set_state(&LeaseId([2; 16]), LeaseState::Stopping, "", 3_000).unwrap();
        assert_eq!(db.admit(&record(12, peer, 3_000), [12; 16], 61_000, 3, 3_000).unwrap(), 0);
        assert!(matches!(db.admit(&record(13, peer, 3_000), [13; 16], 61_000, 3, 3_000), Err(DbError::NoSlot)));
        // More slots configured: the next one up.
        assert_eq!(db.admit(&record(13, peer, 3_000), [13; 16], 61_000, 4, 3_000).unwrap(), 3);
    }

    #[test]
    fn a_lease_stopped_while_it_starts_cannot_become_booting_or_running() {
        let (_dir, db) = fresh();
        let rec = record(1, PeerId::random(), 1_000);
        db.admit(&rec, [1; 16], 61_000, 4, 1_000).unwrap();
        // Not yet provisioning: nothing to boot or run.
        assert!(matches!(db.set_running(&rec.id, 1, 2, 1), Err(DbError::Overtaken { .. })));
        db.set_state(&rec.id, LeaseState::Provisioning, "", 1_100).unwrap();
        db.set_state(&rec.id, LeaseState::Stopping, "terminated by requestor", 1_200).unwrap();
        let err = db.set_state(&rec.id, LeaseState::Booting, "", 1_300).unwrap_err();
        assert!(
            matches!(err, DbError::Overtaken { state: LeaseState::Stopping, to: LeaseState::Booting, .. }),
            "{err}"
        );
        let err = db.set_running(&rec.id, 1_300, 3_601_300, 1_300).unwrap_err();
        assert!(
            matches!(err, DbError::Overtaken { state: LeaseState::Stopping, to: LeaseState::Running, .. }),
            "{err}"
        );
        assert_eq!(db.get(&rec.id).unwrap().unwrap().state, LeaseState::Stopping);
    }

    #[test]
    fn transitions_recorded_in_order() {
        let (_dir, db) = fresh();
        let rec = record(1, PeerId::random(), 1_000);
        db.admit(&rec, [1; 16], 61_000, 4, 1_000).unwrap();
        db.set_state(&rec.id, LeaseState::Provisioning, "", 1_100).unwrap();
        db.set_state(&rec.id, LeaseState::Booting, "", 1_200).unwrap();
        db.set_running(&rec.id, 1_300, 3_601_300, 1_300).unwrap();
        db.set_state(&rec.id, LeaseState::Stopping, "terminated by requestor", 1_400).unwrap();
        db.set_state(&rec.id, LeaseState::Ended, "terminated by requestor", 1_500).unwrap();
        let got = db.transitions(&rec.id).unwrap();
        let want = vec![
            (1_000, LeaseState::Requested, String::new()),
            (1_100, LeaseState::Provisioning, String::new()),
            (1_200, LeaseState::Booting, String::new()),
            (1_300, LeaseState::Running, String::new()),
            (1_400, LeaseState::Stopping, "terminated by requestor".to_string()),
            (1_500, LeaseState::Ended, "terminated by requestor".to_string()),
        ];
        assert_eq!(got, want);
        let stored = db.get(&rec.id).unwrap().unwrap();
        assert_eq!(stored.state, LeaseState::Ended);
        assert_eq!(stored.detail, "terminated by requestor");
        assert_eq!(stored.started_at_unix_ms, Some(1_300));
        assert_eq!(stored.ends_at_unix_ms, 3_601_300);
        assert!(db.transitions(&LeaseId([7; 16])).unwrap().is_empty());
    }

    #[test]
    fn finished_leases_stay_finished() {
        let (_dir, db) = fresh();
        let rec = record(1, PeerId::random(), 1_000);
        db.admit(&rec, [1; 16], 61_000, 4, 1_000).unwrap();
        db.set_state(&rec.id, LeaseState::Ended, "expired", 2_000).unwrap();
        let err = db.set_state(&rec.id, LeaseState::Running, "", 3_000).unwrap_err();
        assert!(matches!(err, DbError::Finished { state: LeaseState::Ended, to: LeaseState::Running, .. }), "{err:?}");
        assert!(matches!(db.set_running(&rec.id, 3_000, 4_000, 3_000), Err(DbError::Finished { .. })));
        // Teardown that fails after the end is still recorded.
        db.set_state(&rec.id, LeaseState::Failed, "teardown: netns busy", 3_000).unwrap();
        assert_eq!(db.transitions(&rec.id).unwrap().len(), 3);
    }

    #[test]
    fn updates_of_unknown_leases_refused() {
        let (_dir, db) = fresh();
        let id = LeaseId([3; 16]);
        assert!(matches!(db.set_state(&id, LeaseState::Failed, "", 1), Err(DbError::UnknownLease(x)) if x == id));
        assert!(matches!(db.set_running(&id, 1, 2, 1), Err(DbError::UnknownLease(_))));
        assert!(matches!(db.set_ends_at(&id, 5), Err(DbError::UnknownLease(_))));
        assert!(matches!(db.set_isolated(&id, true), Err(DbError::UnknownLease(_))));
    }

    #[test]
    fn ends_at_and_isolation_updated() {
        let (_dir, db) = fresh();
        let rec = record(1, PeerId::random(), 1_000);
        db.admit(&rec, [1; 16], 61_000, 4, 1_000).unwrap();
        db.set_ends_at(&rec.id, 9_999_999).unwrap();
        db.set_isolated(&rec.id, true).unwrap();
        let got = db.get(&rec.id).unwrap().unwrap();
        assert_eq!((got.ends_at_unix_ms, got.isolated), (9_999_999, true));
        db.set_isolated(&rec.id, false).unwrap();
        assert!(!db.get(&rec.id).unwrap().unwrap().isolated);
        // Neither is a state change.
        assert_eq!(db.transitions(&rec.id).unwrap().len(), 1);
    }

    #[test]
    fn active_excludes_finished_oldest_first_and_list_newest_first() {
        let (_dir, db) = fresh();
        let peer = PeerId::random();
        for (n, at) in [(1u8, 3_000u64), (2, 1_000), (3, 2_000), (4, 4_000)] {
            db.admit(&record(n, peer, at), [n; 16], 61_000, 8, at).unwrap();
        }
        db.set_state(&LeaseId([3; 16]), LeaseState::Ended, "", 5_000).unwrap();
        db.set_state(&LeaseId([4; 16]), LeaseState::Failed, "", 5_000).unwrap();
        db.set_state(&LeaseId([1; 16]), LeaseState::Provisioning, "", 5_000).unwrap();
        db.set_running(&LeaseId([1; 16]), 5_000, 9_000, 5_000).unwrap();
        let ids = |v: Vec<LeaseRecord>| v.into_iter().map(|r| r.id.0[0]).collect::<Vec<_>>();
        assert_eq!(ids(db.active().unwrap()), vec![2, 1]);
        assert_eq!(ids(db.list(10).unwrap()), vec![4, 1, 3, 2]);
        assert_eq!(ids(db.list(2).unwrap()), vec![4, 1]);
        assert!(db.list(0).unwrap().is_empty());
    }

    #[test]
    fn block_and_unblock() {
        let (_dir, db) = fresh();
        let (a, b) = (PeerId::random(), PeerId::random());
        assert!(!db.is_blocked(&a).unwrap());
        db.block(&a, "spam", 1_000).unwrap();
        db.block(&b, "abuse", 2_000).unwrap();
        assert!(db.is_blocked(&a).unwrap() && db.is_blocked(&b).unwrap());
        let entry = |peer, reason: &str, at_unix_ms| BlockEntry { peer, reason: reason.into(), at_unix_ms };
        assert_eq!(db.blocked().unwrap(), vec![entry(a, "spam", 1_000), entry(b, "abuse", 2_000)]);
        db.block(&a, "more spam", 3_000).unwrap();
        assert_eq!(db.blocked().unwrap(), vec![entry(b, "abuse", 2_000), entry(a, "more spam", 3_000)]);
        assert!(db.unblock(&a).unwrap());
        assert!(!db.unblock(&a).unwrap());
        assert!(!db.is_blocked(&a).unwrap());
        assert_eq!(db.blocked().unwrap().len(), 1);
    }

    #[test]
    fn prune_removes_only_expired_nonces() {
        let (_dir, db) = fresh();
        let peer = PeerId::random();
        db.record_nonce(&peer, [1; 16], 1_000).unwrap();
        db.record_nonce(&peer, [2; 16], 2_000).unwrap();
        db.admit(&record(1, peer, 500), [3; 16], 3_000, 4, 500).unwrap();
        assert_eq!(db.prune_nonces(1_000).unwrap(), 0);
        assert_eq!(db.prune_nonces(2_001).unwrap(), 2);
        db.record_nonce(&peer, [1; 16], 9_000).unwrap();
        assert!(matches!(db.record_nonce(&peer, [3; 16], 9_000), Err(DbError::Replay { .. })));
        // A pruned admit nonce never lets its lease id through again.
        assert_eq!(db.prune_nonces(10_000).unwrap(), 2);
        assert!(matches!(
            db.admit(&record(1, peer, 500), [3; 16], 20_000, 4, 500),
            Err(DbError::Replay { what: "lease id" })
        ));
    }

    #[test]
    fn values_over_i64_refused_not_wrapped() {
        let (_dir, db) = fresh();
        let mut rec = record(1, PeerId::random(), 1_000);
        rec.price_per_hour_micros = u64::MAX;
        let err = db.admit(&rec, [1; 16], 61_000, 4, 1_000).unwrap_err();
        assert!(matches!(err, DbError::TooLarge(TooLarge { field: "price_per_hour_micros", .. })), "{err:?}");
        assert!(db.get(&rec.id).unwrap().is_none());
        rec.price_per_hour_micros = i64::MAX as u64;
        db.admit(&rec, [1; 16], 61_000, 4, 1_000).unwrap();
        assert_eq!(db.get(&rec.id).unwrap().unwrap().price_per_hour_micros, i64::MAX as u64);
        assert!(matches!(db.set_ends_at(&rec.id, 1 << 63), Err(DbError::TooLarge(_))));
    }

    #[test]
    fn corrupt_rows_are_errors_naming_the_lease() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("provider.db");
        let db = ProviderDb::open(&path).unwrap();
        let rec = record(0xab, PeerId::random(), 1_000);
        db.admit(&rec, [1; 16], 61_000, 4, 1_000).unwrap();
        drop(db);
        let raw = Connection::open(&path).unwrap();
        raw.execute("UPDATE leases SET state = 'exploded'", []).unwrap();
        drop(raw);
        let db = ProviderDb::open(&path).unwrap();
        let err = db.get(&rec.id).unwrap_err();
        assert!(matches!(&err, DbError::Corrupt(m) if m.contains(&rec.id.to_hex()) && m.contains("exploded")), "{err}");
        assert!(matches!(db.active(), Err(DbError::Corrupt(_))));
        drop(db);
        let raw = Connection::open(&path).unwrap();
        raw.execute("UPDATE leases SET state = 'running', ssh_public_key = x'0102', ends_at_unix_ms = -5", []).unwrap();
        drop(raw);
        let db = ProviderDb::open(&path).unwrap();
        let err = db.list(5).unwrap_err().to_string();
        assert!(err.contains(&rec.id.to_hex()) && err.contains("ssh_public_key"), "{err}");
    }

    #[test]
    fn db_wal_and_shm_are_0600() {
        let (dir, db) = fresh();
        db.admit(&record(1, PeerId::random(), 1_000), [1; 16], 61_000, 4, 1_000).unwrap();
        db.block(&PeerId::random(), "x", 1).unwrap();
        let path = dir.path().join("provider.db");
        let (wal, shm) = (companion_path(&path, "-wal"), companion_path(&path, "-shm"));
        // Present while the connection is open; SQLite gave them the main file's mode.
        assert!(wal.exists() && shm.exists());
        for file in [&path, &wal, &shm] {
            assert_eq!(mode(file), 0o600, "{}", file.display());
        }
        let journal_mode: String = db
            .db
            .run(|c| Ok::<_, TxError<DbError>>(c.pragma_query_value(None, "journal_mode", |r| r.get(0))?))
            .unwrap();
        assert_eq!(journal_mode, "wal");
        let sync: i64 =
            db.db.run(|c| Ok::<_, TxError<DbError>>(c.pragma_query_value(None, "synchronous", |r| r.get(0))?)).unwrap();
        assert_eq!(sync, 2, "synchronous=FULL");
    }

    /// Why the companions above are 0600: SQLite gives `-wal` and `-shm` the main file's
    /// mode, whatever the umask. A distinctive 0640 main file shows it.
    #[test]
    fn sqlite_copies_the_main_file_mode_to_wal_and_shm() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plain.db");
        std::fs::write(&path, b"").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let raw = Connection::open(&path).unwrap();
        let _: String = raw.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0)).unwrap();
        raw.execute_batch("CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (1);").unwrap();
        for suffix in ["-wal", "-shm"] {
            assert_eq!(mode(&companion_path(&path, suffix)), 0o640, "{suffix}");
        }
    }

    #[test]
    fn open_db_files_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("provider.db");
        drop(ProviderDb::open(&path).unwrap());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = ProviderDb::open(&path).err().unwrap();
        assert!(
            matches!(&err, DbError::Fs(SecureFsError::TooOpen { path: p, mode: 0o644, .. }) if *p == path),
            "{err}"
        );
        assert!(err.to_string().contains(&path.display().to_string()), "{err}");

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let wal = companion_path(&path, "-wal");
        std::fs::write(&wal, b"").unwrap();
        std::fs::set_permissions(&wal, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = ProviderDb::open(&path).err().unwrap();
        assert!(matches!(&err, DbError::Fs(SecureFsError::TooOpen { path: p, .. }) if *p == wal), "{err}");
        std::fs::remove_file(&wal).unwrap();
        ProviderDb::open(&path).unwrap();
    }

    #[test]
    fn schema_versioned_and_newer_schema_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("provider.db");
        drop(ProviderDb::open(&path).unwrap());
        let raw = Connection::open(&path).unwrap();
        let version: i64 = raw.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
        assert_eq!(version, PROVIDER_MIGRATIONS.len() as i64);
        raw.pragma_update(None, "user_version", 7).unwrap();
        drop(raw);
        let err = ProviderDb::open(&path).err().unwrap();
        assert!(matches!(err, DbError::Unusable(UnusableDb::UnknownSchema { found: 7, supported: 2, .. })), "{err}");
    }

    #[test]
    fn debug_does_not_leak_the_host_key_seed() {
        let rec = record(1, PeerId::random(), 1_000);
        let shown = format!("{rec:?} {rec:#?}");
        assert!(!shown.contains(&hex::encode(rec.host_key_seed)), "{shown}");
        assert!(!shown.contains(&format!("{:?}", rec.host_key_seed)), "{shown}");
        assert!(!shown.contains("92, 92"), "{shown}");
        assert!(shown.contains("<redacted>") && shown.contains("alice"), "{shown}");
    }
}
