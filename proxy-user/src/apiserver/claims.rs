//! Who owns each address, host name and pod CIDR that Node objects list.
//!
//! A kubelet may write its own Node's `status.addresses` (`NodeRestriction` allows it), so a node can
//! list another node's `InternalIP` or host name and, if both counted, take its traffic. The rule: **the node
//! that listed an item first keeps it** while it goes on listing it; any other node that lists it too is
//! in conflict, and the item is left out of that node's facts (so out of its routes and claims). A
//! node's own name is always its own. Who listed first is the order the server saw it; on a fresh list
//! (start-up, or a watch that lost its place), the current owner keeps what it still lists, and items
//! without one go to the oldest Node (`metadata.creationTimestamp`), then the first by name. Pod CIDRs
//! conflict when equal (the control plane assigns them; overlapping but unequal ones are not detected).

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;
use tracing::warn;

use super::nodes::NodeFacts;

/// One item a Node lists.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub enum Item {
    /// An `InternalIP` or `ExternalIP`.
    Address(IpAddr),
    /// A `Hostname`, `InternalDNS` or `ExternalDNS`, lower-cased.
    Name(String),
    /// A pod CIDR.
    PodCidr(IpNet),
}

impl std::fmt::Display for Item {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Address(a) => write!(f, "address {a}"),
            Self::Name(n) => write!(f, "host name {n:?}"),
            Self::PodCidr(c) => write!(f, "pod CIDR {c}"),
        }
    }
}

/// The items of a node's stated facts.
fn items(facts: &NodeFacts) -> BTreeSet<Item> {
    let addresses = facts.addresses.iter().copied().map(Item::Address);
    let names = facts.names.iter().cloned().map(Item::Name);
    addresses.chain(names).chain(facts.pod_cidrs.iter().copied().map(Item::PodCidr)).collect()
}

/// A node as it competes for an item: its own name first, then the oldest, then by name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Lister {
    /// 0 for the node the item names (its own name), 1 otherwise.
    rank: u8,
    created: i64,
    name: String,
}

/// The owners of every listed item, and who else lists them.
#[derive(Debug, Default)]
pub struct Claims {
    owners: HashMap<Item, String>,
    listers: HashMap<Item, BTreeSet<Lister>>,
    /// Items listed by a node that does not own them (the conflicts now).
    conflicts: usize,
    /// Conflicts that arose, ever.
    seen: u64,
}

impl Claims {
    fn lister(item: &Item, name: &str, created: i64) -> Lister {
        let own = matches!(item, Item::Name(n) if n.eq_ignore_ascii_case(name));
        Lister { rank: u8::from(!own), created, name: name.to_owned() }
    }

    /// The conflicts now: items listed by a node that does not own them.
    #[must_use]
    pub fn conflicts(&self) -> usize {
        self.conflicts
    }

    /// Conflicts that arose since the server started.
    #[must_use]
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// The claims of a complete list of nodes: the owners in `before` keep what they still list, the
    /// rest goes to the first in line.
    #[must_use]
    pub fn rebuild(before: &Self, stated: &HashMap<String, std::sync::Arc<NodeFacts>>) -> Self {
        let mut claims = Self { seen: before.seen, ..Self::default() };
        let mut ignored = BTreeSet::new();
        for (item, owner) in &before.owners {
            if let Some(facts) = stated.get(owner).filter(|f| items(f).contains(item)) {
                claims.list(item, Self::lister(item, owner, facts.created), &mut ignored);
            }
        }
        let mut nodes: Vec<(&String, &std::sync::Arc<NodeFacts>)> = stated.iter().collect();
        nodes.sort_by_key(|(name, facts)| (facts.created, name.as_str()));
        for (name, facts) in nodes {
            for item in items(facts) {
                claims.list(&item, Self::lister(&item, name, facts.created), &mut ignored);
            }
        }
        claims
    }

    /// Node `name` now states `new` (before: `old`). Returns the other nodes whose owned items changed.
    pub fn update(
        &mut self,
        name: &str,
        old: Option<&NodeFacts>,
        new: Option<&NodeFacts>,
    ) -> BTreeSet<String> {
        let before = old.map(items).unwrap_or_default();
        let after = new.map(items).unwrap_or_default();
        let (created_before, created_after) = (old.map_or(0, |f| f.created), new.map_or(0, |f| f.created));
        let mut affected = BTreeSet::new();
        for item in before.difference(&after) {
            self.unlist(item, &Self::lister(item, name, created_before), &mut affected);
        }
        for item in after.difference(&before) {
            self.list(item, Self::lister(item, name, created_after), &mut affected);
        }
        affected.remove(name);
        affected
    }

