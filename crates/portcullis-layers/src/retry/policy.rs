//! The [`Policy`] trait the retry layer decides through, and the [`StandardPolicy`].

use std::sync::{Arc, Mutex};
use std::time::Duration;

use portcullis_core::{Classify, OnFinish, RetryStop};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use super::backoff::{Backoff, Jitter, nanos};
use super::budget::RetryBudget;
use super::config::{BudgetConfig, COMPONENT, ConfigError, RetryConfig, in_range, positive};

/// Decides, after each attempt, whether the [`Retry`](super::Retry) service returns the
/// outcome, retries after a delay, or gives up.
///
/// The layer keeps one policy behind an `Arc`, shared by all its clones: keep shared state
/// (a budget, an RNG) behind atomics or a briefly held `std` mutex.
///
/// Whatever the policy says, the service never sleeps past the request's
/// [deadline](portcullis_core::RequestInfo::deadline): a [`Decision::Retry`] whose delay would
/// reach it becomes [`Decision::GiveUp`]`(`[`RetryStop::Deadline`]`)`.
///
/// # Example: a custom policy
///
/// Retry any error twice, 100 ms apart, and retry an empty response too:
///
/// ```
/// use std::time::Duration;
/// use portcullis_layers::retry::{Attempt, Decision, Policy, RetryLayer};
/// use portcullis_core::{BoxError, RetryStop};
/// use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
///
/// struct TwiceThenStop;
///
/// impl<Req> Policy<Req, String, BoxError> for TwiceThenStop {
///     fn decide(&self, attempt: &Attempt<'_, Req>, outcome: Result<&String, &BoxError>) -> Decision {
///         let failed = match outcome {
///             Ok(body) => body.is_empty(),
///             Err(_) => true,
///         };
///         match (failed, attempt.retries()) {
///             (false, _) => Decision::Accept,
///             (true, n) if n < 2 => Decision::Retry(Duration::from_millis(100)),
///             (true, _) => Decision::GiveUp(RetryStop::Exhausted),
///         }
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let calls = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
/// let counter = calls.clone();
/// let mut svc = ServiceBuilder::new()
///     .layer(RetryLayer::new(TwiceThenStop))
///     .service(service_fn(move |_req: String| {
///         let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
///         async move { if n == 0 { Ok::<_, BoxError>(String::new()) } else { Err("down".into()) } }
///     }));
/// let err = svc.ready().await.unwrap().call("hi".to_string()).await.unwrap_err();
/// assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 3);
/// assert!(err.to_string().starts_with("retries exhausted after 3 attempts"));
/// # }
/// ```
pub trait Policy<Req, Res, E> {
    /// Called once per request, before its first attempt (a budget deposits here).
    fn on_request(&self, _request: &Req) {}

    /// [`on_request`](Self::on_request) with the time of the call, which the service reads
    /// anyway (for [`Attempt::elapsed`]): a policy that needs the time takes it from here
    /// instead of reading the clock again. The default calls `on_request`.
    fn on_request_at(&self, request: &Req, _now: Instant) {
        self.on_request(request);
    }

    /// Whether [`decide`](Self::decide) would accept this success, whatever the attempt. When
    /// it would, the service returns it without building the [`Attempt`] (which reads the
    /// clock). The default, `false`, has `decide` see every outcome.
    fn accepts(&self, _response: &Res) -> bool {
        false
    }

    /// What to do with the outcome of an attempt.
    fn decide(&self, attempt: &Attempt<'_, Req>, outcome: Result<&Res, &E>) -> Decision;
}

/// What a [`Policy`] decided after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Decision {
    /// Return the outcome to the caller as it is (a success, or an error not worth retrying).
    Accept,
    /// Call the inner service again after this delay.
    Retry(Duration),
    /// Stop: an error is returned as `E::from(RetriesExhausted { attempts, stop, last })`, so it
    /// says how many attempts were made and why retrying stopped. A success is returned as is.
    GiveUp(RetryStop),
}

/// What a [`Policy`] knows about the attempt that just finished.
#[derive(Debug)]
#[non_exhaustive]
pub struct Attempt<'a, Req> {
    /// The request (the original: each attempt sent a clone of it).
    pub request: &'a Req,
    /// Attempts made so far, the one that just finished included (1 after the first).
    pub number: u32,
    /// Time since the layer was called.
    pub elapsed: Duration,
    /// The delay slept before this attempt (zero after the first).
    pub last_delay: Duration,
    /// When the whole call must be over, from
    /// [`RequestInfo::deadline`](portcullis_core::RequestInfo::deadline).
    pub deadline: Option<Instant>,
}

