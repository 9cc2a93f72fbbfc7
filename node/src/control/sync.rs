//! Keeps this node in step with the mesh: the registry view follows gossip,
//! remote agents' cards are fetched through the mesh, and revocations
//! published by any peer are verified, persisted, re-published and enforced.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dmsc_gossip::Gossip;
use tokio::task::JoinSet;
use tracing::Instrument;

use dmsc_transport::Overlay;

use crate::forward::Delegator;
use crate::proto::gossip::{
    policy_key, revoked_key, tenant_key_key, KEY_POLICY_PREFIX, KEY_REVOKED_PREFIX,
    KEY_TENANT_KEY_PREFIX,
};
use crate::route::MeshView;
use crate::security::policies::{announcement, parse_announcement};
use crate::security::Security;

/// Takes in the revocations peers publish: each is checked against the
/// mesh CA, persisted, re-published under this node's state, and the live
/// connections it condemns are closed.
fn apply_revocations(
    scan: &[dmsc_gossip::NodeScan],
    gossip: &Arc<Gossip>,
    security: &Security,
    overlay: &Overlay,
) {
    let mut any = false;
    for (key, value) in scan
        .iter()
        .filter_map(|n| n.values.as_ref())
        .flatten()
        .filter(|(k, _)| k.starts_with(KEY_REVOKED_PREFIX))
    {
        let r = match dmsc_transport::Revocation::parse(value.as_bytes()) {
            Ok(r) if revoked_key(&r.serial) == *key => r,
            Ok(_) | Err(_) => {
                tracing::debug!(key = %key, "ignoring a malformed revocation in gossip");
                continue;
            }
        };
        match security.apply_revocation(r.clone(), "gossip") {
            Ok(true) => {
                let g = gossip.clone();
                tokio::spawn(async move { publish_revocation(&g, &r).await }.in_current_span());
                any = true;
            }
            Ok(false) => {}
            Err(e) => {
                tracing::debug!(key = %key, error = %e, "ignoring a revocation that does not verify")
            }
        }
    }
    if any {
        overlay.close_revoked();
        drop_revoked_policies(gossip, security);
    }
}

/// Drops the tenant policies whose signer a revocation condemned: audited,
/// no longer announced (a peer re-fetching it would refuse it anyway).
pub fn drop_revoked_policies(gossip: &Arc<Gossip>, security: &Security) {
    let roots = security.identity().roots.clone();
    let revoked = &security.revoked;
    for (tenant, version, why) in security
        .policies
        .drop_unverified(&roots, |serial| revoked.get(serial).is_some())
    {
        tracing::warn!(%tenant, version, %why, "tenant policy dropped: its signature no longer holds");
        security.record(dmsc_audit::Event::tenant(
            tenant.clone(),
            dmsc_audit::PolicyChange {
                outcome: "dropped".into(),
                version,
                digest: String::new(),
                signer: String::new(),
                source: "revocation".into(),
                code: Some("signer_revoked".into()),
                reason: Some(why),
            },
        ));
        let g = gossip.clone();
        tokio::spawn(async move { g.delete(&policy_key(&tenant)).await }.in_current_span());
    }
}

