//! A faithful port of the seed's classes, flaws included, for the drills' `seed` rows.
//!
//! The seed was a TypeScript `ResilientLLMClient` built from a `RateLimitManager` (two
//! `TokenBucket`s per `provider:model`), an `LLMCircuitBreaker` and a `RetryableLLMClient`,
//! composed in the order rate limit → breaker → retry, with a list of fallback providers. This
//! module keeps its behaviour, including what Portcullis fixes:
//!
//! - **Retry** classifies by status and by matching the message (`rate_limit`, `timeout`,
//!   `overloaded`): a 429 `insufficient_quota` is retried; `Retry-After` is ignored; there is no
//!   retry budget, so a dead upstream sees `max_retries + 1` calls per request.
//! - **Breaker** counts consecutive failures of whole retried calls; in HALF_OPEN it lets every
//!   request through until `half_open_requests` successes arrive (it counts successes, not
//!   requests in flight).
//! - **Token bucket**: a waiter computes its wait, sleeps, then subtracts without checking
//!   again, so concurrent waiters all pass together; the RPM and TPM buckets are taken one
//!   after the other, not atomically.
//! - **Fallback** moves to the next provider on any error.
//!
//! Durations are the seed's defaults multiplied by the drill's time scale, like every other
//! stack's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use portcullis::{ChatCost, ChatRequest, CompletionResult, CostOf, ErrorKind, LlmError};
use rand::{Rng, SeedableRng, rngs::SmallRng};
use tokio::time::{Instant, sleep, timeout};
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceExt};

/// A provider call, as the seed's `LLMClient` made it.
pub type Provider = BoxCloneSyncService<ChatRequest, CompletionResult, LlmError>;

/// The seed's settings, already scaled.
#[derive(Debug, Clone)]
pub struct SeedConfig {
    /// Retries after the first attempt (seed: 3).
    pub max_retries: u32,
    /// Backoff base (seed: 1 s).
    pub base_delay: Duration,
    /// Backoff cap (seed: 30 s).
    pub max_delay: Duration,
    /// Per-attempt timeout (seed: 30 s).
    pub attempt_timeout: Duration,
    /// Consecutive failures that open the breaker (seed: 5).
    pub failure_threshold: u32,
    /// Open time before half-open (seed: 60 s).
    pub recovery_timeout: Duration,
    /// Successes in half-open that close the breaker (seed: 3).
    pub half_open_requests: u32,
    /// Requests per minute and tokens per minute per provider:model, with the drill's minute.
    pub limits: Option<SeedLimits>,
}

/// The seed's RPM/TPM table entry, scaled.
#[derive(Debug, Clone, Copy)]
pub struct SeedLimits {
    /// Requests per (scaled) minute.
    pub rpm: f64,
    /// Tokens per (scaled) minute.
    pub tpm: f64,
    /// The length of a minute.
    pub minute: Duration,
}

/// The seed's `TokenBucket`.
struct Bucket {
    capacity: f64,
    tokens: f64,
    refill_per_sec: f64,
    last: Instant,
}

impl Bucket {
    fn new(capacity: f64, refill_per_sec: f64) -> Self {
        Bucket {
            capacity,
            tokens: capacity,
            refill_per_sec,
            last: Instant::now(),
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        let dt = now.duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.refill_per_sec).min(self.capacity);
        self.last = now;
    }
}

/// `acquire(n)`: refill, and if short, sleep for the deficit, then subtract. The flaw is
/// deliberate: the lock is not held across the sleep and nothing is checked afterwards.
async fn acquire(bucket: &Mutex<Bucket>, n: f64) {
    let wait = {
        let mut b = bucket.lock().unwrap_or_else(|e| e.into_inner());
        b.refill();
        if b.tokens >= n {
            None
        } else {
            Some((n - b.tokens) / b.refill_per_sec)
        }
    };
    if let Some(secs) = wait {
        sleep(Duration::from_secs_f64(secs.max(0.0))).await;
    }
    let mut b = bucket.lock().unwrap_or_else(|e| e.into_inner());
    b.refill();
    b.tokens -= n;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

/// The seed's `LLMCircuitBreaker`.
struct Breaker {
    state: BreakerState,
    failures: u32,
    successes: u32,
    opened_at: Option<Instant>,
    transitions: Vec<(Instant, &'static str, &'static str)>,
}

fn name(s: BreakerState) -> &'static str {
    match s {
        BreakerState::Closed => "closed",
        BreakerState::Open => "open",
        BreakerState::HalfOpen => "half_open",
    }
}

