//! Who an agent is and what it may claim. Authentication: the node a control channel proves (its
//! kubelet certificate, or its pod's service-account token) must be the node it names. Authorization:
//! its addresses, host names and CIDRs must be its Node object's (`--agent-claims node-objects`), and
//! only the agents of `--default-route-agents` may be a default route.

use std::sync::Arc;

use ipnet::IpNet;
use tokio::time::Instant;
use tracing::{info, warn};

use super::Server;
use super::config::{AgentAuth, AgentClaims};
use super::registry::{Credential, Routes};
use crate::apiserver::nodes::{Change, NodeFacts, Unknown};
use crate::apiserver::pods::PodEvent;
use crate::apiserver::tokens::{self, ReviewError};
use crate::metrics::inc;
use crate::protocol::{Identity, Secret};
use crate::transport::{AcceptedLink, Link};

/// Why an agent was refused: a metric label and a message for the log and the agent.
#[derive(Debug)]
pub(super) struct Refusal {
    /// `agent_conn_failures_total{reason}`.
    pub label: &'static str,
    /// What was wrong.
    pub message: String,
}

impl Refusal {
    fn new(label: &'static str, message: impl Into<String>) -> Self {
        Self { label, message: message.into() }
    }
}

/// An admitted agent: its Node's facts where the server reads them, and what it proved itself with.
#[derive(Debug)]
pub(super) struct Admitted {
    pub facts: Option<Arc<NodeFacts>>,
    pub credential: Credential,
}

/// Admits the agent of a new control channel, by `deadline`, or says why not.
pub(super) async fn admit(
    server: &Server,
    conn: &AcceptedLink,
    identity: &Identity,
    token: &Secret,
    deadline: Instant,
) -> Result<Admitted, Refusal> {
    let (node, credential) = authenticate(server, conn, token, deadline).await?;
    if let Some(node) = node
        && (identity.node_name != node || identity.agent_id != node)
    {
        return Err(Refusal::new(
            "identity_mismatch",
            format!(
                "the agent proved to be node {node:?}, but claims id {:?} on node {:?}",
                identity.agent_id, identity.node_name
            ),
        ));
    }
    authorize_default_route(server, identity)?;
    if server.config.agent_claims == AgentClaims::NodeObjects {
        let nodes = server.nodes.as_ref().expect("node-objects claims watch the nodes");
        let facts = nodes.get(&identity.node_name, deadline).await.map_err(|unknown| match unknown {
            Unknown::NotSynced => Refusal::new("nodes_unavailable", unknown.to_string()),
            Unknown::NoSuchNode => {
                Refusal::new("claim_refused", format!("there is no Node {:?}", identity.node_name))
            }
        })?;
        check_claims(identity, &facts, &server.config.service_cidrs)
            .map_err(|message| Refusal::new("claim_refused", message))?;
        return Ok(Admitted { facts: Some(facts), credential });
    }
    Ok(Admitted { facts: None, credential })
}

/// The node the agent proved to be (`None` with `--agent-auth shared-cert`, where it proves none), and
/// the token's pod and expiry where it proved it with a token.
async fn authenticate(
    server: &Server,
    conn: &AcceptedLink,
    token: &Secret,
    deadline: Instant,
) -> Result<(Option<String>, Credential), Refusal> {
    let no_token = Credential::default();
    match server.config.agent_auth {
        AgentAuth::SharedCert => Ok((None, no_token)),
        AgentAuth::NodeCert => match conn {
            Link::Tls(tls) => tls.peer_node().map(|n| (Some(n.to_owned()), no_token)).ok_or_else(|| {
                Refusal::new(
                    "identity_mismatch",
                    "the certificate names no node (CN=system:node:<name>, O=system:nodes)",
                )
            }),
            Link::Plain(_) => Err(Refusal::new("identity_mismatch", "a control channel must use TLS")),
        },
        AgentAuth::Token => {
            let reviewer = server.reviewer.as_ref().expect("token authentication has a reviewer");
            if token.is_empty() {
                return Err(Refusal::new(
                    "token_refused",
                    "no service-account token (agent --service-account-token-path)",
                ));
            }
            match reviewer.review(token.expose(), deadline).await {
                Ok(owner) => Ok((
                    Some(owner.node),
                    Credential {
                        pod: Some((owner.pod, owner.pod_uid)),
                        expires: tokens::expiry(token.expose()),
                    },
                )),
                Err(ReviewError::Refused(why)) => Err(Refusal::new("token_refused", why)),
                Err(unavailable @ ReviewError::Unavailable(_)) => {
                    Err(Refusal::new("token_review_unavailable", unavailable.to_string()))
                }
            }
        }
    }
}

