//! The admin socket's messages: one JSON request per line, one JSON reply per line.
//!
//! A request is `{"cmd":"<name>", ..arguments}`; a reply is `{"ok":true,"result":..}` or
//! `{"ok":false,"error":".."}`. The objects inside `result` have their keys in sorted
//! order (they were built as `serde_json::Value`, whose maps are sorted, before these
//! types existed); `peervm provider ... --json` prints `result` as it came, so scripts
//! see the same bytes. [`AdminResult::to_json`] is that one rule.

use peervm_protocol::{LeaseState, ResourceAmounts};
use serde::{Deserialize, Serialize};

use crate::provider::lease::db::LeaseRecord;
use crate::provider::reachability::PortReport;
use crate::sqlite::block_table::BlockEntry;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum AdminRequest {
    Status,
    Leases,
    Terminate {
        lease: String,
    },
    Isolate {
        lease: String,
    },
    Block {
        peer: String,
        reason: String,
    },
    Unblock {
        peer: String,
    },
    Blocked,
    Lock,
    Unlock,
    PublishBlocklist,
    /// Re-read the provider's config file, as SIGHUP does.
    Reload,
}

impl AdminRequest {
    /// The `cmd` of this request, as the audit log records it.
    pub fn name(&self) -> &'static str {
        match self {
            AdminRequest::Status => "status",
            AdminRequest::Leases => "leases",
            AdminRequest::Terminate { .. } => "terminate",
            AdminRequest::Isolate { .. } => "isolate",
            AdminRequest::Block { .. } => "block",
            AdminRequest::Unblock { .. } => "unblock",
            AdminRequest::Blocked => "blocked",
            AdminRequest::Lock => "lock",
            AdminRequest::Unlock => "unlock",
            AdminRequest::PublishBlocklist => "publish_blocklist",
            AdminRequest::Reload => "reload",
        }
    }
}

/// What `status` reports besides the leases.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub peer_id: String,
    pub listen_addrs: Vec<String>,
    pub accel: String,
}

/// `status`: the node, its capacity and the last port verification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    pub node: NodeInfo,
    pub locked: bool,
    pub leases_active: usize,
    pub total: ResourceAmounts,
    pub free: ResourceAmounts,
    /// `null` until a peer has dialed the provider back.
    pub reachability: Option<PortReport>,
}

/// One state change of a lease, as the provider committed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    pub at_unix_ms: u64,
    pub state: LeaseState,
    pub detail: String,
}

/// `leases`: one lease the provider knows, without its secrets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseEntry {
    pub lease: String,
    pub requestor: String,
    pub state: LeaseState,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    pub image: String,
    pub slot: u32,
    pub price_per_hour_micros: u64,
    pub currency: String,
    pub requested_at_unix_ms: u64,
    pub started_at_unix_ms: Option<u64>,
    pub ends_at_unix_ms: u64,
    pub isolated: bool,
    pub detail: String,
    pub transitions: Vec<Transition>,
}

impl LeaseEntry {
    pub fn new(r: &LeaseRecord, transitions: Vec<Transition>) -> Self {
        LeaseEntry {
            lease: r.id.to_hex(),
            requestor: r.requestor.to_string(),
            state: r.state,
            vcpus: r.spec.vcpus,
            memory_mib: r.spec.memory_mib,
            disk_gib: r.spec.disk_gib,
            image: r.spec.image_name.clone(),
            slot: r.slot,
            price_per_hour_micros: r.price_per_hour_micros,
            currency: r.currency.clone(),
            requested_at_unix_ms: r.requested_at_unix_ms,
            started_at_unix_ms: r.started_at_unix_ms,
            ends_at_unix_ms: r.ends_at_unix_ms,
            isolated: r.isolated,
            detail: r.detail.clone(),
            transitions,
        }
    }
}

/// `terminate`: the lease that ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Terminated {
    pub terminated: String,
}

/// `isolate`: the lease cut off the network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Isolated {
    pub isolated: String,
}

/// `block`: the blocked peer and the leases of it that were ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blocked {
    pub blocked: String,
    pub ended_leases: Vec<String>,
}

/// `unblock`: the peer, and whether it was blocked at all.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unblocked {
    pub unblocked: String,
    pub was_blocked: bool,
}

/// `blocked`: one entry of the provider's block list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockedPeer {
    pub peer: String,
    pub reason: String,
    pub at_unix_ms: u64,
}

impl From<&BlockEntry> for BlockedPeer {
    fn from(b: &BlockEntry) -> Self {
        BlockedPeer { peer: b.peer.to_string(), reason: b.reason.clone(), at_unix_ms: b.at_unix_ms }
    }
}

/// `publish_blocklist`: what the signed list held.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    pub published_entries: usize,
    pub seq: u64,
}

