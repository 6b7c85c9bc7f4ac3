//! The requestor's side of a lease: pick an offer, send the signed request, follow its
//! progress, check the signed reply, pin the guest's host key, and remember it all; then
//! status, extend and terminate with signed control messages.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};
use peervm_protocol::advert::hourly_price_micros;
use peervm_protocol::lease::{LEASE_VERSION, MAX_REQUEST_VALIDITY_MS, payload_digest};
use peervm_protocol::{
    Advertisement, ControlAction, DenyReason, GuestSpec, LeaseControl, LeaseId, LeaseReply, LeaseRequest, LeaseState,
    LeaseUsage, ReplyOutcome, ResourceAmounts, Signed, SigningKey,
};

use super::db::{Access, RequestorDb, RequestorDbError, StoredLease};
use super::lease_end;
use super::ssh::{self, SshError};
use super::wait_updates;
use crate::advert_store::OfferFilter;
use crate::clock::now_unix_ms;
use crate::network::lease_wire::{Envelope, LeaseMessage};
use crate::network::{Node, NodeConfig, Role};
use crate::requestor::offers::{self, OffersError};

#[derive(Debug, thiserror::Error)]
pub enum RequestorError {
    #[error(transparent)]
    Join(#[from] OffersError),
    #[error(transparent)]
    Network(#[from] crate::network::NetworkError),
    #[error(transparent)]
    Db(#[from] RequestorDbError),
    #[error(transparent)]
    Ssh(#[from] SshError),
    #[error(transparent)]
    Fs(#[from] crate::secure_fs::SecureFsError),
    #[error("cannot sign: {0}")]
    Sign(#[from] peervm_protocol::SignError),
    #[error("no offer matches: {0}")]
    NoOffer(String),
    #[error("provider {0} has no live advert on the market (gone, expired, or not yet seen)")]
    UnknownProvider(PeerId),
    #[error("the provider denied the request: {reason}: {detail}")]
    Denied { reason: DenyReason, detail: String },
    #[error("the provider's reply is not valid: {0}")]
    BadReply(String),
    /// The reply's envelope does not open (size, encoding, signature, version).
    #[error("the provider's reply is not valid")]
    BadReplyEnvelope(#[source] peervm_protocol::VerifyError),
    /// A stored advert did not decode again (the store keeps verified adverts as their
    /// wire bytes, `advert_store.rs`; they decoded once when verified).
    #[error("a stored advert does not decode")]
    StoredAdvert(#[source] peervm_protocol::VerifyError),
    #[error("the provider answered with {0}, which does not answer this message")]
    UnexpectedReply(String),
    #[error("lease {id} is {}; {what}", state.as_str())]
    NotUsable { id: LeaseId, state: LeaseState, what: &'static str },
}

/// Which provider to lease from.
#[derive(Debug, Clone)]
pub enum ProviderChoice {
    Cheapest,
    Peer(PeerId),
}

/// What `peervm lease create` asks for.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub bootstrap: Vec<Multiaddr>,
    pub provider: ProviderChoice,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    pub image: String,
    pub duration_secs: u64,
    /// Use this private key instead of a fresh per-lease one.
    pub ssh_key: Option<PathBuf>,
    pub ssh_user: String,
    /// Guest TCP ports to reach from outside (only providers that expose as many qualify).
    pub expose: Vec<u16>,
    /// Most the requestor pays per hour (micro-units); default: the advertised price.
    pub max_price_micros: Option<u64>,
    pub join_timeout: Duration,
    /// Signers whose block lists hide providers from the choice.
    pub trusted_block_lists: std::collections::HashSet<PeerId>,
}

/// Stages of `lease create`, reported as they complete (with time since the start).
#[derive(Debug, Clone)]
pub enum Stage {
    Joined {
        peers: usize,
        offers: usize,
    },
    Chose {
        provider: PeerId,
        price_per_hour_micros: u64,
        currency: String,
    },
    Sent,
    Provider(LeaseState),
    /// The provider still reports this state, this long after it was first seen; at the
    /// growing intervals of [`wait_updates`], so a minutes-long boot stays visibly alive.
    Still {
        state: LeaseState,
        in_state: Duration,
    },
    Granted,
}

/// Where a requestor keeps its leases: `<data-dir>/requestor.db` and one 0700 directory
/// per lease for its key and known_hosts.
pub struct Requestor {
    key: SigningKey,
    data_dir: PathBuf,
    db: RequestorDb,
}

impl Requestor {
    pub fn open(key: SigningKey, data_dir: &Path) -> Result<Self, RequestorError> {
        crate::secure_fs::ensure_private_dir(data_dir)?;
        let db = RequestorDb::open(&data_dir.join("requestor.db"))?;
        Ok(Requestor { key, data_dir: data_dir.to_path_buf(), db })
    }

    pub fn db(&self) -> &RequestorDb {
        &self.db
    }

    pub fn peer_id(&self) -> PeerId {
        self.key.peer_id()
    }

    pub fn lease_dir(&self, id: &LeaseId) -> PathBuf {
        self.data_dir.join("leases").join(id.to_hex())
    }

    pub fn known_hosts_path(&self, id: &LeaseId) -> PathBuf {
        self.lease_dir(id).join("known_hosts")
    }

    /// How to reach a granted lease's guest over SSH.
    pub fn ssh_target(&self, lease: &StoredLease) -> Result<ssh::SshTarget, RequestorError> {
        let access = lease.access.as_ref().ok_or(RequestorError::NotUsable {
            id: lease.id,
            state: lease.state,
            what: "it was never granted, so there is no guest to reach",
        })?;
        let target = ssh::SshTarget {
            host: access.ssh_host.clone(),
            port: access.ssh_port,
            user: access.ssh_user.clone(),
            key_path: lease.key_path.clone(),
            host_key: access.host_key,
            alias: ssh::host_alias(&lease.id.to_hex()),
        };
        // The host and user come from the provider: refuse anything that is not a plain
        // address and name before it reaches ssh's arguments or a config file.
        ssh::check_target(&target)?;
        Ok(target)
    }

    /// Writes the lease's known_hosts (the pinned key only) and returns its path.
    pub fn pin_host_key(&self, lease: &StoredLease) -> Result<PathBuf, RequestorError> {
        let target = self.ssh_target(lease)?;
        let path = self.known_hosts_path(&lease.id);
        ssh::write_known_hosts(&path, &target.alias, &target.host_key)?;
        Ok(path)
    }

    /// Joins the market, picks an offer, requests the lease and waits for the grant.
    pub async fn create(
        &self,
        opts: &CreateOptions,
        mut progress: impl FnMut(&Stage, Duration),
    ) -> Result<StoredLease, RequestorError> {
        let t0 = Instant::now();
        let want = ResourceAmounts { vcpus: opts.vcpus, memory_mib: opts.memory_mib, disk_gib: opts.disk_gib };
        let blocked: std::collections::HashSet<PeerId> = self.db.blocked()?.into_iter().map(|b| b.peer).collect();
        let filter = lease_filter(opts, &want, &blocked);
        // The cheapest offer needs only the cheapest matching adverts (a light client);
        // a provider chosen by id may be any of them, so then the whole market.
        let market = match opts.provider {
            ProviderChoice::Cheapest => offers::Market::Matching { filter: &filter, limit: 1 },
            ProviderChoice::Peer(_) => offers::Market::Whole,
        };
        let node = offers::join_as(
            SigningKey::from_seed(&self.key.seed()),
            &opts.bootstrap,
            opts.join_timeout,
            opts.trusted_block_lists.clone(),
            market,
        )
        .await?;
        let result = self.create_on(&node, opts, &filter, t0, &mut progress).await;
        node.stop().await;
        result
    }

    async fn create_on(
        &self,
        node: &Node,
        opts: &CreateOptions,
        filter: &OfferFilter,
        t0: Instant,
        progress: &mut impl FnMut(&Stage, Duration),
    ) -> Result<StoredLease, RequestorError> {
        let (advert, price, offers) = choose_offer(node, opts, filter)?;
        let peers = node.client.connected_peers().await?.len();
        progress(&Stage::Joined { peers, offers }, t0.elapsed());
        let a = advert.clone();
        progress(
            &Stage::Chose { provider: a.provider, price_per_hour_micros: price, currency: a.pricing.currency.clone() },
            t0.elapsed(),
        );
        let image_sha256 =
            a.images.iter().find(|i| i.name == opts.image).map(|i| i.sha256).ok_or_else(|| {
                RequestorError::NoOffer(format!("provider {} has no image `{}`", a.provider, opts.image))
            })?;

        let id = LeaseId(rand::random());
        let dir = self.lease_dir(&id);
        crate::secure_fs::ensure_private_dir(&self.data_dir.join("leases"))?;
        crate::secure_fs::ensure_private_dir(&dir)?;
        let key = match &opts.ssh_key {
            Some(path) => ssh::load_key(path)?,
            None => ssh::generate_key(&dir.join("id_ed25519"), &format!("peervm-lease-{}", &id.to_hex()[..12]))?,
        };
        let spec = GuestSpec {
            expose: opts.expose.clone(),
            vcpus: opts.vcpus,
            memory_mib: opts.memory_mib,
            disk_gib: opts.disk_gib,
            image_name: opts.image.clone(),
            image_sha256,
        };
        let now = now_unix_ms();
        let request = LeaseRequest {
            version: LEASE_VERSION,
            lease_id: id,
            requestor: self.key.peer_id(),
            provider: a.provider,
            advert_seq: a.seq,
            spec: spec.clone(),
            duration_secs: opts.duration_secs,
            max_price_per_hour_micros: opts.max_price_micros.unwrap_or(price),
            currency: a.pricing.currency.clone(),
            ssh_user: opts.ssh_user.clone(),
            ssh_public_key: key.public_raw,
            nonce: rand::random(),
            issued_at_unix_ms: now,
            valid_until_unix_ms: now + MAX_REQUEST_VALIDITY_MS,
        };
        let signed = Signed::sign(&self.key, &request)?;
        let digest = payload_digest(signed.signed());
        self.db.insert_pending(&StoredLease {
            id,
            provider: a.provider,
            provider_addrs: a.listen_addrs.clone(),
            spec,
            key_path: key.private_path.clone(),
            created_at_unix_ms: now,
            state: LeaseState::Requested,
            access: None,
            detail: String::new(),
            ended_at_unix_ms: None,
            denial: None,
        })?;

        let call = node.client.lease_call(
            a.provider,
            a.listen_addrs.clone(),
            LeaseMessage::Request(Envelope(signed.to_bytes())),
        );
        progress(&Stage::Sent, t0.elapsed());
        tokio::pin!(call);
        // While the provider provisions and boots, ask it where it is.
        let mut poll =
            tokio::time::interval_at(tokio::time::Instant::now() + Duration::from_secs(1), Duration::from_secs(1));
        // The state last reported, when it was first seen, and when to say it again.
        let mut last: Option<(LeaseState, Instant, Duration)> = None;
        let bytes = loop {
            tokio::select! {
                reply = &mut call => break reply,
                _ = poll.tick() => {
                    let Ok(ReplyOutcome::Status { state, .. }) =
                        self.control_on(node, a.provider, &a.listen_addrs, id, ControlAction::Status).await
                    else {
                        continue;
                    };
                    match &mut last {
                        Some((seen, since, due)) if *seen == state => {
                            let in_state = since.elapsed();
                            if let Some(next) = wait_updates::update_due(in_state, *due) {
                                *due = next;
                                progress(&Stage::Still { state, in_state }, t0.elapsed());
                            }
                        }
                        _ => {
                            last = Some((state, Instant::now(), wait_updates::next_update(Duration::ZERO)));
                            progress(&Stage::Provider(state), t0.elapsed());
                        }
                    }
                }
            }
        };
        let bytes = match bytes {
            Ok(b) => b,
            Err(e) => {
                self.db.set_finished(&id, LeaseState::Failed, &e.to_string(), Some(now_unix_ms()))?;
                return Err(e.into());
            }
        };
        let reply = match open_reply(&bytes, a.provider, self.key.peer_id(), id, digest) {
            Ok(r) => r,
            Err(e) => {
                self.db.set_finished(&id, LeaseState::Failed, &with_causes(&e), Some(now_unix_ms()))?;
                return Err(e);
            }
        };
        match reply.outcome {
            ReplyOutcome::Granted {
                access,
                host_key,
                ends_at_unix_ms,
                price_per_hour_micros,
                currency,
                exposed,
                ..
            } => {
                let access = Access {
                    ssh_host: access.host,
                    ssh_port: access.port,
                    ssh_user: access.user,
                    host_key,
                    ends_at_unix_ms,
                    price_per_hour_micros,
                    currency,
                    grant: bytes,
                    exposed,
                };
                self.db.set_granted(&id, &access)?;
                let stored = self.db.get(&id)?.ok_or_else(|| RequestorDbError::NotFound(id.to_hex()))?;
                self.pin_host_key(&stored)?;
                progress(&Stage::Granted, t0.elapsed());
                Ok(stored)
            }
            ReplyOutcome::Denied { reason, detail } => {
                // the signed denial is kept as the receipt of the refusal
                let detail_line = format!("denied: {reason}: {detail}");
                self.db.set_denied(&id, &detail_line, reply.issued_at_unix_ms, &bytes)?;
                Err(RequestorError::Denied { reason, detail })
            }
            other => {
                let what = outcome_name(&other);
                let detail_line = format!("unexpected reply {what}");
                self.db.set_finished(&id, LeaseState::Failed, &detail_line, Some(now_unix_ms()))?;
                Err(RequestorError::UnexpectedReply(what.into()))
            }
        }
    }

    /// Sends one control message about `lease` to its provider, dialed directly at the
    /// addresses stored with the lease; when that fails and `bootstrap` is given, finds
    /// the provider's current addresses through the swarm and tries there. Returns the
    /// verified outcome.
    pub async fn control(
        &self,
        lease: &StoredLease,
        action: ControlAction,
        bootstrap: &[Multiaddr],
    ) -> Result<ReplyOutcome, RequestorError> {
        let node = direct_node(&self.key).await?;
        let mut result = self.control_on(&node, lease.provider, &lease.provider_addrs, lease.id, action.clone()).await;
        node.stop().await;
        if matches!(result, Err(RequestorError::Network(_))) && !bootstrap.is_empty() {
            let key = SigningKey::from_seed(&self.key.seed());
            let node =
                offers::join_as(key, bootstrap, Duration::from_secs(10), Default::default(), offers::Market::Whole)
                    .await?;
            let fresh = node.store.lock().unwrap_or_else(|p| p.into_inner()).get(&lease.provider).cloned();
            if let Some(advert) = fresh {
                let addrs = advert.decode().map_err(RequestorError::StoredAdvert)?.body().listen_addrs.clone();
                self.db.set_provider_addrs(&lease.id, &addrs)?;
                result = self.control_on(&node, lease.provider, &addrs, lease.id, action).await;
            }
            node.stop().await;
        }
        let outcome = result?;
        match &outcome {
            ReplyOutcome::Status { state, ends_at_unix_ms, .. } => {
                match lease_end::from_status(lease, *state, *ends_at_unix_ms, now_unix_ms()) {
                    Some(f) => self.db.set_finished(&lease.id, f.state, &f.detail, f.at_unix_ms)?,
                    // a finished lease keeps how it finished
                    None if state.is_finished() => {}
                    None => self.db.set_state(&lease.id, *state, "")?,
                }
                if lease.access.is_some() {
                    self.db.set_ends_at(&lease.id, *ends_at_unix_ms)?;
                }
            }
            ReplyOutcome::Extended { ends_at_unix_ms } => self.db.set_ends_at(&lease.id, *ends_at_unix_ms)?,
            ReplyOutcome::Terminated { at_unix_ms } => {
                self.db.set_finished(&lease.id, LeaseState::Ended, lease_end::TERMINATED, Some(*at_unix_ms))?
            }
            ReplyOutcome::Denied { reason: DenyReason::LeaseEnded, detail } if !lease.state.is_finished() => {
                self.db.set_finished(&lease.id, LeaseState::Ended, detail, None)?
            }
            _ => {}
        }
        Ok(outcome)
    }

    async fn control_on(
        &self,
        node: &Node,
        provider: PeerId,
        addrs: &[Multiaddr],
        id: LeaseId,
        action: ControlAction,
    ) -> Result<ReplyOutcome, RequestorError> {
        let now = now_unix_ms();
        let control = LeaseControl {
            version: LEASE_VERSION,
            lease_id: id,
            requestor: self.key.peer_id(),
            provider,
            action,
            nonce: rand::random(),
            issued_at_unix_ms: now,
            valid_until_unix_ms: now + MAX_REQUEST_VALIDITY_MS,
        };
        let signed = Signed::sign(&self.key, &control)?;
        let digest = payload_digest(signed.signed());
        let bytes = node
            .client
            .lease_call(provider, addrs.to_vec(), LeaseMessage::Control(Envelope(signed.to_bytes())))
            .await?;
        Ok(open_reply(&bytes, provider, self.key.peer_id(), id, digest)?.outcome)
    }
}

/// A requestor node with no bootstrap: control messages dial the provider directly.
async fn direct_node(key: &SigningKey) -> Result<Node, RequestorError> {
    let config = NodeConfig::new(SigningKey::from_seed(&key.seed()), Role::Requestor);
    Ok(Node::start(config).await?)
}

/// The offers a lease of `want` can use: its size, image, price limit and exposed ports,
/// less the providers this requestor blocked.
fn lease_filter(
    opts: &CreateOptions,
    want: &ResourceAmounts,
    blocked: &std::collections::HashSet<PeerId>,
) -> OfferFilter {
    OfferFilter {
        exclude: blocked.clone(),
        min_vcpus: Some(want.vcpus),
        min_memory_mib: Some(want.memory_mib),
        min_disk_gib: Some(want.disk_gib),
        max_price_micros: opts.max_price_micros,
        image: Some(opts.image.clone()),
        // exposed ports: only providers whose advert allows as many
        min_exposed_ports: Some(u16::try_from(opts.expose.len()).unwrap_or(u16::MAX)),
        ..Default::default()
    }
}

fn choose_offer(
    node: &Node,
    opts: &CreateOptions,
    filter: &OfferFilter,
) -> Result<(Advertisement, u64, usize), RequestorError> {
    let (want, blocked) = (filter.price_spec(), &filter.exclude);
    let store = node.store.lock().unwrap_or_else(|p| p.into_inner());
    let matching = store.query(filter, now_unix_ms(), usize::MAX);
    match &opts.provider {
        ProviderChoice::Cheapest => {
            let offer = matching.first().ok_or_else(|| {
                RequestorError::NoOffer(format!(
                    "nobody offers {} vCPU, {} MiB, {} GiB with image `{}`{}{} right now{}",
                    want.vcpus,
                    want.memory_mib,
                    want.disk_gib,
                    opts.image,
                    match opts.expose.len() {
                        0 => String::new(),
                        n => format!(" and {n} exposed port{}", if n == 1 { "" } else { "s" }),
                    },
                    if opts.max_price_micros.is_some() { " within the price limit" } else { "" },
                    // Offers that match but that this requestor blocked, said as such.
                    match store
                        .query(&OfferFilter { exclude: Default::default(), ..filter.clone() }, now_unix_ms(), 0)
                        .len()
                    {
                        0 => String::new(),
                        n => format!(" (you blocked the {n} that do)"),
                    }
                ))
            })?;
            let advert = offer.decode().map_err(RequestorError::StoredAdvert)?.into_parts().1;
            Ok((advert, offer.price_per_hour_micros, matching.len()))
        }
        ProviderChoice::Peer(peer) if blocked.contains(peer) => {
            Err(RequestorError::NoOffer(format!("you blocked provider {peer}; lift it with: peervm unblock {peer}")))
        }
        ProviderChoice::Peer(peer) => {
            let advert = store.get(peer).ok_or(RequestorError::UnknownProvider(*peer))?;
            let advert = advert.decode().map_err(RequestorError::StoredAdvert)?.into_parts().1;
            if let Some(offer) = matching.iter().find(|o| o.provider == *peer) {
                return Ok((advert, offer.price_per_hour_micros, matching.len()));
            }
            let a = &advert;
            let p = &a.pricing;
            let price = hourly_price_micros(
                p.per_vcpu_hour_micros,
                p.per_memory_gib_hour_micros,
                p.per_disk_gib_hour_micros,
                &want,
            )
            .unwrap_or(u64::MAX);
            Err(RequestorError::NoOffer(format!(
                "provider {peer} does not match: free {} vCPU, {} MiB, {} GiB; images {}; price {} {} micro-units/hour",
                a.resources.free.vcpus,
                a.resources.free.memory_mib,
                a.resources.free.disk_gib,
                a.images.iter().map(|i| i.name.as_str()).collect::<Vec<_>>().join(","),
                price,
                p.currency
            )))
        }
    }
}

/// `e` and its causes, as `peervm` prints an error: "what failed: why: ...".
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// Verifies a reply: signed by the provider we asked, to us, about this lease, answering
/// exactly the message we sent.
fn open_reply(
    bytes: &[u8],
    provider: PeerId,
    me: PeerId,
    id: LeaseId,
    digest: [u8; 32],
) -> Result<LeaseReply, RequestorError> {
    let verified = Signed::<LeaseReply>::open(bytes).map_err(RequestorError::BadReplyEnvelope)?;
    let reply = verified.body();
    if reply.provider != provider {
        return Err(RequestorError::BadReply(format!("signed by {}, not by the provider {provider}", reply.provider)));
    }
    if reply.in_reply_to != digest {
        return Err(RequestorError::BadReply("it answers another message".into()));
    }
    // A denial of a message the provider could not open carries no lease id.
    let denied_unparsed = matches!(reply.outcome, ReplyOutcome::Denied { .. }) && reply.lease_id == LeaseId([0; 16]);
    if !denied_unparsed && (reply.lease_id != id || reply.requestor != me) {
        return Err(RequestorError::BadReply("it is about another lease or requestor".into()));
    }
    Ok(reply.clone())
}

fn outcome_name(o: &ReplyOutcome) -> &'static str {
    match o {
        ReplyOutcome::Granted { .. } => "granted",
        ReplyOutcome::Denied { .. } => "denied",
        ReplyOutcome::Status { .. } => "status",
        ReplyOutcome::Extended { .. } => "extended",
        ReplyOutcome::Terminated { .. } => "terminated",
    }
}

/// Usage as one line for humans (the guest's whole traffic when the provider counts it).
pub fn usage_line(u: &LeaseUsage) -> String {
    let mut line = format!(
        "cpu {:.1} s, memory {} MiB (peak {} MiB), ssh in {} B / out {} B, up {} s",
        u.cpu_usec as f64 / 1e6,
        u.memory_current_bytes >> 20,
        u.memory_peak_bytes >> 20,
        u.net_rx_bytes,
        u.net_tx_bytes,
        u.uptime_secs
    );
    if let Some(n) = &u.guest_net {
        line.push_str(&format!(
            ", guest net in {} B / out {} B, {} new connections, {} packets dropped",
            n.rx_bytes, n.tx_bytes, n.new_connections, n.dropped_packets
        ));
    }
    line
}

#[cfg(test)]
mod tests {
    use peervm_protocol::{GuestTraffic, LeaseUsage};

    use super::usage_line;

    #[test]
    fn the_usage_line_adds_the_guest_s_traffic_only_when_counted() {
        let u = LeaseUsage {
            cpu_usec: 1_500_000,
            net_rx_bytes: 10,
            net_tx_bytes: 20,
            uptime_secs: 5,
            ..Default::default()
        };
        assert_eq!(usage_line(&u), "cpu 1.5 s, memory 0 MiB (peak 0 MiB), ssh in 10 B / out 20 B, up 5 s");
        let g =
            GuestTraffic { rx_bytes: 300, tx_bytes: 400, new_connections: 2, dropped_packets: 1, ..Default::default() };
        assert!(
            usage_line(&LeaseUsage { guest_net: Some(g), ..u })
                .ends_with("up 5 s, guest net in 300 B / out 400 B, 2 new connections, 1 packets dropped")
        );
    }
}
