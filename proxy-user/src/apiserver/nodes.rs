//! What the apiserver says about each node, kept current by a watch: its names, its addresses and its
//! pod CIDRs (`status.addresses`, `spec.podCIDRs`). Only these few facts are kept, not the Node objects
//! (whose status, with its image list, is tens of KiB per node).

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::pin;
use std::sync::{Arc, RwLock};

use futures_util::StreamExt as _;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::claims::Claims;

/// Changed node names buffered for the subscriber; past it, it is told to re-check every node.
const CHANGES_QUEUE: usize = 1024;

/// One node's facts, as its Node object states them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeFacts {
    /// `status.addresses` of type `Hostname`, `InternalDNS` and `ExternalDNS`, lower-cased.
    pub names: Vec<String>,
    /// `status.addresses` of type `InternalIP` and `ExternalIP`.
    pub addresses: Vec<IpAddr>,
    /// `spec.podCIDRs` (or, where only it is set, `spec.podCIDR`).
    pub pod_cidrs: Vec<IpNet>,
    /// `metadata.creationTimestamp`, seconds since the epoch (0 where unknown): the older Node is first
    /// in line for an item two Nodes list ([`super::claims`]).
    pub created: i64,
    /// Items the Node lists that another Node listed first, as (item, owner): left out of the fields
    /// above ([`super::claims`]).
    pub contested: Vec<(String, String)>,
}

impl NodeFacts {
    /// The facts of `node`; values that do not parse are left out (and so never match a claim).
    #[must_use]
    pub fn of(node: &Node) -> Self {
        let created = node.metadata.creation_timestamp.as_ref().map_or(0, |t| t.0.as_second());
        let mut facts = Self { created, ..Self::default() };
        for a in node.status.as_ref().and_then(|s| s.addresses.as_deref()).unwrap_or_default() {
            match a.type_.as_str() {
                "InternalIP" | "ExternalIP" => facts.addresses.extend(a.address.parse::<IpAddr>().ok()),
                "Hostname" | "InternalDNS" | "ExternalDNS" => {
                    facts.names.push(a.address.to_ascii_lowercase());
                }
                _ => {}
            }
        }
        if let Some(spec) = &node.spec {
            let cidrs = match (&spec.pod_cidrs, &spec.pod_cidr) {
                (Some(list), _) if !list.is_empty() => list.clone(),
                (_, Some(one)) => vec![one.clone()],
                _ => Vec::new(),
            };
            facts.pod_cidrs = cidrs.iter().filter_map(|c| c.parse().ok()).collect();
        }
        facts
    }
}

/// A change the subscriber of [`Nodes::changes`] should act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// This node's facts changed, or it was deleted.
    Node(String),
    /// Changes were missed: re-check every node.
    All,
}

/// The nodes' facts, shared by every task of the server.
#[derive(Clone, Debug)]
pub struct Nodes {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    state: RwLock<State>,
    /// True once the first complete list arrived.
    ready: watch::Sender<bool>,
    changes: broadcast::Sender<String>,
}

/// The Nodes as stated, who owns what they list, and the facts each may use.
#[derive(Debug, Default)]
struct State {
    stated: HashMap<String, Arc<NodeFacts>>,
    claims: Claims,
    facts: HashMap<String, Arc<NodeFacts>>,
}

impl State {
    /// Node `name`'s facts again from its stated ones: `true` when a node known before changed or went
    /// (a new one is announced by nothing: no agent of it was admitted yet).
    fn refresh(&mut self, name: &str) -> bool {
        let Some(stated) = self.stated.get(name) else { return self.facts.remove(name).is_some() };
        let facts = Arc::new(self.claims.effective(name, stated));
        self.facts.insert(name.to_owned(), facts.clone()).is_some_and(|old| old != facts)
    }
}

/// Why a node's facts are not known.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unknown {
    /// The first list of nodes has not arrived yet.
    #[error("the node list has not been read from the apiserver yet")]
    NotSynced,
    /// The apiserver has no Node of that name.
    #[error("the apiserver has no Node of that name")]
    NoSuchNode,
}

