//! Allocation accounting: the steady-state call path of each layer makes no heap allocation.
//!
//! A counting global allocator wraps the system one and counts, per thread, every allocation
//! (and reallocation). Each case warms the service up (first calls create per-key state), then
//! makes `CALLS` calls on a current-thread runtime on this thread and asserts the exact number
//! of allocations they made. Allocation counts are deterministic, so this is a test, not a
//! benchmark. Where a path must allocate, the expected count says so and why.
//!
//! The mock provider answers a prebuilt `u64` at once, so every allocation counted is the
//! layers' own.
//!
//! The counts hold with and without the `metrics` feature: the layers register their metric
//! handles once (at their first use) and record through them, so with metrics compiled in and
//! no recorder installed a call still allocates nothing. (An installed recorder's own storage is
//! the recorder's.) `.ci/run` runs this file in both builds: with `--all-features` in the
//! test command, and again alone without features (`cargo test -p portcullis --test alloc`).
// The workspace forbids unsafe code. This file alone needs one `unsafe impl GlobalAlloc` (a
// global allocator cannot be written without it); the facade package denies unsafe code instead
// of forbidding it (Cargo.toml) so that this one file can allow it.
#![allow(unsafe_code)]
#![allow(missing_docs)]

mod counted {

    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;
    use std::future::{Ready, ready};
    use std::task::{Context, Poll};
    use std::time::Duration;

