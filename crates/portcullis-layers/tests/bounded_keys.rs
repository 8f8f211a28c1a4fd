//! Bounded keyed state (issue 17): the breaker's and the in-memory bucket's maps of keys stay
//! under their cap whatever models clients name, idle neutral keys are evicted and come back
//! fresh, a key that still holds a limit is never evicted, keys beyond the cap share one
//! overflow state, and clones share the map. All in paused time.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use portcullis_core::{
    ChatMessage, ChatRequest, CompletionResult, CostOf, ErrorKind, LlmError, TokenCost,
};
use portcullis_layers::KeyBounds;
use portcullis_layers::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer, CircuitState};
use portcullis_layers::token_bucket::{
    BucketStore, KeyLimits, MemoryStore, Rate, TokenBucketConfig, TokenBucketLayer,
};
use tokio::time::advance;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

const SEC: Duration = Duration::from_secs(1);
/// The default idle timeout.
const IDLE: Duration = Duration::from_secs(600);
/// The time between sweeps with the default idle timeout.
const TICK: Duration = Duration::from_secs(75);

/// Cost = `max_tokens` output tokens (no tokenizer: keeps a million calls fast).
#[derive(Clone, Copy)]
struct MaxTokens;
impl CostOf<ChatRequest> for MaxTokens {
    fn cost(&self, r: &ChatRequest) -> TokenCost {
        TokenCost {
            input: 0,
            output: u64::from(r.options.max_tokens),
        }
    }
}

fn req(model: &str) -> ChatRequest {
    ChatRequest::new(model, vec![ChatMessage::user("x")]).max_tokens(1)
}

type Reply = Pin<Box<dyn Future<Output = Result<CompletionResult, LlmError>> + Send>>;

/// A provider that answers at once: with a 503 for models starting with `down`, never for
/// models starting with `hang`, and with a success otherwise.
fn provider()
-> impl Service<ChatRequest, Response = CompletionResult, Error = LlmError, Future = Reply>
+ Clone
+ Send
+ 'static {
    tower::service_fn(|r: ChatRequest| -> Reply {
        if r.model.starts_with("down") {
            Box::pin(async { Err(LlmError::new(ErrorKind::Overloaded, "down").with_status(503)) })
        } else if r.model.starts_with("hang") {
            Box::pin(std::future::pending())
        } else {
            let res = CompletionResult::new("t", &*r.model, "ok");
            Box::pin(async move { Ok(res) })
        }
    })
}

fn breaker(keys: KeyBounds) -> CircuitBreakerLayer {
    let config = CircuitBreakerConfig {
        keys,
        ..CircuitBreakerConfig::default()
    };
    CircuitBreakerLayer::new("t", config).unwrap()
}

type Bucket = TokenBucketLayer<portcullis_layers::ByModel, MaxTokens>;

fn bucket(config: TokenBucketConfig) -> Bucket {
    TokenBucketLayer::new("t", config)
        .unwrap()
        .with_cost(MaxTokens)
}

/// One request per hour: one call puts a key in debt for an hour.
fn hourly() -> KeyLimits {
    KeyLimits::unlimited().with_requests(Rate::new(1, 1.0 / 3600.0).unwrap())
}

async fn call<S>(svc: &mut S, model: &str) -> Result<CompletionResult, LlmError>
where
    S: Service<ChatRequest, Response = CompletionResult, Error = LlmError>,
{
    svc.ready().await?.call(req(model)).await
}

/// `ticks` sweep intervals pass, each ending with a call for a new key `{tag}-{i}`, as a steady
/// flow of new keys would: sweeps run only when a key is added. A key used before goes after
/// ten of them (a tick to close the epoch it was used in, eight for the idle timeout, and the
/// part of a tick it was used after a sweep), and stays for seven.
async fn pass<S>(svc: &mut S, ticks: u32, tag: &str)
where
    S: Service<ChatRequest, Response = CompletionResult, Error = LlmError>,
{
    for i in 0..ticks {
        advance(TICK).await;
        call(svc, &format!("{tag}-{i}")).await.unwrap();
    }
}