/// `lock` and `unlock`: the state now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockState {
    pub locked: bool,
}

/// `reload`: the config fields that changed and applied, and the seq of the advert that
/// carries them (`null` when nothing changed, or the provider is locked and signs none).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reloaded {
    pub changed: Vec<String>,
    pub advert_seq: Option<u64>,
}

/// The `result` of a successful call, one variant per request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum AdminResult {
    Status(StatusReport),
    Leases(Vec<LeaseEntry>),
    Terminated(Terminated),
    Isolated(Isolated),
    Blocked(Blocked),
    Unblocked(Unblocked),
    BlockList(Vec<BlockedPeer>),
    Published(Published),
    Lock(LockState),
    Reloaded(Reloaded),
}

impl AdminResult {
    /// The result's JSON as it goes on the wire and to `--json`: every object's keys in
    /// sorted order (see the module comment).
    pub fn to_json(&self) -> serde_json::Value {
        // Plain structs, strings and integers: serializing them cannot fail.
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }

    /// Reads the `result` of a reply to `request`: its JSON alone does not tell `lock`
    /// from `unlock`, or `leases` from `blocked` when both are empty.
    pub fn decode(request: &AdminRequest, result: serde_json::Value) -> Result<AdminResult, serde_json::Error> {
        use serde_json::from_value;
        Ok(match request {
            AdminRequest::Status => AdminResult::Status(from_value(result)?),
            AdminRequest::Leases => AdminResult::Leases(from_value(result)?),
            AdminRequest::Terminate { .. } => AdminResult::Terminated(from_value(result)?),
            AdminRequest::Isolate { .. } => AdminResult::Isolated(from_value(result)?),
            AdminRequest::Block { .. } => AdminResult::Blocked(from_value(result)?),
            AdminRequest::Unblock { .. } => AdminResult::Unblocked(from_value(result)?),
            AdminRequest::Blocked => AdminResult::BlockList(from_value(result)?),
            AdminRequest::PublishBlocklist => AdminResult::Published(from_value(result)?),
            AdminRequest::Lock | AdminRequest::Unlock => AdminResult::Lock(from_value(result)?),
            AdminRequest::Reload => AdminResult::Reloaded(from_value(result)?),
        })
    }
}

/// One reply line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminReply {
    Ok(AdminResult),
    /// The call was refused or failed; the message is for the operator.
    Err(String),
}

impl AdminReply {
    pub fn err(e: impl std::fmt::Display) -> Self {
        AdminReply::Err(e.to_string())
    }

    pub fn is_ok(&self) -> bool {
        matches!(self, AdminReply::Ok(_))
    }

    pub fn error(&self) -> Option<&str> {
        match self {
            AdminReply::Ok(_) => None,
            AdminReply::Err(e) => Some(e),
        }
    }

    /// The reply line, without its newline.
    pub fn to_line(&self) -> String {
        let wire = match self {
            AdminReply::Ok(result) => WireReply { ok: true, error: None, result: Some(result.to_json()) },
            AdminReply::Err(e) => WireReply { ok: false, error: Some(e.clone()), result: None },
        };
        serde_json::to_string(&wire).unwrap_or_else(|_| "{\"ok\":false}".into())
    }

    /// Reads a reply line to `request`. A refusal without a message (which no provider
    /// sends) reads as "the provider refused".
    pub fn from_line(request: &AdminRequest, line: &str) -> Result<AdminReply, serde_json::Error> {
        let wire: WireReply = serde_json::from_str(line)?;
        if !wire.ok {
            return Ok(AdminReply::Err(wire.error.unwrap_or_else(|| "the provider refused".into())));
        }
        let result = wire.result.unwrap_or(serde_json::Value::Null);
        Ok(AdminReply::Ok(AdminResult::decode(request, result)?))
    }
}

/// The reply's envelope on the wire: `ok`, then `error` or `result`.
#[derive(Serialize, Deserialize)]
struct WireReply {
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    result: Option<serde_json::Value>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::dialback::PortState;
    use crate::provider::reachability::{PortKind, PortProbe};

    const PEER: &str = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN";
    const LEASE: &str = "00112233445566778899aabbccddeeff";

    fn amounts(vcpus: u32) -> ResourceAmounts {
        ResourceAmounts { vcpus, memory_mib: 4096, disk_gib: 20 }
    }

    fn ok_line(result: AdminResult) -> String {
        AdminReply::Ok(result).to_line()
    }

    /// The reply line and the `--json` output of `request`'s `result`, checked against the
    /// JSON the provider has always sent, and read back to the same value.
    fn assert_wire(request: AdminRequest, result: AdminResult, json: &str) {
        let line = ok_line(result.clone());
        assert_eq!(line, format!("{{\"ok\":true,\"result\":{json}}}"));
        assert_eq!(result.to_json().to_string(), json);
        assert_eq!(AdminReply::from_line(&request, &line).unwrap(), AdminReply::Ok(result));
    }