    fn list(&mut self, item: &Item, lister: Lister, affected: &mut BTreeSet<String>) {
        if !self.listers.entry(item.clone()).or_default().insert(lister.clone()) {
            return;
        }
        match self.owners.get(item) {
            None => {
                self.owners.insert(item.clone(), lister.name);
            }
            // A node's own name is its own, whoever listed it first.
            Some(owner) if lister.rank == 0 && *owner != lister.name => {
                warn!(node = %lister.name, %item, from = %owner, "a node's own name taken back from the node that listed it");
                affected.insert(owner.clone());
                self.owners.insert(item.clone(), lister.name);
                self.conflicts += 1;
                self.seen += 1;
            }
            Some(owner) => {
                warn!(
                    node = %lister.name, %item, owner = %owner,
                    "Node lists an item another Node listed first: left out of its routes and claims"
                );
                self.conflicts += 1;
                self.seen += 1;
            }
        }
    }

    fn unlist(&mut self, item: &Item, lister: &Lister, affected: &mut BTreeSet<String>) {
        let Some(listers) = self.listers.get_mut(item) else { return };
        listers.remove(lister);
        let owned = self.owners.get(item) == Some(&lister.name);
        if !owned {
            self.conflicts = self.conflicts.saturating_sub(1);
            return;
        }
        match listers.first() {
            None => {
                self.listers.remove(item);
                self.owners.remove(item);
            }
            Some(next) => {
                // The next in line takes it over; one conflict fewer.
                affected.insert(next.name.clone());
                self.owners.insert(item.clone(), next.name.clone());
                self.conflicts = self.conflicts.saturating_sub(1);
            }
        }
    }

    /// The facts node `name` may use: what it states, less what other nodes own; the items left out
    /// are in `contested`, with their owners.
    #[must_use]
    pub fn effective(&self, name: &str, stated: &NodeFacts) -> NodeFacts {
        let mine = |item: Item| self.owners.get(&item).is_none_or(|owner| owner == name);
        let mut facts = NodeFacts { created: stated.created, ..NodeFacts::default() };
        for item in items(stated) {
            if !mine(item.clone()) {
                let owner = self.owners.get(&item).cloned().unwrap_or_default();
                facts.contested.push((item.to_string(), owner));
                continue;
            }
            match item {
                Item::Address(a) => facts.addresses.push(a),
                Item::Name(n) => facts.names.push(n),
                Item::PodCidr(c) => facts.pod_cidrs.push(c),
            }
        }
        facts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(addresses: &[&str], names: &[&str], created: i64) -> NodeFacts {
        NodeFacts {
            addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
            names: names.iter().map(|n| (*n).to_owned()).collect(),
            created,
            ..NodeFacts::default()
        }
    }

    #[test]
    fn the_node_that_listed_an_item_first_keeps_it_until_it_stops_listing_it() {
        let mut claims = Claims::default();
        let a = facts(&["10.0.0.1"], &["node-a"], 200);
        assert!(claims.update("node-a", None, Some(&a)).is_empty());
        // node-b, older, lists node-a's address later: node-a keeps it.
        let b = facts(&["10.0.0.2", "10.0.0.1"], &["node-b"], 100);
        assert!(claims.update("node-b", None, Some(&b)).is_empty());
        assert_eq!(claims.conflicts(), 1);
        let eb = claims.effective("node-b", &b);
        assert_eq!(eb.addresses, vec!["10.0.0.2".parse::<IpAddr>().unwrap()]);
        assert_eq!(eb.contested, vec![("address 10.0.0.1".to_owned(), "node-a".to_owned())]);
        assert_eq!(claims.effective("node-a", &a).addresses, a.addresses);
        // node-a lets it go: node-b, next in line, gets it and is told.
        let a2 = facts(&["10.0.0.3"], &["node-a"], 200);
        assert_eq!(claims.update("node-a", Some(&a), Some(&a2)), BTreeSet::from(["node-b".to_owned()]));
        assert_eq!(claims.conflicts(), 0);
        assert!(claims.effective("node-b", &b).contested.is_empty());
        // Deleting node-b frees its items.
        claims.update("node-b", Some(&b), None);
        assert!(!claims.owners.contains_key(&Item::Address("10.0.0.1".parse().unwrap())));
    }

    #[test]
    fn a_nodes_own_name_is_its_own_whoever_listed_it_first() {
        let mut claims = Claims::default();
        let b = facts(&[], &["node-a"], 100);
        claims.update("node-b", None, Some(&b));
        let a = facts(&[], &["node-a"], 200);
        assert_eq!(claims.update("node-a", None, Some(&a)), BTreeSet::from(["node-b".to_owned()]));
        assert_eq!(claims.effective("node-a", &a).names, vec!["node-a".to_owned()]);
        assert!(claims.effective("node-b", &b).names.is_empty());
        assert_eq!(claims.conflicts(), 1);
    }
}
