//! The connected agents, their parked data connections, and routing of a destination to an agent.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use ipnet::IpNet;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::apiserver::nodes::NodeFacts;
use crate::protocol::{DataKey, Identity, Nonces, SessionId};
use crate::transport::AcceptedLink;
use crate::transport::counted::Ends;

/// A data connection parked by an agent.
pub type DataConn = AcceptedLink;

/// A parked data connection, with the nonces of its challenge where it answered one (its `Dial` is then
/// signed with the session's data key and these nonces).
#[derive(Debug)]
pub struct Parked {
    /// The connection.
    pub conn: DataConn,
    /// The challenge's nonces; `None` over TLS with a node certificate.
    pub nonces: Option<Nonces>,
}

/// How the server picks the agent for a destination; tried in the configured order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// An agent whose node name, host names or addresses equal the destination host.
    DestHost,
    /// The agent announcing the longest CIDR prefix that contains the destination address.
    Cidr,
    /// An agent that announced itself as a default route.
    DefaultRoute,
    /// Any connected agent.
    Default,
}

impl FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "destHost" => Ok(Self::DestHost),
            "cidr" => Ok(Self::Cidr),
            "defaultRoute" => Ok(Self::DefaultRoute),
            "default" => Ok(Self::Default),
            _ => Err(format!("unknown proxy strategy {s:?} (destHost, cidr, defaultRoute, default)")),
        }
    }
}

/// What a session's agent proved itself with, where that can be taken back or run out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Credential {
    /// The pod its token is bound to, with that pod's uid where the token names it (`--agent-auth
    /// token`): the session ends when the pod goes.
    pub pod: Option<(String, Option<String>)>,
    /// When its token expires: the session ends then.
    pub expires: Option<std::time::SystemTime>,
}

/// One connected agent: its identity, its pool of data connections and its stream slots.
#[derive(Debug)]
pub struct AgentHandle {
    /// What the agent announced.
    pub identity: Identity,
    /// Its control session; data connections must quote it.
    pub session_id: SessionId,
    /// Set when the agent asked to drain: no new streams go to it.
    pub draining: AtomicBool,
    /// Stream slots (the per-agent stream limit).
    pub stream_slots: Arc<Semaphore>,
    /// Cancelled when the control session ends; pending takes give up.
    pub gone: CancellationToken,
    /// The session's data key (see [`DataKey`]).
    pub data_key: DataKey,
    /// The session's counted stream ends (TLS data connections carry one stream after another).
    pub ends: Arc<Ends>,
    /// What the agent proved itself with.
    pub credential: Credential,
    /// Why [`Self::end`] ended the session.
    end_reason: std::sync::OnceLock<&'static str>,
    /// Parked connections, each with its place in the server's shared pool (`None`: one of the agent's
    /// own [`PARKED_PER_AGENT`]).
    idle: Mutex<VecDeque<(Parked, Option<OwnedSemaphorePermit>)>>,
    idle_added: Notify,
    parking: Parking,
    /// When a dial last took a parked connection (or the session began).
    last_taken: Mutex<Instant>,
    /// Frames heard on the control channel, counted: a probe waits for it to move.
    heard: tokio::sync::watch::Sender<u64>,
    /// Asks the session loop to send a `Ping` now (a newer claimant of the identity arrived).
    probe: Notify,
    /// When a claimant refused in this session's favour was last logged at warn level.
    refusal_logged: Mutex<Option<Instant>>,
}

/// Data connections every agent may park whatever `--max-parked-conns` says: a node never goes without
/// a ready connection because others filled the server's pool.
pub const PARKED_PER_AGENT: usize = 2;

/// Where an agent's data connections park: its own limit, and the server's pool shared by all agents.
#[derive(Clone, Debug)]
pub struct Parking {
    /// Most connections this agent may park (`--max-idle-per-agent`).
    pub max_idle: usize,
    /// Places beyond each agent's first [`PARKED_PER_AGENT`], shared by all agents
    /// (`--max-parked-conns` less what every agent may always park).
    pub shared: Arc<Semaphore>,
    /// Counts parked connections across all agents.
    pub gauge: Gauge,
}

