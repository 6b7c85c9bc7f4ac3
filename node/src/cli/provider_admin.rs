//! `peervm provider status | leases | terminate | isolate | block | unblock | blocked |
//! lock | unlock | publish-blocklist | reload`: one request to the running provider's admin socket
//! and its reply, as a table or as JSON.

use std::path::Path;
use std::process::ExitCode;

use anyhow::bail;
use peervm_node::provider::admin::{self, AdminReply, AdminRequest, AdminResult};
use peervm_node::provider::config::ProviderConfig;

use super::provider::ProviderCommand;
use super::provider_data_dir::ProviderDataDir;
use super::provider_status;
use super::render::format_time;

pub async fn run(cmd: ProviderCommand, data_dir: &Path) -> anyhow::Result<ExitCode> {
    let (request, args) = match cmd {
        ProviderCommand::Run { .. } => bail!("`provider run` is not an admin command"),
        ProviderCommand::Status(a) => (AdminRequest::Status, a),
        ProviderCommand::Leases(a) => (AdminRequest::Leases, a),
        ProviderCommand::Terminate { lease, admin } => (AdminRequest::Terminate { lease }, admin),
        ProviderCommand::Isolate { lease, admin } => (AdminRequest::Isolate { lease }, admin),
        ProviderCommand::Block { peer, reason, admin } => (AdminRequest::Block { peer, reason }, admin),
        ProviderCommand::Unblock { peer, admin } => (AdminRequest::Unblock { peer }, admin),
        ProviderCommand::Blocked(a) => (AdminRequest::Blocked, a),
        ProviderCommand::Lock(a) => (AdminRequest::Lock, a),
        ProviderCommand::PublishBlocklist(a) => (AdminRequest::PublishBlocklist, a),
        ProviderCommand::Unlock(a) => (AdminRequest::Unlock, a),
        ProviderCommand::Reload(a) => (AdminRequest::Reload, a),
    };
    let config = args.config.as_ref().map(|path| ProviderConfig::load(path).map(|c| (path, c))).transpose()?;
    let dir = ProviderDataDir::choose(config.as_ref().map(|(p, c)| (p.as_path(), c)), data_dir);
    let result = match admin::call(&admin::socket_path(&dir.path), &request).await? {
        AdminReply::Ok(result) => result,
        AdminReply::Err(error) => bail!("{error}"),
    };
    if args.json {
        println!("{}", result.to_json());
    } else if let AdminResult::Status(status) = &result {
        print!("{}", provider_status::render(status, &dir.describe(), peervm_node::clock::now_unix_ms()));
    } else if let AdminResult::Leases(list) = &result {
        if list.is_empty() {
            println!("no leases");
        } else {
            println!("{:<32}  {:<12}  {:<8}  {:<14}  REQUESTOR", "LEASE", "STATE", "ISOLATED", "ENDS");
            for l in list {
                println!(
                    "{:<32}  {:<12}  {:<8}  {:<14}  {}",
                    l.lease,
                    l.state.as_str(),
                    if l.isolated { "yes" } else { "" },
                    format_time(l.ends_at_unix_ms),
                    l.requestor,
                );
            }
        }
    } else {
        println!("{}", serde_json::to_string_pretty(&result.to_json()).unwrap_or_default());
    }
    Ok(ExitCode::SUCCESS)
}