impl Breaker {
    fn go(&mut self, to: BreakerState) {
        if self.state != to {
            self.transitions
                .push((Instant::now(), name(self.state), name(to)));
            self.state = to;
        }
    }
}

/// The RPM and TPM buckets of one `provider:model`.
type BucketPair = Arc<(Mutex<Bucket>, Mutex<Bucket>)>;

struct Lane {
    name: String,
    provider: Provider,
    breaker: Mutex<Breaker>,
    buckets: Mutex<HashMap<String, BucketPair>>,
}

/// The seed's `ResilientLLMClient`: per provider, rate limit → breaker → retry → provider; then
/// the next provider on any error.
#[derive(Clone)]
pub struct SeedClient {
    cfg: SeedConfig,
    lanes: Arc<Vec<(Lane, Option<Arc<str>>)>>,
    rng: Arc<Mutex<SmallRng>>,
}

impl SeedClient {
    /// A client over `(name, provider, model remap)` entries, primary first.
    pub fn new(
        cfg: SeedConfig,
        providers: Vec<(String, Provider, Option<Arc<str>>)>,
        seed: u64,
    ) -> Self {
        let lanes = providers
            .into_iter()
            .map(|(name, provider, model)| {
                let breaker = Breaker {
                    state: BreakerState::Closed,
                    failures: 0,
                    successes: 0,
                    opened_at: None,
                    transitions: Vec::new(),
                };
                (
                    Lane {
                        name,
                        provider,
                        breaker: Mutex::new(breaker),
                        buckets: Mutex::default(),
                    },
                    model,
                )
            })
            .collect();
        SeedClient {
            cfg,
            lanes: Arc::new(lanes),
            rng: Arc::new(Mutex::new(SmallRng::seed_from_u64(seed))),
        }
    }

    /// Breaker transitions of the primary: `(at, from, to)`.
    pub fn primary_transitions(&self) -> Vec<(Instant, &'static str, &'static str)> {
        self.lanes[0]
            .0
            .breaker
            .lock()
            .map(|b| b.transitions.clone())
            .unwrap_or_default()
    }

    /// `complete(request)`: each provider in turn until one answers.
    pub async fn complete(&self, req: ChatRequest) -> Result<CompletionResult, LlmError> {
        let mut last = None;
        for (lane, model) in self.lanes.iter() {
            let req = match model {
                Some(m) => req.clone().with_model(m.clone()),
                None => req.clone(),
            };
            match self.through_lane(lane, req).await {
                Ok(res) => return Ok(res),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| LlmError::new(ErrorKind::Configuration, "no provider")))
    }

    async fn through_lane(
        &self,
        lane: &Lane,
        req: ChatRequest,
    ) -> Result<CompletionResult, LlmError> {
        // 1. Rate limit: RPM then TPM, one after the other.
        if let Some(l) = self.cfg.limits {
            let key = format!("{}:{}", lane.name, req.model);
            let pair = {
                let mut map = lane.buckets.lock().unwrap_or_else(|e| e.into_inner());
                map.entry(key)
                    .or_insert_with(|| {
                        let per_sec = 1.0 / l.minute.as_secs_f64();
                        Arc::new((
                            Mutex::new(Bucket::new(l.rpm, l.rpm * per_sec)),
                            Mutex::new(Bucket::new(l.tpm, l.tpm * per_sec)),
                        ))
                    })
                    .clone()
            };
            acquire(&pair.0, 1.0).await;
            acquire(&pair.1, ChatCost.cost(&req).total() as f64).await;
        }
        // 2. Breaker.
        {
            let mut b = lane.breaker.lock().unwrap_or_else(|e| e.into_inner());
            if b.state == BreakerState::Open {
                let since = b.opened_at.map(|t| t.elapsed()).unwrap_or_default();
                if since >= self.cfg.recovery_timeout {
                    b.successes = 0;
                    b.go(BreakerState::HalfOpen);
                } else {
                    return Err(LlmError::new(
                        ErrorKind::CircuitOpen,
                        "Circuit breaker is OPEN",
                    ));
                }
            }
        }
        // 3. Retry.
        let result = self.with_retry(lane, req).await;
        let mut b = lane.breaker.lock().unwrap_or_else(|e| e.into_inner());
        match &result {
            Ok(_) => {
                b.failures = 0;
                if b.state == BreakerState::HalfOpen {
                    b.successes += 1;
                    if b.successes >= self.cfg.half_open_requests {
                        b.go(BreakerState::Closed);
                    }
                }
            }
            Err(_) => {
                b.failures += 1;
                if b.state == BreakerState::HalfOpen || b.failures >= self.cfg.failure_threshold {
                    b.opened_at = Some(Instant::now());
                    b.go(BreakerState::Open);
                }
            }
        }
        result
    }

