//! deploy/ checked against the binaries and the Kubernetes API: every kustomization renders (`kubectl
//! kustomize`), every object validates against the API's schemas (kubernetes-validate, strict) and
//! passes checkov's Kubernetes checks (each check a manifest skips names its reason in a
//! `checkov.io/skipN` annotation), and every flag and `SPOKE_*` variable a container sets passes its
//! binary's `--check-config`, so that the manifests and the binaries cannot drift apart.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::bootstrap::output;
use crate::{cmd, root, run, target_dir};

fn say(msg: &str) {
    eprintln!("[manifests] {msg}");
}

/// Kustomizations, rendered.
const KUSTOMIZATIONS: [&str; 3] = ["deploy/base", "deploy/overlays/sockmap", "deploy/overlays/token-auth"];
/// Manifests applied as they are (the server as a static pod, or as a `DaemonSet`).
const PLAIN: [&str; 2] = ["deploy/server/spoke-server.yaml", "deploy/server/spoke-server-daemonset.yaml"];
/// The Kubernetes version the schemas are checked for (the oldest the apiserver client targets).
const KUBERNETES_VERSION: &str = "1.33.0";
/// The schema validator and the policy checker, from `PyPI`, into a virtual environment under the
/// target directory.
const PYTHON_TOOLS: [&str; 2] = ["kubernetes-validate==1.37.0", "checkov==3.3.30"];

/// Stand-in values of the downward API, for `--check-config`.
const NODE_NAME: &str = "node-a";
const HOST_IP: &str = "10.0.0.5";

/// Renders and validates deploy/, and runs every container's flags through `--check-config` with the
/// binaries in `bins`.
pub fn check(bins: &Path) -> anyhow::Result<()> {
    let work = target_dir().join("manifest-check");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).with_context(|| format!("create {}", work.display()))?;
    if output("kubectl", &["version", "--client"]).is_err() {
        bail!("kubectl (with its kustomize) is not on PATH: it renders deploy/'s kustomizations");
    }
    let files = stand_in_files(bins, &work)?;
    let mut rendered = Vec::new();
    for dir in KUSTOMIZATIONS {
        let yaml = output("kubectl", &["kustomize", &root().join(dir).display().to_string()])
            .with_context(|| format!("render {dir} (kubectl kustomize)"))?;
        let path = work.join(format!("{}.yaml", dir.replace('/', "_")));
        std::fs::write(&path, &yaml).with_context(|| format!("write {}", path.display()))?;
        rendered.push((dir.to_owned(), path, yaml));
    }
    for file in PLAIN {
        let path = root().join(file);
        let yaml = std::fs::read_to_string(&path).with_context(|| format!("read {file}"))?;
        rendered.push((file.to_owned(), path, yaml));
    }
    let mut containers = 0;
    for (name, _, yaml) in &rendered {
        let docs: Vec<Value> = serde_saphyr::from_multiple(yaml).with_context(|| format!("parse {name}"))?;
        for doc in &docs {
            for container in pod_containers(doc) {
                check_container(bins, &files, name, container)?;
                containers += 1;
            }
        }
    }
    say(&format!("manifests: {containers} containers' flags pass --check-config"));
    validate(&work, &rendered.iter().map(|(_, path, _)| path.clone()).collect::<Vec<_>>())
}

/// Files that flags naming TLS material or tokens point at, for `--check-config` (which reads them).
fn stand_in_files(bins: &Path, work: &Path) -> anyhow::Result<BTreeMap<&'static str, PathBuf>> {
    let certs = work.join("certs");
    let certs_arg = certs.display().to_string();
    output(&bins.join("spoke-certs").display().to_string(), &["--out", &certs_arg, "--node", NODE_NAME])
        .context("write stand-in certificates")?;
    let token = work.join("token");
    std::fs::write(&token, "header.claims.signature\n").context("write a stand-in token")?;
    let node = certs.join(format!("node-{NODE_NAME}.pem"));
    let node_key = certs.join(format!("node-{NODE_NAME}-key.pem"));
    Ok(BTreeMap::from([
        ("--cluster-ca-cert", certs.join("cluster-ca.pem")),
        ("--cluster-cert", certs.join("cluster.pem")),
        ("--cluster-key", certs.join("cluster-key.pem")),
        ("--server-ca-cert", certs.join("frontend-ca.pem")),
        ("--server-cert", certs.join("frontend.pem")),
        ("--server-key", certs.join("frontend-key.pem")),
        ("SPOKE_AGENT_CA_CERT", certs.join("cluster-ca.pem")),
        ("SPOKE_AGENT_AGENT_CERT", node),
        ("SPOKE_AGENT_AGENT_KEY", node_key),
        ("SPOKE_AGENT_SERVICE_ACCOUNT_TOKEN_PATH", token),
    ]))
}

