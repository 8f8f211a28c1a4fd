//! Shared by the test binaries: a real redis-server, stores, a logging provider, the window check.

#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use portcullis_core::{
    ChatMessage, ChatRequest, CompletionResult, CostOf, LlmError, TokenCost, Usage,
};
use portcullis_layers::token_bucket::{
    BucketStore, KeyLimits, Levels, MemoryStore, Rate, TokenBucketConfig,
};
use portcullis_redis::{LocalRedis, RedisConfig, RedisStore};
use tokio::time::Instant;
use tower::Service;

/// A fresh redis-server. CI installs it (`.ci/run`); without it these tests fail, saying so.
pub fn server() -> LocalRedis {
    LocalRedis::start()
        .unwrap_or_else(|e| panic!("the portcullis-redis tests need a real redis-server: {e}"))
}

/// A Redis config for tests: a generous timeout (a loaded CI machine must not fail open).
pub fn redis_config(server: &LocalRedis) -> RedisConfig {
    RedisConfig::new(server.url()).timeout(Duration::from_secs(1))
}

pub fn redis_store(server: &LocalRedis, cfg: TokenBucketConfig) -> RedisStore {
    RedisStore::new("t", cfg, redis_config(server)).unwrap()
}

pub fn memory_store(cfg: TokenBucketConfig) -> MemoryStore {
    MemoryStore::new("t", cfg).unwrap()
}

/// Reading a store's levels once every update sent so far has landed.
pub trait Probe: BucketStore<Arc<str>, Ticket: std::fmt::Debug> {
    /// Waits for background updates (none for the in-memory store).
    fn sync(&self) -> impl std::future::Future<Output = ()> + Send;
    /// The levels of `key` now.
    fn now_levels(&self, key: &str) -> impl std::future::Future<Output = Levels> + Send;
}

impl Probe for MemoryStore {
    async fn sync(&self) {}
    async fn now_levels(&self, key: &str) -> Levels {
        self.levels(&Arc::from(key)).expect("key seen")
    }
}

impl Probe for RedisStore {
    async fn sync(&self) {
        self.flush().await;
    }
    async fn now_levels(&self, key: &str) -> Levels {
        self.flush().await;
        self.fetch_levels(&Arc::from(key)).await.unwrap()
    }
}

pub fn limits(req: (u64, f64), tok: (u64, f64)) -> KeyLimits {
    KeyLimits::unlimited()
        .with_requests(Rate::new(req.0, req.1).unwrap())
        .with_tokens(Rate::new(tok.0, tok.1).unwrap())
}

pub fn config(l: KeyLimits) -> TokenBucketConfig {
    TokenBucketConfig::new()
        .default_limits(l)
        .max_wait(Duration::from_secs(10))
}

/// Cost = `max_tokens` output tokens, no prompt.
#[derive(Clone, Copy)]
pub struct MaxTokens;
impl CostOf<ChatRequest> for MaxTokens {
    fn cost(&self, r: &ChatRequest) -> TokenCost {
        TokenCost {
            input: 0,
            output: u64::from(r.options.max_tokens),
        }
    }
}

pub fn req(model: &str, max_tokens: u32) -> ChatRequest {
    ChatRequest::new(model, vec![ChatMessage::user("x")]).max_tokens(max_tokens)
}

/// How far an admission seen by the provider may be from its slot, in real time on a loaded CI
/// machine: timer ticks and task scheduling for both stores; for Redis also the spread of the
/// replies' delays (the slot is computed on the server, the wait starts when the reply is read).
pub const SLACK: Duration = Duration::from_millis(20);

pub type Log = Arc<Mutex<Vec<(Instant, u64)>>>;

/// A provider that logs each call's instant and cost, and reports usage = the estimate.
pub fn provider(
    log: Log,
) -> impl Service<
    ChatRequest,
    Response = CompletionResult,
    Error = LlmError,
    Future = impl Send + 'static,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |r: ChatRequest| {
        let n = u64::from(r.options.max_tokens);
        log.lock().unwrap().push((Instant::now(), n));
        async move { Ok(CompletionResult::new("t", "m", "ok").with_usage(Usage::new(0, n))) }
    })
}

/// Checks that the cost admitted in every window `[t_i, t_j]` is at most
/// `capacity + rate·(span + slack)`: the token bucket's invariant, with `slack` for the clocks
/// (timer ticks, and the spread of round-trip latencies for Redis).
pub fn check_window(
    admitted: &[(Instant, u64)],
    rate: Rate,
    slack: Duration,
    what: &str,
) -> Result<(), String> {
    let mut admitted = admitted.to_vec();
    admitted.sort_by_key(|a| a.0);
    for i in 0..admitted.len() {
        let mut sum = 0u64;
        for j in i..admitted.len() {
            sum += admitted[j].1;
            let span = (admitted[j].0 - admitted[i].0 + slack).as_secs_f64();
            let bound = rate.capacity() as f64 + rate.refill_per_sec() * span;
            if sum as f64 > bound {
                return Err(format!(
                    "{what}: {sum} admitted in {:?} > {bound:.1} (from #{i} to #{j})",
                    admitted[j].0 - admitted[i].0
                ));
            }
        }
    }
    Ok(())
}
