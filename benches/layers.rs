//! Per-call overhead of each layer over an always-ready mock service, side by side with tower's
//! built-in layers and tower-resilience's, in one criterion group per mode so that the ratios
//! between cases are meaningful:
//!
//! - `layers/1-thread`: one service driven by one task on a current-thread runtime;
//! - `layers/2-threads`: one service cloned into 2 OS threads (each with its own
//!   current-thread runtime) that call it at the same time; the time reported is wall time per
//!   call, so throughput = 1 / time, and the scaling ratio is 1-thread time / 2-threads time.
//!
//! Run: `cargo bench --bench layers` (add `-- --quick` for a fast pass).
//!
//! Profiling: with `LAYERS_PROFILE=<case>` (e.g. `portcullis/retry`) and optionally
//! `LAYERS_PROFILE_CALLS=<n>` (default 100 000) in the environment, the binary skips criterion
//! and makes exactly `n` calls of that one case on one thread, so that instruction counts
//! (`valgrind --tool=callgrind`) are repeatable: the difference between two runs with different
//! `n`, divided by the difference in calls, is the cost of one call. See benches/README.md.
#![allow(missing_docs)]

use std::future::{Ready, ready};
use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, Throughput, criterion_group};
use portcullis_core::{
    ChatMessage, ChatRequest, ChatStream, CompletionResult, LlmError, TokenCost,
};
use portcullis_layers::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer};
use portcullis_layers::retry::{RetryLayer, StandardPolicy};
use portcullis_layers::telemetry::TelemetryLayer;
use portcullis_layers::token_bucket::{KeyLimits, TokenBucketConfig, TokenBucketLayer};
use portcullis_layers::{DeadlineLayer, Entry, FallbackLayer, TimeoutLayer};
use tokio::runtime::Runtime;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

/// The always-ready mock provider: answers at once with an empty `CompletionResult`, allocates
/// nothing.
/// The same for every case, so the differences between cases are the layers' own cost.
#[derive(Clone, Copy, Debug, Default)]
struct Mock;

impl Service<ChatRequest> for Mock {
    type Response = CompletionResult;
    type Error = LlmError;
    type Future = Ready<Result<CompletionResult, LlmError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), LlmError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: ChatRequest) -> Self::Future {
        black_box(&req);
        ready(Ok(answer()))
    }
}

/// The mock's answer: a `CompletionResult` with empty strings and a `'static` provider name, so
/// building it allocates nothing.
fn answer() -> CompletionResult {
    CompletionResult::new("openai", String::new(), String::new())
}

/// The streaming side the facade's `Stack` needs; never called by these benches.
#[derive(Clone, Copy, Debug, Default)]
struct NoStream;

impl Service<ChatRequest> for NoStream {
    type Response = ChatStream;
    type Error = LlmError;
    type Future = Ready<Result<ChatStream, LlmError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), LlmError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: ChatRequest) -> Self::Future {
        unreachable!("the layer benches make no streaming call")
    }
}

fn request() -> ChatRequest {
    ChatRequest::new(
        "gpt-4o-mini",
        vec![
            ChatMessage::system("You are a helpful assistant."),
            ChatMessage::user("What is the capital of France?"),
        ],
    )
    .max_tokens(64)
}

/// A constant cost, so the bucket's own overhead is measured and not the tokenizer's (that one
/// is in the `tokens` bench).
fn flat_cost(_: &ChatRequest) -> TokenCost {
    TokenCost {
        input: 10,
        output: 10,
    }
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime")
}

/// `iters` calls, each `ready().await` then `call(..).await`; errors (the refusal cases) are
/// results like any other.
async fn drive<S>(svc: &mut S, req: &ChatRequest, iters: u64) -> Duration
where
    S: Service<ChatRequest>,
    S::Error: std::fmt::Debug,
{
    let start = Instant::now();
    for _ in 0..iters {
        let svc = svc.ready().await.expect("ready");
        let out = svc.call(req.clone()).await;
        black_box(out.is_ok());
    }
    start.elapsed()
}

