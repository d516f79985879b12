//! A stand-in for kube-apiserver on 127.0.0.1 over HTTPS, answering what spoke-server asks, with the
//! JSON shapes of the real API (Kubernetes v1.33): Node list and watch (`/api/v1/nodes`), Pod get, list
//! and watch in `kube-system` (`/api/v1/namespaces/kube-system/pods`, the list and watch filtered by a
//! `spec.serviceAccountName=` field selector), `TokenReview` create
//! (`/apis/authentication.k8s.io/v1/tokenreviews`) and Leases (`/apis/coordination.k8s.io/v1`: create,
//! merge-patch, list by label, watch, delete with a resourceVersion precondition). Requests need the
//! bearer token of the kubeconfig it writes (401 otherwise, as the real one answers). Each connection
//! serves one request.
//!
//! Where it simplifies: watches ignore label and field selectors (every object here matches them); a
//! deleted pod goes at once, as a real pod bound to a node goes once its kubelet confirms the end; a
//! token bound to a deleted pod is refused, as the real review refuses it. The same behaviours are
//! checked against a real kube-apiserver (v1.20.2) by `tests/tests/kube_e2e.rs` (`cargo xtask e2e`);
//! where the two disagree, the real one is right and this is to be mended.
#![allow(dead_code, reason = "each test uses a different subset")]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

/// The bearer token spoke-server's kubeconfig carries.
const SERVER_TOKEN: &str = "spoke-server-test-credential";

/// A service-account token the stand-in knows.
#[derive(Clone, Debug)]
pub struct FakeToken {
    /// `system:serviceaccount:<namespace>:<name>`.
    pub namespace: String,
    pub service_account: String,
    /// The audiences it was issued for.
    pub audiences: Vec<String>,
    /// The pod it is bound to (name, uid), if any.
    pub pod: Option<(String, String)>,
    /// Whether the review names the pod's node in `user.extra` (Kubernetes 1.30 and later).
    pub node_in_extra: Option<String>,
    /// Expired: the review says so, as the real one does.
    pub expired: bool,
}

impl FakeToken {
    /// A good token of `kube-system/spoke-agent` for audience `spoke-server`, bound to `pod`.
    pub fn agent(pod: &str, node_in_extra: Option<&str>) -> Self {
        Self {
            namespace: "kube-system".into(),
            service_account: "spoke-agent".into(),
            audiences: vec!["spoke-server".into()],
            pod: Some((pod.into(), format!("uid-{pod}"))),
            node_in_extra: node_in_extra.map(str::to_owned),
            expired: false,
        }
    }
}

