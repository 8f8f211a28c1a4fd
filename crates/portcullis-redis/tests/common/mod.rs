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

/// Set to a running server (`redis://127.0.0.1:6379/`) to run the tests against it instead of
/// starting throwaway `redis-server`s. Each test then works under its own key prefix.
pub const URL_VAR: &str = "PORTCULLIS_REDIS_URL";
/// Set to `1` to make a missing redis-server a failure instead of a skip (`.ci/run` does).
pub const REQUIRE_VAR: &str = "PORTCULLIS_REQUIRE_REDIS";

/// What a Redis test needs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Any server: one started here, or the one [`URL_VAR`] names.
    Server,
    /// A `redis-server` binary: the test stops, kills or restarts its own server.
    Binary,
}

/// A server for one test: its own throwaway `redis-server`, or a running one shared with
/// other tests, kept apart by a key prefix of its own.
pub struct TestRedis {
    local: Option<LocalRedis>,
    url: String,
    prefix: String,
}

impl TestRedis {
    /// The server's URL.
    pub fn url(&self) -> String {
        self.url.clone()
    }
    /// This test's key prefix, followed by `rest`.
    pub fn prefix(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }
    /// The local server (only for [`Need::Binary`] tests).
    pub fn local(&self) -> &LocalRedis {
        self.local
            .as_ref()
            .expect("a Need::Binary test has a local server")
    }
    /// Kills the local server (only for [`Need::Binary`] tests).
    pub fn kill(self) {
        self.local
            .expect("a Need::Binary test has a local server")
            .kill()
    }
}

/// The server a Redis test runs against, or `None` (after saying so once per test binary) when
/// there is none and [`REQUIRE_VAR`] is not set. `tests_here` is how many Redis tests the binary
/// holds, for the skip line.
pub fn acquire(need: Need, tests_here: usize) -> Option<TestRedis> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let prefix = format!(
        "portcullis-test:{}:{}:",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let external = std::env::var(URL_VAR).ok().filter(|u| !u.is_empty());
    if need == Need::Server {
        if let Some(url) = external.clone() {
            return Some(TestRedis {
                local: None,
                url,
                prefix,
            });
        }
    }
    let why = match LocalRedis::start() {
        Ok(local) => {
            let url = local.url();
            return Some(TestRedis {
                local: Some(local),
                url,
                prefix,
            });
        }
        Err(portcullis_redis::Error::ServerNotFound)
            if need == Need::Binary && external.is_some() =>
        {
            format!(
                "redis-server not found on the PATH; these tests stop and restart their own \
                 server, so {URL_VAR} is not enough: install redis-server"
            )
        }
        Err(portcullis_redis::Error::ServerNotFound) => format!(
            "redis-server not found; install it (Debian/Ubuntu: apt-get install redis-server) \
             or set {URL_VAR}=redis://127.0.0.1:6379/ to a running server"
        ),
        Err(e) => panic!("the Redis tests could not start redis-server: {e}"),
    };
    if std::env::var(REQUIRE_VAR).is_ok_and(|v| v == "1") {
        panic!("{why} ({REQUIRE_VAR}=1 makes this a failure)");
    }
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| {
        use std::io::Write;
        // Straight to the stderr handle: the test harness captures `eprintln!`, not this.
        let _ = writeln!(
            std::io::stderr(),
            "portcullis-redis tests/{}.rs: skipped {tests_here} tests: {why} ({REQUIRE_VAR}=1 \
             makes this a failure)",
            env!("CARGO_CRATE_NAME")
        );
    });
    None
}

/// Declares Redis tests: each gets its server as `$server` (a [`TestRedis`]) or is skipped, and
/// the binary says once how many it skipped.
#[macro_export]
macro_rules! redis_tests {
    ($need:expr; $( $(#[$m:meta])* async fn $name:ident($server:ident) $body:block )*) => {
        const REDIS_TESTS: usize = [$(stringify!($name)),*].len();
        $(
            $(#[$m])*
            async fn $name() {
                let Some($server) = $crate::common::acquire($need, REDIS_TESTS) else {
                    return;
                };
                $body
            }
        )*
    };
}

/// A Redis config for tests: this test's key prefix, and a generous timeout (a loaded CI
/// machine must not fail open).
pub fn redis_config(server: &TestRedis) -> RedisConfig {
    RedisConfig::new(server.url())
        .prefix(server.prefix(""))
        .timeout(Duration::from_secs(1))
}

pub fn redis_store(server: &TestRedis, cfg: TokenBucketConfig) -> RedisStore {
    RedisStore::new("t", cfg, redis_config(server)).unwrap()
}

pub fn memory_store(cfg: TokenBucketConfig) -> MemoryStore {
    MemoryStore::new("t", cfg).unwrap()
}

/// Reading a store's levels once every update sent so far has landed.
pub trait Probe: BucketStore<Key = Arc<str>, Ticket: std::fmt::Debug> {
    /// Waits for background updates (none for the in-memory store).
    fn sync(&self) -> impl std::future::Future<Output = ()> + Send;
    /// The levels of `key` now.
    fn now_levels(&self, key: &str) -> impl std::future::Future<Output = Levels> + Send;
}

impl Probe for MemoryStore {
    async fn sync(&self) {}
    async fn now_levels(&self, key: &str) -> Levels {
        self.levels(key).expect("key seen")
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