impl<Req> Clone for Attempt<'_, Req> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<Req> Copy for Attempt<'_, Req> {}

impl<'a, Req> Attempt<'a, Req> {
    /// The first attempt of `request`: no time elapsed, no deadline. Refine with the `with_`
    /// methods (useful to unit-test a policy).
    pub fn new(request: &'a Req, number: u32) -> Self {
        Attempt {
            request,
            number,
            elapsed: Duration::ZERO,
            last_delay: Duration::ZERO,
            deadline: None,
        }
    }

    /// Sets the time elapsed since the call.
    pub fn with_elapsed(mut self, elapsed: Duration) -> Self {
        self.elapsed = elapsed;
        self
    }

    /// Sets the delay slept before this attempt.
    pub fn with_last_delay(mut self, delay: Duration) -> Self {
        self.last_delay = delay;
        self
    }

    /// Sets the deadline.
    pub fn with_deadline(mut self, deadline: Option<Instant>) -> Self {
        self.deadline = deadline;
        self
    }

    /// Retries made so far (`number - 1`).
    pub fn retries(&self) -> u32 {
        self.number.saturating_sub(1)
    }

    /// Time left until the deadline (zero once it passed), if there is one.
    pub fn remaining(&self) -> Option<Duration> {
        self.deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// Whether sleeping `delay` ends strictly before the deadline (always, without one).
    pub fn allows(&self, delay: Duration) -> bool {
        self.remaining().is_none_or(|left| delay < left)
    }
}

/// A policy that never retries: every outcome is returned as it is. A
/// [`Fallback`](crate::fallback::Fallback) entry without a policy of its own uses it, so that
/// each of its failures moves the call on (or ends it).
///
/// ```
/// use portcullis_layers::retry::{Attempt, Decision, NoRetry, Policy};
///
/// let err: Result<&String, &String> = Err(&"down".to_string());
/// assert_eq!(Policy::<&str, String, String>::decide(&NoRetry, &Attempt::new(&"hi", 1), err), Decision::Accept);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct NoRetry;

impl<Req, Res, E> Policy<Req, Res, E> for NoRetry {
    fn accepts(&self, _response: &Res) -> bool {
        true
    }

    fn decide(&self, _attempt: &Attempt<'_, Req>, _outcome: Result<&Res, &E>) -> Decision {
        Decision::Accept
    }
}

/// The standard policy: the shared classification table, capped exponential backoff with
/// jitter, `Retry-After`, a retry budget and the deadline.
///
/// After a failed attempt, in this order:
/// 1. an error whose [`Classify`] row says "do not retry" (`insufficient_quota`, 400, 401,
///    a stream interrupted after content, `x-should-retry: false`, …) is returned unchanged
///    after the first attempt, and after a retry ends the call with
///    [`RetryStop::NotRetryable`] (so the error still says how many attempts were made);
/// 2. after `max_retries` retries: give up, [`RetryStop::Exhausted`] (with `max_retries` 0,
///    the error is returned unchanged);
/// 3. a `Retry-After` hint above `retry_after_cap`: give up now, so a fallback can act,
///    [`RetryStop::RetryAfterTooLong`]; otherwise the hint (plus up to
///    `retry_after_jitter` of it) replaces the backoff;
/// 4. a delay that would reach the deadline: give up, [`RetryStop::Deadline`];
/// 5. no retry left in the budget: give up, [`RetryStop::BudgetExhausted`];
/// 6. otherwise retry after the delay.
///
/// A success is always accepted. The jitter RNG (a `SmallRng`) is shared behind a mutex, so a
/// seeded policy is deterministic for a given order of calls.
///
/// ```
/// use std::time::Duration;
/// use portcullis_layers::retry::{Jitter, RetryLayer, StandardPolicy};
///
/// let policy = StandardPolicy::builder()
///     .max_retries(5)
///     .base_delay(Duration::from_millis(200))
///     .max_delay(Duration::from_secs(10))
///     .jitter(Jitter::Equal)
///     .seed(7)
///     .build()
///     .unwrap();
/// let layer = RetryLayer::new(policy);
/// # let _ = layer;
/// ```
#[derive(Debug)]
pub struct StandardPolicy {
    max_retries: u32,
    backoff: Backoff,
    retry_after_cap: Duration,
    retry_after_jitter: f64,
    budget: Option<Arc<RetryBudget>>,
    rng: Mutex<SmallRng>,
}

impl StandardPolicy {
    /// A builder, starting from the defaults of [`RetryConfig`].
    pub fn builder() -> StandardPolicyBuilder {
        StandardPolicyBuilder::default()
    }