impl Parking {
    /// Places for `max_parked` connections across `max_agents` agents, each parking at most
    /// `max_idle`.
    #[must_use]
    pub fn new(max_idle: usize, max_parked: usize, max_agents: usize, gauge: Gauge) -> Self {
        let shared = max_parked.saturating_sub(max_agents * PARKED_PER_AGENT);
        Self { max_idle, shared: Arc::new(Semaphore::new(shared)), gauge }
    }
}

/// Why a data connection was not parked.
#[derive(Debug, PartialEq, Eq)]
pub enum ParkError {
    /// The agent already parked its maximum.
    Full,
    /// The server's pool is full (`--max-parked-conns`).
    ServerFull,
    /// The session is over or draining.
    Closed,
}

impl AgentHandle {
    /// A new handle; `idle_gauge` counts parked connections across all agents.
    #[must_use]
    pub fn new(
        identity: Identity,
        session_id: SessionId,
        data_key: DataKey,
        max_streams: usize,
        parking: Parking,
        ends: Arc<Ends>,
    ) -> Self {
        Self {
            identity,
            session_id,
            data_key,
            draining: AtomicBool::new(false),
            stream_slots: Arc::new(Semaphore::new(max_streams)),
            gone: CancellationToken::new(),
            idle: Mutex::new(VecDeque::new()),
            idle_added: Notify::new(),
            parking,
            last_taken: Mutex::new(Instant::now()),
            ends,
            credential: Credential::default(),
            end_reason: std::sync::OnceLock::new(),
            heard: tokio::sync::watch::Sender::new(0),
            probe: Notify::new(),
            refusal_logged: Mutex::new(None),
        }
    }

    /// The handle with what its agent proved itself with.
    #[must_use]
    pub fn with_credential(mut self, credential: Credential) -> Self {
        self.credential = credential;
        self
    }

    /// Ends the session for `reason` (its claims or credential no longer hold, or a newer session took
    /// over): pending takes give up, and the session loop closes the channel.
    pub fn end(&self, reason: &'static str) {
        let _ = self.end_reason.set(reason);
        self.gone.cancel();
    }