    use portcullis_core::{ChatMessage, ChatRequest, CompletionResult, LlmError, TokenCost};
    use portcullis_layers::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer};
    use portcullis_layers::retry::{RetryLayer, StandardPolicy};
    use portcullis_layers::token_bucket::{KeyLimits, TokenBucketConfig, TokenBucketLayer};
    use portcullis_layers::{ByModel, DeadlineLayer, Entry, FallbackLayer, TimeoutLayer};
    use tower::{Layer, Service, ServiceBuilder, ServiceExt};

    struct Counting;

    thread_local! {
        // `const` initialisation: no lazy init, no destructor, so reading it never allocates.
        static ALLOCS: Cell<u64> = const { Cell::new(0) };
    }

    fn count() {
        // `try_with`: during thread teardown the slot may be gone; such allocations are not ours.
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
    }

    // SAFETY: every method forwards to `System`, which upholds `GlobalAlloc`'s contract, with the
    // caller's own arguments unchanged; the only addition is a thread-local counter update, which
    // neither allocates nor unwinds.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            count();
            // SAFETY: forwarded as is (see the impl's comment).
            unsafe { System.alloc(layout) }
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            count();
            // SAFETY: forwarded as is.
            unsafe { System.alloc_zeroed(layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            count();
            // SAFETY: forwarded as is.
            unsafe { System.realloc(ptr, layout, new_size) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: forwarded as is.
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    #[global_allocator]
    static GLOBAL: Counting = Counting;

    fn allocations() -> u64 {
        ALLOCS.with(Cell::get)
    }

    /// The always-ready mock provider (as in benches/layers.rs).
    #[derive(Clone, Copy, Debug)]
    struct Mock;

    impl Service<ChatRequest> for Mock {
        type Response = CompletionResult;
        type Error = LlmError;
        type Future = Ready<Result<CompletionResult, LlmError>>;
        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), LlmError>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _req: ChatRequest) -> Self::Future {
            ready(Ok(answer()))
        }
    }

    /// The mock's answer: a `CompletionResult` with empty strings and a `'static` provider name, so
    /// building it allocates nothing.
    fn answer() -> CompletionResult {
        CompletionResult::new("openai", String::new(), String::new())
    }

    const WARM_UP: u64 = 16;
    const CALLS: u64 = 1000;

    /// Allocations per call in steady state, checked to be a whole number: `CALLS` calls after
    /// `WARM_UP`, on a current-thread runtime on this thread.
    fn per_call<S>(mut svc: S) -> u64
    where
        S: Service<ChatRequest>,
        S::Error: std::fmt::Debug,
    {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        let req = ChatRequest::new(
            "gpt-4o-mini",
            vec![
                ChatMessage::system("You are a helpful assistant."),
                ChatMessage::user("What is the capital of France?"),
            ],
        )
        .max_tokens(64);
        rt.block_on(async {
            for _ in 0..WARM_UP {
                one(&mut svc, &req).await;
            }
            let before = allocations();
            for _ in 0..CALLS {
                one(&mut svc, &req).await;
            }
            let total = allocations() - before;
            assert_eq!(
                total % CALLS,
                0,
                "{total} allocations in {CALLS} calls: not the same on every call"
            );
            total / CALLS
        })
    }

    async fn one<S>(svc: &mut S, req: &ChatRequest)
    where
        S: Service<ChatRequest>,
        S::Error: std::fmt::Debug,
    {
        let out = svc.ready().await.expect("ready").call(req.clone()).await;
        std::hint::black_box(out.is_ok());
    }

    fn flat_cost(_: &ChatRequest) -> TokenCost {
        TokenCost {
            input: 10,
            output: 10,
        }
    }

    type Bucket = TokenBucketLayer<ByModel, fn(&ChatRequest) -> TokenCost>;

    fn bucket(tpm: u64) -> Bucket {
        let limits = KeyLimits::rpm_tpm(1_000_000_000_000, tpm).expect("limits");
        TokenBucketLayer::new("openai", TokenBucketConfig::new().default_limits(limits))
            .expect("bucket")
            .with_cost(flat_cost as fn(&ChatRequest) -> TokenCost)
    }

    fn retry() -> RetryLayer<StandardPolicy> {
        RetryLayer::new(StandardPolicy::builder().seed(1).build().expect("policy"))
    }

    fn breaker() -> CircuitBreakerLayer {
        CircuitBreakerLayer::new("openai", CircuitBreakerConfig::default()).expect("breaker")
    }

    #[test]
    fn breaker_closed_allocates_nothing() {
        assert_eq!(per_call(breaker().layer(Mock)), 0);
    }

    /// Allocations made by building one error value.
    fn allocs_of<E>(make: impl Fn() -> E) -> u64 {
        std::hint::black_box(make()); // warm up anything lazy
        let before = allocations();
        std::hint::black_box(make());
        allocations() - before
    }

    #[test]
    fn breaker_open_rejection_allocates_only_its_error() {
        let layer = breaker();
        layer.handle().force_open("gpt-4o-mini");
        // The refusal is `LlmError::from(CircuitOpen { .. })`: core boxes the error (one pointer
        // wide, so the happy path's `Result` stays small); its message is static. The breaker
        // itself adds nothing to that.
        let error = allocs_of(|| {
            LlmError::from(portcullis_core::CircuitOpen {
                retry_after: Duration::from_secs(59),
            })
        });
        assert_eq!(error, 1, "one box, no formatted message");
        assert_eq!(per_call(layer.layer(Mock)), error);
    }

    #[test]
    fn bare_mock_allocates_nothing() {
        // The harness itself (request clone, ready, call) allocates nothing: the baseline is 0.
        assert_eq!(per_call(Mock), 0);
    }

    #[test]
    fn retry_allocates_nothing() {
        assert_eq!(per_call(retry().layer(Mock)), 0);
    }

    #[test]
    fn timeout_and_deadline_allocate_nothing() {
        assert_eq!(
            per_call(TimeoutLayer::new(Duration::from_secs(30)).layer(Mock)),
            0
        );
        assert_eq!(
            per_call(DeadlineLayer::new(Duration::from_secs(60)).layer(Mock)),
            0
        );
    }

    #[test]
    fn fallback_with_a_healthy_primary_allocates_nothing() {
        let layer = FallbackLayer::new("primary", vec![Entry::new("secondary", Mock)]);
        assert_eq!(per_call(layer.layer(Mock)), 0);
    }

    #[test]
    fn token_bucket_admission_allocates_nothing() {
        assert_eq!(per_call(bucket(1_000_000_000_000).layer(Mock)), 0);
    }

    #[test]
    fn token_bucket_fail_fast_refusal() {
        // Capacity 5 tokens, cost 20: refused at once with `OverCapacity`. The only allocations are
        // the error it becomes, `LlmError::from(OverCapacity { .. })`: its box and its message,
        // which names the cost and the capacity. The layer's log event formats the key lazily.
        let error = allocs_of(|| {
            LlmError::from(portcullis_core::OverCapacity {
                cost: 20,
                capacity: 5,
            })
        });
        assert_eq!(per_call(bucket(5).layer(Mock)), error);
    }

    #[test]
    fn full_stack_allocates_nothing() {
        let svc = ServiceBuilder::new()
            .layer(DeadlineLayer::new(Duration::from_secs(60)))
            .layer(retry())
            .layer(breaker())
            .layer(bucket(1_000_000_000_000))
            .layer(TimeoutLayer::new(Duration::from_secs(30)))
            .service(Mock);
        assert_eq!(per_call(svc), 0);
    }

    /// The mock's streaming side, never called (the facade `Stack` needs one).
    #[derive(Clone, Copy, Debug)]
    struct NoStream;

    impl Service<ChatRequest> for NoStream {
        type Response = portcullis_core::ChatStream;
        type Error = LlmError;
        type Future = Ready<Result<portcullis_core::ChatStream, LlmError>>;
        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), LlmError>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _req: ChatRequest) -> Self::Future {
            ready(Err(LlmError::new(
                portcullis_core::ErrorKind::InvalidRequest,
                "no streams here",
            )))
        }
    }

    #[test]
    fn telemetry_allocates_nothing() {
        let svc = portcullis_layers::telemetry::TelemetryLayer::new().layer(Mock);
        assert_eq!(per_call(svc), 0);
    }

    /// The facade's `Stack` with its defaults (telemetry, deadline, fallback, retry, breaker,
    /// the learned-limits bucket with `ChatCost`, timeout) over the mock.
    #[test]
    fn the_stack_allocates_nothing() {
        let stack = portcullis::Stack::builder()
            .provider(portcullis::ProviderStack::new("openai", Mock, NoStream))
            .build()
            .expect("stack");
        assert_eq!(per_call(stack.completions()), 0);
    }

    /// The provider path around the layers: reading a response's rate-limit headers allocates
    /// nothing (one pass over the map into fixed slots); parsing an OpenAI answer allocates
    /// only what the `CompletionResult` owns and serde's buffers.
    #[test]
    fn the_provider_path_allocates_only_what_the_answer_owns() {
        use portcullis_core::RateLimitHints;
        use portcullis_providers::Wire;
        let mut headers = http::HeaderMap::new();
        for (k, v) in [
            ("content-type", "application/json"),
            ("x-request-id", "req_123"),
            ("x-ratelimit-limit-requests", "10000"),
            ("x-ratelimit-remaining-requests", "9999"),
            ("x-ratelimit-reset-requests", "6ms"),
            ("x-ratelimit-limit-tokens", "30000000"),
            ("x-ratelimit-remaining-tokens", "29999980"),
            ("x-ratelimit-reset-tokens", "0s"),
            ("openai-processing-ms", "120"),
        ] {
            headers.insert(
                http::HeaderName::from_static(k),
                http::HeaderValue::from_static(v),
            );
        }
        let now = std::time::SystemTime::now();
        let hints = RateLimitHints::from_headers_at(&headers, now);
        assert_eq!(hints.tokens.remaining, Some(29_999_980));
        assert_eq!(
            allocs_of(|| RateLimitHints::from_headers_at(&headers, now)),
            0
        );

        let body = br#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"message":{"role":"assistant","content":"Paris is the capital of France.","refusal":null},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":24,"completion_tokens":8,"total_tokens":32},"system_fingerprint":"fp_1"}"#;
        let req = ChatRequest::new("gpt-4o-mini", vec![ChatMessage::user("Capital of France?")]);
        let wire = portcullis_providers::OpenAi::default();
        let parsed = wire.parse_response(&req, body).expect("an answer");
        assert_eq!(parsed.content, "Paris is the capital of France.");
        // The model and content strings the answer owns, and the choices' vector (the finish
        // reason is read borrowed from the body).
        assert_eq!(allocs_of(|| wire.parse_response(&req, body)), 3);
    }
}