    /// The policy a validated [`RetryConfig`] describes.
    pub fn from_config(config: &RetryConfig) -> Result<Self, ConfigError> {
        config.build()
    }

    /// Retries after the first attempt.
    pub fn max_retries(&self) -> u32 {
        self.max_retries
    }

    /// The backoff.
    pub fn backoff(&self) -> Backoff {
        self.backoff
    }

    /// The retry budget, shared by every clone of the layer (and by any other policy built
    /// with [`StandardPolicyBuilder::shared_budget`]).
    pub fn budget(&self) -> Option<&Arc<RetryBudget>> {
        self.budget.as_ref()
    }

    fn delay(&self, retries: u32, last: Duration, retry_after: Option<Duration>) -> Duration {
        let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        match retry_after {
            Some(hint) => {
                let spread = (nanos(hint) as f64 * self.retry_after_jitter) as u64;
                hint.saturating_add(Duration::from_nanos(rng.random_range(0..=spread)))
            }
            None => self.backoff.delay(retries, last, &mut *rng),
        }
    }
}

impl Default for StandardPolicy {
    /// The defaults of [`RetryConfig`], with an unseeded RNG.
    fn default() -> Self {
        let budget = Arc::new(RetryBudget::default());
        StandardPolicyBuilder::default().assemble(Some(budget))
    }
}

/// Errors classify by [`Classify`]; an `Ok` response by [`OnFinish::failure`], so an HTTP 503
/// response is retried as the 503 error would be (and returned as it is when retrying stops).
impl<Req, Res: OnFinish, E: Classify> Policy<Req, Res, E> for StandardPolicy {
    fn on_request(&self, _request: &Req) {
        if let Some(budget) = &self.budget {
            budget.deposit();
        }
    }

    fn on_request_at(&self, _request: &Req, now: Instant) {
        if let Some(budget) = &self.budget {
            budget.deposit_at(now);
        }
    }

    fn accepts(&self, response: &Res) -> bool {
        response.failure().is_none()
    }

