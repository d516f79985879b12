//! Service-account tokens checked with the `TokenReview` API (`authentication.k8s.io/v1`): the audience
//! and the service account are enforced, and the node is the one the token's pod runs on. Results are
//! cached briefly, and reviews are rate-limited so that a reconnect storm cannot flood the apiserver.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// `user.extra` key of the pod a token is bound to (set by the apiserver for pod-bound tokens).
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
/// `user.extra` key of that pod's uid.
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
/// `user.extra` key of the node that pod runs on (Kubernetes 1.30 and later).
pub const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
/// Cached results at most; past it the oldest half is dropped.
const MAX_CACHED: usize = 65_536;
/// How long a refusal is remembered, so that a retrying bad token costs the apiserver nothing.
const REFUSAL_TTL: Duration = Duration::from_secs(10);

/// Who may present tokens, and how hard the apiserver may be asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenPolicy {
    /// The audience tokens must be issued for.
    pub audience: String,
    /// The namespace of the agents' service account.
    pub namespace: String,
    /// The agents' service account.
    pub service_account: String,
    /// How long a successful review is reused (never past the token's own expiry).
    pub cache_ttl: Duration,
    /// Reviews sent per second at most, on average.
    pub qps: u32,
    /// Reviews sent at once at most.
    pub max_in_flight: usize,
}

impl TokenPolicy {
    fn username(&self) -> String {
        format!("system:serviceaccount:{}:{}", self.namespace, self.service_account)
    }
}

/// Who a reviewed token belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reviewed {
    /// The node its pod runs on.
    pub node: String,
    /// Its pod.
    pub pod: String,
    /// That pod's uid, where the token names it.
    pub pod_uid: Option<String>,
}

/// Why a token was not accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReviewError {
    /// The token is not good for this server: invalid, expired, another audience, another service
    /// account, or not bound to a pod.
    #[error("{0}")]
    Refused(String),
    /// The review could not be done now (apiserver unreachable, rate limit, time out); retry later.
    #[error("token review unavailable: {0}")]
    Unavailable(String),
}

/// A review's result and until when it may be reused.
type Cached = (Result<Reviewed, ReviewError>, Instant);

/// Reviews agents' tokens.
pub struct Reviewer {
    client: Client,
    policy: TokenPolicy,
    cache: Mutex<HashMap<[u8; 32], Cached>>,
    bucket: Mutex<Bucket>,
    in_flight: Semaphore,
}

impl std::fmt::Debug for Reviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reviewer").field("policy", &self.policy).finish_non_exhaustive()
    }
}

impl Reviewer {
    /// A reviewer asking the apiserver behind `client`.
    #[must_use]
    pub fn new(client: Client, policy: TokenPolicy) -> Self {
        Self {
            client,
            bucket: Mutex::new(Bucket::new(policy.qps)),
            in_flight: Semaphore::new(policy.max_in_flight),
            policy,
            cache: Mutex::default(),
        }
    }

    /// Who `token` belongs to, answered by `deadline`.
    pub async fn review(&self, token: &str, deadline: Instant) -> Result<Reviewed, ReviewError> {
        let key: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
            .as_ref()
            .try_into()
            .expect("SHA-256 is 32 bytes");
        if let Some(cached) = self.cached(&key) {
            return cached;
        }
        let busy = || ReviewError::Unavailable("too many token reviews at once; retry later".into());
        let _permit =
            tokio::time::timeout_at(deadline, self.in_flight.acquire()).await.map_err(|_| busy())?;
        let wait = lock(&self.bucket).take(Instant::now());
        if Instant::now() + wait > deadline {
            return Err(ReviewError::Unavailable("token review rate limit reached; retry later".into()));
        }
        tokio::time::sleep(wait).await;
        let result = tokio::time::timeout_at(deadline, self.ask(token))
            .await
            .unwrap_or_else(|_| Err(ReviewError::Unavailable("the apiserver did not answer in time".into())));
        let ttl = match &result {
            Ok(_) => self.policy.cache_ttl.min(remaining_life(token).unwrap_or(Duration::MAX)),
            Err(ReviewError::Refused(_)) => REFUSAL_TTL,
            Err(ReviewError::Unavailable(_)) => Duration::ZERO,
        };
        if !ttl.is_zero() {
            self.remember(key, result.clone(), Instant::now() + ttl);
        }
        result
    }

    /// Forgets every accepted review of a token whose pod `event` shows deleted or replaced, so that
    /// the next connection with such a token is reviewed afresh (the apiserver refuses it now). A pod
    /// seen again as it was (a watch event or re-list of the same uid) keeps its reviews; where the
    /// token names no uid, any event about its pod forgets them.
    pub fn forget_ended(&self, event: &super::pods::PodEvent) {
        use super::pods::PodEvent;
        let about = |pod: &str| match event {
            PodEvent::Present { name, .. } | PodEvent::Gone { name, .. } => name == pod,
            PodEvent::Listed(_) => false,
        };
        lock(&self.cache).retain(|_, (result, _)| {
            !matches!(result, Ok(r) if event.ends(&r.pod, r.pod_uid.as_deref()) || (r.pod_uid.is_none() && about(&r.pod)))
        });
    }

    /// The namespace and service account of the agents' tokens.
    #[must_use]
    pub fn service_account(&self) -> (&str, &str) {
        (&self.policy.namespace, &self.policy.service_account)
    }

    fn cached(&self, key: &[u8; 32]) -> Option<Result<Reviewed, ReviewError>> {
        let cache = lock(&self.cache);
        cache.get(key).filter(|(_, until)| *until > Instant::now()).map(|(result, _)| result.clone())
    }