#[derive(Default)]
struct State {
    resource_version: u64,
    nodes: BTreeMap<String, Value>,
    /// Watch events (resourceVersion, kind, event) in order.
    events: Vec<(u64, &'static str, Value)>,
    pods: BTreeMap<String, Value>,
    /// Pods deleted: tokens bound to them are refused.
    deleted_pods: std::collections::BTreeSet<String>,
    tokens: BTreeMap<String, FakeToken>,
    reviews: u64,
    /// Reviews answered, by token.
    reviews_of: BTreeMap<String, u64>,
    /// Leases by (namespace, name).
    leases: BTreeMap<(String, String), Value>,
}

/// The running stand-in.
pub struct FakeApiserver {
    state: Arc<Mutex<State>>,
    changed: watch::Sender<u64>,
    /// A kubeconfig for it (spoke-server --kubeconfig).
    pub kubeconfig: PathBuf,
}

/// A Node object as the kubelet registers it.
pub fn node(name: &str, addresses: &[(&str, &str)], pod_cidrs: &[&str]) -> Value {
    json!({
        "kind": "Node",
        "apiVersion": "v1",
        "metadata": {"name": name, "uid": format!("uid-{name}"), "labels": {"kubernetes.io/hostname": name}},
        "spec": {"podCIDR": pod_cidrs.first(), "podCIDRs": pod_cidrs},
        "status": {
            "addresses": addresses.iter().map(|(t, a)| json!({"type": t, "address": a})).collect::<Vec<_>>(),
            "images": [{"names": ["registry.k8s.io/pause:3.10"], "sizeBytes": 320_368}],
        },
    })
}

impl FakeApiserver {
    /// Serves on 127.0.0.1 with `cert`/`key` (valid for 127.0.0.1, from `ca`); writes its kubeconfig
    /// into `dir`.
    pub async fn start(dir: &Path, ca: &Path, cert: &Path, key: &Path) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind fake apiserver");
        let addr = listener.local_addr().expect("address");
        let files = spoke::transport::tls::TlsFiles { ca: ca.into(), cert: cert.into(), key: key.into() };
        let tls = spoke::transport::tls::server_config(
            &files,
            spoke::transport::tls::Versions::Tls12And13,
            spoke::transport::tls::ClientCerts::Optional,
        )
        .expect("fake apiserver TLS");
        let acceptor = TlsAcceptor::from(tls);
        let kubeconfig = dir.join(format!("kubeconfig-{}", addr.port()));
        let ca_pem = std::fs::read(ca).expect("read CA");
        std::fs::write(
            &kubeconfig,
            serde_json::to_string_pretty(&json!({
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "test", "cluster": {
                    "server": format!("https://{addr}"),
                    "certificate-authority-data": base64(&ca_pem),
                }}],
                "users": [{"name": "spoke-server", "user": {"token": SERVER_TOKEN}}],
                "contexts": [{"name": "test", "context": {"cluster": "test", "user": "spoke-server"}}],
                "current-context": "test",
            }))
            .expect("kubeconfig JSON"),
        )
        .expect("write kubeconfig");
        let state = Arc::new(Mutex::new(State { resource_version: 100, ..State::default() }));
        let (changed, _) = watch::channel(100);
        let this = Self { state: state.clone(), changed: changed.clone(), kubeconfig };
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let (acceptor, state, changed) = (acceptor.clone(), state.clone(), changed.clone());
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        serve(tls, state, changed).await;
                    }
                });
            }
        });
        this
    }

    /// Adds or replaces a Node (an ADDED or MODIFIED watch event).
    pub fn put_node(&self, node: Value) {
        let name = node["metadata"]["name"].as_str().expect("node name").to_owned();
        let mut s = self.state.lock().unwrap();
        s.resource_version += 1;
        let rv = s.resource_version;
        let mut node = node;
        node["metadata"]["resourceVersion"] = json!(rv.to_string());
        let kind = if s.nodes.contains_key(&name) { "MODIFIED" } else { "ADDED" };
        s.events.push((rv, "Node", json!({"type": kind, "object": node.clone()})));
        s.nodes.insert(name, node);
        drop(s);
        self.changed.send_replace(rv);
    }

    /// Deletes a Node (a DELETED watch event).
    pub fn delete_node(&self, name: &str) {
        let mut s = self.state.lock().unwrap();
        let Some(mut node) = s.nodes.remove(name) else { return };
        s.resource_version += 1;
        let rv = s.resource_version;
        node["metadata"]["resourceVersion"] = json!(rv.to_string());
        s.events.push((rv, "Node", json!({"type": "DELETED", "object": node})));
        drop(s);
        self.changed.send_replace(rv);
    }

    /// Adds a pod of service account `spoke-agent` in `kube-system` scheduled on `node` (an ADDED or
    /// MODIFIED watch event).
    pub fn put_pod(&self, name: &str, node: &str) {
        let mut s = self.state.lock().unwrap();
        s.resource_version += 1;
        let rv = s.resource_version;
        let pod = json!({
            "kind": "Pod",
            "apiVersion": "v1",
            "metadata": {"name": name, "namespace": "kube-system", "uid": format!("uid-{name}"), "resourceVersion": rv.to_string()},
            "spec": {"nodeName": node, "serviceAccountName": "spoke-agent", "containers": [{"name": "agent"}]},
        });
        let kind = if s.pods.contains_key(name) { "MODIFIED" } else { "ADDED" };
        s.events.push((rv, "Pod", json!({"type": kind, "object": pod.clone()})));
        s.pods.insert(name.to_owned(), pod);
        drop(s);
        self.changed.send_replace(rv);
    }

    /// Deletes a pod (a DELETED watch event); tokens bound to it are refused from then on, as the
    /// real apiserver refuses a bound token whose pod is gone.
    pub fn delete_pod(&self, name: &str) {
        let mut s = self.state.lock().unwrap();
        let Some(mut pod) = s.pods.remove(name) else { return };
        s.resource_version += 1;
        let rv = s.resource_version;
        pod["metadata"]["resourceVersion"] = json!(rv.to_string());
        s.events.push((rv, "Pod", json!({"type": "DELETED", "object": pod})));
        s.deleted_pods.insert(name.to_owned());
        drop(s);
        self.changed.send_replace(rv);
    }

    /// Makes `token` known.
    pub fn put_token(&self, token: &str, fake: FakeToken) {
        self.state.lock().unwrap().tokens.insert(token.to_owned(), fake);
    }

    /// The names of the Leases in `namespace`.
    pub fn leases(&self, namespace: &str) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .leases
            .keys()
            .filter(|(ns, _)| ns == namespace)
            .map(|(_, n)| n.clone())
            .collect()
    }

    /// Token reviews of `token` answered so far.
    pub fn reviews_of(&self, token: &str) -> u64 {
        self.state.lock().unwrap().reviews_of.get(token).copied().unwrap_or(0)
    }

    /// Token reviews answered so far.
    pub fn reviews(&self) -> u64 {
        self.state.lock().unwrap().reviews
    }
}

