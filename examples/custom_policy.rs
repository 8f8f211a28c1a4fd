//! # Your own retry policy, classifier and breaker key
//!
//! The layers are generic; the [`Stack`](portcullis::Stack) is only one way to compose them.
//! Here they are composed by hand with `tower::ServiceBuilder` over an OpenAI provider, with
//! three customisations:
//!
//! 1. **A retry [`Policy`]**, `OverloadedOnly`: retries only `Overloaded` errors (503 / 529),
//!    at fixed delays of 50, 100 and 200 ms, and nothing else: a 429 is returned at once.
//! 2. **A classifier**: the layers decide through [`Classify`]. `AppError` wraps [`LlmError`]
//!    and changes one row of the table: a 429 (`RateLimited`) counts as a *breaker failure*, so
//!    a tenant that keeps getting rate-limited is cooled off by its breaker instead of hammering
//!    a shared key. Besides `Classify`, the layers need one conversion: `From<Refusal>`.
//! 3. **A breaker key**: `CircuitBreakerLayer::key_by` keys breakers per (tenant, model), the
//!    tenant read from the request's extensions, so one noisy tenant's open breaker does not
//!    refuse anyone else.
//!
//! ```text
//! cargo run --example custom_policy
//! ```
//!
//! Runs against the embedded simulator only: it needs the simulator's fault injection.

use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use portcullis::layers::CircuitBreakerLayer;
use portcullis::layers::circuit_breaker::{CircuitBreakerConfig, TripPolicy};
use portcullis::layers::retry::{Attempt, Decision, Policy, RetryLayer};
use portcullis::providers::{ApiKey, OpenAiProvider};
use portcullis::{
    ChatMessage, ChatRequest, Classification, Classify, ErrorKind, LlmError, Refusal, RetryStop,
};
use portcullis_sim::{FaultKind, FaultRule, SimHandle, Simulator};
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt};

const MODEL: &str = "gpt-4o-mini";

// ---- 1. a retry policy ----------------------------------------------------------------------

/// Retries `Overloaded` errors only, after fixed delays; one retry per delay.
#[derive(Debug, Clone)]
struct OverloadedOnly {
    delays: Vec<Duration>,
}

impl Default for OverloadedOnly {
    fn default() -> Self {
        OverloadedOnly {
            delays: [50, 100, 200].map(Duration::from_millis).to_vec(),
        }
    }
}

/// Any error that is (or wraps) an [`LlmError`]: this policy works for both.
impl<Req, Res, E: Borrow<LlmError>> Policy<Req, Res, E> for OverloadedOnly {
    fn decide(&self, attempt: &Attempt<'_, Req>, outcome: Result<&Res, &E>) -> Decision {
        let Err(e) = outcome else {
            return Decision::Accept;
        };
        let retries = attempt.retries() as usize;
        if e.borrow().kind() != ErrorKind::Overloaded {
            // Returned unchanged after a first attempt; after retries, say how many were made.
            return match retries {
                0 => Decision::Accept,
                _ => Decision::GiveUp(RetryStop::NotRetryable),
            };
        }
        match self.delays.get(retries) {
            // The layer never sleeps past the request's deadline: this is only a wish.
            Some(&delay) if attempt.allows(delay) => Decision::Retry(delay),
            Some(_) => Decision::GiveUp(RetryStop::Deadline),
            None => Decision::GiveUp(RetryStop::Exhausted),
        }
    }
}

// ---- 2. a classifier ------------------------------------------------------------------------

/// The application's error: an [`LlmError`] whose classification differs in one row.
#[derive(Debug)]
struct AppError(LlmError);

impl Classify for AppError {
    fn classify(&self) -> Classification {
        let mut c = self.0.classify();
        if self.0.kind() == ErrorKind::RateLimited {
            // Our tenants share one upstream key: a 429 means "stop sending for a while".
            // Count it against the tenant's breaker, and do not retry it here.
            c.breaker_failure = true;
            c.retry = false;
        }
        c
    }

    fn provider(&self) -> Option<&str> {
        self.0.provider()
    }

    // When retries give up, the inner LlmError records how many attempts were made.
    fn retries_exhausted(self, attempts: u32, stop: RetryStop) -> Self {
        AppError(self.0.retries_exhausted(attempts, stop))
    }
}

impl fmt::Display for AppError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for AppError {}

impl Borrow<LlmError> for AppError {
    fn borrow(&self) -> &LlmError {
        &self.0
    }
}

// The one conversion every layer needs: from its refusal (circuit open, throttled, …).
impl From<Refusal> for AppError {
    fn from(r: Refusal) -> Self {
        AppError(r.into())
    }
}

// ---- 3. a breaker key -----------------------------------------------------------------------

