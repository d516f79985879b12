//! Who an agent is and what it may claim, checked against an apiserver stand-in: forged claims and bad
//! tokens are refused and counted, and the victim's streams keep flowing.

#[path = "common/apiserver.rs"]
mod apiserver;
mod common;

use std::path::PathBuf;

use apiserver::{FakeApiserver, FakeToken, node};
use common::{agent, certs, connect_status, echo, eventually, metric, round_trip, server};

fn failures(reason: &str) -> String {
    format!("spoke_server_agent_conn_failures_total{{reason=\"{reason}\"}}")
}

async fn apiserver(certs: &common::Certs) -> FakeApiserver {
    let f = &certs.files;
    let api = FakeApiserver::start(certs.dir.path(), &f.cluster_ca, &f.cluster_cert, &f.cluster_key).await;
    api.put_node(node("node-a", &[("InternalIP", "127.0.0.1"), ("Hostname", "node-a")], &["10.244.1.0/24"]));
    api.put_node(node("node-b", &[("InternalIP", "127.0.0.2"), ("Hostname", "node-b")], &["10.244.2.0/24"]));
    api
}

/// Waits until the counter `name` on `srv` passes `before`; returns its new value.
async fn counted_past(srv: &common::Server, name: &str, before: u64) -> u64 {
    eventually(name, || async { metric(srv.admin_addr, name).await > before }).await;
    metric(srv.admin_addr, name).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_may_claim_only_what_its_node_object_states() {
    let certs = certs();
    let api = apiserver(&certs).await;
    let srv = server(&certs)
        .flag("--agent-auth", "node-cert")
        .flag("--agent-claims", "node-objects")
        .flag("--kubeconfig", &api.kubeconfig.display().to_string())
        .flag("--default-route-agents", "node-a")
        .run()
        .await;
    let echo = echo().await;
    let [a, b] = [&certs.files.nodes[0], &certs.files.nodes[1]];
    let _node_a = agent(&srv)
        .id("node-a")
        .cert(&a.cert, &a.key)
        .identifiers("ipv4=127.0.0.1&host=node-a&cidr=10.244.1.0/25&default-route=true")
        .run()
        .await;
    round_trip(&srv, echo).await;

    // Node b's certificate claiming node a's address, a /32 of it, node a's pod CIDR, everything, node
    // a's host name, or the default route: each refused, while node a's streams go on.
    let refused = failures("claim_refused");
    let mut count = 0;
    for claim in [
        "ipv4=127.0.0.1",
        "cidr=127.0.0.1/32",
        "cidr=10.244.1.0/24",
        "cidr=0.0.0.0/0",
        "host=node-a",
        "ipv4=127.0.0.2&default-route=true",
    ] {
        let mut forger = agent(&srv).id("node-b").cert(&b.cert, &b.key).identifiers(claim).spawn().await;
        count = counted_past(&srv, &refused, count).await;
        forger.proc.kill().await;
        round_trip(&srv, echo).await;
        assert!(srv.proc.log().contains("agent refused"), "refusals are logged");
    }
    assert_eq!(metric(srv.admin_addr, "spoke_server_agents_connected").await, 1);

    // Node b with its own claims is admitted; once its Node is deleted, its session ends.
    let _node_b = agent(&srv).id("node-b").cert(&b.cert, &b.key).identifiers("ipv4=127.0.0.2").run().await;
    assert_eq!(metric(srv.admin_addr, "spoke_server_agents_connected").await, 2);
    api.delete_node("node-b");
    let revoked = failures("claim_revoked");
    counted_past(&srv, &revoked, 0).await;
    eventually("node b gone", || async {
        metric(srv.admin_addr, "spoke_server_agents_connected").await == 1
    })
    .await;
    round_trip(&srv, echo).await;

    // Node a's address changes: its claims no longer hold, so its session ends; when its Node states the
    // address again, the agent is admitted on its own next try.
    api.put_node(node("node-a", &[("InternalIP", "127.0.0.9"), ("Hostname", "node-a")], &["10.244.1.0/24"]));
    counted_past(&srv, &revoked, 1).await;
    eventually("node a gone", || async {
        metric(srv.admin_addr, "spoke_server_agents_connected").await == 0
    })
    .await;
    api.put_node(node("node-a", &[("InternalIP", "127.0.0.1"), ("Hostname", "node-a")], &["10.244.1.0/24"]));
    srv.wait_for_agent().await;
    round_trip(&srv, echo).await;
}

fn token_file(certs: &common::Certs, name: &str, token: &str) -> PathBuf {
    let path = certs.dir.path().join(format!("token-{name}"));
    std::fs::write(&path, format!("{token}\n")).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_proves_the_node_its_pod_runs_on() {
    let certs = certs();
    let api = apiserver(&certs).await;
    let srv = server(&certs)
        .flag("--agent-auth", "token")
        .flag("--agent-claims", "node-objects")
        .flag("--kubeconfig", &api.kubeconfig.display().to_string())
        .run()
        .await;
    let echo = echo().await;
    api.put_pod("spoke-agent-a", "node-a");
    api.put_pod("spoke-agent-b", "node-b");
    // The review names no node (as before Kubernetes 1.30): the server reads the pod.
    api.put_token("good-a", FakeToken::agent("spoke-agent-a", None));
    let good = token_file(&certs, "good-a", "good-a");
    let mut node_a = agent(&srv).id("node-a").token(&good).identifiers("ipv4=127.0.0.1").run().await;
    round_trip(&srv, echo).await;
    let reviews = api.reviews();

    // Each of these claims node a and is refused; node a's streams go on.
    let other_audience =
        FakeToken { audiences: vec!["other".into()], ..FakeToken::agent("spoke-agent-a", None) };
    let other_account =
        FakeToken { service_account: "default".into(), ..FakeToken::agent("spoke-agent-a", None) };
    let expired = FakeToken { expired: true, ..FakeToken::agent("spoke-agent-a", None) };
    let unbound = FakeToken { pod: None, ..FakeToken::agent("spoke-agent-a", None) };
    let cases = [
        ("audience", Some(other_audience), "token_refused"),
        ("account", Some(other_account), "token_refused"),
        ("expired", Some(expired), "token_refused"),
        ("unbound", Some(unbound), "token_refused"),
        ("unknown", None, "token_refused"),
        // Pods on node b, named by the review (1.30 and later) or read from the pod.
        ("b-extra", Some(FakeToken::agent("spoke-agent-b", Some("node-b"))), "identity_mismatch"),
        ("b-pod", Some(FakeToken::agent("spoke-agent-b", None)), "identity_mismatch"),
    ];
    for (name, fake, reason) in cases {
        if let Some(fake) = fake {
            api.put_token(name, fake);
        }
        let path = token_file(&certs, name, name);
        let before = metric(srv.admin_addr, &failures(reason)).await;
        let mut forger = agent(&srv).id("node-a").token(&path).identifiers("ipv4=127.0.0.1").spawn().await;
        counted_past(&srv, &failures(reason), before).await;
        forger.proc.kill().await;
        round_trip(&srv, echo).await;
    }
    assert_eq!(metric(srv.admin_addr, "spoke_server_agents_connected").await, 1);

    // A reconnect within the cache's lifetime costs the apiserver no review (counted for the good token
    // alone: a killed forger's last attempt may still be reviewed meanwhile).
    assert!(api.reviews() > reviews);
    let good_reviews = api.reviews_of("good-a");
    assert!(good_reviews >= 1, "the good token was reviewed when node a connected");
    node_a.proc.kill().await;
    let _node_a = agent(&srv).id("node-a").token(&good).identifiers("ipv4=127.0.0.1").run().await;
    round_trip(&srv, echo).await;
    assert_eq!(api.reviews_of("good-a"), good_reviews, "the good token's review was cached");
}

/// A token whose pod is deleted stops working at once: the open session is ended, the cached review
/// is forgotten, and a new connection with the token is reviewed afresh and refused (the apiserver
/// invalidates a bound token with its pod). Before, the token kept working for the cache's 60 s and the
/// session for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_whose_pod_is_deleted_ends_its_session_and_is_refused() {
    let certs = certs();
    let api = apiserver(&certs).await;
    let srv = server(&certs)
        .flag("--agent-auth", "token")
        .flag("--agent-claims", "node-objects")
        .flag("--token-review-cache-ttl", "10m")
        .flag("--kubeconfig", &api.kubeconfig.display().to_string())
        .run()
        .await;
    let echo = echo().await;
    api.put_pod("spoke-agent-a", "node-a");
    api.put_token("good-a", FakeToken::agent("spoke-agent-a", None));
    let good = token_file(&certs, "good-a", "good-a");
    let agent_a = agent(&srv).id("node-a").token(&good).identifiers("ipv4=127.0.0.1").run().await;
    round_trip(&srv, echo).await;
    let before = metric(srv.admin_addr, &failures("token_revoked")).await;
    api.delete_pod("spoke-agent-a");
    counted_past(&srv, &failures("token_revoked"), before).await;
    // The agent comes back with the same token (its file is unchanged) and is refused, not served
    // from the cache.
    let refused = metric(srv.admin_addr, &failures("token_refused")).await;
    counted_past(&srv, &failures("token_refused"), refused).await;
    assert_eq!(metric(srv.admin_addr, "spoke_server_agents_connected").await, 0);
    assert_eq!(connect_status(&srv, &echo.to_string()).await.0, 503);
    let log = srv.proc.log();
    assert!(log.contains("the pod the agent's token is bound to is gone"), "{log}");
    drop(agent_a);
}

/// A kubelet may write its own Node's status (`NodeRestriction` allows it): node b lists node a's
/// `InternalIP` there. Node a listed it first, so it keeps the route: node b may not claim the address,
/// gets no route to it from its Node, and none of 200 CONNECTs to node a's address reach node b's
/// agent. The conflict is logged and exposed for alerting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_listing_another_nodes_address_in_its_status_takes_none_of_its_traffic() {
    let certs = certs();
    let api = apiserver(&certs).await;
    let srv = server(&certs)
        .flag("--agent-auth", "node-cert")
        .flag("--agent-claims", "node-objects")
        .flag("--kubeconfig", &api.kubeconfig.display().to_string())
        .run()
        .await;
    let echo = echo().await;
    assert_eq!(echo.ip().to_string(), "127.0.0.1", "the echo backend is on node a's address");
    let [a, b] = [&certs.files.nodes[0], &certs.files.nodes[1]];
    let node_a = agent(&srv).id("node-a").cert(&a.cert, &a.key).identifiers("ipv4=127.0.0.1").run().await;
    round_trip(&srv, echo).await;

    api.put_node(node(
        "node-b",
        &[("InternalIP", "127.0.0.2"), ("InternalIP", "127.0.0.1"), ("Hostname", "node-b")],
        &["10.244.2.0/24"],
    ));
    let conflicts = "spoke_server_node_claim_conflicts ";
    eventually("the conflict exposed", || async { metric(srv.admin_addr, conflicts).await == 1 }).await;
    assert!(srv.proc.log().contains("another Node listed first"), "the conflict is logged");

    // Node b claiming the address is refused, and told why.
    let refused = failures("claim_refused");
    let mut forger =
        agent(&srv).id("node-b").cert(&b.cert, &b.key).identifiers("ipv4=127.0.0.1").spawn().await;
    counted_past(&srv, &refused, 0).await;
    forger.proc.kill().await;
    assert!(srv.proc.log().contains("which listed it first"), "the refusal names the owner");

    // Node b with its own claim is admitted, and gets no route to node a's address from its Node.
    let node_b = agent(&srv).id("node-b").cert(&b.cert, &b.key).identifiers("ipv4=127.0.0.2").run().await;
    assert_eq!(metric(srv.admin_addr, "spoke_server_agents_connected").await, 2);
    let ok = "spoke_agent_streams_total{result=\"ok\"}";
    let (a_before, b_before) = (metric(node_a.admin_addr, ok).await, metric(node_b.admin_addr, ok).await);
    for _ in 0..200 {
        round_trip(&srv, echo).await;
    }
    let a_after = common::counted(node_a.admin_addr, ok, a_before + 200).await;
    assert_eq!(a_after, a_before + 200, "every stream to node a's address went to node a");
    assert_eq!(metric(node_b.admin_addr, ok).await, b_before, "none went to node b");
}