fn base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

async fn serve<S: tokio::io::AsyncRead + AsyncWrite + Unpin>(
    mut conn: S,
    state: Arc<Mutex<State>>,
    changed: watch::Sender<u64>,
) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let (method, target, authorized, body) = loop {
        let Ok(n) = conn.read(&mut chunk).await else { return };
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        let Ok(httparse::Status::Complete(head_len)) = req.parse(&buf) else { continue };
        let header = |name: &str| {
            req.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).into_owned())
        };
        let len: usize = header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
        if buf.len() < head_len + len {
            continue;
        }
        let authorized = header("authorization").as_deref() == Some(&format!("Bearer {SERVER_TOKEN}"));
        break (
            req.method.unwrap_or("").to_owned(),
            req.path.unwrap_or("").to_owned(),
            authorized,
            buf[head_len..head_len + len].to_vec(),
        );
    };
    if !authorized {
        return respond(&mut conn, 401, &status_json(401, "Unauthorized", "Unauthorized")).await;
    }
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let param = |key: &str| {
        query
            .split('&')
            .find_map(|kv| kv.split_once('=').filter(|(k, _)| *k == key).map(|(_, v)| v.to_owned()))
    };
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    if let ["apis", "coordination.k8s.io", "v1", "namespaces", ns, "leases", rest @ ..] = segments.as_slice()
    {
        if method == "GET" && rest.is_empty() && param("watch").as_deref() == Some("true") {
            // Every Lease here carries the replicas' label: the selector keeps them all.
            let since = param("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
            return watch(conn, state, changed, "Lease", since).await;
        }
        let (code, answer) =
            lease_request(&state, &method, ns, rest.first().copied(), param("labelSelector"), &body);
        let rv = state.lock().unwrap().resource_version;
        changed.send_replace(rv);
        return respond(&mut conn, code, &answer).await;
    }
    match (method.as_str(), segments.as_slice()) {
        ("GET", ["api", "v1", "nodes"]) if param("watch").as_deref() == Some("true") => {
            let since = param("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
            watch(conn, state, changed, "Node", since).await;
        }
        ("GET", ["api", "v1", "nodes"]) => respond(&mut conn, 200, &list_nodes(&state)).await,
        ("GET", ["api", "v1", "namespaces", "kube-system", "pods"])
            if param("watch").as_deref() == Some("true") =>
        {
            // Every pod here is the agents' service account's: the field selector keeps them all.
            let since = param("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
            watch(conn, state, changed, "Pod", since).await;
        }
        ("GET", ["api", "v1", "namespaces", "kube-system", "pods"]) => {
            let list = list_pods(&state, &param("fieldSelector").unwrap_or_default());
            respond(&mut conn, 200, &list).await;
        }
        ("GET", ["api", "v1", "namespaces", ns, "pods", name]) => {
            let pod =
                (*ns == "kube-system").then(|| state.lock().unwrap().pods.get(*name).cloned()).flatten();
            if let Some(pod) = pod {
                respond(&mut conn, 200, &pod).await;
            } else {
                let msg = format!("pods \"{name}\" not found");
                respond(&mut conn, 404, &status_json(404, "NotFound", &msg)).await;
            }
        }
        ("POST", ["apis", "authentication.k8s.io", "v1", "tokenreviews"]) => {
            let review: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let answer = token_review(&state, &review);
            respond(&mut conn, 201, &answer).await;
        }
        _ => {
            respond(
                &mut conn,
                404,
                &status_json(404, "NotFound", "the server could not find the requested resource"),
            )
            .await;
        }
    }
}

fn list_nodes(state: &Mutex<State>) -> Value {
    let s = state.lock().unwrap();
    json!({
        "kind": "NodeList",
        "apiVersion": "v1",
        "metadata": {"resourceVersion": s.resource_version.to_string()},
        "items": s.nodes.values().collect::<Vec<_>>(),
    })
}

/// The pods in `kube-system`, filtered by a `spec.serviceAccountName=` field selector (URL-encoded).
fn list_pods(state: &Mutex<State>, selector: &str) -> Value {
    let selector = selector.replace("%3D", "=");
    let s = state.lock().unwrap();
    let wanted = |pod: &&Value| {
        selector
            .strip_prefix("spec.serviceAccountName=")
            .is_none_or(|sa| pod["spec"]["serviceAccountName"] == sa)
    };
    json!({
        "kind": "PodList",
        "apiVersion": "v1",
        "metadata": {"resourceVersion": s.resource_version.to_string()},
        "items": s.pods.values().filter(wanted).collect::<Vec<_>>(),
    })
}

/// A Lease request as the real API answers it: create (201, 409 if it exists), merge-patch (200, 404 if
/// it does not), list by label equality, delete (200 Status).
fn lease_request(
    state: &Mutex<State>,
    method: &str,
    ns: &str,
    name: Option<&str>,
    selector: Option<String>,
    body: &[u8],
) -> (u16, Value) {
    let mut s = state.lock().unwrap();
    s.resource_version += 1;
    let rv = s.resource_version.to_string();
    let not_found = |name: &str| {
        status_json(404, "NotFound", &format!("leases.coordination.k8s.io \"{name}\" not found"))
    };
    match (method, name) {
        ("POST", None) => {
            let mut lease: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            let name = lease["metadata"]["name"].as_str().unwrap_or("").to_owned();
            let key = (ns.to_owned(), name.clone());
            if s.leases.contains_key(&key) {
                let msg = format!("leases.coordination.k8s.io \"{name}\" already exists");
                return (409, status_json(409, "AlreadyExists", &msg));
            }
            lease["metadata"]["namespace"] = json!(ns);
            lease["metadata"]["resourceVersion"] = json!(rv);
            lease["metadata"]["uid"] = json!(format!("uid-lease-{name}"));
            s.leases.insert(key, lease.clone());
            let at = s.resource_version;
            s.events.push((at, "Lease", json!({"type": "ADDED", "object": lease.clone()})));
            (201, lease)
        }
        ("PATCH", Some(name)) => {
            let Some(lease) = s.leases.get_mut(&(ns.to_owned(), name.to_owned())) else {
                return (404, not_found(name));
            };
            let patch: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            merge_patch(lease, &patch);
            lease["metadata"]["resourceVersion"] = json!(rv);
            let lease = lease.clone();
            let at = s.resource_version;
            s.events.push((at, "Lease", json!({"type": "MODIFIED", "object": lease.clone()})));
            (200, lease)
        }
        ("DELETE", Some(name)) => {
            let key = (ns.to_owned(), name.to_owned());
            let Some(current) = s.leases.get(&key) else { return (404, not_found(name)) };
            let options: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            let wanted = &options["preconditions"]["resourceVersion"];
            let have = &current["metadata"]["resourceVersion"];
            if !wanted.is_null() && wanted != have {
                let msg = format!(
                    "Operation cannot be fulfilled on leases.coordination.k8s.io \"{name}\": Precondition failed: \
                     ResourceVersion in precondition: {}, ResourceVersion in object meta: {}",
                    wanted.as_str().unwrap_or(""),
                    have.as_str().unwrap_or("")
                );
                return (409, status_json(409, "Conflict", &msg));
            }
            let mut lease = s.leases.remove(&key).expect("looked up above");
            lease["metadata"]["resourceVersion"] = json!(rv);
            let at = s.resource_version;
            s.events.push((at, "Lease", json!({"type": "DELETED", "object": lease})));
            (200, json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}))
        }
        ("GET", None) => {
            let selector = selector.map(|v| v.replace("%3D", "=").replace("%2F", "/")).unwrap_or_default();
            let wanted = selector.split_once('=');
            let items: Vec<&Value> = s
                .leases
                .iter()
                .filter(|((n, _), _)| n == ns)
                .map(|(_, l)| l)
                .filter(|l| wanted.is_none_or(|(k, v)| l["metadata"]["labels"][k].as_str() == Some(v)))
                .collect();
            (
                200,
                json!({"kind": "LeaseList", "apiVersion": "coordination.k8s.io/v1", "metadata": {"resourceVersion": rv}, "items": items}),
            )
        }
        _ => (
            405,
            status_json(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
            ),
        ),
    }
}

