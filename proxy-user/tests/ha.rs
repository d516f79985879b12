//! Several server replicas behind one load-balanced address, counted from Leases (in the apiserver
//! stand-in): every agent holds a control channel to each replica, survives one being killed, comes
//! back to it when it returns, finds an added one and lets a removed one go.

#[path = "common/apiserver.rs"]
mod apiserver;
mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use common::{Agent, Server, agent, certs, echo, eventually, metric, server, tunnel_via};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A layer-4 load balancer on 127.0.0.1: each connection goes to the next backend, round robin.
struct Balancer {
    addr: SocketAddr,
    backends: Arc<Mutex<Vec<SocketAddr>>>,
}

impl Balancer {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let backends: Arc<Mutex<Vec<SocketAddr>>> = Arc::default();
        let list = backends.clone();
        tokio::spawn(async move {
            let mut next = 0usize;
            while let Ok((mut client, _)) = listener.accept().await {
                let backend = {
                    let list = list.lock().unwrap();
                    next += 1;
                    (!list.is_empty()).then(|| list[next % list.len()])
                };
                let Some(backend) = backend else { continue };
                tokio::spawn(async move {
                    if let Ok(mut upstream) = TcpStream::connect(backend).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    }
                });
            }
        });
        Self { addr, backends }
    }

    fn set(&self, backends: &[SocketAddr]) {
        *self.backends.lock().unwrap() = backends.to_vec();
    }
}

/// Data connections each agent keeps parked at each replica.
const POOL_SIZE: u64 = 4;

/// A port free on 127.0.0.1 now (a replica must know its own address before it starts, to advertise it).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Replica `id`, counted from the Leases it renews in the apiserver stand-in.
fn leased(certs: &Arc<common::Certs>, api: &apiserver::FakeApiserver, id: usize) -> common::ServerBuilder {
    server(certs)
        .flag("--server-id", &format!("spoke-server-{id}"))
        .flag("--kubeconfig", &api.kubeconfig.display().to_string())
        .switch("--enable-lease-controller")
        .flag("--lease-renewal-interval", "200ms")
        .flag("--lease-duration", "2s")
}

/// A replica that advertises its own address `127.0.0.1:port` for its data connections.
async fn replica(certs: &Arc<common::Certs>, api: &apiserver::FakeApiserver, id: usize, port: u16) -> Server {
    leased(certs, api, id)
        .flag("--advertise-address", &format!("127.0.0.1:{port}"))
        .agent_port(port)
        .run()
        .await
}

async fn agents_on(srv: &Server, want: u64) {
    eventually(&format!("{want} agents on {}", srv.agent_addr), || async {
        metric(srv.admin_addr, "spoke_server_agents_connected").await == want
    })
    .await;
}

async fn held_by_all(agents: &[Agent], want: u64) {
    for a in agents {
        eventually(&format!("an agent holding {want} replicas"), || async {
            metric(a.admin_addr, "spoke_agent_control_connected").await == want
                && metric(a.admin_addr, "spoke_agent_server_count").await == want
        })
        .await;
    }
}