    /// Why the session was ended by [`Self::end`] (or cancelled).
    pub fn end_reason(&self) -> &'static str {
        self.end_reason.get().copied().unwrap_or("ended by the server")
    }

    /// Counts a frame heard on the control channel.
    pub fn heard(&self) {
        self.heard.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Resolves when the session loop is asked to probe the agent with a `Ping`.
    pub async fn probe_requested(&self) {
        self.probe.notified().await;
    }

    /// Whether this session still holds its identity against a newer claimant: it is neither gone nor
    /// draining, and its agent answers a `Ping` within `within` (a channel broken on the agent's side
    /// only, or a node gone without a FIN, answers nothing).
    pub async fn holds_identity(&self, within: std::time::Duration) -> bool {
        if !self.usable() {
            return false;
        }
        let mut heard = self.heard.subscribe();
        heard.mark_unchanged();
        self.probe.notify_one();
        tokio::select! {
            changed = heard.changed() => changed.is_ok() && self.usable(),
            () = self.gone.cancelled() => false,
            () = tokio::time::sleep(within) => false,
        }
    }

    /// Whether a refusal in this session's favour should be logged at warn level: at most once per
    /// `every`, so that a claimant retrying through a rollout does not flood the log.
    pub fn log_refusal(&self, every: std::time::Duration) -> bool {
        let mut last = self.refusal_logged.lock().expect("refusal lock poisoned");
        let now = Instant::now();
        if last.is_some_and(|t| now < t + every) {
            return false;
        }
        *last = Some(now);
        true
    }

    /// Streams open through this agent (the load used to spread requests).
    fn load(&self, max_streams: usize) -> usize {
        max_streams.saturating_sub(self.stream_slots.available_permits())
    }

    fn usable(&self) -> bool {
        !self.draining.load(Ordering::Relaxed) && !self.gone.is_cancelled()
    }

    /// Parks a data connection until a dial takes it; gives it back where it cannot park.
    pub fn park(&self, conn: Parked) -> Result<(), (ParkError, Parked)> {
        if !self.usable() {
            return Err((ParkError::Closed, conn));
        }
        let mut idle = self.idle.lock().expect("idle lock poisoned");
        if idle.len() >= self.parking.max_idle {
            return Err((ParkError::Full, conn));
        }
        let own = idle.iter().filter(|(_, place)| place.is_none()).count();
        let place = if own < PARKED_PER_AGENT {
            None
        } else {
            match self.parking.shared.clone().try_acquire_owned() {
                Ok(place) => Some(place),
                Err(_) => return Err((ParkError::ServerFull, conn)),
            }
        };
        idle.push_back((conn, place));
        self.parking.gauge.inc();
        drop(idle);
        self.idle_added.notify_one();
        Ok(())
    }

    /// Takes a parked data connection, waiting for one until `deadline`; `None` on timeout or when the
    /// agent went away.
    pub async fn take(&self, deadline: Instant) -> Option<Parked> {
        loop {
            let added = self.idle_added.notified();
            tokio::pin!(added);
            added.as_mut().enable();
            if let Some((conn, _place)) = self.idle.lock().expect("idle lock poisoned").pop_front() {
                self.parking.gauge.dec();
                *self.last_taken.lock().expect("last_taken lock poisoned") = Instant::now();
                return Some(conn);
            }
            if self.gone.is_cancelled() {
                return None;
            }
            tokio::select! {
                () = added => {}
                () = self.gone.cancelled() => return None,
                () = tokio::time::sleep_until(deadline) => return None,
            }
        }
    }

    /// The parked connections beyond the agent's own [`PARKED_PER_AGENT`], taken out when no dial took
    /// one for `idle_for`: an idle node keeps few parked, a busy one what its pool holds.
    pub fn surplus(&self, idle_for: std::time::Duration) -> Vec<Parked> {
        if self.last_taken.lock().expect("last_taken lock poisoned").elapsed() < idle_for {
            return Vec::new();
        }
        let mut idle = self.idle.lock().expect("idle lock poisoned");
        // The agent's own places are kept before places in the shared pool, which others may need.
        let mut all: Vec<_> = idle.drain(..).collect();
        all.sort_by_key(|(_, place)| place.is_some());
        let surplus: Vec<Parked> = all
            .split_off(all.len().min(PARKED_PER_AGENT))
            .into_iter()
            .map(|(parked, _place)| parked)
            .collect();
        idle.extend(all);
        drop(idle);
        self.parking.gauge.dec_by(i64::try_from(surplus.len()).unwrap_or(i64::MAX));
        surplus
    }

    /// Closes every parked connection (the agent is draining or gone).
    pub fn drop_idle(&self) {
        let drained: Vec<_> = self.idle.lock().expect("idle lock poisoned").drain(..).collect();
        self.parking.gauge.dec_by(i64::try_from(drained.len()).unwrap_or(i64::MAX));
    }
}

/// Where an agent takes streams: what it announced and, where the server reads Node objects, what its
/// Node states (so that a node's pod CIDR and addresses route to it even when its agent announces none).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Routes {
    /// Exact destination hosts (normalized: canonical address text or a lower-case name).
    pub hosts: Vec<String>,
    /// Networks, for longest-prefix routing.
    pub cidrs: Vec<IpNet>,
    /// Whether the agent takes destinations nothing else matched.
    pub default_route: bool,
}

impl Routes {
    /// The routes of an agent announcing `identity`, on a node `facts` describes (if known).
    #[must_use]
    pub fn of(identity: &Identity, facts: Option<&NodeFacts>) -> Self {
        let mut hosts: Vec<String> = std::iter::once(identity.node_name.clone())
            .chain(identity.hostnames.iter().cloned())
            .chain(identity.addresses.iter().map(ToString::to_string))
            .chain(facts.iter().flat_map(|f| f.names.iter().cloned()))
            .chain(facts.iter().flat_map(|f| f.addresses.iter().map(ToString::to_string)))
            .map(|k| host_key(&k))
            .collect();
        hosts.sort_unstable();
        hosts.dedup();
        let mut cidrs: Vec<IpNet> =
            identity.cidrs.iter().chain(facts.iter().flat_map(|f| f.pod_cidrs.iter())).copied().collect();
        cidrs.sort_unstable();
        cidrs.dedup();
        Self { hosts, cidrs, default_route: identity.default_route }
    }
}