/// Takes in the tenant key statements peers publish: each is verified
/// against the mesh CA and applied once (a rotate makes this node rotate its
/// own key for that tenant, a delete destroys its keys), and this node
/// re-publishes the tenant's statements under its own state.
fn apply_tenant_keys(scan: &[dmsc_gossip::NodeScan], gossip: &Arc<Gossip>, security: &Security) {
    let mut changed = std::collections::BTreeSet::new();
    for (key, value) in scan
        .iter()
        .filter_map(|n| n.values.as_ref())
        .flatten()
        .filter(|(k, _)| k.starts_with(KEY_TENANT_KEY_PREFIX))
    {
        let mut statements = crate::security::tenant_keys::parse_gossip_value(value);
        statements.sort_by_key(|s| s.seq);
        for s in statements {
            if tenant_key_key(&s.tenant) != *key {
                tracing::debug!(key = %key, "ignoring a tenant key statement under another tenant's key");
                continue;
            }
            match security.apply_tenant_key_statement(&s, "gossip") {
                Ok(crate::security::tenant_keys::StatementOutcome::Applied { .. }) => {
                    changed.insert(s.tenant.clone());
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(key = %key, error = %e, "ignoring a tenant key statement that does not apply")
                }
            }
        }
    }
    for tenant in changed {
        let g = gossip.clone();
        let value =
            crate::security::tenant_keys::gossip_value(&security.tenant_keys.statements(&tenant));
        tokio::spawn(
            async move { g.set(&tenant_key_key(&tenant), &value).await }.in_current_span(),
        );
    }
}

/// Publishes a tenant's retained key statements under this node's gossip state.
pub async fn publish_tenant_keys(gossip: &Gossip, security: &Security, tenant: &str) {
    let value =
        crate::security::tenant_keys::gossip_value(&security.tenant_keys.statements(tenant));
    gossip.set(&tenant_key_key(tenant), &value).await;
}

/// Hands the overlay what gossip says about paths, when it changed: every
/// relay (a session is kept to each) and the relays each node is reachable
/// through. Returns the version applied.
fn feed_paths(mesh: &MeshView, overlay: &Overlay, applied: u64) -> u64 {
    let (version, anns) = mesh.announcements();
    if version == applied {
        return applied;
    }
    let mut relays = Vec::new();
    for a in anns.iter().filter(|a| a.name != overlay.name()) {
        // Only a directly reachable node on a real address can relay: a
        // record naming a mapped address (or a relayed node) as a relay
        // would black-hole or bounce whatever took it.
        let usable = a.reachability == "direct"
            && !dmsc_transport::path::is_mapped(a.overlay_addr)
            && a.roles.iter().any(|r| r == "relay");
        if let Some(r) = a.relay.as_ref().filter(|_| usable) {
            relays.push(dmsc_transport::RelayAddr {
                overlay: a.overlay_addr,
                tcp: r.tcp,
            });
        }
        overlay.set_peer_via(
            a.overlay_addr,
            a.via.iter().map(|v| Arc::from(v.as_str())).collect(),
        );
    }
    overlay.set_learned_relays(relays);
    version
}

/// Announces a tenant policy this node holds (`policy/<tenant>`).
pub async fn publish_policy(gossip: &Gossip, tenant: &str, version: u64, digest: &str) {
    gossip
        .set(&policy_key(tenant), &announcement(version, digest))
        .await;
}

/// Policies announced by peers with a newer version than this node holds:
/// `(tenant, version, digest, announcing node)`, highest version first (a
/// candidate that fails, e.g. a forged maximal version, does not hide the
/// next one).
fn wanted_policies(
    scan: &[dmsc_gossip::NodeScan],
    security: &Security,
) -> Vec<(String, u64, String, String)> {
    let mut out = Vec::new();
    for n in scan {
        for (key, value) in n.values.iter().flatten() {
            let Some(tenant) = key.strip_prefix(KEY_POLICY_PREFIX) else {
                continue;
            };
            let Some((version, digest)) = parse_announcement(value) else {
                continue;
            };
            if version > security.policies.version(tenant) {
                out.push((
                    tenant.to_string(),
                    version,
                    digest.to_string(),
                    n.name.clone(),
                ));
            }
        }
    }
    out.sort_by_key(|c| std::cmp::Reverse(c.1));
    out
}

/// A policy fetch: the version and digest applied, or nothing new, or why
/// it could not be had.
type FetchResult = Result<Option<(u64, String)>, String>;