    async fn with_retry(
        &self,
        lane: &Lane,
        req: ChatRequest,
    ) -> Result<CompletionResult, LlmError> {
        let mut attempt = 0;
        loop {
            let call = lane.provider.clone().oneshot(req.clone());
            let outcome = match timeout(self.cfg.attempt_timeout, call).await {
                Ok(r) => r,
                Err(_) => Err(LlmError::new(ErrorKind::Timeout, "Request timeout")),
            };
            let err = match outcome {
                Ok(res) => return Ok(res),
                Err(e) => e,
            };
            if attempt >= self.cfg.max_retries || !seed_is_retryable(&err) {
                return Err(err);
            }
            let exp = self.cfg.base_delay.as_secs_f64() * 2f64.powi(attempt as i32);
            let capped = exp.min(self.cfg.max_delay.as_secs_f64());
            let jitter = self
                .rng
                .lock()
                .map(|mut r| r.random_range(0.5..1.5))
                .unwrap_or(1.0);
            sleep(Duration::from_secs_f64(capped * jitter)).await;
            attempt += 1;
        }
    }
}

/// The seed's `isRetryable`: status codes, then substrings of the message.
fn seed_is_retryable(err: &LlmError) -> bool {
    if let Some(s) = err.status() {
        if s == 429 || s >= 500 {
            return true;
        }
    }
    let msg = err.to_string().to_lowercase();
    msg.contains("rate_limit") || msg.contains("timeout") || msg.contains("overloaded")
}

impl Service<ChatRequest> for SeedClient {
    type Response = CompletionResult;
    type Error = LlmError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<CompletionResult, LlmError>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), LlmError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: ChatRequest) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { this.complete(req).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The port keeps the seed's bug: 100 concurrent callers against a bucket of 10 at 10/s all
    /// pass within about 0.1 s (they sleep, then all subtract).
    #[tokio::test(start_paused = true)]
    async fn the_seed_bucket_over_admits_concurrent_waiters() {
        let bucket = Arc::new(Mutex::new(Bucket::new(10.0, 10.0)));
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..100 {
            let b = bucket.clone();
            tasks.spawn(async move {
                acquire(&b, 1.0).await;
                Instant::now()
            });
        }
        let mut last = start;
        while let Some(t) = tasks.join_next().await {
            last = last.max(t.unwrap());
        }
        assert!(
            last - start <= Duration::from_millis(100),
            "{:?}",
            last - start
        );
    }

    #[test]
    fn the_seed_retries_by_status_and_message() {
        let quota = LlmError::new(ErrorKind::QuotaExhausted, "insufficient_quota").with_status(429);
        assert!(
            seed_is_retryable(&quota),
            "the seed retries a 429 whatever its type"
        );
        let bad = LlmError::new(ErrorKind::InvalidRequest, "rate_limit mentioned in a 400");
        assert!(seed_is_retryable(&bad), "and matches message text");
        assert!(!seed_is_retryable(
            &LlmError::new(ErrorKind::Authentication, "no").with_status(401)
        ));
    }
}