#[derive(Debug, Default)]
struct Index {
    by_id: HashMap<String, (Arc<AgentHandle>, Routes)>,
    by_session: HashMap<SessionId, Arc<AgentHandle>>,
    by_host: HashMap<String, Vec<Arc<AgentHandle>>>,
    cidrs: Vec<(IpNet, Arc<AgentHandle>)>,
    default_routes: Vec<Arc<AgentHandle>>,
}

/// Normalizes a destination host for exact matching: canonical address text, or a lower-case name.
fn host_key(host: &str) -> String {
    let trimmed = host.trim_start_matches('[').trim_end_matches(']');
    trimmed.parse::<IpAddr>().map_or_else(|_| trimmed.to_ascii_lowercase(), |ip| ip.to_string())
}

impl Index {
    fn insert(&mut self, agent: &Arc<AgentHandle>, routes: Routes) {
        self.by_session.insert(agent.session_id, agent.clone());
        for key in &routes.hosts {
            self.by_host.entry(key.clone()).or_default().push(agent.clone());
        }
        self.cidrs.extend(routes.cidrs.iter().map(|n| (*n, agent.clone())));
        if routes.default_route {
            self.default_routes.push(agent.clone());
        }
        self.by_id.insert(agent.identity.agent_id.clone(), (agent.clone(), routes));
    }

    fn remove(&mut self, agent: &Arc<AgentHandle>) {
        let Some((_, routes)) = self.by_id.remove(&agent.identity.agent_id) else { return };
        self.by_session.remove(&agent.session_id);
        for key in &routes.hosts {
            if let Some(list) = self.by_host.get_mut(key) {
                list.retain(|a| !Arc::ptr_eq(a, agent));
                if list.is_empty() {
                    self.by_host.remove(key);
                }
            }
        }
        self.cidrs.retain(|(_, a)| !Arc::ptr_eq(a, agent));
        self.default_routes.retain(|a| !Arc::ptr_eq(a, agent));
    }

    fn is_current(&self, agent: &Arc<AgentHandle>) -> bool {
        self.by_id.get(&agent.identity.agent_id).is_some_and(|(a, _)| Arc::ptr_eq(a, agent))
    }
}

/// All connected agents, indexed for every routing strategy.
#[derive(Debug)]
pub struct AgentRegistry {
    index: RwLock<Index>,
    /// Bumped at every registration, for requests waiting for an agent.
    registrations: tokio::sync::watch::Sender<u64>,
    strategies: Vec<Strategy>,
    /// Networks any agent reaches (service CIDRs, the pod network): the `cidr` strategy's last resort.
    any_agent: Vec<IpNet>,
    max_streams: usize,
}

impl AgentRegistry {
    /// An empty registry routing with `strategies` in order; destinations inside `any_agent` that no
    /// agent's own CIDR matches go to any agent.
    #[must_use]
    pub fn new(strategies: Vec<Strategy>, any_agent: Vec<IpNet>, max_streams: usize) -> Self {
        Self {
            index: RwLock::new(Index::default()),
            registrations: tokio::sync::watch::Sender::new(0),
            strategies,
            any_agent,
            max_streams,
        }
    }

    /// A receiver that sees every registration after this call (`changed()`).
    pub fn registrations(&self) -> tokio::sync::watch::Receiver<u64> {
        self.registrations.subscribe()
    }

    /// Number of registered agents.
    pub fn len(&self) -> usize {
        self.index.read().expect("registry lock poisoned").by_id.len()
    }

    /// Whether an agent with this id is registered.
    pub fn contains(&self, agent_id: &str) -> bool {
        self.index.read().expect("registry lock poisoned").by_id.contains_key(agent_id)
    }

    /// Whether no agent is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The registered session of `agent_id`.
    pub fn get(&self, agent_id: &str) -> Option<Arc<AgentHandle>> {
        self.index.read().expect("registry lock poisoned").by_id.get(agent_id).map(|(a, _)| a.clone())
    }