// ---- our layers ------------------------------------------------------------------------

fn retry() -> RetryLayer<StandardPolicy> {
    RetryLayer::new(StandardPolicy::builder().seed(1).build().expect("policy"))
}

fn bucket_layer(
    limits: KeyLimits,
) -> TokenBucketLayer<portcullis_layers::ByModel, fn(&ChatRequest) -> TokenCost> {
    TokenBucketLayer::new("openai", TokenBucketConfig::new().default_limits(limits))
        .expect("bucket")
        .with_cost(flat_cost as fn(&ChatRequest) -> TokenCost)
}

/// A bucket that never makes anyone wait: a trillion requests and tokens per minute.
fn ample_bucket() -> TokenBucketLayer<portcullis_layers::ByModel, fn(&ChatRequest) -> TokenCost> {
    bucket_layer(KeyLimits::rpm_tpm(1_000_000_000_000, 1_000_000_000_000).expect("limits"))
}

/// A bucket whose token capacity (5) is below every request's cost (20): fail-fast refusal.
fn tiny_bucket() -> TokenBucketLayer<portcullis_layers::ByModel, fn(&ChatRequest) -> TokenCost> {
    bucket_layer(KeyLimits::rpm_tpm(1_000_000_000_000, 5).expect("limits"))
}

fn fallback() -> FallbackLayer<Mock, ChatRequest> {
    FallbackLayer::new("primary", vec![Entry::new("secondary", Mock)])
}

/// The breaker with its defaults (5 consecutive failures, 60 s recovery, 3 probes).
fn breaker() -> CircuitBreakerLayer {
    CircuitBreakerLayer::new("openai", CircuitBreakerConfig::default()).expect("breaker")
}

/// A breaker forced open for the bench's model: every call is refused with `CircuitOpen`.
fn open_breaker() -> CircuitBreakerLayer {
    let layer = breaker();
    layer.handle().force_open("gpt-4o-mini");
    layer
}

/// The facade's [`portcullis::Stack`] over the mock (deadline → fallback → retry → breaker →
/// (bucket) → timeout). Its bucket charges [`ChatCost`](portcullis_core::ChatCost), which runs
/// the tokenizer on every call: so it is measured with and without limits.
fn facade_stack(limits: bool) -> portcullis::Completions<Mock> {
    let mut provider = portcullis::ProviderStack::new("openai", Mock, NoStream);
    if limits {
        let l = KeyLimits::rpm_tpm(1_000_000_000_000, 1_000_000_000_000).expect("limits");
        provider = provider.limits(TokenBucketConfig::new().default_limits(l));
    }
    portcullis::Stack::builder()
        .provider(provider)
        .build()
        .expect("stack")
        .completions()
}

fn timeout() -> TimeoutLayer {
    TimeoutLayer::new(Duration::from_secs(30))
}

// ---- tower's built-ins -----------------------------------------------------------------

/// A tower retry policy that never retries (but clones the request, as any real one must).
#[derive(Clone, Copy, Debug)]
struct NeverRetry;

impl<E> tower::retry::Policy<ChatRequest, CompletionResult, E> for NeverRetry {
    type Future = Ready<()>;
    fn retry(
        &mut self,
        _: &mut ChatRequest,
        _: &mut Result<CompletionResult, E>,
    ) -> Option<Self::Future> {
        None
    }
    fn clone_request(&mut self, req: &ChatRequest) -> Option<ChatRequest> {
        Some(req.clone())
    }
}

// ---- tower-resilience ------------------------------------------------------------------

fn tr_breaker() -> tower_resilience::circuitbreaker::CircuitBreakerLayer {
    tower_resilience::circuitbreaker::CircuitBreakerLayer::builder()
        .build()
        .expect("breaker")
}