impl Nodes {
    /// Watches every Node through `client` until `stop`; the watch retries with backoff on errors.
    #[must_use]
    pub fn watch(client: Client, stop: CancellationToken) -> Self {
        let nodes = Self::empty();
        let api: Api<Node> = Api::all(client);
        let events = watcher::watcher(api, watcher::Config::default()).default_backoff();
        let this = nodes.clone();
        tokio::spawn(async move {
            let mut events = pin!(events);
            let mut listing: Option<HashMap<String, Arc<NodeFacts>>> = None;
            loop {
                let event = tokio::select! {
                    () = stop.cancelled() => return,
                    event = events.next() => event,
                };
                match event {
                    None => return,
                    Some(Err(error)) => warn!(%error, "watching Nodes (retrying with backoff)"),
                    Some(Ok(Event::Init)) => listing = Some(HashMap::new()),
                    Some(Ok(Event::InitApply(node))) => {
                        if let (Some(listing), Some(name)) = (listing.as_mut(), node.metadata.name.clone()) {
                            listing.insert(name, Arc::new(NodeFacts::of(&node)));
                        }
                    }
                    Some(Ok(Event::InitDone)) => this.replace(listing.take().unwrap_or_default()),
                    Some(Ok(Event::Apply(node))) => {
                        if let Some(name) = node.metadata.name.clone() {
                            this.upsert(&name, NodeFacts::of(&node));
                        }
                    }
                    Some(Ok(Event::Delete(node))) => {
                        if let Some(name) = node.metadata.name.clone() {
                            this.remove(&name);
                        }
                    }
                }
            }
        });
        nodes
    }

    fn empty() -> Self {
        Self {
            inner: Arc::new(Inner {
                state: RwLock::default(),
                ready: watch::Sender::new(false),
                changes: broadcast::Sender::new(CHANGES_QUEUE),
            }),
        }
    }

    /// The facts of node `name`, waiting (until `deadline`) for the first list if it has not arrived.
    pub async fn get(&self, name: &str, deadline: Instant) -> Result<Arc<NodeFacts>, Unknown> {
        let mut ready = self.inner.ready.subscribe();
        if tokio::time::timeout_at(deadline, ready.wait_for(|r| *r)).await.is_err() {
            return Err(Unknown::NotSynced);
        }
        self.known(name)
    }

    /// The facts of node `name` as known now.
    pub fn known(&self, name: &str) -> Result<Arc<NodeFacts>, Unknown> {
        if !*self.inner.ready.borrow() {
            return Err(Unknown::NotSynced);
        }
        self.read().facts.get(name).cloned().ok_or(Unknown::NoSuchNode)
    }

    /// How many nodes are known.
    #[must_use]
    pub fn len(&self) -> usize {
        self.read().facts.len()
    }

    /// Items listed now by a Node that another Node listed first ([`super::claims`]), and how many
    /// such conflicts arose since the start.
    #[must_use]
    pub fn conflicts(&self) -> (usize, u64) {
        let state = self.read();
        (state.claims.conflicts(), state.claims.seen())
    }

