//! `cargo xtask image`: the container image, built from source without a container daemon or registry:
//! the release binaries (without debug information) and the shared libraries they load (glibc, libgcc) in one layer on an empty
//! base, written as an OCI image layout in a tar archive, byte for byte the same from the same sources
//! (files sorted, owners and times fixed, gzip without a name or time), and checked by reading it back
//! with skopeo. The image's user is 65532; the manifests run a container as root only where it reads
//! root's files (the kubelet's key, the server's key).

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde_json::json;

use crate::bootstrap::output;
use crate::{cmd, run, target_dir};

/// The binaries in the image.
const BINARIES: [&str; 3] = ["spoke-server", "spoke-agent", "spoke-certs"];
/// Where they go.
const BIN_DIR: &str = "usr/local/bin";
/// The image's reference name inside the layout.
const REF_NAME: &str = "spoke:dev";
/// The user the image runs as unless a pod says otherwise.
const USER: &str = "65532:65532";

fn say(msg: &str) {
    eprintln!("[image] {msg}");
}

/// Builds the image; returns the archive's path.
pub fn build() -> anyhow::Result<PathBuf> {
    let mut c = cmd("cargo", &["build", "--release", "--package", "proxy-user", "--bins"]);
    c.env_remove("RUSTC_WORKSPACE_WRAPPER");
    run(c)?;
    let work = target_dir().join("image");
    let _ = std::fs::remove_dir_all(&work);
    let rootfs = work.join("rootfs");
    let bin_dir = rootfs.join(BIN_DIR);
    std::fs::create_dir_all(&bin_dir).with_context(|| format!("create {}", bin_dir.display()))?;
    let release = target_dir().join("release");
    let mut libraries = std::collections::BTreeSet::new();
    for name in BINARIES {
        let binary = release.join(name);
        copy(&binary, &bin_dir.join(name))?;
        // Debug information is for profiling on the build machine; symbols stay, for backtraces.
        run(cmd("strip", &["--strip-debug", &bin_dir.join(name).display().to_string()]))?;
        libraries.extend(shared_libraries(&binary)?);
    }
    for library in &libraries {
        // Each library at its own path (the loader's, and the one the binaries name).
        let inside = rootfs.join(library.strip_prefix("/").unwrap_or(library));
        copy(&std::fs::canonicalize(library)?, &inside)?;
    }
    let etc = rootfs.join("etc");
    std::fs::create_dir_all(&etc)?;
    std::fs::write(
        etc.join("passwd"),
        "root:x:0:0:root:/:/sbin/nologin\nnonroot:x:65532:65532::/:/sbin/nologin\n",
    )?;
    std::fs::write(etc.join("group"), "root:x:0:\nnonroot:x:65532:\n")?;
    say(&format!("{} binaries and {} shared libraries in the layer", BINARIES.len(), libraries.len()));

    let layout = work.join("layout");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let layer_tar = work.join("layer.tar");
    reproducible_tar(&rootfs, &layer_tar)?;
    let diff_id = sha256(&layer_tar)?;
    run(cmd("gzip", &["-n", "-9", "-f", &layer_tar.display().to_string()]))?;
    let layer_gz = work.join("layer.tar.gz");
    let (layer_digest, layer_size) = blob(&layer_gz, &blobs)?;
    let config = json!({
        "created": "1970-01-01T00:00:00Z",
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "User": USER,
            "Entrypoint": [format!("/{BIN_DIR}/spoke-agent")],
            "Env": ["PATH=/usr/local/bin"],
            "Labels": {"org.opencontainers.image.title": "spoke", "org.opencontainers.image.source": "https://example.invalid/spoke"},
        },
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{diff_id}")]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "cargo xtask image"}],
    });
    let config_path = work.join("config.json");
    std::fs::write(&config_path, serde_json::to_vec(&config)?)?;
    let (config_digest, config_size) = blob(&config_path, &blobs)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{config_digest}"), "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": format!("sha256:{layer_digest}"), "size": layer_size}],
    });
    let manifest_path = work.join("manifest.json");
    std::fs::write(&manifest_path, serde_json::to_vec(&manifest)?)?;
    let (manifest_digest, manifest_size) = blob(&manifest_path, &blobs)?;
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{manifest_digest}"),
            "size": manifest_size,
            "annotations": {"org.opencontainers.image.ref.name": REF_NAME},
        }],
    });
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&index)?)?;
    std::fs::write(layout.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let archive = work.join("spoke-oci.tar");
    reproducible_tar(&layout, &archive)?;
    check(&archive, &manifest_digest)?;
    say(&format!("{} (manifest sha256:{manifest_digest})", archive.display()));
    Ok(archive)
}

fn copy(from: &Path, to: &Path) -> anyhow::Result<()> {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
    }
    std::fs::copy(from, to).with_context(|| format!("copy {} to {}", from.display(), to.display()))?;
    Ok(())
}

/// The shared libraries `binary` loads, and its loader, as absolute paths (from `ldd`).
fn shared_libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let listing = output("ldd", &[&binary.display().to_string()])?;
    let mut libraries = Vec::new();
    for line in listing.lines() {
        let path = match line.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            libraries.push(PathBuf::from(path));
        }
    }
    if libraries.is_empty() {
        bail!("ldd named no library for {}", binary.display());
    }
    Ok(libraries)
}

/// A tar of `dir`'s contents with sorted names, fixed owners, modes kept and times at the epoch.
fn reproducible_tar(dir: &Path, archive: &Path) -> anyhow::Result<()> {
    let mut c = cmd(
        "tar",
        &["--sort=name", "--mtime=@0", "--owner=0", "--group=0", "--numeric-owner", "--format=posix"],
    );
    c.args(["--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime", "-C"])
        .arg(dir)
        .arg("-cf")
        .arg(archive)
        .arg(".");
    run(c)
}

fn sha256(path: &Path) -> anyhow::Result<String> {
    let out = output("sha256sum", &[&path.display().to_string()])?;
    out.split_whitespace().next().map(str::to_owned).context("sha256sum printed nothing")
}

/// Moves `path` into the blob store under its digest; its digest and size.
fn blob(path: &Path, blobs: &Path) -> anyhow::Result<(String, u64)> {
    let digest = sha256(path)?;
    let size = std::fs::metadata(path)?.len();
    std::fs::rename(path, blobs.join(&digest)).with_context(|| format!("store {}", path.display()))?;
    Ok((digest, size))
}

/// Reads the archive back with skopeo (a standard OCI tool): the manifest it finds must be ours.
fn check(archive: &Path, manifest_digest: &str) -> anyhow::Result<()> {
    crate::bootstrap::ensure_packages(&[("skopeo", "skopeo")])?;
    let reference = format!("oci-archive:{}:{REF_NAME}", archive.display());
    let inspected = output("skopeo", &["inspect", &reference])?;
    let inspected: serde_json::Value = serde_json::from_str(&inspected).context("skopeo's answer")?;
    if inspected["Digest"] != format!("sha256:{manifest_digest}") {
        bail!("skopeo read another manifest: {}", inspected["Digest"]);
    }
    let config = output("skopeo", &["inspect", "--config", &reference])?;
    let config: serde_json::Value = serde_json::from_str(&config).context("skopeo's config")?;
    if config["config"]["User"] != USER {
        bail!("the image's user is {}", config["config"]["User"]);
    }
    say("skopeo reads the archive: manifest and config as written");
    Ok(())
}