/// JSON merge patch (RFC 7386): objects merge, `null` removes, anything else replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(fields) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let object = target.as_object_mut().expect("an object");
    for (key, value) in fields {
        if value.is_null() {
            object.remove(key);
        } else {
            merge_patch(object.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// The real API's answer to a `TokenReview`: `status.error` and no `authenticated` for a bad token.
fn token_review(state: &Mutex<State>, review: &Value) -> Value {
    let token = review["spec"]["token"].as_str().unwrap_or("");
    let wanted: Vec<String> = review["spec"]["audiences"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    let mut s = state.lock().unwrap();
    s.reviews += 1;
    *s.reviews_of.entry(token.to_owned()).or_default() += 1;
    let fake = s.tokens.get(token).cloned();
    let pod_deleted = fake
        .as_ref()
        .and_then(|f| f.pod.as_ref())
        .is_some_and(|(pod, _)| s.deleted_pods.contains(pod) && !s.pods.contains_key(pod));
    drop(s);
    let mut answer = json!({
        "kind": "TokenReview",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"creationTimestamp": null},
        "spec": review["spec"].clone(),
    });
    let Some(fake) = fake else {
        answer["status"] = json!({"user": {}, "error": "[invalid bearer token, square/go-jose: error in cryptographic primitive]"});
        return answer;
    };
    if pod_deleted {
        // The real apiserver checks a bound token's pod at every review.
        answer["status"] = json!({"user": {}, "error": "[invalid bearer token, Token has been invalidated]"});
        return answer;
    }
    if fake.expired {
        answer["status"] =
            json!({"user": {}, "error": "[invalid bearer token, service account token has expired]"});
        return answer;
    }
    let audiences: Vec<&String> =
        fake.audiences.iter().filter(|a| wanted.is_empty() || wanted.contains(a)).collect();
    if audiences.is_empty() {
        answer["status"] = json!({"user": {}, "error": "[invalid bearer token, token audiences [\"other\"] is invalid for the target audiences]"});
        return answer;
    }
    let mut extra = serde_json::Map::new();
    extra.insert("authentication.kubernetes.io/credential-id".into(), json!(["JTI=0a1b2c"]));
    if let Some((pod, uid)) = &fake.pod {
        extra.insert("authentication.kubernetes.io/pod-name".into(), json!([pod]));
        extra.insert("authentication.kubernetes.io/pod-uid".into(), json!([uid]));
    }
    if let Some(node) = &fake.node_in_extra {
        extra.insert("authentication.kubernetes.io/node-name".into(), json!([node]));
        extra.insert("authentication.kubernetes.io/node-uid".into(), json!([format!("uid-{node}")]));
    }
    answer["status"] = json!({
        "authenticated": true,
        "user": {
            "username": format!("system:serviceaccount:{}:{}", fake.namespace, fake.service_account),
            "uid": "sa-uid",
            "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{}", fake.namespace), "system:authenticated"],
            "extra": extra,
        },
        "audiences": audiences,
    });
    answer
}

fn status_json(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code})
}