/// The containers of a Pod, or of a workload's pod template.
fn pod_containers(doc: &Value) -> Vec<&Value> {
    let spec = match doc["kind"].as_str() {
        Some("Pod") => &doc["spec"],
        Some("DaemonSet" | "Deployment" | "StatefulSet") => &doc["spec"]["template"]["spec"],
        _ => return Vec::new(),
    };
    spec["containers"].as_array().map(|c| c.iter().collect()).unwrap_or_default()
}

/// Runs one container's command line and environment through its binary's `--check-config`.
fn check_container(
    bins: &Path,
    files: &BTreeMap<&'static str, PathBuf>,
    manifest: &str,
    container: &Value,
) -> anyhow::Result<()> {
    let name = container["name"].as_str().unwrap_or("?");
    let what = format!("{manifest}: container {name}");
    let mut line: Vec<String> = ["command", "args"]
        .iter()
        .flat_map(|k| container[*k].as_array().cloned().unwrap_or_default())
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    if line.is_empty() {
        bail!("{what}: no command");
    }
    let program = line.remove(0);
    let binary = Path::new(&program).file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
    if !matches!(binary.as_str(), "spoke-server" | "spoke-agent") {
        bail!("{what}: runs {program}, not a Spoke binary");
    }
    // The environment in order, with `$(VAR)` expanded as the kubelet does.
    let mut env: Vec<(String, String)> = Vec::new();
    for var in container["env"].as_array().cloned().unwrap_or_default() {
        let key = var["name"].as_str().unwrap_or_default().to_owned();
        let value = match (&var["value"], var["valueFrom"]["fieldRef"]["fieldPath"].as_str()) {
            (Value::String(v), _) => expand(v, &env),
            (_, Some("spec.nodeName")) => NODE_NAME.into(),
            (_, Some("status.hostIP")) => HOST_IP.into(),
            _ => bail!("{what}: no stand-in for the value of {key}"),
        };
        let value = files.get(key.as_str()).map_or(value, |f| f.display().to_string());
        env.push((key, value));
    }
    let args: Vec<String> = line
        .iter()
        .map(|arg| {
            let arg = expand(arg, &env);
            match arg.split_once('=') {
                Some((flag, _)) if files.contains_key(flag) => format!("{flag}={}", files[flag].display()),
                _ => arg,
            }
        })
        .collect();
    let mut c = std::process::Command::new(bins.join(&binary));
    c.arg("--check-config").args(&args);
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("SPOKE_")) {
        c.env_remove(key);
    }
    c.envs(env.iter().filter(|(k, _)| k.starts_with("SPOKE_")).map(|(k, v)| (k, v)));
    let out = c.output().with_context(|| format!("{what}: run {binary}"))?;
    if !out.status.success() {
        bail!(
            "{what}: {binary} --check-config refuses the manifest's flags ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // A variable no flag reads would be ignored without a word: every SPOKE_ one must set a flag.
    let report: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("{what}: {binary} --check-config printed no JSON"))?;
    let settings = report["settings"].as_object().cloned().unwrap_or_default();
    for (key, _) in env.iter().filter(|(k, _)| k.starts_with("SPOKE_")) {
        let used = settings.values().any(|s| s["env"] == key.as_str() && s["source"] == "env");
        if !used {
            bail!("{what}: {key} sets no flag of {binary}");
        }
    }
    Ok(())
}

/// `$(VAR)` references to earlier variables replaced by their values (others left as they are).
fn expand(value: &str, env: &[(String, String)]) -> String {
    let mut out = value.to_owned();
    for (key, v) in env {
        out = out.replace(&format!("$({key})"), v);
    }
    out
}

/// Validates `files` against the Kubernetes API's schemas, strictly (unknown fields are errors), and
/// runs checkov's Kubernetes checks on them (offline: `--skip-download`).
fn validate(work: &Path, files: &[PathBuf]) -> anyhow::Result<()> {
    let venv = target_dir().join("tools/venv");
    let bin = |name: &str| venv.join("bin").join(name).display().to_string();
    let installed = output(&bin("pip"), &["freeze"]).unwrap_or_default();
    let missing: Vec<&str> =
        PYTHON_TOOLS.iter().copied().filter(|t| !installed.lines().any(|l| l == *t)).collect();
    if !missing.is_empty() {
        say(&format!("installing {} from PyPI into {}", missing.join(" "), venv.display()));
        if !venv.join("bin/pip").exists() {
            run(cmd("python3", &["-m", "venv", &venv.display().to_string()]))?;
        }
        let mut pip = cmd(&bin("pip"), &["install", "-q"]);
        pip.args(&missing);
        run(pip)?;
    }
    let mut c = cmd(&bin("kubernetes-validate"), &["--strict", "--kubernetes-version", KUBERNETES_VERSION]);
    c.args(files).current_dir(work);
    run(c).context("kubernetes-validate found manifests the API would refuse")?;
    let mut c =
        cmd(&bin("checkov"), &["--skip-download", "--framework", "kubernetes", "--compact", "--quiet"]);
    for file in files {
        c.arg("-f").arg(file);
    }
    c.current_dir(work);
    run(c).context("checkov found manifests that break a check without a written reason to skip it")?;
    Ok(())
}
