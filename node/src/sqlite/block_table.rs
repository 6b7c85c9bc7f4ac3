//! A table of blocked peers, each with a reason and the time of the block. The provider's
//! blocked requestors (`blocked_peers`) and a requestor's blocked providers
//! (`blocked_providers`) are both kept this way; their tables differ only in names, which
//! stay as the files on disk have them.

use libp2p::PeerId;
use rusqlite::{Connection, params};

use super::{TxError, column, column_peer, column_u64};

/// One blocked peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockEntry {
    pub peer: PeerId,
    pub reason: String,
    pub at_unix_ms: u64,
}

/// Where a store keeps its blocks: the table and the name of its time column (`peer`
/// and `reason` are the same everywhere).
pub(crate) struct BlockTable {
    pub table: &'static str,
    pub at_column: &'static str,
}

impl BlockTable {
    /// Blocks `peer`, or updates the reason and time of an existing block.
    pub(crate) fn block<E>(&self, conn: &Connection, peer: &PeerId, reason: &str, at: i64) -> Result<(), TxError<E>> {
        let Self { table, at_column: at_col } = self;
        conn.execute(
            &format!(
                "INSERT INTO {table} (peer, reason, {at_col}) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (peer) DO UPDATE SET reason = excluded.reason, {at_col} = excluded.{at_col}"
            ),
            params![peer.to_bytes(), reason, at],
        )?;
        Ok(())
    }

    /// Lifts a block; false when `peer` was not blocked.
    pub(crate) fn unblock<E>(&self, conn: &Connection, peer: &PeerId) -> Result<bool, TxError<E>> {
        Ok(conn.execute(&format!("DELETE FROM {} WHERE peer = ?1", self.table), [peer.to_bytes()])? > 0)
    }

    pub(crate) fn contains<E>(&self, conn: &Connection, peer: &PeerId) -> Result<bool, TxError<E>> {
        let sql = format!("SELECT EXISTS (SELECT 1 FROM {} WHERE peer = ?1)", self.table);
        Ok(conn.query_row(&sql, [peer.to_bytes()], |row| row.get(0))?)
    }

    /// Every block, oldest first; a row that does not decode is `corrupt(problem)`.
    pub(crate) fn list<E>(
        &self,
        conn: &Connection,
        corrupt: impl Fn(String) -> E,
    ) -> Result<Vec<BlockEntry>, TxError<E>> {
        let Self { table, at_column } = self;
        let mut stmt =
            conn.prepare(&format!("SELECT peer, reason, {at_column} FROM {table} ORDER BY {at_column}, peer"))?;
        let mut rows = stmt.query([])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            let decoded = (|| {
                Ok::<_, String>(BlockEntry {
                    peer: column_peer(row, "peer")?,
                    reason: column(row, "reason")?,
                    at_unix_ms: column_u64(row, at_column)?,
                })
            })();
            out.push(decoded.map_err(|problem| TxError::Other(corrupt(format!("blocked peer: {problem}"))))?);
        }
        Ok(out)
    }
}