async fn respond<S: AsyncWrite + Unpin>(conn: &mut S, code: u16, body: &Value) {
    let body = body.to_string();
    let head = format!(
        "HTTP/1.1 {code} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        if code < 300 { "OK" } else { "Error" },
        body.len()
    );
    let _ = conn.write_all(head.as_bytes()).await;
    let _ = conn.write_all(body.as_bytes()).await;
    let _ = conn.shutdown().await;
}

/// A watch: every event after `since`, then new ones as they come, one JSON object per chunk.
/// Streams the watch events of `kind` after `since`, as the real API's chunked watch response does.
async fn watch<S: AsyncWrite + Unpin>(
    mut conn: S,
    state: Arc<Mutex<State>>,
    changed: watch::Sender<u64>,
    kind: &'static str,
    mut since: u64,
) {
    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    if conn.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    let mut rx = changed.subscribe();
    loop {
        let pending: Vec<(u64, Value)> = state
            .lock()
            .unwrap()
            .events
            .iter()
            .filter(|(rv, k, _)| *rv > since && *k == kind)
            .map(|(rv, _, e)| (*rv, e.clone()))
            .collect();
        for (rv, event) in pending {
            let line = format!("{event}\n");
            let chunk = format!("{:x}\r\n{line}\r\n", line.len());
            if conn.write_all(chunk.as_bytes()).await.is_err() || conn.flush().await.is_err() {
                return;
            }
            since = rv;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}