/// Only the agents of `--default-route-agents` may be a default route.
fn authorize_default_route(server: &Server, identity: &Identity) -> Result<(), Refusal> {
    let allowed = &server.config.default_route_agents;
    if identity.default_route && !allowed.iter().any(|a| a == "*" || *a == identity.agent_id) {
        return Err(Refusal::new(
            "claim_refused",
            format!(
                "agent {:?} may not be a default route (not in the server's --default-route-agents)",
                identity.agent_id
            ),
        ));
    }
    Ok(())
}

/// Checks an agent's claims against its Node object: every host name must be the node's name or one of
/// its DNS/host-name addresses, every address one of its IPs, and every CIDR inside one of its pod
/// CIDRs, inside one of the cluster's `service_cidrs`, or a single address (/32, /128) of its own.
pub(super) fn check_claims(
    identity: &Identity,
    facts: &NodeFacts,
    service_cidrs: &[IpNet],
) -> Result<(), String> {
    let node = &identity.node_name;
    for name in &identity.hostnames {
        let name = name.to_ascii_lowercase();
        if name != node.to_ascii_lowercase() && !facts.names.contains(&name) {
            return Err(format!("host name {name:?} is not among Node {node:?}'s addresses"));
        }
    }
    for address in &identity.addresses {
        if !facts.addresses.contains(address) {
            let item = format!("address {address}");
            if let Some((_, owner)) = facts.contested.iter().find(|(i, _)| *i == item) {
                return Err(format!(
                    "{item} is also listed by Node {owner:?}, which listed it first: Node {node:?} may not claim it"
                ));
            }
            return Err(format!("{item} is not among Node {node:?}'s addresses"));
        }
    }
    for cidr in &identity.cidrs {
        let inside = |nets: &[IpNet]| nets.iter().any(|net| net.contains(cidr));
        let own_address =
            cidr.prefix_len() == cidr.max_prefix_len() && facts.addresses.contains(&cidr.addr());
        if !inside(&facts.pod_cidrs) && !inside(service_cidrs) && !own_address {
            return Err(format!(
                "CIDR {cidr} is neither inside Node {node:?}'s pod CIDRs ({}) or the service CIDRs ({}) nor \
                 one of its addresses",
                list(&facts.pod_cidrs),
                list(service_cidrs)
            ));
        }
    }
    Ok(())
}

