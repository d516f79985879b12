//! The server's access to the Kubernetes apiserver: one client (from a kubeconfig file or the pod's
//! in-cluster credentials), the Node facts agents' claims are checked against ([`nodes`], with who owns
//! an item two Nodes list in [`claims`]), token
//! reviews ([`tokens`]) and the pods their tokens are bound to ([`pods`]), and the replica count from
//! Leases ([`leases`]). Nothing here knows about agents or streams.

pub mod claims;
pub mod leases;
pub mod nodes;
pub mod pods;
pub mod tokens;

use std::path::PathBuf;
use std::time::Duration;

use kube::config::{KubeConfigOptions, Kubeconfig};

/// Time to open a connection to the apiserver.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the apiserver's address and credentials come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Access {
    /// A kubeconfig file (its current context).
    Kubeconfig(PathBuf),
    /// The pod's service-account token and the `KUBERNETES_SERVICE_*` environment.
    InCluster,
}

/// Why no apiserver client could be made.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// The kubeconfig file could not be read or used.
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        source: kube::config::KubeconfigError,
    },
    /// The in-cluster credentials are missing or unusable.
    #[error("in-cluster apiserver credentials: {0}")]
    InCluster(#[from] kube::config::InClusterError),
    /// The client could not be built from the configuration.
    #[error("apiserver client: {0}")]
    Client(#[from] kube::Error),
}

impl Access {
    /// Whether the credentials are there to be used (read now, before the server says it started):
    /// the kubeconfig file parses, or the pod's in-cluster environment and token exist. `needed_for`
    /// says what the server uses the apiserver for, in the error.
    ///
    /// # Errors
    /// One line: what is missing, and the flags that supply it.
    pub fn check(&self, needed_for: &str) -> Result<(), String> {
        match self {
            Self::Kubeconfig(path) => Kubeconfig::read_from(path).map(drop).map_err(|e| {
                format!(
                    "the apiserver is needed for {needed_for}, but --kubeconfig {} is not usable: {e}",
                    path.display()
                )
            }),
            Self::InCluster => kube::Config::incluster().map(drop).map_err(|e| {
                format!(
                    "the apiserver is needed for {needed_for}, and there are no credentials for it: no \
                     --kubeconfig was given and this is not a pod with a service account ({e}). Give \
                     --kubeconfig FILE (on a kubeadm control plane: `kubeadm kubeconfig user \
                     --client-name=spoke-server`), run it in a pod with a service account, or, for \
                     development only, --agent-claims trusted (agents' claims taken on their word)"
                )
            }),
        }
    }
}

/// A client for the apiserver that `access` names.
pub async fn client(access: &Access) -> Result<kube::Client, AccessError> {
    let mut config = match access {
        Access::Kubeconfig(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .map_err(|source| AccessError::Kubeconfig { path: path.clone(), source })?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(|source| AccessError::Kubeconfig { path: path.clone(), source })?
        }
        Access::InCluster => kube::Config::incluster()?,
    };
    config.connect_timeout = Some(CONNECT_TIMEOUT);
    Ok(kube::Client::try_from(config)?)
}