    fn remember(&self, key: [u8; 32], result: Result<Reviewed, ReviewError>, until: Instant) {
        let mut cache = lock(&self.cache);
        if cache.len() >= MAX_CACHED {
            let now = Instant::now();
            cache.retain(|_, (_, until)| *until > now);
            if cache.len() >= MAX_CACHED {
                let mut times: Vec<Instant> = cache.values().map(|(_, t)| *t).collect();
                let (_, median, _) = times.select_nth_unstable(MAX_CACHED / 2);
                let median = *median;
                cache.retain(|_, (_, until)| *until > median);
            }
        }
        cache.insert(key, (result, until));
    }

    async fn ask(&self, token: &str) -> Result<Reviewed, ReviewError> {
        let unavailable = |e: kube::Error| ReviewError::Unavailable(e.to_string());
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.policy.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let answer = api.create(&PostParams::default(), &review).await.map_err(unavailable)?;
        let pod = self.check(&answer.status.unwrap_or_default())?;
        if let Some(node) = pod.node {
            return Ok(Reviewed { node, pod: pod.name, pod_uid: pod.uid });
        }
        // Before Kubernetes 1.30 the review does not name the node: the pod does.
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.policy.namespace);
        let Some(found) = pods.get_opt(&pod.name).await.map_err(unavailable)? else {
            return Err(ReviewError::Refused(format!("the token's pod {} no longer exists", pod.name)));
        };
        if pod.uid.is_some() && found.metadata.uid != pod.uid {
            return Err(ReviewError::Refused(format!("the token's pod {} was replaced", pod.name)));
        }
        match found.spec.and_then(|s| s.node_name) {
            Some(node) => Ok(Reviewed { node, pod: pod.name, pod_uid: pod.uid }),
            None => Err(ReviewError::Refused(format!("the token's pod {} is not on a node", pod.name))),
        }
    }

    /// What a review's status says about the token; the pod it is bound to if it is good here.
    fn check(&self, status: &TokenReviewStatus) -> Result<BoundPod, ReviewError> {
        let refused = |why: String| Err(ReviewError::Refused(why));
        if status.authenticated != Some(true) {
            let why = status.error.as_deref().unwrap_or("no reason given");
            return refused(format!("the apiserver did not authenticate the token: {why}"));
        }
        if !status.audiences.as_deref().unwrap_or_default().contains(&self.policy.audience) {
            return refused(format!("the token is not for audience {:?}", self.policy.audience));
        }
        let user = status.user.clone().unwrap_or_default();
        let username = user.username.unwrap_or_default();
        if username != self.policy.username() {
            return refused(format!("the token is {username:?}'s, not {:?}'s", self.policy.username()));
        }
        let extra = user.extra.unwrap_or_default();
        let one = |key: &str| extra.get(key).and_then(|v| v.first()).filter(|v| !v.is_empty()).cloned();
        let Some(name) = one(EXTRA_POD_NAME) else {
            return refused("the token is not bound to a pod (use a projected service-account token)".into());
        };
        Ok(BoundPod { name, uid: one(EXTRA_POD_UID), node: one(EXTRA_NODE_NAME) })
    }
}

struct BoundPod {
    name: String,
    uid: Option<String>,
    node: Option<String>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The time until `token`'s `exp` claim, if it is a JWT with one. Read only to bound caching and
/// sessions: the apiserver, not this, decides whether a token is valid.
fn remaining_life(token: &str) -> Option<Duration> {
    expiry(token)?.duration_since(SystemTime::now()).ok().or(Some(Duration::ZERO))
}

/// When `token` expires: its `exp` claim, if it is a JWT with one (the claim is read, not verified:
/// only a review says the token is good, and this only ever shortens what the review allowed).
#[must_use]
pub fn expiry(token: &str) -> Option<SystemTime> {
    let payload = token.split('.').nth(1)?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&json).ok()?;
    let exp = claims.get("exp")?.as_u64()?;
    Some(UNIX_EPOCH + Duration::from_secs(exp))
}

/// A token bucket: `qps` per second on average, bursts of up to one second's worth.
#[derive(Debug)]
struct Bucket {
    qps: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(qps: u32) -> Self {
        let qps = f64::from(qps.max(1));
        Self { qps, tokens: qps, at: Instant::now() }
    }

    /// Takes one token; returns how long to wait before using it.
    fn take(&mut self, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.qps).min(self.qps) - 1.0;
        self.at = now;
        if self.tokens >= 0.0 { Duration::ZERO } else { Duration::from_secs_f64(-self.tokens / self.qps) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_a_burst_then_the_rate() {
        let start = Instant::now();
        let mut bucket = Bucket::new(10);
        bucket.at = start;
        for _ in 0..10 {
            assert_eq!(bucket.take(start), Duration::ZERO);
        }
        assert_eq!(bucket.take(start), Duration::from_millis(100));
        assert_eq!(bucket.take(start), Duration::from_millis(200));
        // A second later the debt is paid and some tokens are back.
        assert_eq!(bucket.take(start + Duration::from_secs(1)), Duration::ZERO);
    }

    #[test]
    fn token_life_comes_from_the_exp_claim() {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        let claims = format!(r#"{{"exp":{}}}"#, now + 100);
        let token = format!("e30.{}.sig", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims));
        let life = remaining_life(&token).unwrap();
        assert!(life <= Duration::from_secs(100) && life >= Duration::from_secs(98), "{life:?}");
        assert_eq!(remaining_life("opaque"), None);
    }
}