fn list(cidrs: &[IpNet]) -> String {
    if cidrs.is_empty() {
        return "none".into();
    }
    cidrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

/// How often the Node-conflict metrics are brought up to date when no Node changes.
const CONFLICTS_REFRESH: std::time::Duration = std::time::Duration::from_secs(10);

/// Brings the Node-conflict metrics up to date ([`crate::apiserver::claims`]).
fn count_conflicts(server: &Server, nodes: &crate::apiserver::nodes::Nodes) {
    let (conflicts, seen) = nodes.conflicts();
    server.metrics.node_claim_conflicts.set(i64::try_from(conflicts).unwrap_or(i64::MAX));
    let counted = server.metrics.node_claim_conflicts_total.get();
    server.metrics.node_claim_conflicts_total.inc_by(seen.saturating_sub(counted));
}

/// Re-checks connected agents whenever their Node changes or goes: a session whose claims no longer
/// hold is ended (its agent reconnects and is checked afresh); one whose claims hold takes its Node's
/// new routes.
pub(super) async fn recheck_on_node_changes(server: Arc<Server>) {
    let Some(nodes) = server.nodes.clone() else { return };
    let mut changes = nodes.changes();
    // The conflict metrics follow every change, and the first node list too (which announces nothing).
    let mut refresh = tokio::time::interval(CONFLICTS_REFRESH);
    loop {
        let change = tokio::select! {
            () = server.stop.cancelled() => return,
            _ = refresh.tick() => {
                count_conflicts(&server, &nodes);
                continue;
            }
            change = changes.next() => change,
        };
        let Some(change) = change else { return };
        count_conflicts(&server, &nodes);
        for agent in server.agents.all() {
            if let Change::Node(name) = &change
                && *name != agent.identity.node_name
            {
                continue;
            }
            let verdict = match nodes.known(&agent.identity.node_name) {
                Ok(facts) => {
                    check_claims(&agent.identity, &facts, &server.config.service_cidrs).map(|()| Some(facts))
                }
                Err(Unknown::NoSuchNode) => Err(format!("Node {:?} was deleted", agent.identity.node_name)),
                Err(Unknown::NotSynced) => Ok(None),
            };
            match verdict {
                Ok(Some(facts)) => {
                    if matches!(change, Change::Node(_)) {
                        info!(agent = %agent.identity.agent_id, "Node changed; the agent's claims still hold");
                    }
                    // Its routes follow its Node (a new pod CIDR or address).
                    server.agents.reroute(&agent, Routes::of(&agent.identity, Some(&facts)));
                }
                Ok(None) => {}
                Err(reason) => {
                    warn!(agent = %agent.identity.agent_id, %reason, "agent's claims no longer hold: ending its session");
                    inc(&server.metrics.agent_conn_failures, "reason", "claim_revoked");
                    agent.end("its claims no longer hold");
                }
            }
        }
    }
}

/// With `--agent-auth token`: ends the sessions whose token's pod was deleted or replaced (the
/// apiserver refuses such a token from then on), and forgets the cached reviews of those tokens, so
/// that a new connection with one is reviewed afresh and refused.
pub(super) async fn revoke_on_pod_changes(
    server: Arc<Server>,
    mut events: tokio::sync::mpsc::Receiver<PodEvent>,
) {
    let reviewer = server.reviewer.as_ref().expect("pods are watched with token authentication");
    while let Some(event) = events.recv().await {
        reviewer.forget_ended(&event);
        for agent in server.agents.all() {
            let Some((pod, uid)) = &agent.credential.pod else { continue };
            if !event.ends(pod, uid.as_deref()) {
                continue;
            }
            warn!(agent = %agent.identity.agent_id, %pod, "the pod the agent's token is bound to is gone: ending its session");
            inc(&server.metrics.agent_conn_failures, "reason", "token_revoked");
            agent.end("its token's pod is gone");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(hostnames: &[&str], addresses: &[&str], cidrs: &[&str]) -> Identity {
        Identity {
            agent_id: "node-a".into(),
            node_name: "node-a".into(),
            hostnames: hostnames.iter().map(|s| (*s).into()).collect(),
            addresses: addresses.iter().map(|s| s.parse().unwrap()).collect(),
            cidrs: cidrs.iter().map(|s| s.parse().unwrap()).collect(),
            default_route: false,
        }
    }

    fn facts() -> NodeFacts {
        NodeFacts {
            names: vec!["node-a.example".into()],
            addresses: vec!["10.0.0.5".parse().unwrap(), "fd00::5".parse().unwrap()],
            pod_cidrs: vec!["10.244.1.0/24".parse().unwrap()],
            ..NodeFacts::default()
        }
    }

    #[test]
    fn own_names_addresses_and_pod_cidrs_are_allowed() {
        let ok = identity(
            &["Node-A", "node-a.example"],
            &["10.0.0.5", "fd00::5"],
            &["10.244.1.0/24", "10.244.1.128/25", "10.0.0.5/32", "fd00::5/128"],
        );
        assert_eq!(check_claims(&ok, &facts(), &[]), Ok(()));
        assert_eq!(check_claims(&identity(&[], &[], &[]), &NodeFacts::default(), &[]), Ok(()));
        let services = ["10.96.0.0/12".parse().unwrap()];
        assert_eq!(check_claims(&identity(&[], &[], &["10.96.0.0/12"]), &facts(), &services), Ok(()));
    }

    #[test]
    fn another_nodes_claims_are_refused() {
        let cases = [
            (identity(&["node-b"], &[], &[]), "host name \"node-b\""),
            (identity(&[], &["10.0.0.6"], &[]), "address 10.0.0.6"),
            (identity(&[], &[], &["10.244.2.7/32"]), "CIDR 10.244.2.7/32"),
            (identity(&[], &[], &["10.244.0.0/16"]), "CIDR 10.244.0.0/16"),
            (identity(&[], &[], &["0.0.0.0/0"]), "CIDR 0.0.0.0/0"),
            (identity(&[], &[], &["10.0.0.0/24"]), "neither inside"),
            (identity(&[], &[], &["10.96.0.0/12"]), "service CIDRs (none)"),
        ];
        for (claim, want) in cases {
            let err = check_claims(&claim, &facts(), &[]).unwrap_err();
            assert!(err.contains(want), "{err}");
        }
    }
}