fn tr_retry<E>() -> tower_resilience::retry::RetryLayer<ChatRequest, CompletionResult, E> {
    tower_resilience::retry::RetryLayer::<ChatRequest, CompletionResult, E>::builder()
        .max_attempts(4)
        .exponential_backoff(Duration::from_secs(1))
        .build()
}

fn tr_limiter() -> tower_resilience::ratelimiter::RateLimiterLayer {
    tower_resilience::ratelimiter::RateLimiterLayer::builder()
        .limit_for_period(usize::MAX / 2)
        .refresh_period(Duration::from_secs(60))
        .timeout_duration(Duration::from_secs(30))
        .build()
        .expect("limiter")
}

// ---- the harness -----------------------------------------------------------------------

fn single<S>(g: &mut BenchmarkGroup<'_, WallTime>, name: &str, svc: S)
where
    S: Service<ChatRequest> + 'static,
    S::Error: std::fmt::Debug,
{
    let rt = runtime();
    let req = request();
    let mut svc = svc;
    g.bench_function(name, |b| {
        b.iter_custom(|iters| rt.block_on(drive(&mut svc, &req, iters)))
    });
}

/// Two OS threads, each with its own current-thread runtime and clone of `svc`, make
/// `iters / 2` calls each, started together; the wall time of the slower one is the sample.
fn contended<S>(g: &mut BenchmarkGroup<'_, WallTime>, name: &str, svc: S)
where
    S: Service<ChatRequest> + Clone + Send + 'static,
    S::Error: std::fmt::Debug,
{
    const THREADS: u64 = 2;
    let req = request();
    g.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let per_thread = iters.div_ceil(THREADS);
            let barrier = Arc::new(Barrier::new(THREADS as usize));
            std::thread::scope(|scope| {
                let handles: Vec<_> = (0..THREADS)
                    .map(|_| {
                        let (mut svc, req, barrier) = (svc.clone(), req.clone(), barrier.clone());
                        scope.spawn(move || {
                            let rt = runtime();
                            barrier.wait();
                            rt.block_on(drive(&mut svc, &req, per_thread))
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("thread"))
                    .max()
                    .unwrap_or_default()
            })
        })
    });
}

/// Every case, built fresh for each mode. `$run` is `single`, `contended` or `profile`; the
/// tower cases that cannot be shared between threads (`RateLimit` is not `Clone`) go to
/// `single_only` instead (`skip` in the contended mode).
macro_rules! cases {
    ($g:expr, $run:ident, single_only: $single:ident) => {{
        let g = $g;
        $run(g, "bare", Mock);

        // Ours, each alone.
        $run(g, "portcullis/retry", retry().layer(Mock));
        $run(g, "portcullis/circuit_breaker", breaker().layer(Mock));
        $run(g, "portcullis/token_bucket", ample_bucket().layer(Mock));
        $run(g, "portcullis/fallback", fallback().layer(Mock));
        $run(g, "portcullis/timeout", timeout().layer(Mock));
        $run(g, "portcullis/telemetry", TelemetryLayer::new().layer(Mock));
        $run(
            g,
            "portcullis/deadline",
            DeadlineLayer::new(Duration::from_secs(60)).layer(Mock),
        );
        // The recommended stack, outermost first: deadline → retry → breaker → bucket →
        // timeout → provider.
        $run(
            g,
            "portcullis/stack",
            ServiceBuilder::new()
                .layer(DeadlineLayer::new(Duration::from_secs(60)))
                .layer(retry())
                .layer(breaker())
                .layer(ample_bucket())
                .layer(timeout())
                .service(Mock),
        );
        $run(g, "portcullis/Stack_no_limits", facade_stack(false));
        $run(g, "portcullis/Stack_chat_cost", facade_stack(true));
        // Refusals.
        $run(g, "portcullis/circuit_open", open_breaker().layer(Mock));
        $run(
            g,
            "portcullis/bucket_over_capacity",
            tiny_bucket().layer(Mock),
        );

        // tower's built-ins.
        $run(
            g,
            "tower/retry",
            tower::retry::RetryLayer::new(NeverRetry).layer(Mock),
        );
        $run(
            g,
            "tower/timeout",
            tower::timeout::TimeoutLayer::new(Duration::from_secs(30)).layer(Mock),
        );
        $run(
            g,
            "tower/concurrency_limit",
            tower::limit::ConcurrencyLimitLayer::new(1024).layer(Mock),
        );
        {
            $single(
                g,
                "tower/rate_limit",
                tower::limit::RateLimitLayer::new(u64::MAX / 2, Duration::from_secs(60))
                    .layer(Mock),
            );
        }

        // tower-resilience.
        $run(
            g,
            "tower-resilience/retry",
            tr_retry::<LlmError>().layer(Mock),
        );
        $run(
            g,
            "tower-resilience/circuit_breaker",
            tr_breaker().layer(Mock),
        );
        $run(g, "tower-resilience/rate_limiter", tr_limiter().layer(Mock));
        $run(
            g,
            "tower-resilience/stack",
            ServiceBuilder::new()
                .layer(tr_retry())
                .layer(tr_breaker())
                .layer(tr_limiter())
                .layer(tower::timeout::TimeoutLayer::new(Duration::from_secs(30)))
                .service(Mock),
        );
        let open = tr_breaker().layer(Mock);
        runtime().block_on(open.force_open());
        $run(g, "tower-resilience/circuit_open", open);
    }};
}

/// A case that does not run in this mode.
fn skip<G, S>(_: &mut G, _: &str, _: S) {}

/// The profile mode's target: one case, `calls` calls.
struct Profile {
    case: String,
    calls: u64,
    found: bool,
}

/// Runs `svc` for `target.calls` calls if it is the case asked for, single-threaded.
fn profile<S>(target: &mut Profile, name: &str, svc: S)
where
    S: Service<ChatRequest> + 'static,
    S::Error: std::fmt::Debug,
{
    if name != target.case {
        return;
    }
    target.found = true;
    let rt = runtime();
    let req = request();
    let mut svc = svc;
    let took = rt.block_on(drive(&mut svc, &req, target.calls));
    eprintln!("{name}: {} calls in {took:?}", target.calls);
}

fn layers(c: &mut Criterion) {
    // tower's `RateLimit::new` creates its timer at once, so the cases are built inside a
    // runtime context (each case is then driven on runtimes of its own).
    let rt = runtime();
    let _enter = rt.enter();
    let mut g = c.benchmark_group("layers/1-thread");
    g.throughput(Throughput::Elements(1));
    cases!(&mut g, single, single_only: single);
    g.finish();

    let mut g = c.benchmark_group("layers/2-threads");
    g.throughput(Throughput::Elements(1));
    cases!(&mut g, contended, single_only: skip);
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = layers
}
/// Built with `--features metrics`, the benches record into a real exporter: a Prometheus
/// recorder installed for the process, as a service that serves `/metrics` has (rendering is
/// not measured: a scrape is not on the call path). Without the feature, no metrics code exists.
fn install_recorder() {
    #[cfg(feature = "metrics")]
    {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        metrics::set_global_recorder(recorder).expect("the only recorder");
    }
}

fn main() {
    install_recorder();
    if let Ok(case) = std::env::var("LAYERS_PROFILE") {
        let calls = std::env::var("LAYERS_PROFILE_CALLS")
            .ok()
            .map_or(100_000, |n| {
                n.parse().expect("LAYERS_PROFILE_CALLS: a number")
            });
        let rt = runtime();
        let _enter = rt.enter();
        let mut target = Profile {
            case,
            calls,
            found: false,
        };
        cases!(&mut target, profile, single_only: profile);
        assert!(target.found, "no case named {:?}", target.case);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