    #[test]
    fn requests_are_tagged_by_cmd() {
        let cases = [
            (AdminRequest::Status, r#"{"cmd":"status"}"#),
            (AdminRequest::Leases, r#"{"cmd":"leases"}"#),
            (
                AdminRequest::Terminate { lease: LEASE.into() },
                r#"{"cmd":"terminate","lease":"00112233445566778899aabbccddeeff"}"#,
            ),
            (
                AdminRequest::Isolate { lease: LEASE.into() },
                r#"{"cmd":"isolate","lease":"00112233445566778899aabbccddeeff"}"#,
            ),
            (
                AdminRequest::Block { peer: "p".into(), reason: "abuse".into() },
                r#"{"cmd":"block","peer":"p","reason":"abuse"}"#,
            ),
            (AdminRequest::Unblock { peer: "p".into() }, r#"{"cmd":"unblock","peer":"p"}"#),
            (AdminRequest::Blocked, r#"{"cmd":"blocked"}"#),
            (AdminRequest::Lock, r#"{"cmd":"lock"}"#),
            (AdminRequest::Unlock, r#"{"cmd":"unlock"}"#),
            (AdminRequest::PublishBlocklist, r#"{"cmd":"publish_blocklist"}"#),
            (AdminRequest::Reload, r#"{"cmd":"reload"}"#),
        ];
        for (request, json) in cases {
            assert_eq!(serde_json::to_string(&request).unwrap(), json);
            assert_eq!(serde_json::from_str::<AdminRequest>(json).unwrap(), request);
            assert!(json.starts_with(&format!("{{\"cmd\":\"{}\"", request.name())), "{json}");
        }
        assert!(serde_json::from_str::<AdminRequest>(r#"{"cmd":"reboot"}"#).is_err());
        assert!(serde_json::from_str::<AdminRequest>(r#"{"cmd":"terminate"}"#).is_err());
    }

    #[test]
    fn status_reply() {
        let mut status = StatusReport {
            node: NodeInfo {
                peer_id: PEER.into(),
                listen_addrs: vec!["/ip4/127.0.0.1/tcp/4001".into()],
                accel: "tcg".into(),
            },
            locked: false,
            leases_active: 1,
            total: amounts(4),
            free: amounts(2),
            reachability: None,
        };
        let node = format!(r#"{{"accel":"tcg","listen_addrs":["/ip4/127.0.0.1/tcp/4001"],"peer_id":"{PEER}"}}"#);
        assert_wire(
            AdminRequest::Status,
            AdminResult::Status(status.clone()),
            &format!(
                r#"{{"free":{{"disk_gib":20,"memory_mib":4096,"vcpus":2}},"leases_active":1,"locked":false,"node":{node},"reachability":null,"total":{{"disk_gib":20,"memory_mib":4096,"vcpus":4}}}}"#
            ),
        );
        status.reachability = Some(PortReport {
            by: PEER.into(),
            checked_at_unix_ms: 1_700_000_000_000,
            observed_ip: "127.0.0.1".into(),
            ports: vec![PortProbe { kind: PortKind::Libp2p, port: 4001, state: PortState::Open }],
        });
        assert_wire(
            AdminRequest::Status,
            AdminResult::Status(status),
            &format!(
                r#"{{"free":{{"disk_gib":20,"memory_mib":4096,"vcpus":2}},"leases_active":1,"locked":false,"node":{node},"reachability":{{"by":"{PEER}","checked_at_unix_ms":1700000000000,"observed_ip":"127.0.0.1","ports":[{{"kind":"libp2p","port":4001,"state":"open"}}]}},"total":{{"disk_gib":20,"memory_mib":4096,"vcpus":4}}}}"#
            ),
        );
    }

    #[test]
    fn leases_reply() {
        let entry = LeaseEntry {
            lease: LEASE.into(),
            requestor: PEER.into(),
            state: LeaseState::Running,
            vcpus: 1,
            memory_mib: 1024,
            disk_gib: 4,
            image: "minimal".into(),
            slot: 3,
            price_per_hour_micros: 12_500,
            currency: "USD".into(),
            requested_at_unix_ms: 1000,
            started_at_unix_ms: Some(2000),
            ends_at_unix_ms: 3_602_000,
            isolated: false,
            detail: String::new(),
            transitions: vec![
                Transition { at_unix_ms: 1000, state: LeaseState::Requested, detail: String::new() },
                Transition { at_unix_ms: 2000, state: LeaseState::Running, detail: "sshd up".into() },
            ],
        };
        assert_wire(
            AdminRequest::Leases,
            AdminResult::Leases(vec![entry.clone()]),
            &format!(
                r#"[{{"currency":"USD","detail":"","disk_gib":4,"ends_at_unix_ms":3602000,"image":"minimal","isolated":false,"lease":"{LEASE}","memory_mib":1024,"price_per_hour_micros":12500,"requested_at_unix_ms":1000,"requestor":"{PEER}","slot":3,"started_at_unix_ms":2000,"state":"running","transitions":[{{"at_unix_ms":1000,"detail":"","state":"requested"}},{{"at_unix_ms":2000,"detail":"sshd up","state":"running"}}],"vcpus":1}}]"#
            ),
        );
        let not_started =
            LeaseEntry { started_at_unix_ms: None, state: LeaseState::Requested, transitions: vec![], ..entry };
        let json = AdminResult::Leases(vec![not_started]).to_json().to_string();
        assert!(json.contains(r#""started_at_unix_ms":null"#) && json.contains(r#""transitions":[]"#), "{json}");
        assert_wire(AdminRequest::Leases, AdminResult::Leases(vec![]), "[]");
    }

    #[test]
    fn terminate_isolate_block_unblock_replies() {
        assert_wire(
            AdminRequest::Terminate { lease: LEASE.into() },
            AdminResult::Terminated(Terminated { terminated: LEASE.into() }),
            &format!(r#"{{"terminated":"{LEASE}"}}"#),
        );
        assert_wire(
            AdminRequest::Isolate { lease: LEASE.into() },
            AdminResult::Isolated(Isolated { isolated: LEASE.into() }),
            &format!(r#"{{"isolated":"{LEASE}"}}"#),
        );
        assert_wire(
            AdminRequest::Block { peer: PEER.into(), reason: "abuse".into() },
            AdminResult::Blocked(Blocked { blocked: PEER.into(), ended_leases: vec![LEASE.into()] }),
            &format!(r#"{{"blocked":"{PEER}","ended_leases":["{LEASE}"]}}"#),
        );
        assert_wire(
            AdminRequest::Unblock { peer: PEER.into() },
            AdminResult::Unblocked(Unblocked { unblocked: PEER.into(), was_blocked: true }),
            &format!(r#"{{"unblocked":"{PEER}","was_blocked":true}}"#),
        );
    }

    #[test]
    fn blocked_publish_and_lock_replies() {
        assert_wire(
            AdminRequest::Blocked,
            AdminResult::BlockList(vec![BlockedPeer {
                peer: PEER.into(),
                reason: "abuse report 42".into(),
                at_unix_ms: 5,
            }]),
            &format!(r#"[{{"at_unix_ms":5,"peer":"{PEER}","reason":"abuse report 42"}}]"#),
        );
        assert_wire(AdminRequest::Blocked, AdminResult::BlockList(vec![]), "[]");
        assert_wire(
            AdminRequest::PublishBlocklist,
            AdminResult::Published(Published { published_entries: 1, seq: 1_700_000_000_001 }),
            r#"{"published_entries":1,"seq":1700000000001}"#,
        );
        assert_wire(AdminRequest::Lock, AdminResult::Lock(LockState { locked: true }), r#"{"locked":true}"#);
        assert_wire(AdminRequest::Unlock, AdminResult::Lock(LockState { locked: false }), r#"{"locked":false}"#);
    }

    #[test]
    fn reload_reply() {
        assert_wire(
            AdminRequest::Reload,
            AdminResult::Reloaded(Reloaded {
                changed: vec!["pricing.per_vcpu_hour".into()],
                advert_seq: Some(1_700_000_000_002),
            }),
            r#"{"advert_seq":1700000000002,"changed":["pricing.per_vcpu_hour"]}"#,
        );
        assert_wire(
            AdminRequest::Reload,
            AdminResult::Reloaded(Reloaded { changed: vec![], advert_seq: None }),
            r#"{"advert_seq":null,"changed":[]}"#,
        );
    }

    #[test]
    fn errors_carry_only_the_message() {
        let refused = AdminReply::err("refused: uid 65534 is not the provider's user (uid 0)");
        let line = refused.to_line();
        assert_eq!(line, r#"{"ok":false,"error":"refused: uid 65534 is not the provider's user (uid 0)"}"#);
        assert_eq!(AdminReply::from_line(&AdminRequest::Lock, &line).unwrap(), refused);
        assert_eq!(
            AdminReply::from_line(&AdminRequest::Lock, r#"{"ok":false}"#).unwrap(),
            AdminReply::Err("the provider refused".into())
        );
        // A result that does not fit the request is an error, not a guess.
        assert!(AdminReply::from_line(&AdminRequest::Status, r#"{"ok":true,"result":{"locked":true}}"#).is_err());
        assert!(AdminReply::from_line(&AdminRequest::Status, "not json").is_err());
    }
}
