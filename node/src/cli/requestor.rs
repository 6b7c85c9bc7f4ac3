//! The requestor's local state as the commands open it: its identity and its store.

use std::collections::HashSet;
use std::path::Path;

use libp2p::PeerId;
use peervm_node::requestor::client::Requestor;
use peervm_node::requestor::db::RequestorDb;

use super::identity::load_or_init_key;

pub fn open(data_dir: &Path) -> anyhow::Result<Requestor> {
    let key = load_or_init_key(&peervm_node::paths::identity_key_path(data_dir))?;
    Ok(Requestor::open(key, data_dir)?)
}

pub fn db(data_dir: &Path) -> anyhow::Result<RequestorDb> {
    peervm_node::secure_fs::ensure_private_dir(data_dir)?;
    Ok(RequestorDb::open(&data_dir.join("requestor.db"))?)
}

/// The providers this requestor blocked (none when it never stored anything).
pub fn blocked_providers(data_dir: &Path) -> anyhow::Result<HashSet<PeerId>> {
    if !data_dir.join("requestor.db").exists() {
        return Ok(HashSet::new());
    }
    Ok(db(data_dir)?.blocked()?.into_iter().map(|b| b.peer).collect())
}
