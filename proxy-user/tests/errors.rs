//! Every way a CONNECT can fail gets its status, a short reason, and the matching metric.

mod common;

use common::{agent, certs, closed_port, connect_status, echo, metric, server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

async fn raw(server: &common::Server, request: &[u8]) -> (u16, String) {
    let mut s = UnixStream::connect(&server.uds).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut text = String::new();
    tokio::time::timeout(common::WAIT, s.read_to_string(&mut text)).await.expect("reply in time").unwrap();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_side_failures_map_to_their_statuses() {
    let certs = certs();
    let srv = server(&certs).flag("--backend-dial-timeout", "1s").run().await;
    // Loopback is reachable only through 127.0.0.1, so 127.0.0.3 is denied by policy.
    let _agent = agent(&srv).allow("127.0.0.1/32").run().await;

    let refused = closed_port().await;
    let (status, text) = connect_status(&srv, &refused.to_string()).await;
    assert_eq!(status, 502, "{text}");
    assert!(text.contains("refused"), "{text}");

    let (status, text) = connect_status(&srv, "127.0.0.3:80").await;
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("denied"), "{text}");

    // A listener whose accept queue is full drops further SYNs: the dial hangs until the timeout.
    let (full, _fillers) = common::full_backlog();
    let (status, text) = connect_status(&srv, &full.to_string()).await;
    assert_eq!(status, 504, "{text}");

    for (result, want) in [("refused", 1), ("denied", 1), ("timeout", 1)] {
        let line = format!("spoke_server_streams_total{{result=\"{result}\"}}");
        assert_eq!(metric(srv.admin_addr, &line).await, want, "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_agent_is_503() {
    let certs = certs();
    let srv = server(&certs).run().await;
    let (status, text) = connect_status(&srv, "10.0.0.1:10250").await;
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("no agent serves 10.0.0.1:10250"), "{text}");
    assert_eq!(metric(srv.admin_addr, "spoke_server_streams_total{result=\"no_agent\"}").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_uses_the_configured_strategies() {
    let certs = certs();
    let srv = server(&certs).flag("--proxy-strategies", "destHost,cidr").run().await;
    // node-a owns 127.0.0.1 and the pod CIDR 127.1.0.0/16; node-b owns 127.0.0.2.
    let _a = agent(&srv).id("node-a").identifiers("ipv4=127.0.0.1&cidr=127.1.0.0/16").run().await;
    let _b = agent(&srv).id("node-b").identifiers("ipv4=127.0.0.2").run().await;
    let echo = echo().await;
    // By exact address, by node name, and by CIDR.
    common::tunnel(&srv, echo).await;
    let (status, _) = connect_status(&srv, &format!("node-a:{}", echo.port())).await;
    assert_eq!(status, 200);
    let (status, text) = connect_status(&srv, "127.1.2.3:9").await;
    assert_ne!(status, 503, "cidr routing found an agent: {text}");
    // Nobody claims 127.9.9.9 and there is no default route.
    let (status, _) = connect_status(&srv, "127.9.9.9:80").await;
    assert_eq!(status, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_4xx() {
    let certs = certs();
    let srv = server(&certs).flag("--header-timeout", "500ms").run().await;
    let (status, text) = raw(&srv, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(status, 405, "{text}");
    let (status, text) = raw(&srv, b"CONNECT nowhere HTTP/1.1\r\n\r\n").await;
    assert_eq!(status, 400, "{text}");
    let (status, text) = raw(&srv, b"\x16\x03\x01\x00\xff garbage\r\n\r\n").await;
    assert_eq!(status, 400, "{text}");
    let mut huge = b"CONNECT 10.0.0.1:80 HTTP/1.1\r\nX-Big: ".to_vec();
    huge.resize(16 * 1024, b'a');
    let (status, text) = raw(&srv, &huge).await;
    assert_eq!(status, 431, "{text}");
    // A head that never completes.
    let (status, text) = raw(&srv, b"CONNECT 10.0.0.1:80 HTTP/1.1\r\n").await;
    assert_eq!(status, 408, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_is_private_and_stale_files_are_replaced() {
    use std::os::unix::fs::PermissionsExt as _;
    let certs = certs();
    let path = certs.dir.path().join("stale.sock");
    // A socket file left by a crashed server.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let srv = server(&certs).flag("--uds-name", path.to_str().unwrap()).run().await;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(UnixStream::connect(&path).await.is_ok());
    drop(srv);
}

/// Server flags naming a CA file that does not exist.
const MISSING_CA: [&str; 8] = [
    "--cluster-ca-cert",
    "/nonexistent",
    "--cluster-cert",
    "/x",
    "--cluster-key",
    "/y",
    "--uds-name",
    "/tmp/x.sock",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_exits_64() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_spoke-server"))
        .args(MISSING_CA)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent"));
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_spoke-agent"))
        .args([
            "--proxy-server-host",
            "x",
            "--ca-cert",
            "a",
            "--agent-cert",
            "b",
            "--agent-key",
            "c",
            "--pool-size",
            "0",
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let certs = certs();
    let f = &certs.files;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_spoke-agent"))
        .args(["--proxy-server-host", "localhost", "--node-name", "n", "--check-config"])
        .arg("--ca-cert")
        .arg(&f.cluster_ca)
        .arg("--agent-cert")
        .arg(&f.agent_cert)
        .arg("--agent-key")
        .arg(&f.agent_key)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    // The stable report: every flag, its values and where they came from.
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["format"], 1);
    assert_eq!(report["binary"], "spoke-agent");
    let settings = &report["settings"];
    assert_eq!(settings["--node-name"]["values"], serde_json::json!(["n"]));
    assert_eq!(settings["--node-name"]["source"], "command-line");
    assert_eq!(settings["--pool-size"]["source"], "default");
    assert!(settings["--pool-size"]["env"].as_str().is_some_and(|e| e.starts_with("SPOKE_AGENT_")));
    assert!(settings.get("--help").is_none());
}

#[tokio::test]
async fn flag_values_clap_rejects_exit_64_in_the_log_format_asked_for() {
    let run = |args: &[&str]| {
        let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        async move {
            tokio::process::Command::new(env!("CARGO_BIN_EXE_spoke-server"))
                .args(args)
                .output()
                .await
                .unwrap()
        }
    };
    let out = run(&["--max-agents", "many", "--uds-name", "s"]).await;
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("many"));
    let out = run(&["--log-format", "json", "--max-agents", "many"]).await;
    assert_eq!(out.status.code(), Some(64));
    let line = String::from_utf8_lossy(&out.stderr);
    let record: serde_json::Value =
        serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(record["level"], "ERROR");
    assert!(record["fields"]["error"].as_str().unwrap().contains("many"), "{record}");
    // A configuration error past the flags, in JSON too.
    let out = run(&[&["--log-format", "json"][..], &MISSING_CA].concat()).await;
    assert_eq!(out.status.code(), Some(64));
    let line = String::from_utf8_lossy(&out.stderr);
    let last = line.lines().last().unwrap_or_default();
    let record: serde_json::Value = serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert!(record["fields"]["error"].as_str().unwrap().contains("/nonexistent"), "{record}");
    let out = run(&["--help"]).await;
    assert_eq!(out.status.code(), Some(0));
}

/// Started with its defaults (Node objects read from the apiserver) and no Kubernetes credentials, the
/// server says what it needs and which flags supply it, once, and never that it started.
#[tokio::test]
async fn without_apiserver_credentials_the_server_says_what_it_needs_before_starting() {
    let certs = certs();
    let f = &certs.files;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_spoke-server"))
        .arg("--cluster-ca-cert")
        .arg(&f.cluster_ca)
        .arg("--cluster-cert")
        .arg(&f.cluster_cert)
        .arg("--cluster-key")
        .arg(&f.cluster_key)
        .args(["--agent-bind", "127.0.0.1:0", "--admin-bind", "127.0.0.1:0", "--uds-name"])
        .arg(certs.dir.path().join("no-credentials.sock"))
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .env_remove("SPOKE_SERVER_KUBECONFIG")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!stdout.contains("started"), "{stdout}");
    for needed in ["Node objects", "--kubeconfig", "service account", "--agent-claims trusted"] {
        assert!(stderr.contains(needed), "{needed:?} missing from: {stderr}");
    }
    assert_eq!(
        stderr.matches("environment variable not found").count(),
        2,
        "once in the log, once on exit: {stderr}"
    );
}