    /// Registers `agent` with its `routes` if the session registered under its id is still `expected`
    /// (`None`: none is) or none is, replacing and returning that one; `Err` with the session registered
    /// meanwhile otherwise (two claimants raced: the first keeps the identity).
    pub fn register(
        &self,
        agent: &Arc<AgentHandle>,
        routes: Routes,
        expected: Option<SessionId>,
    ) -> Result<Option<Arc<AgentHandle>>, Arc<AgentHandle>> {
        let mut index = self.index.write().expect("registry lock poisoned");
        let old = index.by_id.get(&agent.identity.agent_id).map(|(a, _)| a.clone());
        if let Some(current) = &old
            && Some(current.session_id) != expected
        {
            return Err(current.clone());
        }
        if let Some(old) = &old {
            index.remove(old);
        }
        index.insert(agent, routes);
        drop(index);
        self.registrations.send_modify(|n| *n += 1);
        Ok(old)
    }

    /// Gives `agent`, if it is still registered, new `routes` (its Node changed).
    pub fn reroute(&self, agent: &Arc<AgentHandle>, routes: Routes) {
        let mut index = self.index.write().expect("registry lock poisoned");
        if index.is_current(agent) && index.by_id[&agent.identity.agent_id].1 != routes {
            index.remove(agent);
            index.insert(agent, routes);
        }
    }

    /// Removes `agent` if it is still the registered session of its id.
    pub fn unregister(&self, agent: &Arc<AgentHandle>) {
        let mut index = self.index.write().expect("registry lock poisoned");
        if index.is_current(agent) {
            index.remove(agent);
        }
    }

    /// Every registered agent.
    pub fn all(&self) -> Vec<Arc<AgentHandle>> {
        self.index.read().expect("registry lock poisoned").by_id.values().map(|(a, _)| a.clone()).collect()
    }

    /// The agent of a live control session.
    pub fn session(&self, session_id: SessionId) -> Option<Arc<AgentHandle>> {
        self.index.read().expect("registry lock poisoned").by_session.get(&session_id).cloned()
    }

    /// Picks the agent for `host`: the first strategy with a usable candidate wins; among its equal
    /// candidates, the less loaded of two random picks.
    pub fn route(&self, host: &str) -> Option<Arc<AgentHandle>> {
        let index = self.index.read().expect("registry lock poisoned");
        let key = host_key(host);
        let ip = key.parse::<IpAddr>().ok();
        for strategy in &self.strategies {
            let candidates: Vec<&Arc<AgentHandle>> = match strategy {
                Strategy::DestHost => index.by_host.get(&key).map(|l| l.iter().collect()).unwrap_or_default(),
                Strategy::Cidr => {
                    let Some(ip) = ip else { continue };
                    let matching = index.cidrs.iter().filter(|(n, a)| n.contains(&ip) && a.usable());
                    let longest = matching.clone().map(|(n, _)| n.prefix_len()).max();
                    let own: Vec<_> =
                        matching.filter(|(n, _)| Some(n.prefix_len()) == longest).map(|(_, a)| a).collect();
                    if own.is_empty() && self.any_agent.iter().any(|n| n.contains(&ip)) {
                        index.by_id.values().map(|(a, _)| a).collect()
                    } else {
                        own
                    }
                }
                Strategy::DefaultRoute => index.default_routes.iter().collect(),
                Strategy::Default => index.by_id.values().map(|(a, _)| a).collect(),
            };
            let usable: Vec<&Arc<AgentHandle>> = candidates.into_iter().filter(|a| a.usable()).collect();
            if let Some(pick) = self.pick(&usable) {
                return Some(pick.clone());
            }
        }
        None
    }