/// The tenant a request is made for, carried in its extensions.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Tenant(Arc<str>);

fn request(tenant: &str, i: u32) -> ChatRequest {
    let mut req =
        ChatRequest::new(MODEL, vec![ChatMessage::user(format!("question {i}"))]).max_tokens(16);
    req.extensions.insert(Tenant(tenant.into()));
    req
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let sim = Simulator::builder().seed(3).start().await?;
    let provider = OpenAiProvider::builder()
        .base_url(sim.openai_base_url())
        .api_key(ApiKey::new("sk-portcullis-example")?)
        .build()?;

    println!("## 1. OverloadedOnly: a custom retry policy");
    let retried = ServiceBuilder::new()
        .layer(RetryLayer::new(OverloadedOnly::default()))
        .service(provider.clone());

    sim.set_faults(vec![FaultRule::new(FaultKind::Overloaded).times(2)])?;
    let (res, took) = timed(retried.clone().oneshot(request("-", 1))).await;
    let res = res?;
    println!(
        "   two 503s, then a success: {} upstream calls, {took:.0?} (50 + 100 ms of fixed delays), served by {}",
        upstream_calls(&sim),
        res.provider
    );

    sim.set_faults(vec![FaultRule::new(FaultKind::RateLimit).times(1)])?;
    let (res, took) = timed(retried.clone().oneshot(request("-", 2))).await;
    let e = res.unwrap_err();
    println!(
        "   a 429: not retried ({} upstream call, {took:.0?}): {}",
        upstream_calls(&sim),
        e.kind()
    );

    println!("\n## 2 + 3. AppError's classification, breakers keyed per (tenant, model)");
    let config = CircuitBreakerConfig {
        trip: TripPolicy::consecutive(3),
        recovery_timeout: Duration::from_millis(300),
        half_open_probes: 1,
        ..CircuitBreakerConfig::default()
    };
    let breaker = CircuitBreakerLayer::new("openai", config)?.key_by(|r: &ChatRequest| {
        let tenant = r.extensions.get::<Tenant>().cloned();
        (
            tenant.unwrap_or(Tenant("anonymous".into())),
            r.model.clone(),
        )
    });
    let breakers = breaker.handle();
    let mut svc = ServiceBuilder::new()
        .layer(RetryLayer::new(OverloadedOnly::default()))
        .layer(breaker)
        .map_err(AppError)
        .service(provider);
    let key = |t: &str| (Tenant(t.into()), Arc::<str>::from(MODEL));

    // The next three calls get a 429 — all of them acme's.
    sim.set_faults(vec![FaultRule::new(FaultKind::RateLimit).times(3)])?;
    for i in 0..3 {
        let e = svc
            .ready()
            .await?
            .call(request("acme", i))
            .await
            .unwrap_err();
        let standard = e.0.classify();
        let ours = e.classify();
        println!(
            "   acme call {i}: {} — breaker failure? standard table: {}, AppError: {}",
            e.0.kind(),
            standard.breaker_failure,
            ours.breaker_failure
        );
    }
    println!("   acme's breaker: {}", breakers.state(&key("acme")));

    upstream_calls(&sim);
    let refused = svc
        .ready()
        .await?
        .call(request("acme", 3))
        .await
        .unwrap_err();
    println!(
        "   acme call 3: {} (refused locally: {} upstream calls)",
        refused.0.kind(),
        upstream_calls(&sim)
    );
    let ok = svc.ready().await?.call(request("globex", 0)).await?;
    println!(
        "   globex call 0: ok, {} tokens — its breaker is {}",
        ok.usage.total_tokens,
        breakers.state(&key("globex"))
    );

    tokio::time::sleep(Duration::from_millis(350)).await;
    println!(
        "   after the 300 ms recovery timeout acme's breaker is {}",
        breakers.state(&key("acme"))
    );
    svc.ready().await?.call(request("acme", 4)).await?;
    println!(
        "   acme's probe succeeded: its breaker is {}",
        breakers.state(&key("acme"))
    );

    println!("\n   breakers:");
    for k in breakers.keys() {
        let m = breakers.metrics(&k).ok_or("no metrics")?;
        let name = format!("{}:{}", (k.0).0, k.1);
        println!(
            "   - {name:<20} {:<9} calls {} failures {} refused {}",
            m.state.to_string(),
            m.calls,
            m.failures,
            m.rejected
        );
    }
    sim.shutdown().await;
    Ok(())
}

async fn timed<F: std::future::Future>(f: F) -> (F::Output, Duration) {
    let start = Instant::now();
    let out = f.await;
    (out, start.elapsed())
}

/// Calls the simulator received since the last call to this function.
fn upstream_calls(sim: &SimHandle) -> u64 {
    let n = sim.stats().requests;
    sim.reset_stats();
    n
}