/// Fetches `tenant`'s policy from `node` and applies it; true if it was
/// applied (the caller announces it), false if it could not be had or was
/// refused (and audited).
async fn fetch_and_apply(sync: &Sync, tenant: &str, digest: &str, node: &str) -> FetchResult {
    let (addr, _) = sync
        .mesh
        .node_route(node)
        .ok_or_else(|| format!("no route to node `{node}`"))?;
    let bytes = crate::control::policy::fetch_policy(&sync.overlay, addr, tenant)
        .await
        .map_err(|e| e.to_string())?;
    // The bytes must be what was announced: a peer that announces one
    // document and serves another is not followed.
    let claimed = dmsc_policy::SignedPolicy::parse(&bytes)
        .and_then(|s| s.doc_bytes())
        .map(|d| dmsc_policy::digest(&d))
        .map_err(|e| e.to_string())?;
    if claimed != digest {
        return Err(format!(
            "node `{node}` served a document other than the one it announces"
        ));
    }
    match sync
        .security
        .apply_policy(&bytes, &format!("gossip:{node}"))
    {
        Ok(crate::security::policies::Applied::New {
            version, digest, ..
        }) => Ok(Some((version, digest))),
        Ok(crate::security::policies::Applied::Unchanged { .. }) => Ok(None),
        // Refused and audited; not fetched again for a while.
        Err(e) => {
            tracing::debug!(%tenant, error = %e, "refused a policy from gossip");
            Ok(None)
        }
    }
}

/// Publishes a revocation under this node's gossip state.
pub async fn publish_revocation(gossip: &Gossip, r: &dmsc_transport::Revocation) {
    gossip.set(&revoked_key(&r.serial), &r.to_json()).await;
}

/// Keeps the registry in step with gossip, and fetches the cards of remote
/// agents this node has not seen yet (their text feeds intent matching).
/// What the sync loop works with.
#[derive(Debug, Clone)]
pub struct Sync {
    pub gossip: Arc<Gossip>,
    pub mesh: Arc<MeshView>,
    /// Verifies and persists revocations.
    pub security: Arc<Security>,
    /// Connections to close (dead peers, revoked certificates).
    pub overlay: Overlay,
    /// Fetches remote agents' cards through the mesh.
    pub cards: Arc<Delegator>,
    pub every: Duration,
}

