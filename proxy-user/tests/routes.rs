//! Routes for everything kube-apiserver's `cluster` egress selection sends: a node's kubelet, a pod on
//! another node (an admission webhook) and a service address (an aggregated API), with the nodes' pod
//! CIDRs and addresses read from Node objects (an apiserver stand-in) rather than announced by agents.

#[path = "common/apiserver.rs"]
mod apiserver;
mod common;

use apiserver::{FakeApiserver, node};
use common::{agent, certs, echo_on, metric, round_trip, server};

const OK: &str = "spoke_agent_streams_total{result=\"ok\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_webhook_and_service_traffic_reach_the_right_nodes() {
    let certs = certs();
    let f = &certs.files;
    let api = FakeApiserver::start(certs.dir.path(), &f.cluster_ca, &f.cluster_cert, &f.cluster_key).await;
    api.put_node(node("node-a", &[("InternalIP", "127.0.0.1")], &["127.1.0.0/24"]));
    api.put_node(node("node-b", &[("InternalIP", "127.0.0.2")], &["127.2.0.0/24"]));
    let srv = server(&certs)
        .flag("--agent-auth", "node-cert")
        .flag("--agent-claims", "node-objects")
        .flag("--kubeconfig", &api.kubeconfig.display().to_string())
        .flag("--service-cidrs", "127.3.0.0/24")
        .flag("--proxy-strategies", "destHost,cidr")
        .run()
        .await;
    // The agents announce only their node's address: no pod CIDR, no service CIDR.
    let [a, b] = [&certs.files.nodes[0], &certs.files.nodes[1]];
    let node_a = agent(&srv).id("node-a").cert(&a.cert, &a.key).identifiers("ipv4=127.0.0.1").run().await;
    let node_b = agent(&srv).id("node-b").cert(&b.cert, &b.key).identifiers("ipv4=127.0.0.2").run().await;
    let kubelet_a = echo_on("127.0.0.1").await;
    let webhook_on_b = echo_on("127.2.0.5").await;
    let service = echo_on("127.3.0.7").await;

    // Each alone first, to see which agent carried it.
    round_trip(&srv, webhook_on_b).await;
    assert_eq!(
        (metric(node_a.admin_addr, OK).await, metric(node_b.admin_addr, OK).await),
        (0, 1),
        "webhook via b"
    );
    round_trip(&srv, kubelet_a).await;
    assert_eq!(
        (metric(node_a.admin_addr, OK).await, metric(node_b.admin_addr, OK).await),
        (1, 1),
        "kubelet via a"
    );
    round_trip(&srv, service).await;
    assert_eq!(
        metric(node_a.admin_addr, OK).await + metric(node_b.admin_addr, OK).await,
        3,
        "service via either"
    );

    // All three at once, repeatedly.
    let rounds = 20;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..rounds {
        for dest in [kubelet_a, webhook_on_b, service] {
            let srv_uds = srv.uds.clone();
            tasks.spawn(async move { common::round_trip_via(&srv_uds, dest).await });
        }
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("stream task");
    }
    let (on_a, on_b) = (metric(node_a.admin_addr, OK).await, metric(node_b.admin_addr, OK).await);
    assert_eq!(on_a + on_b, 3 + 3 * rounds);
    assert!(on_a > rounds && on_b > rounds, "kubelet on a, webhooks on b: {on_a}, {on_b}");

    // A pod address outside every node's pod CIDR and the service range: 503.
    let (status, text) = common::connect_status(&srv, "127.9.0.1:80").await;
    assert_eq!(status, 503, "{text}");
}