/// Resident memory of this process, in bytes.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// `n` calls, each for a new model `m{i}`, a thousand a (paused) second: over ten minutes, so
/// that the map fills, then sheds what has been idle ten minutes. Returns the peak key count
/// seen by `count`.
async fn flood<S>(svc: &mut S, n: u32, count: impl Fn() -> usize) -> usize
where
    S: Service<ChatRequest, Response = CompletionResult, Error = LlmError>,
{
    let mut peak = 0;
    for i in 0..n {
        call(svc, &format!("m{i}")).await.unwrap();
        if i % 1000 == 999 {
            advance(SEC).await;
            peak = peak.max(count());
        }
    }
    peak
}

#[tokio::test(start_paused = true)]
async fn a_million_model_names_leave_at_most_the_cap_in_a_breaker() {
    let cb = breaker(KeyBounds::default());
    let h = cb.handle();
    let mut svc = cb.layer(provider());
    let peak = flood(&mut svc, 1_000_000, || h.key_count()).await;
    assert_eq!(peak, 10_000);
    // Ten idle minutes later, sweeps drop them all.
    pass(&mut svc, 10, "end").await;
    assert!(h.keys().iter().all(|k| k.starts_with("end")));
}

/// The in-memory store's request path costs a few microseconds a call in a debug build (the
/// GCRA arithmetic), so a million keys go in through `pause`, which finds or creates a key as a
/// reservation does (a provider's 429 takes it).
#[tokio::test(start_paused = true)]
async fn a_million_model_names_leave_at_most_the_cap_in_a_bucket_store() {
    let config = TokenBucketConfig::new().default_limits(KeyLimits::rpm_tpm(60, 1000).unwrap());
    let store = MemoryStore::new("t", config).unwrap();
    let mut peak = 0;
    for i in 0..1_000_000u32 {
        store.pause(&Arc::from(format!("m{i}")), Duration::ZERO);
        if i % 1000 == 999 {
            advance(SEC).await;
            peak = peak.max(store.key_count());
        }
    }
    assert_eq!(peak, 10_000);
    assert!(store.snapshot().len() <= 10_000);
}

/// The issue's measurement: 200 000 models through a breaker and a bucket grew the process by
/// 214 MiB, none of it reclaimed.
#[tokio::test(start_paused = true)]
async fn two_hundred_thousand_models_through_breaker_and_bucket_stay_bounded() {
    let cb = breaker(KeyBounds::default());
    let config = TokenBucketConfig::new().default_limits(KeyLimits::rpm_tpm(60, 1000).unwrap());
    let tb = bucket(config);
    let (cbh, tbh) = (cb.handle(), tb.handle());
    let mut svc = ServiceBuilder::new()
        .layer(cb)
        .layer(tb)
        .service(provider());
    let before = rss();
    let peak = flood(&mut svc, 200_000, || cbh.key_count().max(tbh.key_count())).await;
    eprintln!(
        "200 000 models: peak key count {peak}; resident memory grew {} KiB (approximate: \
         other tests run in this process)",
        rss().saturating_sub(before) / 1024
    );
    assert_eq!(peak, 10_000);
    pass(&mut svc, 10, "end").await;
    assert!(cbh.keys().iter().all(|k| k.starts_with("end")));
    assert!(tbh.levels().iter().all(|(k, _)| k.starts_with("t:end")));
}

#[tokio::test(start_paused = true)]
async fn an_evicted_key_comes_back_fresh() {
    let cb = breaker(KeyBounds::default());
    let config = TokenBucketConfig::new().default_limits(KeyLimits::rpm_tpm(60, 1000).unwrap());
    let tb = bucket(config);
    let (cbh, tbh) = (cb.handle(), tb.handle());
    let mut svc = ServiceBuilder::new()
        .layer(cb)
        .layer(tb)
        .service(provider());
    call(&mut svc, "a").await.unwrap();
    assert_eq!(cbh.metrics("a").unwrap().calls, 1);
    assert_eq!(tbh.level("a").unwrap().requests(), Some(59.0));
    pass(&mut svc, 7, "filler").await;
    assert!(cbh.metrics("a").is_some() && tbh.level("a").is_some());
    pass(&mut svc, 3, "more").await;
    assert_eq!(cbh.metrics("a"), None);
    assert_eq!(tbh.level("a"), None);
    // "a" comes back as new: counters at zero, buckets full.
    call(&mut svc, "a").await.unwrap();
    assert_eq!(cbh.metrics("a").unwrap().calls, 1);
    assert_eq!(tbh.level("a").unwrap().requests(), Some(59.0));
}