pub async fn sync_loop(sync: Sync) {
    let (gossip, mesh, every) = (sync.gossip.clone(), sync.mesh.clone(), sync.every);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut cards = tokio::time::interval(Duration::from_millis(500));
    cards.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failed: std::collections::HashMap<String, Instant> = Default::default();
    let mut closed: std::collections::HashSet<SocketAddr> = Default::default();
    let mut in_progress: std::collections::HashSet<String> = Default::default();
    let mut fetching: JoinSet<(String, bool)> = JoinSet::new();
    let mut paths_version = u64::MAX;
    // Policies: re-announce what was persisted; fetch newer ones peers announce.
    for h in sync.security.policies.all() {
        publish_policy(
            &gossip,
            &h.policy.tenant,
            h.policy.version,
            &h.policy.digest,
        )
        .await;
    }
    let mut policy_fetches: JoinSet<(String, String, FetchResult)> = JoinSet::new();
    let mut policy_seen: std::collections::HashMap<String, Instant> = Default::default();
    let mut fetching_tenants: std::collections::HashSet<String> = Default::default();
    let mut last_full_policy_scan = Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let scan = gossip.scan_changes("", &mesh.scan_cursor()).await;
                apply_revocations(&scan, &gossip, &sync.security, &sync.overlay);
                apply_tenant_keys(&scan, &gossip, &sync.security);
                // A digest that was fetched (applied, refused or failed) is
                // not fetched again for a while: a forged document is
                // audited once per minute at most, not once per scan.
                policy_seen.retain(|_, t: &mut Instant| t.elapsed() < Duration::from_secs(60));
                // A scan carries only the nodes whose state changed; every
                // few seconds all announcements are read again, so a fetch
                // that failed (no route yet, a timeout) is tried again.
                let mut wanted = wanted_policies(&scan, &sync.security);
                if last_full_policy_scan.elapsed() >= Duration::from_secs(5) {
                    last_full_policy_scan = Instant::now();
                    let all = gossip.scan_since(KEY_POLICY_PREFIX, &Default::default()).await;
                    wanted.extend(wanted_policies(&all, &sync.security));
                    wanted.sort_by_key(|c| std::cmp::Reverse(c.1));
                }
                for (tenant, _version, digest, node) in wanted {
                    if policy_fetches.len() >= 4
                        || policy_seen.contains_key(&digest)
                        || !fetching_tenants.insert(tenant.clone())
                    {
                        continue;
                    }
                    policy_seen.insert(digest.clone(), Instant::now());
                    let s2 = sync.clone();
                    policy_fetches.spawn(
                        async move {
                            let r = fetch_and_apply(&s2, &tenant, &digest, &node).await;
                            (tenant, digest, r)
                        }
                        .in_current_span(),
                    );
                }
                let gone = mesh.apply_scan(scan);
                for addr in &gone {
                    // Once per death: in-flight delegations to a dead node
                    // fail now (idempotent ones retry elsewhere) instead of
                    // waiting for the QUIC idle timeout. Not again while it
                    // stays dead, so a node that comes back can reconnect.
                    if closed.insert(*addr) {
                        sync.overlay.close_peer(*addr);
                    }
                }
                closed.retain(|a| gone.contains(a));
                paths_version = feed_paths(&mesh, &sync.overlay, paths_version);
            }
            _ = cards.tick() => {
                // Fetches run beside the scans (a dead home node must not
                // hold up the scan that notices it), a few at a time.
                failed.retain(|_, t: &mut Instant| t.elapsed() < Duration::from_secs(10));
                // A node whose certificate is scoped to some tenants would be
                // refused (and audited) by the home nodes of all the others.
                let scope = sync.security.identity().info.tenants.clone();
                let missing = mesh.missing_cards(8usize.saturating_sub(fetching.len()), |id, digest| {
                    !crate::policy::in_scope(scope.as_deref(), &id.tenant)
                        || failed.contains_key(digest)
                        || in_progress.contains(digest)
                });
                for (id, digest) in missing {
                    if !in_progress.insert(digest.clone()) {
                        continue;
                    }
                    let (d, m) = (sync.cards.clone(), mesh.clone());
                    fetching.spawn(
                        async move {
                            let ok = match crate::forward::fetch_card(&d, &id).await {
                                Ok(card) if card.digest() == digest => {
                                    m.add_card(card);
                                    true
                                }
                                Ok(_) => false,
                                Err(e) => {
                                    tracing::debug!(agent = %id, error = %e, "card fetch failed");
                                    false
                                }
                            };
                            (digest, ok)
                        }
                        .in_current_span(),
                    );
                }
            }
            Some(done) = policy_fetches.join_next(), if !policy_fetches.is_empty() => {
                if let Ok((tenant, _, _)) = &done {
                    fetching_tenants.remove(tenant);
                }
                match done {
                    Ok((tenant, _, Ok(Some((version, digest))))) => {
                        publish_policy(&gossip, &tenant, version, &digest).await;
                    }
                    Ok((tenant, digest, Err(e))) => {
                        // Another peer may have it, or the route was not
                        // up yet: eligible again in a second (the next scan
                        // that lists it, at most 5 s away), not in ten.
                        tracing::debug!(%tenant, error = %e, "policy fetch failed");
                        let soon = Instant::now().checked_sub(Duration::from_secs(59));
                        policy_seen.insert(digest, soon.unwrap_or_else(Instant::now));
                    }
                    _ => {}
                }
            }
            Some(done) = fetching.join_next(), if !fetching.is_empty() => {
                if let Ok((digest, ok)) = done {
                    in_progress.remove(&digest);
                    if !ok {
                        failed.insert(digest, Instant::now());
                    }
                }
            }
        }
    }
}
