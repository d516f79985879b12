//! Counting server replicas with Leases (`coordination.k8s.io/v1`), as Konnectivity's lease controller
//! does: each replica renews a Lease of its own, labelled, and counts the labelled Leases that have not
//! expired, following them with a watch. A replica that stops deletes its Lease, so the others count
//! it out at once; one that dies is counted out when its Lease expires, and its Lease is deleted a
//! lease duration later by the others.

use std::collections::{BTreeMap, HashMap};
use std::pin::pin;
use std::time::Duration;

use futures_util::StreamExt as _;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
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
/// then deletes the Lease, unless `superseded` says a successor process of the same replica (which
/// renews the same Lease) took its place. The count follows a watch of the labelled Leases, so a replica that starts
/// or stops is counted at once, not at the next renewal; one that died is counted out the moment its
/// Lease expires, and its Lease is deleted (by whichever replica renews next) once it has been expired
/// for a further lease duration.
pub async fn run(
    client: Client,
    config: LeaseConfig,
    holder: String,
    count: watch::Sender<u16>,
    (stop, superseded): (CancellationToken, CancellationToken),
) {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let name = lease_name(&holder);
    tokio::join!(renew_loop(&api, &config, &name, &holder, &stop), count_loop(&api, &config, &count, &stop));
    if superseded.is_cancelled() {
        info!(lease = %name, "a successor renews this replica's Lease: kept");
        return;
    }
    let gone = tokio::time::timeout(REQUEST_TIMEOUT, api.delete(&name, &DeleteParams::default())).await;
    if !matches!(gone, Ok(Ok(_))) {
        warn!(lease = %name, "could not delete this replica's Lease; it expires on its own");
    }
}

/// Renews this replica's Lease every `renew_every`, and deletes the labelled Leases long expired.
async fn renew_loop(
    api: &Api<Lease>,
    config: &LeaseConfig,
    name: &str,
    holder: &str,
    stop: &CancellationToken,
) {
    let mut ticker = tokio::time::interval(config.renew_every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let round = async {
            renew(api, config, name, holder).await?;
            collect_garbage(api, config).await
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, round).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => warn!(%error, "renewing or collecting the server Leases"),
            Err(_) => warn!("renewing or collecting the server Leases timed out"),
        }
    }
}

/// Publishes the count of live labelled Leases (at least 1) as the watch reports them and as they
/// expire.
async fn count_loop(
    api: &Api<Lease>,
    config: &LeaseConfig,
    count: &watch::Sender<u16>,
    stop: &CancellationToken,
) {
    let selector = format!("{}={}", config.label.0, config.label.1);
    let events =
        watcher::watcher(api.clone(), watcher::Config::default().labels(&selector)).default_backoff();
    let mut events = pin!(events);
    // Lease name → when it stops counting.
    let mut known: HashMap<String, Timestamp> = HashMap::new();
    let mut listing: Option<HashMap<String, Timestamp>> = None;
    loop {
        let now = Timestamp::now();
        let live = known.values().filter(|until| **until > now).count();
        let n = u16::try_from(live.max(1)).unwrap_or(u16::MAX);
        if count.send_replace(n) != n {
            info!(replicas = n, "server replicas counted from Leases");
        }
        // Wake when the next live Lease expires, to count it out then.
        let next_expiry = known.values().filter(|until| **until > now).min().copied();
        let wait = next_expiry.map_or(Duration::from_hours(1), |t| {
            Duration::try_from(t.duration_since(now)).unwrap_or_default() + Duration::from_millis(1)
        });
        let event = tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => continue,
            event = events.next() => event,
        };
        match event {
            None => return,
            Some(Err(error)) => warn!(%error, "watching the server Leases (retrying with backoff)"),
            Some(Ok(Event::Init)) => listing = Some(HashMap::new()),
            Some(Ok(Event::InitApply(lease))) => {
                if let (Some(listing), Some((name, until))) = (listing.as_mut(), valid_until(&lease)) {
                    listing.insert(name, until);
                }
            }
            Some(Ok(Event::InitDone)) => known = listing.take().unwrap_or_default(),
            Some(Ok(Event::Apply(lease))) => {
                if let Some((name, until)) = valid_until(&lease) {
                    known.insert(name, until);
                }
            }
            Some(Ok(Event::Delete(lease))) => {
                if let Some(name) = &lease.metadata.name {
                    known.remove(name);
                }
            }
        }
    }
}

/// Deletes the labelled Leases expired for longer than a lease duration: replicas that died without
/// deleting their own. The delete is conditional on the Lease's resourceVersion, so a Lease renewed
/// meanwhile stays; a replica that was only cut off from the apiserver creates its Lease again at its
/// next renewal.
async fn collect_garbage(api: &Api<Lease>, config: &LeaseConfig) -> Result<(), kube::Error> {
    let selector = format!("{}={}", config.label.0, config.label.1);
    let leases = api.list(&ListParams::default().labels(&selector)).await?;
    let horizon = Timestamp::now()
        .checked_sub(k8s_openapi::jiff::SignedDuration::try_from(config.duration).unwrap_or_default())
        .unwrap_or(Timestamp::MIN);
    for lease in &leases.items {
        let (Some(name), Some(version)) = (&lease.metadata.name, &lease.metadata.resource_version) else {
            continue;
        };
        if valid_until(lease).is_some_and(|(_, until)| until > horizon) {
            continue;
        }
        let params = DeleteParams {
            preconditions: Some(Preconditions { resource_version: Some(version.clone()), uid: None }),
            ..DeleteParams::default()
        };
        match api.delete(name, &params).await {
            Ok(_) => info!(lease = %name, "deleted the Lease of a replica gone without deleting it"),
            // Renewed or deleted meanwhile.
            Err(kube::Error::Api(status)) if status.code == 409 || status.code == 404 => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
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

/// A Lease's name and the time it stops counting (its renewal plus its duration); `None` for one
/// without them, which never counts.
fn valid_until(lease: &Lease) -> Option<(String, Timestamp)> {
    let spec = lease.spec.as_ref()?;
    let (Some(MicroTime(renewed)), Some(seconds)) = (&spec.renew_time, spec.lease_duration_seconds) else {
        return None;
    };
    let until = renewed.checked_add(k8s_openapi::jiff::SignedDuration::from_secs(i64::from(seconds))).ok()?;
    Some((lease.metadata.name.clone()?, until))
}

/// Whether `lease` was renewed within its duration.
#[cfg(test)]
fn alive(lease: &Lease, now: Timestamp) -> bool {
    valid_until(lease).is_some_and(|(_, until)| until > now)
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
            metadata: ObjectMeta { name: Some("spoke-server-0".into()), ..ObjectMeta::default() },
        };
        assert!(alive(&lease(5, 30), now));
        assert!(!alive(&lease(31, 30), now));
        assert!(!alive(&Lease::default(), now));
    }
}