#[tokio::test(start_paused = true)]
async fn an_open_breaker_or_a_pending_failure_is_never_evicted() {
    let cb = breaker(KeyBounds::default());
    let h = cb.handle();
    let mut svc = cb.layer(provider());
    for _ in 0..5 {
        call(&mut svc, "down-a").await.unwrap_err();
    }
    for _ in 0..4 {
        call(&mut svc, "down-b").await.unwrap_err();
    }
    call(&mut svc, "ok").await.unwrap();
    assert_eq!(h.state("down-a"), CircuitState::Open);
    // An hour of new keys and sweeps: neither goes.
    pass(&mut svc, 48, "new").await;
    assert!(h.metrics("ok").is_none(), "a neutral key did go");
    // "down-a" was not reset to CLOSED: it is where it was, its recovery long elapsed.
    assert_eq!(h.state("down-a"), CircuitState::HalfOpen);
    assert_eq!(h.metrics("down-a").unwrap().failures, 5);
    // "down-b" still has four failures in a row: the fifth opens it.
    call(&mut svc, "down-b").await.unwrap_err();
    assert_eq!(h.state("down-b"), CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn a_call_in_flight_holds_its_keys() {
    let cb = breaker(KeyBounds::default());
    let tb = bucket(TokenBucketConfig::new().default_limits(hourly()));
    let (cbh, tbh) = (cb.handle(), tb.handle());
    let mut svc = ServiceBuilder::new()
        .layer(cb)
        .layer(tb)
        .service(provider());
    let mut hung = tokio_test::task::spawn(svc.ready().await.unwrap().call(req("hang")));
    assert!(hung.poll().is_pending());
    pass(&mut svc, 48, "new").await;
    assert!(hung.poll().is_pending());
    assert!(cbh.metrics("hang").is_some());
    assert!(tbh.level("hang").is_some());
    drop(hung);
    // Its reservation was spent on the call, so "hang" owed until an hour after it: now.
    pass(&mut svc, 10, "later").await;
    assert!(cbh.metrics("hang").is_none());
    assert!(tbh.level("hang").is_none());
}

#[tokio::test(start_paused = true)]
async fn a_bucket_in_debt_or_paused_is_never_evicted() {
    let config = TokenBucketConfig::new()
        .default_limits(hourly())
        .max_wait(SEC);
    let tb = bucket(config);
    let h = tb.handle();
    let mut svc = tb.layer(provider());
    call(&mut svc, "debtor").await.unwrap();
    h.pause("paused", 2 * 3600 * SEC);
    pass(&mut svc, 40, "new").await;
    // 50 minutes on, "debtor" still owes ten: eviction did not hand it a full bucket.
    let err = call(&mut svc, "debtor").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Throttled);
    assert!(h.paused_for("paused").is_some());
    // Both go once their limits hold nothing any more (and ten minutes have passed).
    pass(&mut svc, 100, "later").await;
    assert!(h.level("debtor").is_none());
    assert!(h.level("paused").is_none());
}

#[tokio::test(start_paused = true)]
async fn keys_given_limits_by_hand_are_kept() {
    let tb = bucket(TokenBucketConfig::new().keys(KeyBounds::new(1, IDLE)));
    let h = tb.handle();
    let mut svc = tb.layer(provider());
    call(&mut svc, "a").await.unwrap();
    h.set_limits("manual", KeyLimits::rpm_tpm(60, 1000).unwrap())
        .unwrap();
    assert_eq!(h.key_count(), 2, "not refused, though the map is full");
    pass(&mut svc, 30, "new").await;
    assert!(h.level("a").is_none(), "a neutral key did go");
    let manual = h.level("manual").expect("kept");
    assert_eq!(manual.limits, KeyLimits::rpm_tpm(60, 1000).unwrap());
}

#[tokio::test(start_paused = true)]
async fn keys_beyond_the_cap_share_the_overflow_breaker() {
    let cb = breaker(KeyBounds::new(2, IDLE));
    let h = cb.handle();
    let mut svc = cb.layer(provider());
    call(&mut svc, "a").await.unwrap();
    call(&mut svc, "b").await.unwrap();
    // "down-1" and "down-2" have no room: their failures open the one overflow breaker.
    for i in 0..5 {
        call(&mut svc, &format!("down-{}", 1 + i % 2))
            .await
            .unwrap_err();
    }
    assert_eq!(h.key_count(), 2);
    assert_eq!(
        h.state("down-1"),
        CircuitState::Closed,
        "no breaker of its own"
    );
    let err = call(&mut svc, "c").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::CircuitOpen, "another overflow key");
    call(&mut svc, "a").await.unwrap();
    // The operator still gets a breaker of its own for a key it names.
    h.force_open("b2");
    assert_eq!(h.state("b2"), CircuitState::Open);
    assert_eq!(h.key_count(), 3);
}