    fn pick<'a>(&self, candidates: &[&'a Arc<AgentHandle>]) -> Option<&'a Arc<AgentHandle>> {
        match candidates.len() {
            0 => None,
            1 => Some(candidates[0]),
            n => {
                let a = candidates[fastrand::usize(..n)];
                let b = candidates[fastrand::usize(..n)];
                Some(if b.load(self.max_streams) < a.load(self.max_streams) { b } else { a })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn agent(
        id: &str,
        hosts: &[&str],
        addrs: &[&str],
        cidrs: &[&str],
        default_route: bool,
    ) -> Arc<AgentHandle> {
        Arc::new(AgentHandle::new(
            Identity {
                agent_id: id.into(),
                node_name: id.into(),
                hostnames: hosts.iter().map(|h| (*h).to_owned()).collect(),
                addresses: addrs.iter().map(|a| a.parse().unwrap()).collect(),
                cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
                default_route,
            },
            SessionId(fastrand::u128(..)),
            DataKey::new(&[0; 32]),
            16,
            Parking::new(4, 1000, 10, Gauge::default()),
            Ends::new().0,
        ))
    }

    fn reg(r: &AgentRegistry, a: &Arc<AgentHandle>) -> Option<Arc<AgentHandle>> {
        let expected = r.get(&a.identity.agent_id).map(|old| old.session_id);
        r.register(a, Routes::of(&a.identity, None), expected).expect("nothing raced")
    }

    fn routed(r: &AgentRegistry, host: &str) -> Option<String> {
        r.route(host).map(|a| a.identity.agent_id.clone())
    }

    #[test]
    fn strategies_in_order() {
        let r =
            AgentRegistry::new(vec![Strategy::DestHost, Strategy::Cidr, Strategy::DefaultRoute], vec![], 16);
        reg(&r, &agent("node-a", &["a.example"], &["10.0.0.1", "fd00::1"], &["10.244.0.0/16"], false));
        reg(&r, &agent("node-b", &[], &["10.0.0.2"], &["10.244.1.0/24"], false));
        reg(&r, &agent("edge", &[], &[], &[], true));
        assert_eq!(routed(&r, "10.0.0.1").as_deref(), Some("node-a"));
        assert_eq!(routed(&r, "[fd00:0:0::1]").as_deref(), Some("node-a"));
        assert_eq!(routed(&r, "A.Example").as_deref(), Some("node-a"));
        assert_eq!(routed(&r, "node-b").as_deref(), Some("node-b"));
        // longest prefix wins
        assert_eq!(routed(&r, "10.244.1.7").as_deref(), Some("node-b"));
        assert_eq!(routed(&r, "10.244.9.7").as_deref(), Some("node-a"));
        assert_eq!(routed(&r, "192.0.2.1").as_deref(), Some("edge"));
        assert_eq!(routed(&r, "unknown.example").as_deref(), Some("edge"));
        let strict = AgentRegistry::new(vec![Strategy::DestHost], vec![], 16);
        reg(&strict, &agent("node-a", &[], &["10.0.0.1"], &[], false));
        assert_eq!(routed(&strict, "10.0.0.9"), None);
    }

    #[test]
    fn draining_and_replaced_agents_are_skipped() {
        let r = AgentRegistry::new(vec![Strategy::DestHost, Strategy::Default], vec![], 16);
        let a = agent("node-a", &[], &["10.0.0.1"], &[], false);
        let b = agent("node-b", &[], &["10.0.0.2"], &[], false);
        reg(&r, &a);
        reg(&r, &b);
        a.draining.store(true, Ordering::Relaxed);
        assert_eq!(routed(&r, "10.0.0.1").as_deref(), Some("node-b"), "falls through to default");
        let a2 = agent("node-a", &[], &["10.0.0.1"], &[], false);
        let old = reg(&r, &a2).expect("replaces the earlier session");
        assert!(Arc::ptr_eq(&old, &a));
        assert_eq!(routed(&r, "10.0.0.1").as_deref(), Some("node-a"));
        r.unregister(&a); // stale session: no effect
        assert_eq!(r.len(), 2);
        assert!(r.session(a2.session_id).is_some());
        r.unregister(&a2);
        assert_eq!(r.len(), 1);
        assert!(r.session(a2.session_id).is_none());
    }

    #[test]
    fn a_claimant_that_lost_a_race_does_not_replace_the_winner() {
        let r = AgentRegistry::new(vec![Strategy::DestHost], vec![], 16);
        let old = agent("node-a", &[], &["10.0.0.1"], &[], false);
        reg(&r, &old);
        // Two claimants each saw `old` and found it gone; the first registers, the second must not.
        let (first, second) = (
            agent("node-a", &[], &["10.0.0.1"], &[], false),
            agent("node-a", &[], &["10.0.0.1"], &[], false),
        );
        let seen = Some(old.session_id);
        assert!(Arc::ptr_eq(
            &r.register(&first, Routes::of(&first.identity, None), seen).unwrap().unwrap(),
            &old
        ));
        let winner =
            r.register(&second, Routes::of(&second.identity, None), seen).expect_err("lost the race");
        assert!(Arc::ptr_eq(&winner, &first));
        assert!(r.session(second.session_id).is_none());
        // A claimant that saw nobody registers if the id is still free, not over a session.
        let third = agent("node-a", &[], &["10.0.0.1"], &[], false);
        assert!(r.register(&third, Routes::of(&third.identity, None), None).is_err());
        r.unregister(&first);
        assert!(r.register(&third, Routes::of(&third.identity, None), seen).unwrap().is_none());
    }

    #[tokio::test]
    async fn a_session_holds_its_identity_while_its_agent_answers() {
        let a = agent("node-a", &[], &[], &[], false);
        // The session loop's part: answer each probe by hearing a frame.
        let answering = {
            let a = a.clone();
            tokio::spawn(async move {
                loop {
                    a.probe_requested().await;
                    a.heard();
                }
            })
        };
        assert!(a.holds_identity(Duration::from_millis(200)).await);
        answering.abort();
        assert!(!a.holds_identity(Duration::from_millis(200)).await, "a silent agent loses it");
        a.draining.store(true, Ordering::Relaxed);
        assert!(!a.holds_identity(Duration::from_millis(200)).await, "a draining one too");
        assert!(a.log_refusal(Duration::from_mins(1)));
        assert!(!a.log_refusal(Duration::from_mins(1)), "logged once a minute");
    }

    #[test]
    fn equal_candidates_share_the_load() {
        let r = AgentRegistry::new(vec![Strategy::Cidr], vec![], 16);
        let a = agent("a", &[], &[], &["10.96.0.0/12"], false);
        let b = agent("b", &[], &[], &["10.96.0.0/12"], false);
        reg(&r, &a);
        reg(&r, &b);
        // Load agent a fully: every pick of two that sees b prefers it.
        let _held = a.stream_slots.clone().try_acquire_many_owned(10).unwrap();
        let to_b = (0..200).filter(|_| routed(&r, "10.96.0.10").as_deref() == Some("b")).count();
        assert!(to_b > 120, "the less loaded agent gets most picks: {to_b}/200");
    }

    #[test]
    fn node_facts_and_any_agent_networks_route() {
        let services: IpNet = "10.96.0.0/12".parse().unwrap();
        let r = AgentRegistry::new(vec![Strategy::DestHost, Strategy::Cidr], vec![services], 16);
        let a = agent("node-a", &[], &[], &[], false);
        let b = agent("node-b", &[], &[], &[], false);
        let facts = |addr: &str, pods: &str| NodeFacts {
            names: vec![],
            addresses: vec![addr.parse().unwrap()],
            pod_cidrs: vec![pods.parse().unwrap()],
            ..NodeFacts::default()
        };
        r.register(&a, Routes::of(&a.identity, Some(&facts("10.0.0.1", "10.244.1.0/24"))), None).unwrap();
        r.register(&b, Routes::of(&b.identity, Some(&facts("10.0.0.2", "10.244.2.0/24"))), None).unwrap();
        // A pod on node b (a webhook), node a's address (its kubelet), a service (either agent).
        assert_eq!(routed(&r, "10.244.2.9").as_deref(), Some("node-b"));
        assert_eq!(routed(&r, "10.0.0.1").as_deref(), Some("node-a"));
        assert!(routed(&r, "10.96.0.10").is_some());
        assert_eq!(routed(&r, "10.245.0.1"), None, "outside every network");
        // Node b's pod CIDR moves: the route follows.
        r.reroute(&b, Routes::of(&b.identity, Some(&facts("10.0.0.2", "10.244.3.0/24"))));
        assert_eq!(routed(&r, "10.244.2.9"), None);
        assert_eq!(routed(&r, "10.244.3.9").as_deref(), Some("node-b"));
        // A stale handle is not re-added.
        r.unregister(&b);
        r.reroute(&b, Routes::of(&b.identity, None));
        assert_eq!(routed(&r, "node-b"), None);
    }
}