async fn exchange(s: &mut tokio::net::UnixStream, byte: u8) {
    s.write_all(&[byte; 16]).await.unwrap();
    let mut back = [0u8; 16];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(back, [byte; 16]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_hold_every_replica_behind_a_load_balancer() {
    let certs = certs();
    let f = &certs.files;
    let api =
        apiserver::FakeApiserver::start(certs.dir.path(), &f.cluster_ca, &f.cluster_cert, &f.cluster_key)
            .await;
    let balancer = Balancer::start().await;
    let ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let mut replicas = Vec::new();
    for (i, port) in ports.iter().take(3).enumerate() {
        replicas.push(replica(&certs, &api, i, *port).await);
    }
    balancer.set(&replicas.iter().map(|r| r.agent_addr).collect::<Vec<_>>());
    let mut agents = Vec::new();
    for i in 0..5 {
        let lb = balancer.addr;
        agents.push(
            agent(&replicas[0])
                .id(&format!("node-{i}"))
                .identifiers(&format!("ipv4=127.0.1.{i}&default-route=true"))
                .flag("--proxy-server-host", &lb.ip().to_string())
                .flag("--proxy-server-port", &lb.port().to_string())
                .flag("--tls-server-name", "localhost")
                .flag("--pool-size", &POOL_SIZE.to_string())
                .spawn()
                .await,
        );
    }
    for r in &replicas {
        agents_on(r, 5).await;
    }
    held_by_all(&agents, 3).await;
    // Every agent parks a full pool at every replica: each serves its own apiserver's streams alike.
    for r in &replicas {
        eventually("a full pool from every agent at every replica", || async {
            metric(r.admin_addr, "spoke_server_data_conns_idle").await == 5 * POOL_SIZE
        })
        .await;
    }

    // 100 streams over the three replicas; one replica is killed mid-way.
    let echo = echo().await;
    let mut streams = Vec::new();
    for i in 0..100 {
        streams.push((i % 3, tunnel_via(&replicas[i % 3].uds, echo).await));
    }
    for (_, s) in &mut streams {
        exchange(s, 1).await;
    }
    replicas[2].proc.kill().await;
    // The streams on the other replicas go on; new ones succeed.
    for (on, s) in &mut streams {
        if *on != 2 {
            exchange(s, 2).await;
        }
    }
    for i in 0..20 {
        let mut s = tunnel_via(&replicas[i % 2].uds, echo).await;
        exchange(&mut s, 3).await;
    }
    // The replica returns: every agent comes back to it.
    replicas[2] = replica(&certs, &api, 2, ports[2]).await;
    agents_on(&replicas[2], 5).await;
    held_by_all(&agents, 3).await;

    // A fourth replica: once its Lease counts, the agents find it behind the balancer.
    let fourth = replica(&certs, &api, 3, ports[3]).await;
    let mut all: Vec<SocketAddr> = replicas.iter().map(|r| r.agent_addr).collect();
    all.push(fourth.agent_addr);
    balancer.set(&all);
    agents_on(&fourth, 5).await;
    held_by_all(&agents, 4).await;
    let mut s = tunnel_via(&fourth.uds, echo).await;
    exchange(&mut s, 4).await;
    drop(s);

    // It is removed again: the agents let it go and hold three.
    balancer.set(&all[..3]);
    fourth.proc.terminate();
    held_by_all(&agents, 3).await;
    for r in &replicas {
        assert_eq!(metric(r.admin_addr, "spoke_server_agents_connected").await, 5);
    }
}

/// Plaintext data connections behind a balancer, with no advertised replica addresses: about half
/// reach another replica than their session's. Each is replaced at once, not counted as a failure and
/// paused after like a broken one, and both replicas' pools fill and carry streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_data_connections_that_reach_another_replica_are_replaced() {
    let certs = certs();
    let f = &certs.files;
    let api =
        apiserver::FakeApiserver::start(certs.dir.path(), &f.cluster_ca, &f.cluster_cert, &f.cluster_key)
            .await;
    let balancer = Balancer::start().await;
    let mut replicas = Vec::new();
    for id in 0..2 {
        replicas.push(leased(&certs, &api, id).allow_plaintext_tunnel().run().await);
    }
    balancer.set(&replicas.iter().map(|r| r.agent_addr).collect::<Vec<_>>());
    let lb = balancer.addr;
    let a = agent(&replicas[0])
        .plaintext("splice")
        .flag("--proxy-server-host", &lb.ip().to_string())
        .flag("--proxy-server-port", &lb.port().to_string())
        .flag("--tls-server-name", "localhost")
        .flag("--pool-size", "8")
        .spawn()
        .await;
    held_by_all(std::slice::from_ref(&a), 2).await;
    eventually("both replicas' pools full", || async {
        metric(a.admin_addr, "spoke_agent_pool_idle").await == 16
    })
    .await;
    assert_eq!(metric(a.admin_addr, "spoke_agent_server_conn_failures_total{kind=\"data\"}").await, 0);
    let echo = echo().await;
    for (i, r) in replicas.iter().enumerate() {
        let mut s = tunnel_via(&r.uds, echo).await;
        exchange(&mut s, u8::try_from(i).unwrap()).await;
    }
}

/// The replica count follows the Leases as they change, not at the next renewal: with a renewal
/// interval of an hour, a replica that starts is counted by the other (and its agent told) at once,
/// and one that stops is counted out at once (it deletes its Lease). A replica killed without
/// deleting its Lease is counted out when the Lease expires, and the survivors delete that Lease a
/// lease duration later rather than leave it for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replica_count_follows_the_leases_as_they_change_and_dead_ones_are_deleted() {
    let certs = certs();
    let f = &certs.files;
    let api =
        apiserver::FakeApiserver::start(certs.dir.path(), &f.cluster_ca, &f.cluster_cert, &f.cluster_key)
            .await;
    let slow = |id: usize| {
        leased(&certs, &api, id).flag("--lease-renewal-interval", "1h").flag("--lease-duration", "2h")
    };
    let first = slow(0).run().await;
    let node = agent(&first).run().await;
    let counted = |want: u64| {
        let addr = node.admin_addr;
        async move {
            eventually(&format!("the agent told of {want} replicas"), || async {
                metric(addr, "spoke_agent_server_count").await == want
            })
            .await;
        }
    };
    counted(1).await;
    let second = slow(1).run().await;
    counted(2).await;
    second.proc.terminate();
    counted(1).await;
    assert_eq!(api.leases("kube-system"), ["spoke-server-0"]);

    // Short leases: a killed replica's Lease expires (counted out), then is deleted by the survivor.
    drop(node);
    let mut first = first;
    first.proc.terminate();
    first.proc.exited().await;
    assert!(api.leases("kube-system").is_empty(), "a replica that stops deletes its Lease");
    let quick = |id: usize| {
        leased(&certs, &api, id).flag("--lease-renewal-interval", "200ms").flag("--lease-duration", "1s")
    };
    let survivor = quick(2).run().await;
    let node = agent(&survivor).run().await;
    let mut killed = quick(3).run().await;
    eventually("both replicas counted", || async {
        metric(node.admin_addr, "spoke_agent_server_count").await == 2
    })
    .await;
    killed.proc.kill().await;
    eventually("the killed replica counted out", || async {
        metric(node.admin_addr, "spoke_agent_server_count").await == 1
    })
    .await;
    eventually("the killed replica's Lease deleted", || async {
        !api.leases("kube-system").contains(&"spoke-server-3".to_owned())
    })
    .await;
    assert!(survivor.proc.log().contains("deleted the Lease of a replica gone without deleting it"));
}