#[tokio::test(start_paused = true)]
async fn keys_beyond_the_cap_share_the_overflow_bucket_and_named_keys_never_do() {
    let config = TokenBucketConfig::new()
        .default_limits(hourly())
        .limit("t:named", hourly())
        .max_wait(SEC)
        .keys(KeyBounds::new(2, IDLE));
    let tb = bucket(config);
    let h = tb.handle();
    let mut svc = tb.layer(provider());
    call(&mut svc, "a").await.unwrap();
    call(&mut svc, "b").await.unwrap();
    // The overflow bucket has the default limits: one request an hour for all of them.
    call(&mut svc, "c").await.unwrap();
    let err = call(&mut svc, "d").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Throttled);
    // A key the configuration names is not counted and has its own bucket.
    call(&mut svc, "named").await.unwrap();
    assert_eq!(h.key_count(), 3);
    assert!(h.level("c").is_none() && h.level("named").is_some());
}

#[tokio::test(start_paused = true)]
async fn clones_of_the_layers_and_services_share_the_map() {
    let cb = breaker(KeyBounds::new(3, IDLE));
    let tb = bucket(TokenBucketConfig::new().keys(KeyBounds::new(3, IDLE)));
    let (cbh, tbh) = (cb.handle(), tb.handle());
    let stack = |cb: &CircuitBreakerLayer, tb: &Bucket| {
        ServiceBuilder::new()
            .layer(cb.clone())
            .layer(tb.clone())
            .service(provider())
    };
    let mut one = stack(&cb, &tb);
    let mut two = one.clone();
    let mut three = stack(&cb.clone(), &tb.clone());
    call(&mut one, "a").await.unwrap();
    call(&mut two, "b").await.unwrap();
    call(&mut three, "c").await.unwrap();
    call(&mut three, "d").await.unwrap();
    assert_eq!((cbh.key_count(), tbh.key_count()), (3, 3));
    assert!(cbh.metrics("d").is_none() && tbh.level("d").is_none());
}

#[test]
fn bounds_are_configured_and_validated() {
    let cb: CircuitBreakerConfig =
        serde_json::from_str(r#"{"keys": {"max_keys": 50, "idle_timeout_ms": 1500}}"#).unwrap();
    assert_eq!(cb.keys, KeyBounds::new(50, Duration::from_millis(1500)));
    assert_eq!(
        CircuitBreakerConfig::default().keys,
        KeyBounds::new(10_000, IDLE)
    );
    let tb: TokenBucketConfig = serde_json::from_str(r#"{"keys": {"max_keys": 7}}"#).unwrap();
    assert_eq!(tb.keys, KeyBounds::new(7, IDLE));
    assert!(serde_json::from_str::<TokenBucketConfig>(r#"{"keys": {"max": 7}}"#).is_err());

    let no_keys = KeyBounds::new(0, IDLE);
    let err = CircuitBreakerLayer::new(
        "t",
        CircuitBreakerConfig {
            keys: no_keys,
            ..CircuitBreakerConfig::default()
        },
    )
    .unwrap_err();
    assert_eq!(err.field, "keys.max_keys");
    let err = TokenBucketLayer::new("t", TokenBucketConfig::new().keys(no_keys)).unwrap_err();
    assert_eq!(err.field, "keys.max_keys");
    let never = KeyBounds::new(1, Duration::ZERO);
    let err = TokenBucketLayer::new("t", TokenBucketConfig::new().keys(never)).unwrap_err();
    assert_eq!(err.field, "keys.idle_timeout_ms");
}
