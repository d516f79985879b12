//! `spoke-server`'s flags: what each combination becomes, and what is refused.

use super::*;

fn server(extra: &[&str]) -> Result<ServerConfig, String> {
    let base =
        ["spoke-server", "--cluster-ca-cert", "ca.pem", "--cluster-cert", "c.pem", "--cluster-key", "k.pem"];
    let args = ServerArgs::try_parse_from(base.iter().chain(extra)).map_err(|e| e.to_string())?;
    ServerConfig::try_from(args).map_err(|e| e.to_string())
}

#[test]
fn server_needs_a_frontend_and_complete_tls() {
    assert!(server(&[]).unwrap_err().contains("no frontend"));
    let ok = server(&["--uds-name", "/run/spoke.sock"]).unwrap();
    assert_eq!(ok.strategies, vec![Strategy::DestHost, Strategy::Cidr, Strategy::DefaultRoute]);
    assert_eq!(ok.limits.dial_timeout, Duration::from_secs(5));
    assert_eq!(ok.agent_auth, AgentAuth::NodeCert, "agents prove their node unless told otherwise");
    assert!(server(&["--frontend-bind", "127.0.0.1:8090"]).unwrap_err().contains("mTLS"));
    let tcp = [
        "--frontend-bind",
        "127.0.0.1:8090",
        "--server-ca-cert",
        "a",
        "--server-cert",
        "b",
        "--server-key",
        "c",
    ];
    assert!(server(&tcp).unwrap_err().contains("--frontend-allowed-names"));
    let allowed =
        server(&[&tcp[..], &["--frontend-allowed-names", "kube-apiserver,apiserver.example"]].concat());
    assert_eq!(allowed.unwrap().frontend.unwrap().allowed_names, ["kube-apiserver", "apiserver.example"]);
    assert!(
        server(&["--uds-name", "s", "--server-cert", "b"]).unwrap_err().contains("without --frontend-bind")
    );
}

#[test]
fn apiserver_access_follows_claims_and_auth() {
    let nodes = server(&["--uds-name", "s"]).unwrap();
    assert_eq!(nodes.agent_claims, AgentClaims::NodeObjects, "claims are checked unless told otherwise");
    assert_eq!(nodes.apiserver, Some(Access::InCluster));
    let trusted = server(&["--uds-name", "s", "--agent-claims", "trusted"]).unwrap();
    assert_eq!(trusted.apiserver, None, "no apiserver needed");
    let token = server(&[
        "--uds-name",
        "s",
        "--agent-claims",
        "trusted",
        "--agent-auth",
        "token",
        "--kubeconfig",
        "k",
    ])
    .unwrap();
    assert_eq!(token.apiserver, Some(Access::Kubeconfig("k".into())));
    let policy = token.tokens.clone().unwrap();
    assert_eq!((policy.audience.as_str(), policy.namespace.as_str()), ("spoke-server", "kube-system"));
    assert_eq!(policy.service_account, "spoke-agent");
    assert_eq!(token.agent_client_certs(), ClientCerts::Optional);
    assert_eq!(nodes.agent_client_certs(), ClientCerts::Required);
    let bad = ["--uds-name", "s", "--agent-auth", "token", "--authentication-audience", ""];
    assert!(server(&bad).unwrap_err().contains("--authentication-audience"));
    assert!(server(&["--uds-name", "s", "--service-cidrs", "10.96.0.0/12,fd00::/108"]).is_ok());
    assert!(server(&["--uds-name", "s", "--service-cidrs", "10.96.0.0"]).is_err());
}

#[test]
fn an_advertised_address_names_its_port() {
    for ok in ["10.0.0.5:8091", "cp-1.example:8091", "[fd00::1]:8091"] {
        let c = server(&["--uds-name", "s", "--advertise-address", ok]).unwrap();
        assert_eq!(c.advertise_address, ok);
    }
    for bad in ["10.0.0.5", "cp-1.example:0", "fd00::1", "[fd00::1]", ":8091"] {
        let e = server(&["--uds-name", "s", "--advertise-address", bad]).unwrap_err();
        assert!(e.contains("expected HOST:PORT"), "{bad}: {e}");
    }
}

#[test]
fn server_rejects_bad_values() {
    assert!(
        server(&["--uds-name", "s", "--proxy-strategies", "destHost,nearest"])
            .unwrap_err()
            .contains("nearest")
    );
    assert!(server(&["--uds-name", "s", "--max-pending-dials", "0"]).unwrap_err().contains("at least 1"));
    assert!(
        server(&["--uds-name", "s", "--backend-dial-timeout", "0s"]).unwrap_err().contains("longer than 0")
    );
    assert!(server(&["--uds-name", "s", "--admin-bind", "nowhere"]).unwrap_err().contains("admin-bind"));
    assert_eq!(server(&["--uds-name", "s", "--admin-bind", "off"]).unwrap().admin_bind, None);
}
