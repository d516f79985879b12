//! The agents' pods, watched for `--agent-auth token`: a token bound to a pod is good only while that
//! pod exists (the apiserver refuses it once the pod is deleted), so a session opened with it must end
//! then too, and a cached review of it must be forgotten. One watch per server, on the agents'
//! namespace, narrowed to the agents' service account (`spec.serviceAccountName`, a field selector Pods
//! support).

use std::collections::HashMap;
use std::pin::pin;

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// Events buffered for the consumer; the watch waits when it falls behind (nothing is dropped).
const EVENTS_QUEUE: usize = 1024;

/// What the watch saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodEvent {
    /// The pod of this name exists with this uid (a pod of that name with another uid is gone).
    Present {
        /// `metadata.name`.
        name: String,
        /// `metadata.uid`.
        uid: String,
    },
    /// The pod was deleted.
    Gone {
        /// `metadata.name`.
        name: String,
        /// `metadata.uid`.
        uid: String,
    },
    /// A complete list (at the start and after each re-list): every pod not in it is gone.
    Listed(HashMap<String, String>),
}

impl PodEvent {
    /// Whether a session bound to pod `name` (with `uid`, where the token named it) has lost its pod.
    #[must_use]
    pub fn ends(&self, name: &str, uid: Option<&str>) -> bool {
        let other_uid = |current: &str| uid.is_some_and(|u| u != current);
        match self {
            Self::Present { name: n, uid: current } => n == name && other_uid(current),
            Self::Gone { name: n, uid: gone } => n == name && uid.is_none_or(|u| u == gone),
            Self::Listed(pods) => pods.get(name).is_none_or(|current| other_uid(current)),
        }
    }
}

/// Watches the pods of `service_account` in `namespace` until `stop`; the watch retries with backoff
/// on errors.
#[must_use]
pub fn watch(
    client: Client,
    namespace: &str,
    service_account: &str,
    stop: CancellationToken,
) -> mpsc::Receiver<PodEvent> {
    let (tx, rx) = mpsc::channel(EVENTS_QUEUE);
    let api: Api<Pod> = Api::namespaced(client, namespace);
    let config = watcher::Config::default().fields(&format!("spec.serviceAccountName={service_account}"));
    let events = watcher::watcher(api, config).default_backoff();
    tokio::spawn(async move {
        let mut events = pin!(events);
        let mut listing: Option<HashMap<String, String>> = None;
        loop {
            let event = tokio::select! {
                () = stop.cancelled() => return,
                event = events.next() => event,
            };
            let out = match event {
                None => return,
                Some(Err(error)) => {
                    warn!(%error, "watching the agents' pods (retrying with backoff)");
                    continue;
                }
                Some(Ok(Event::Init)) => {
                    listing = Some(HashMap::new());
                    continue;
                }
                Some(Ok(Event::InitApply(pod))) => {
                    if let (Some(listing), Some((name, uid))) = (listing.as_mut(), name_uid(&pod)) {
                        listing.insert(name, uid);
                    }
                    continue;
                }
                Some(Ok(Event::InitDone)) => PodEvent::Listed(listing.take().unwrap_or_default()),
                Some(Ok(Event::Apply(pod))) => {
                    let Some((name, uid)) = name_uid(&pod) else { continue };
                    PodEvent::Present { name, uid }
                }
                Some(Ok(Event::Delete(pod))) => {
                    let Some((name, uid)) = name_uid(&pod) else { continue };
                    PodEvent::Gone { name, uid }
                }
            };
            if tx.send(out).await.is_err() {
                return;
            }
        }
    });
    rx
}

fn name_uid(pod: &Pod) -> Option<(String, String)> {
    Some((pod.metadata.name.clone()?, pod.metadata.uid.clone()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_ends_when_its_pod_is_deleted_replaced_or_missing_from_a_list() {
        let gone = PodEvent::Gone { name: "agent-x".into(), uid: "u1".into() };
        assert!(gone.ends("agent-x", Some("u1")));
        assert!(gone.ends("agent-x", None));
        assert!(!gone.ends("agent-x", Some("u2")), "a newer pod of that name was not deleted");
        assert!(!gone.ends("agent-y", Some("u1")));
        let replaced = PodEvent::Present { name: "agent-x".into(), uid: "u2".into() };
        assert!(replaced.ends("agent-x", Some("u1")));
        assert!(!replaced.ends("agent-x", Some("u2")));
        assert!(!replaced.ends("agent-x", None));
        let listed = PodEvent::Listed(HashMap::from([("agent-x".into(), "u2".into())]));
        assert!(listed.ends("agent-x", Some("u1")));
        assert!(!listed.ends("agent-x", Some("u2")));
        assert!(listed.ends("agent-y", None));
    }
}
