//! The tunnel across network namespaces: the agent on a "node" reached only through a veth link,
//! dialing its kubelet under the default policy.

#[path = "../../proxy-user/tests/common/mod.rs"]
mod common;

use std::net::SocketAddr;

use common::{agent, certs, check_pattern, connect_status, send_pattern, server};
use spoke_tests::{Netns, privileged};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_in_a_namespace_reaches_its_kubelet_with_the_default_policy() {
    if !privileged("network namespace test") {
        return;
    }
    let ns = Netns::new();
    let certs = certs();
    let srv = server(&certs).flag("--agent-bind", &format!("{}:0", ns.host_addr)).run().await;
    // A "kubelet" inside the node's namespace, on the node's address.
    let kubelet = ns.bind(SocketAddr::new(ns.ns_addr.into(), 0));
    let kubelet_addr = kubelet.local_addr().unwrap();
    kubelet.set_nonblocking(true).unwrap();
    let kubelet = tokio::net::TcpListener::from_std(kubelet).unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = kubelet.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut w).await;
            });
        }
    });
    let _agent = agent(&srv)
        .netns(&ns.name)
        .id("node-1")
        .identifiers(&format!("ipv4={}", ns.ns_addr))
        .flag("--kubelet-port", &kubelet_addr.port().to_string())
        // The development certificate names localhost; the agent dials the server by address.
        .flag("--tls-server-name", "localhost")
        .spawn()
        .await;
    srv.wait_for_agent().await;

    // The kubelet port on the node's address is allowed by default.
    let mut s = common::tunnel(&srv, kubelet_addr).await;
    let (mut r, mut w) = tokio::io::split(&mut s);
    let len = 16 << 20;
    let (got, ()) = tokio::join!(check_pattern(&mut r, 3), send_pattern(&mut w, 3, len));
    assert_eq!(got, len);
    // Another port on the node's address is not.
    let (status, text) = connect_status(&srv, &format!("{}:{}", ns.ns_addr, kubelet_addr.port() + 1)).await;
    assert_eq!(status, 403, "{text}");
    // An address no agent claims (and no default route): 503.
    let (status, text) = connect_status(&srv, "198.19.0.1:80").await;
    assert_eq!(status, 503, "{text}");
}