/// The same conflict present when the server starts: its first node list gives the address to the
/// first Node in line (here the first by name, as the stand-in sets no creation time), and the
/// conflict is exposed without waiting for a change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_present_at_start_is_resolved_and_exposed() {
    let certs = certs();
    let api = apiserver(&certs).await;
    api.put_node(node(
        "node-b",
        &[("InternalIP", "127.0.0.2"), ("InternalIP", "127.0.0.1"), ("Hostname", "node-b")],
        &["10.244.2.0/24"],
    ));
    let srv = server(&certs)
        .flag("--agent-auth", "node-cert")
        .flag("--agent-claims", "node-objects")
        .flag("--kubeconfig", &api.kubeconfig.display().to_string())
        .run()
        .await;
    let conflicts = "spoke_server_node_claim_conflicts ";
    eventually("the conflict exposed", || async { metric(srv.admin_addr, conflicts).await == 1 }).await;
    let b = &certs.files.nodes[1];
    let refused = failures("claim_refused");
    let mut forger =
        agent(&srv).id("node-b").cert(&b.cert, &b.key).identifiers("ipv4=127.0.0.1").spawn().await;
    counted_past(&srv, &refused, 0).await;
    forger.proc.kill().await;
    let echo = echo().await;
    let a = &certs.files.nodes[0];
    let _node_a = agent(&srv).id("node-a").cert(&a.cert, &a.key).identifiers("ipv4=127.0.0.1").run().await;
    round_trip(&srv, echo).await;
}