    /// Whether no node is known.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Changes from now on: a node whose facts changed or that was deleted.
    #[must_use]
    pub fn changes(&self) -> Changes {
        Changes(self.inner.changes.subscribe())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.inner.state.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.inner.state.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn notify(&self, name: String) {
        // No subscriber is not an error: nothing needs re-checking.
        let _ = self.inner.changes.send(name);
    }

    /// A complete list replaces what was known; nodes gone from it or whose facts changed are announced.
    fn replace(&self, listing: HashMap<String, Arc<NodeFacts>>) {
        let changed: Vec<String> = {
            let mut state = self.write();
            state.claims = Claims::rebuild(&state.claims, &listing);
            state.stated = listing;
            let names: std::collections::BTreeSet<String> =
                state.stated.keys().chain(state.facts.keys()).cloned().collect();
            names.into_iter().filter(|name| state.refresh(name)).collect()
        };
        let first = !self.inner.ready.send_replace(true);
        if first {
            info!(nodes = self.len(), "node list read from the apiserver");
        }
        for name in changed {
            self.notify(name);
        }
    }

    fn upsert(&self, name: &str, facts: NodeFacts) {
        self.update(name, Some(&Arc::new(facts)));
    }

    fn remove(&self, name: &str) {
        self.update(name, None);
    }

    /// Node `name` states `facts` now (`None`: deleted); it and every node whose owned items changed
    /// with it are announced where their facts changed.
    fn update(&self, name: &str, facts: Option<&Arc<NodeFacts>>) {
        let changed: Vec<String> = {
            let mut state = self.write();
            let old = match facts {
                Some(f) => state.stated.insert(name.to_owned(), f.clone()),
                None => state.stated.remove(name),
            };
            let mut affected = state.claims.update(name, old.as_deref(), facts.map(AsRef::as_ref));
            affected.insert(name.to_owned());
            affected.into_iter().filter(|n| state.refresh(n)).collect()
        };
        for name in changed {
            self.notify(name);
        }
    }
}

/// A subscription to node changes.
#[derive(Debug)]
pub struct Changes(broadcast::Receiver<String>);

impl Changes {
    /// The next change; `None` once the watch is gone.
    pub async fn next(&mut self) -> Option<Change> {
        match self.0.recv().await {
            Ok(name) => Some(Change::Node(name)),
            Err(broadcast::error::RecvError::Lagged(_)) => Some(Change::All),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(addresses: &[(&str, &str)], pod_cidrs: &[&str]) -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n"},
            "spec": {"podCIDR": pod_cidrs.first(), "podCIDRs": pod_cidrs},
            "status": {"addresses": addresses.iter().map(|(t, a)| serde_json::json!({"type": t, "address": a})).collect::<Vec<_>>()},
        }))
        .unwrap()
    }

    #[test]
    fn facts_come_from_status_addresses_and_pod_cidrs() {
        let facts = NodeFacts::of(&node(
            &[
                ("InternalIP", "10.0.0.5"),
                ("ExternalIP", "2001:db8::5"),
                ("Hostname", "Node-A"),
                ("Bogus", "x"),
            ],
            &["10.244.1.0/24", "fd00:1::/64"],
        ));
        assert_eq!(facts.names, ["node-a"]);
        assert_eq!(facts.addresses, ["10.0.0.5".parse::<IpAddr>().unwrap(), "2001:db8::5".parse().unwrap()]);
        assert_eq!(
            facts.pod_cidrs,
            ["10.244.1.0/24".parse::<IpNet>().unwrap(), "fd00:1::/64".parse().unwrap()]
        );
        assert_eq!(NodeFacts::of(&node(&[], &[])), NodeFacts::default());
    }

    #[tokio::test]
    async fn changes_are_announced_only_when_facts_change() {
        let nodes = Nodes::empty();
        let deadline = Instant::now();
        assert_eq!(nodes.get("a", deadline).await.unwrap_err(), Unknown::NotSynced);
        let mut changes = nodes.changes();
        let a = Arc::new(NodeFacts { names: vec!["a".into()], ..NodeFacts::default() });
        nodes.replace(HashMap::from([("a".to_owned(), a.clone()), ("b".to_owned(), a.clone())]));
        assert_eq!(*nodes.get("a", deadline).await.unwrap(), *a);
        assert_eq!(nodes.known("c").unwrap_err(), Unknown::NoSuchNode);
        nodes.upsert("a", (*a).clone());
        nodes.upsert("c", NodeFacts::default());
        nodes.upsert("b", NodeFacts::default());
        nodes.remove("c");
        nodes.replace(HashMap::from([("b".to_owned(), Arc::new(NodeFacts::default()))]));
        for expected in ["b", "c", "a"] {
            assert_eq!(changes.next().await, Some(Change::Node(expected.into())));
        }
        assert!(changes.0.is_empty(), "unchanged facts and new nodes are not announced");
    }
}
