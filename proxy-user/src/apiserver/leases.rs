//! Counting server replicas with Leases (`coordination.k8s.io/v1`), as Konnectivity's lease controller
//! does: each replica renews a Lease of its own, labelled, and counts the labelled Leases that have not
//! expired. A replica that stops deletes its Lease, so the others count it out at once; one that dies
//! is counted out when its Lease expires.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Time each apiserver request of the controller may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How this replica's Lease is kept and the others' are counted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseConfig {
    /// The namespace of the Leases.
    pub namespace: String,
    /// The label (`key`, `value`) every replica's Lease carries, and the count selects.
    pub label: (String, String),
    /// How long a Lease counts after its last renewal.
    pub duration: Duration,
    /// How often this replica renews its Lease and counts.
    pub renew_every: Duration,
}

/// Renews the Lease of replica `holder` and publishes the replica count into `count` until `stop`;
/// then deletes the Lease.
pub async fn run(
    client: Client,
    config: LeaseConfig,
    holder: String,
    count: watch::Sender<u16>,
    stop: CancellationToken,
) {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let name = lease_name(&holder);
    let mut ticker = tokio::time::interval(config.renew_every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let round = async {
            renew(&api, &config, &name, &holder).await?;
            counted(&api, &config).await
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, round).await {
            Ok(Ok(n)) => {
                let n = u16::try_from(n.max(1)).unwrap_or(u16::MAX);
                if count.send_replace(n) != n {
                    info!(replicas = n, "server replicas counted from Leases");
                }
            }
            Ok(Err(error)) => warn!(%error, "renewing or counting the server Leases"),
            Err(_) => warn!("renewing or counting the server Leases timed out"),
        }
    }
    let gone = tokio::time::timeout(REQUEST_TIMEOUT, api.delete(&name, &DeleteParams::default())).await;
    if !matches!(gone, Ok(Ok(_))) {
        warn!(lease = %name, "could not delete this replica's Lease; it expires on its own");
    }
}

/// A Lease name for replica `holder`: lower-case letters, digits, `-` and `.` (a DNS subdomain).
fn lease_name(holder: &str) -> String {
    let name: String = holder
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c.to_ascii_lowercase() } else { '-' })
        .collect();
    let name = name.trim_matches(|c| c == '-' || c == '.');
    if name.is_empty() { "spoke-server".into() } else { name.chars().take(253).collect() }
}

/// Renews this replica's Lease, creating it if it does not exist.
async fn renew(api: &Api<Lease>, config: &LeaseConfig, name: &str, holder: &str) -> Result<(), kube::Error> {
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(BTreeMap::from([config.label.clone()])),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(holder.to_owned()),
            lease_duration_seconds: Some(i32::try_from(config.duration.as_secs()).unwrap_or(i32::MAX)),
            renew_time: Some(MicroTime(Timestamp::now())),
            ..LeaseSpec::default()
        }),
    };
    match api.patch(name, &PatchParams::default(), &Patch::Merge(&lease)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => {
            api.create(&PostParams::default(), &lease).await.map(drop)
        }
        Err(error) => Err(error),
    }
}

/// The labelled Leases that have not expired.
async fn counted(api: &Api<Lease>, config: &LeaseConfig) -> Result<usize, kube::Error> {
    let selector = format!("{}={}", config.label.0, config.label.1);
    let leases = api.list(&ListParams::default().labels(&selector)).await?;
    let now = Timestamp::now();
    Ok(leases.items.iter().filter(|lease| alive(lease, now)).count())
}

/// Whether `lease` was renewed within its duration.
fn alive(lease: &Lease, now: Timestamp) -> bool {
    let Some(spec) = &lease.spec else { return false };
    let (Some(MicroTime(renewed)), Some(seconds)) = (&spec.renew_time, spec.lease_duration_seconds) else {
        return false;
    };
    let Ok(until) = renewed.checked_add(k8s_openapi::jiff::SignedDuration::from_secs(i64::from(seconds)))
    else {
        return false;
    };
    until > now
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_names_are_dns_subdomains() {
        assert_eq!(lease_name("spoke-server-0"), "spoke-server-0");
        assert_eq!(lease_name("CP_1/spoke"), "cp-1-spoke");
        assert_eq!(lease_name("__"), "spoke-server");
    }

    #[test]
    fn a_lease_counts_until_it_expires() {
        let now = Timestamp::now();
        let lease = |ago: i64, seconds: i32| Lease {
            spec: Some(LeaseSpec {
                renew_time: Some(MicroTime(
                    now.checked_sub(k8s_openapi::jiff::SignedDuration::from_secs(ago)).unwrap(),
                )),
                lease_duration_seconds: Some(seconds),
                ..LeaseSpec::default()
            }),
            ..Lease::default()
        };
        assert!(alive(&lease(5, 30), now));
        assert!(!alive(&lease(31, 30), now));
        assert!(!alive(&Lease::default(), now));
    }
}