    fn decide(&self, attempt: &Attempt<'_, Req>, outcome: Result<&Res, &E>) -> Decision {
        let class = match outcome {
            Err(err) => err.classify(),
            Ok(res) => match res.failure() {
                Some(class) => class,
                None => return Decision::Accept,
            },
        };
        let retries = attempt.retries();
        // The first attempt's error comes back unchanged when it is not retried at all.
        let stop = |reason| match retries {
            0 => Decision::Accept,
            _ => Decision::GiveUp(reason),
        };
        if !class.retry {
            return stop(RetryStop::NotRetryable);
        }
        if retries >= self.max_retries {
            return stop(RetryStop::Exhausted);
        }
        if class.retry_after.is_some_and(|d| d > self.retry_after_cap) {
            return Decision::GiveUp(RetryStop::RetryAfterTooLong);
        }
        let delay = self.delay(retries, attempt.last_delay, class.retry_after);
        if !attempt.allows(delay) {
            return Decision::GiveUp(RetryStop::Deadline);
        }
        if self.budget.as_ref().is_some_and(|b| !b.try_withdraw()) {
            crate::telemetry::budget_refused();
            return Decision::GiveUp(RetryStop::BudgetExhausted);
        }
        Decision::Retry(delay)
    }
}

/// Builds a [`StandardPolicy`]; [`build`](StandardPolicyBuilder::build) validates.
#[derive(Debug, Clone)]
pub struct StandardPolicyBuilder {
    max_retries: u32,
    base: Duration,
    max: Duration,
    jitter: Jitter,
    retry_after_cap: Duration,
    retry_after_jitter: f64,
    budget: BudgetChoice,
    seed: Option<u64>,
}

#[derive(Debug, Clone)]
enum BudgetChoice {
    Off,
    Own(BudgetConfig),
    Shared(Arc<RetryBudget>),
}

impl Default for StandardPolicyBuilder {
    /// The defaults of [`RetryConfig`], the one place they are written.
    fn default() -> Self {
        let c = RetryConfig::default();
        StandardPolicyBuilder {
            max_retries: c.max_retries,
            base: c.base_delay,
            max: c.max_delay,
            jitter: c.jitter,
            retry_after_cap: c.retry_after_cap,
            retry_after_jitter: c.retry_after_jitter,
            budget: c.budget.map_or(BudgetChoice::Off, BudgetChoice::Own),
            seed: c.seed,
        }
    }
}

impl StandardPolicyBuilder {
    /// Retries after the first attempt (default 3).
    pub fn max_retries(mut self, n: u32) -> Self {
        self.max_retries = n;
        self
    }
    /// The first backoff delay (default 1 s).
    pub fn base_delay(mut self, d: Duration) -> Self {
        self.base = d;
        self
    }
    /// The cap of the exponential delay (default 30 s).
    pub fn max_delay(mut self, d: Duration) -> Self {
        self.max = d;
        self
    }
    /// The jitter (default [`Jitter::Full`]).
    pub fn jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }
    /// The longest `Retry-After` honoured (default 60 s); a longer one returns the error at
    /// once.
    pub fn retry_after_cap(mut self, d: Duration) -> Self {
        self.retry_after_cap = d;
        self
    }
    /// The largest fraction of a `Retry-After` added at random, in `[0, 1]` (default 0.1).
    pub fn retry_after_jitter(mut self, fraction: f64) -> Self {
        self.retry_after_jitter = fraction;
        self
    }
    /// A budget of its own with this configuration (the default is
    /// [`BudgetConfig::default`]).
    pub fn budget(mut self, config: BudgetConfig) -> Self {
        self.budget = BudgetChoice::Own(config);
        self
    }
    /// Shares an existing budget, e.g. between the retry layers of several providers.
    pub fn shared_budget(mut self, budget: Arc<RetryBudget>) -> Self {
        self.budget = BudgetChoice::Shared(budget);
        self
    }
    /// No retry budget: every retryable error is retried up to `max_retries`.
    pub fn no_budget(mut self) -> Self {
        self.budget = BudgetChoice::Off;
        self
    }
    /// Seeds the jitter RNG (tests, reproducible drills).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Validates and builds: durations must be positive, `base_delay ≤ max_delay`, fractions in
    /// `[0, 1]`.
    pub fn build(self) -> Result<StandardPolicy, ConfigError> {
        let base = positive("base_delay_ms", self.base)?;
        let max = positive("max_delay_ms", self.max)?;
        if base > max {
            return Err(ConfigError::new(
                COMPONENT,
                "base_delay_ms",
                format!("({base:?}) must not be above `max_delay_ms` ({max:?})"),
            ));
        }
        positive("retry_after_cap_ms", self.retry_after_cap)?;
        in_range("retry_after_jitter", self.retry_after_jitter, 0.0, 1.0)?;
        let budget = match &self.budget {
            BudgetChoice::Off => None,
            BudgetChoice::Shared(b) => Some(b.clone()),
            BudgetChoice::Own(config) => Some(Arc::new(RetryBudget::new(config)?)),
        };
        Ok(self.assemble(budget))
    }

    /// Builds from values already validated.
    fn assemble(self, budget: Option<Arc<RetryBudget>>) -> StandardPolicy {
        let rng = match self.seed {
            Some(seed) => SmallRng::seed_from_u64(seed),
            None => SmallRng::from_rng(&mut rand::rng()),
        };
        StandardPolicy {
            max_retries: self.max_retries,
            backoff: Backoff::new(self.base, self.max, self.jitter),
            retry_after_cap: self.retry_after_cap,
            retry_after_jitter: self.retry_after_jitter,
            budget,
            rng: Mutex::new(rng),
        }
    }
}

impl RetryConfig {
    /// Validates this configuration and builds the policy it describes.
    pub fn build(&self) -> Result<StandardPolicy, ConfigError> {
        self.builder().build()
    }

    /// A builder holding this configuration, to refine before it builds, e.g. to share one
    /// budget between the policies of several providers
    /// ([`shared_budget`](StandardPolicyBuilder::shared_budget)).
    pub fn builder(&self) -> StandardPolicyBuilder {
        let mut builder = StandardPolicy::builder()
            .max_retries(self.max_retries)
            .base_delay(self.base_delay)
            .max_delay(self.max_delay)
            .jitter(self.jitter)
            .retry_after_cap(self.retry_after_cap)
            .retry_after_jitter(self.retry_after_jitter);
        builder = match &self.budget {
            Some(b) => builder.budget(b.clone()),
            None => builder.no_budget(),
        };
        if let Some(seed) = self.seed {
            builder = builder.seed(seed);
        }
        builder
    }
}
