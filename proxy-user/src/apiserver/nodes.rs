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
}

impl NodeFacts {
    /// The facts of `node`; values that do not parse are left out (and so never match a claim).
    #[must_use]
    pub fn of(node: &Node) -> Self {
        let mut facts = Self::default();
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
    facts: RwLock<HashMap<String, Arc<NodeFacts>>>,
    /// True once the first complete list arrived.
    ready: watch::Sender<bool>,
    changes: broadcast::Sender<String>,
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
                            this.upsert(name, NodeFacts::of(&node));
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
                facts: RwLock::default(),
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
        self.read().get(name).cloned().ok_or(Unknown::NoSuchNode)
    }

    /// How many nodes are known.
    #[must_use]
    pub fn len(&self) -> usize {
        self.read().len()
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

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<NodeFacts>>> {
        self.inner.facts.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<NodeFacts>>> {
        self.inner.facts.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn notify(&self, name: String) {
        // No subscriber is not an error: nothing needs re-checking.
        let _ = self.inner.changes.send(name);
    }

    /// A complete list replaces what was known; nodes gone from it or changed in it are announced.
    fn replace(&self, listing: HashMap<String, Arc<NodeFacts>>) {
        let old = std::mem::replace(&mut *self.write(), listing);
        let changed: Vec<String> = {
            let new = self.read();
            let gone = old.keys().filter(|name| !new.contains_key(*name));
            let different = new.iter().filter(|(name, facts)| old.get(*name).is_some_and(|o| o != *facts));
            gone.chain(different.map(|(name, _)| name)).cloned().collect()
        };
        let first = !self.inner.ready.send_replace(true);
        if first {
            info!(nodes = self.len(), "node list read from the apiserver");
        }
        for name in changed {
            self.notify(name);
        }
    }

    fn upsert(&self, name: String, facts: NodeFacts) {
        let facts = Arc::new(facts);
        let old = self.write().insert(name.clone(), facts.clone());
        if old.is_some_and(|old| old != facts) {
            self.notify(name);
        }
    }

    fn remove(&self, name: &str) {
        if self.write().remove(name).is_some() {
            self.notify(name.to_owned());
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
        nodes.upsert("a".into(), (*a).clone());
        nodes.upsert("c".into(), NodeFacts::default());
        nodes.upsert("b".into(), NodeFacts::default());
        nodes.remove("c");
        nodes.replace(HashMap::from([("b".to_owned(), Arc::new(NodeFacts::default()))]));
        for expected in ["b", "c", "a"] {
            assert_eq!(changes.next().await, Some(Change::Node(expected.into())));
        }
        assert!(changes.0.is_empty(), "unchanged facts and new nodes are not announced");
    }
}
