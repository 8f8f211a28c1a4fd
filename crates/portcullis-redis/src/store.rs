//! [`RedisStore`]: the token bucket's state in Redis, shared by every instance that points at
//! the same server and prefix.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::fmt::{self, Debug};
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use portcullis_core::TokenCost;
use portcullis_layers::token_bucket::{
    Admission, BucketStore, Denied, KeyLabel, KeyLimits, Levels, MemoryStore, MemoryTicket,
    PerBucket, Rate, Remaining, Settlement, TokenBucketConfig,
};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::script::{Scripts, State};
use crate::{Error, FailurePolicy, RedisConfig};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One key of the store: its Redis key, its limits, and what the last round trip said.
pub(crate) struct Entry {
    pub(crate) redis_key: String,
    state: Mutex<EntryState>,
}

struct EntryState {
    limits: KeyLimits,
    /// The server's state as of the last round trip for this key, and when it arrived.
    seen: Option<(State, Instant)>,
}

impl Entry {
    fn limits(&self) -> KeyLimits {
        lock(&self.state).limits
    }

    fn observe(&self, state: State) {
        lock(&self.state).seen = Some((state, Instant::now()));
    }

    /// The server's clock now, estimated from the last round trip (µs).
    fn server_now(seen: &(State, Instant)) -> i64 {
        seen.0.now.saturating_add(micros(seen.1.elapsed()))
    }

    fn paused_for(&self) -> Option<Duration> {
        let st = lock(&self.state);
        let seen = st.seen.as_ref()?;
        let left = seen.0.paused.saturating_sub(Entry::server_now(seen));
        (left > 0).then(|| Duration::from_micros(left as u64))
    }

    /// Holds local waiters at once; the server applies the pause when the update arrives.
    fn pause_locally(&self, duration: Duration) {
        let mut st = lock(&self.state);
        if let Some(seen) = st.seen.as_mut() {
            let until = Entry::server_now(seen).saturating_add(micros(duration));
            seen.0.paused = seen.0.paused.max(until);
        }
    }

    fn levels(&self) -> Option<Levels> {
        let st = lock(&self.state);
        let seen = st.seen.as_ref()?;
        Some(levels_of(st.limits, &seen.0, Entry::server_now(seen)))
    }
}

/// The levels of a key with `limits` in server state `s`, at server time `now` (µs).
fn levels_of(limits: KeyLimits, s: &State, now: i64) -> Levels {
    let mut queued = s.floor.max(s.paused);
    let levels = PerBucket::from(limits).zip(s.tat).map(|(rate, tat)| {
        let r = rate?;
        let upu = micros_per_unit(r);
        let cap = r.capacity() as f64;
        queued = queued.max(tat - (cap * upu).floor() as i64);
        Some(cap - (tat - now).max(0) as f64 / upu)
    });
    let paused = s.paused.saturating_sub(now);
    Levels::new(
        limits,
        levels,
        (paused > 0).then(|| Duration::from_micros(paused as u64)),
        Duration::from_micros(queued.saturating_sub(now).max(0) as u64),
    )
}

pub(crate) fn micros(d: Duration) -> i64 {
    d.as_micros().min(i64::MAX as u128) as i64
}

pub(crate) fn micros_per_unit(r: Rate) -> f64 {
    1e6 / r.refill_per_sec()
}

/// Whether Redis is answering, and when to try it again if not.
struct Health {
    down: bool,
    retry_at: Instant,
}

/// Everything the background task shares with the store (no key type).
pub(crate) struct Remote {
    conn: ConnectionManager,
    pub(crate) scripts: Scripts,
    config: RedisConfig,
    health: Mutex<Health>,
}

impl Remote {
    /// Whether this call should go to Redis: always while it is up; while it is down, one call
    /// per retry interval (the probe).
    fn gate(&self) -> bool {
        let mut h = lock(&self.health);
        if !h.down {
            return true;
        }
        let now = Instant::now();
        if now >= h.retry_at {
            h.retry_at = now + self.config.retry_interval;
            return true;
        }
        false
    }

    fn until_retry(&self) -> Duration {
        let h = lock(&self.health);
        h.retry_at
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    }

    fn succeeded(&self) {
        let mut h = lock(&self.health);
        if h.down {
            h.down = false;
            tracing::info!(
                url = %self.config.url,
                "token bucket: redis answers again; back to the shared buckets"
            );
        }
    }

    fn failed(&self, error: &Error) {
        let mut h = lock(&self.health);
        h.retry_at = Instant::now() + self.config.retry_interval;
        if h.down {
            tracing::debug!(%error, "token bucket: redis still unavailable");
            return;
        }
        h.down = true;
        match self.config.failure_policy {
            FailurePolicy::FailOpen => tracing::warn!(
                url = %self.config.url,
                %error,
                "token bucket: redis unavailable; failing open to local buckets until it answers"
            ),
            FailurePolicy::FailClosed => tracing::warn!(
                url = %self.config.url,
                %error,
                "token bucket: redis unavailable; failing closed (refusing) until it answers"
            ),
        }
    }

    fn is_down(&self) -> bool {
        lock(&self.health).down
    }

    /// Runs one script for `entry` within the timeout: the common arguments (`limits`), then
    /// the script's own (`args`).
    async fn run(
        &self,
        entry: &Entry,
        script: &redis::Script,
        limits: KeyLimits,
        args: impl FnOnce(&mut redis::ScriptInvocation<'_>),
    ) -> Result<Vec<i64>, Error> {
        let mut inv = script.key(&entry.redis_key);
        base_args(&mut inv, &self.config, limits);
        args(&mut inv);
        let mut conn = self.conn.clone();
        let reply =
            tokio::time::timeout(self.config.timeout, inv.invoke_async::<Vec<i64>>(&mut conn))
                .await
                .map_err(|_| Error::Timeout(self.config.timeout))??;
        Ok(reply)
    }

    /// Runs a script whose reply is the key's state; records the outcome.
    async fn update(
        &self,
        entry: &Entry,
        script: &redis::Script,
        limits: KeyLimits,
        args: impl FnOnce(&mut redis::ScriptInvocation<'_>),
    ) {
        let result = self
            .run(entry, script, limits, args)
            .await
            .and_then(|r| State::parse(&r));
        match result {
            Ok(state) => {
                entry.observe(state);
                self.succeeded();
            }
            Err(e) => self.failed(&e),
        }
    }
}

/// The arguments every script takes: the idle TTL (ms), then each bucket's capacity (0: none)
/// and µs to refill one unit.
fn base_args(inv: &mut redis::ScriptInvocation<'_>, config: &RedisConfig, limits: KeyLimits) {
    inv.arg(config.idle_ttl.as_millis() as u64);
    limit_args(inv, limits);
}

/// Each bucket's capacity (0: none), then µs to refill one unit.
fn limit_args(inv: &mut redis::ScriptInvocation<'_>, limits: KeyLimits) {
    let buckets = PerBucket::from(limits);
    for r in buckets {
        inv.arg(r.map_or(0, |r| r.capacity()));
    }
    for r in buckets {
        inv.arg(r.map_or(0.0, micros_per_unit));
    }
}

fn ints(inv: &mut redis::ScriptInvocation<'_>, values: &[i64]) {
    for v in values {
        inv.arg(*v);
    }
}

/// A background update: what the synchronous methods send to Redis.
enum Op {
    Settle {
        ticket: RemoteTicket,
        cancelled: bool,
        actual: PerBucket<u64>,
    },
    Pause(Duration),
    ClearPause,
    Clamp(Remaining),
    SetLimits {
        old: KeyLimits,
        new: KeyLimits,
    },
}

enum Job {
    Op(Arc<Entry>, Op),
    Flush(oneshot::Sender<()>),
}

/// Sends the updates in order, one round trip each, each within the timeout; drops them while
/// Redis is down (a lost refund errs on the safe side; pauses and clamps also apply locally).
async fn worker(remote: Arc<Remote>, mut rx: mpsc::UnboundedReceiver<Job>) {
    while let Some(job) = rx.recv().await {
        let (entry, op) = match job {
            Job::Flush(done) => {
                let _ = done.send(());
                continue;
            }
            Job::Op(entry, op) => (entry, op),
        };
        if !remote.gate() {
            tracing::debug!(key = %entry.redis_key, "token bucket: redis down; update dropped");
            continue;
        }
        let limits = entry.limits();
        let s = &remote.scripts;
        match op {
            Op::Settle {
                ticket: t,
                cancelled,
                actual,
            } => {
                let mut args = vec![i64::from(cancelled), t.seq, t.prev_floor];
                args.extend(t.cost.map(sat));
                args.extend(actual.map(sat));
                args.extend(t.tat_before);
                args.extend(t.tat_after);
                args.extend(t.epoch);
                remote
                    .update(&entry, &s.settle, limits, |i| ints(i, &args))
                    .await;
            }
            Op::Pause(d) => {
                remote
                    .update(&entry, &s.pause, limits, |i| ints(i, &[micros(d)]))
                    .await;
            }
            Op::ClearPause => {
                remote
                    .update(&entry, &s.clear_pause, limits, |i| ints(i, &[]))
                    .await;
            }
            Op::Clamp(rem) => {
                let args = rem.map(|r| r.map_or(-1, sat)).into_array();
                remote
                    .update(&entry, &s.clamp, limits, |i| ints(i, &args))
                    .await;
            }
            Op::SetLimits { old, new } => {
                // The old limits go as the common arguments, the new ones after them.
                remote
                    .update(&entry, &s.set_limits, old, |i| limit_args(i, new))
                    .await;
            }
        }
    }
}

fn sat(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

struct Shared<K> {
    name: Arc<str>,
    config: TokenBucketConfig,
    remote: Arc<Remote>,
    keys: RwLock<HashMap<K, Arc<Entry>>>,
    /// The fail-open buckets; also receives every pause, clamp and limit change.
    local: MemoryStore<K>,
    tx: mpsc::UnboundedSender<Job>,
}

/// A [`BucketStore`] in Redis: every instance built with the same Redis, prefix and name shares
/// each key's buckets, so a fleet stays under one provider limit together.
///
/// - **One atomic round trip per admission**: a Lua script reads the server's `TIME`, computes
///   the admission instant for every bucket of the key (the [GCRA of the in-memory
///   store](portcullis_layers::token_bucket::gcra)), and reserves all of them or none. Client
///   clocks do not matter; the reply is the wait.
/// - **Background updates**: refunds, reconciliation, pauses after a 429, clamps from
///   `remaining` headers and limit changes are sent in order by a background task (the trait's
///   methods for them are synchronous). [`flush`](Self::flush) waits for them.
/// - **Limits** come from this instance's [`TokenBucketConfig`] and travel with each call: Redis
///   stores only the buckets' state. Give every instance the same limits;
///   [`set_limits`](BucketStore::set_limits) rescales the shared state but changes only this
///   instance's copy.
/// - **Levels** ([`levels`](BucketStore::levels), [`snapshot`](BucketStore::snapshot)) are the
///   state of the last round trip for the key, aged by the local clock;
///   [`fetch_levels`](Self::fetch_levels) asks the server.
/// - **Keys** are hashes named `{prefix}{name}:{label}` that expire once their buckets are full
///   again, plus [`RedisConfig::idle_ttl`].
/// - **Failures** (no answer within [`RedisConfig::timeout`], a connection error, an error
///   reply) follow [`RedisConfig::failure_policy`]: a local fallback or a `Throttled` refusal,
///   never a hang. Redis is retried once per [`RedisConfig::retry_interval`]; the connection is
///   re-established when it returns.
///
/// Cloning shares the state.
///
/// ```no_run
/// use std::time::Duration;
/// use portcullis_layers::token_bucket::{KeyLimits, TokenBucketConfig, TokenBucketLayer};
/// use portcullis_redis::{FailurePolicy, RedisConfig, RedisStore};
///
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let limits = TokenBucketConfig::new()
///     .limit("openai:gpt-4o-mini", KeyLimits::rpm_tpm(500, 200_000)?)
///     .max_wait(Duration::from_secs(10));
/// let redis = RedisConfig::new("redis://127.0.0.1:6379/")
///     .failure_policy(FailurePolicy::FailOpen)
///     .timeout(Duration::from_millis(50));
/// let store: RedisStore = RedisStore::new("openai", limits.clone(), redis)?;
/// store.ping().await?; // optional: check Redis answers at startup
/// let layer = TokenBucketLayer::from_store("openai", store, limits.max_wait).max_pause(limits.max_pause);
/// # let _ = layer; Ok(()) }
/// ```
pub struct RedisStore<K = Arc<str>> {
    shared: Arc<Shared<K>>,
}

impl<K> Clone for RedisStore<K> {
    fn clone(&self) -> Self {
        RedisStore {
            shared: self.shared.clone(),
        }
    }
}

impl<K> Debug for RedisStore<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("name", &self.shared.name)
            .field("url", &self.shared.remote.config.url)
            .field("prefix", &self.shared.remote.config.prefix)
            .field("failure_policy", &self.shared.remote.config.failure_policy)
            .finish_non_exhaustive()
    }
}

/// A reservation in a [`RedisStore`]: in Redis, or in the local fallback while Redis was down.
#[derive(Debug)]
pub struct RedisTicket(TicketInner);

#[derive(Debug)]
enum TicketInner {
    Remote(RemoteTicket),
    Local(MemoryTicket),
}

pub(crate) struct RemoteTicket {
    entry: Arc<Entry>,
    seq: i64,
    prev_floor: i64,
    cost: PerBucket<u64>,
    tat_before: PerBucket<i64>,
    tat_after: PerBucket<i64>,
    epoch: PerBucket<i64>,
}

impl Debug for RemoteTicket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteTicket")
            .field("key", &self.entry.redis_key)
            .field("seq", &self.seq)
            .field("cost", &self.cost)
            .finish_non_exhaustive()
    }
}

impl RedisTicket {
    /// Whether the reservation was made in Redis (not in the local fallback).
    pub fn is_shared(&self) -> bool {
        matches!(self.0, TicketInner::Remote(_))
    }
}

/// The future of [`RedisStore::reserve`]: one round trip (boxed: the round trip, not the
/// allocation, is the cost).
pub struct ReserveFuture(
    Pin<Box<dyn Future<Output = Result<Admission<RedisTicket>, Denied>> + Send + 'static>>,
);

impl Future for ReserveFuture {
    type Output = Result<Admission<RedisTicket>, Denied>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.0.as_mut().poll(cx)
    }
}

impl Debug for ReserveFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ReserveFuture")
    }
}

impl<K> RedisStore<K>
where
    K: Clone + Eq + Hash + KeyLabel + Send + Sync + 'static,
{
    /// A store for the provider `name` (keys read `name:label`), with the limits of `config`,
    /// in the Redis of `redis`. Both configurations are validated. Connects lazily: an
    /// unreachable Redis is not an error here (see [`ping`](Self::ping)). Must be called inside
    /// a Tokio runtime, where it spawns its background task.
    pub fn new(
        name: impl Into<Arc<str>>,
        config: TokenBucketConfig,
        redis: RedisConfig,
    ) -> Result<Self, Error> {
        let name = name.into();
        redis.validate()?;
        config.validate()?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        let local = MemoryStore::new(name.clone(), scaled(&config, redis.fail_open_share)?)?;
        let client = redis::Client::open(redis.url.as_str())?;
        let conn_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(redis.timeout.max(Duration::from_millis(500))))
            .set_response_timeout(None)
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(20))
            .set_max_delay(redis.retry_interval);
        let conn = {
            let _guard = runtime.enter();
            ConnectionManager::new_lazy_with_config(client, conn_config)?
        };
        let remote = Arc::new(Remote {
            conn,
            scripts: Scripts::new(),
            config: redis,
            health: Mutex::new(Health {
                down: false,
                retry_at: Instant::now(),
            }),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        runtime.spawn(worker(remote.clone(), rx));
        Ok(RedisStore {
            shared: Arc::new(Shared {
                name,
                config,
                remote,
                keys: RwLock::new(HashMap::new()),
                local,
                tx,
            }),
        })
    }

    /// The token bucket configuration the store was built with.
    pub fn config(&self) -> &TokenBucketConfig {
        &self.shared.config
    }

    /// The Redis configuration.
    pub fn redis_config(&self) -> &RedisConfig {
        &self.shared.remote.config
    }

    /// Whether Redis counts as unavailable: from a failed round trip until one succeeds.
    pub fn is_degraded(&self) -> bool {
        self.shared.remote.is_down()
    }

    /// The Redis key of `key`'s buckets: `{prefix}{name}:{label}`.
    pub fn redis_key(&self, key: &K) -> String {
        self.entry(key).redis_key.clone()
    }

    /// Sends `PING` and returns the round-trip time, within the timeout.
    pub async fn ping(&self) -> Result<Duration, Error> {
        let remote = &self.shared.remote;
        let mut conn = remote.conn.clone();
        let start = Instant::now();
        tokio::time::timeout(
            remote.config.timeout,
            redis::cmd("PING").query_async::<String>(&mut conn),
        )
        .await
        .map_err(|_| Error::Timeout(remote.config.timeout))??;
        Ok(start.elapsed())
    }

    /// Waits until the background updates sent so far (refunds, pauses, clamps, limits) are
    /// applied or dropped. Each takes at most the timeout.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.shared.tx.send(Job::Flush(done)).is_ok() {
            let _ = wait.await;
        }
    }

    /// The levels of `key` as Redis has them now (one round trip, within the timeout).
    pub async fn fetch_levels(&self, key: &K) -> Result<Levels, Error> {
        let entry = self.entry(key);
        let remote = &self.shared.remote;
        let limits = entry.limits();
        let reply = remote
            .run(&entry, &remote.scripts.fetch, limits, |_| {})
            .await?;
        let state = State::parse(&reply)?;
        entry.observe(state);
        Ok(levels_of(limits, &state, state.now))
    }

    fn entry(&self, key: &K) -> Arc<Entry> {
        let keys = &self.shared.keys;
        if let Some(e) = keys.read().unwrap_or_else(PoisonError::into_inner).get(key) {
            return e.clone();
        }
        let label = key.label();
        let name = &*self.shared.name;
        let limits = self.shared.config.resolve(name, &label).unwrap_or_else(|| {
            tracing::warn!(
                key = %key_name(name, &label),
                "token bucket: no limits configured for this key and no default; not limited"
            );
            KeyLimits::unlimited()
        });
        let redis_key = format!(
            "{}{}",
            self.shared.remote.config.prefix,
            key_name(name, &label)
        );
        keys.write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key.clone())
            .or_insert_with(|| {
                Arc::new(Entry {
                    redis_key,
                    state: Mutex::new(EntryState { limits, seen: None }),
                })
            })
            .clone()
    }

    fn send(&self, entry: Arc<Entry>, op: Op) {
        // The receiver lives as long as the runtime; after it shut down there is no one to
        // send to, and nothing to do.
        let _ = self.shared.tx.send(Job::Op(entry, op));
    }

    fn fallback(&self) -> bool {
        self.shared.remote.config.failure_policy == FailurePolicy::FailOpen
            && self.shared.remote.is_down()
    }
}

/// `name:label`, or whichever is not empty.
fn key_name(name: &str, label: &str) -> String {
    match (name.is_empty(), label.is_empty()) {
        (_, true) => name.to_owned(),
        (true, false) => label.to_owned(),
        (false, false) => format!("{name}:{label}"),
    }
}

/// Every bucket of `limits` scaled by `share` (capacities at least 1).
fn scale(limits: KeyLimits, share: f64) -> Result<KeyLimits, Error> {
    if share >= 1.0 {
        return Ok(limits);
    }
    let rate = |r: Option<Rate>| {
        r.map(|r| {
            let capacity = ((r.capacity() as f64 * share).floor() as u64).max(1);
            Rate::new(capacity, r.refill_per_sec() * share)
        })
        .transpose()
    };
    let r = PerBucket::from(limits);
    let mut out = KeyLimits::unlimited();
    out.requests = rate(r.requests)?;
    out.tokens = rate(r.tokens)?;
    out.input_tokens = rate(r.input)?;
    out.output_tokens = rate(r.output)?;
    Ok(out)
}

/// The configuration with every limit scaled by `share`: the fail-open fallback's.
fn scaled(config: &TokenBucketConfig, share: f64) -> Result<TokenBucketConfig, Error> {
    let mut out = config.clone();
    for l in out.limits.values_mut() {
        *l = scale(*l, share)?;
    }
    if let Some(d) = out.default.as_mut() {
        *d = scale(*d, share)?;
    }
    Ok(out)
}

impl<K> BucketStore for RedisStore<K>
where
    K: Clone + Eq + Hash + KeyLabel + Send + Sync + 'static,
{
    type Key = K;
    type Ticket = RedisTicket;
    type Reserve = ReserveFuture;

    fn reserve(&self, key: &K, cost: TokenCost, max_wait: Duration) -> ReserveFuture {
        let entry = self.entry(key);
        let store = self.clone();
        let key = key.clone();
        ReserveFuture(Box::pin(async move {
            let remote = &store.shared.remote;
            if remote.gate() {
                let limits = entry.limits();
                let c = PerBucket::from(cost);
                let mut args = c.map(sat).into_array().to_vec();
                args.push(micros(max_wait));
                let reply = remote
                    .run(&entry, &remote.scripts.reserve, limits, |i| ints(i, &args))
                    .await
                    .and_then(|r| crate::script::parse_reserve(&r));
                match reply {
                    Ok(r) => {
                        remote.succeeded();
                        return r.map(|(wait, t, state)| {
                            entry.observe(state);
                            Admission {
                                wait,
                                ticket: RedisTicket(TicketInner::Remote(RemoteTicket {
                                    entry: entry.clone(),
                                    seq: t.seq,
                                    prev_floor: t.prev_floor,
                                    cost: c,
                                    tat_before: t.tat_before,
                                    tat_after: t.tat_after,
                                    epoch: t.epoch,
                                })),
                            }
                        });
                    }
                    Err(e) => remote.failed(&e),
                }
            }
            match remote.config.failure_policy {
                FailurePolicy::FailOpen => {
                    let a = store.shared.local.reserve(&key, cost, max_wait).await?;
                    Ok(Admission {
                        wait: a.wait,
                        ticket: RedisTicket(TicketInner::Local(a.ticket)),
                    })
                }
                FailurePolicy::FailClosed => Err(Denied::Throttled {
                    retry_after: remote.until_retry(),
                }),
            }
        }))
    }

    fn settle(&self, ticket: RedisTicket, settlement: Settlement) {
        match ticket.0 {
            TicketInner::Local(t) => self.shared.local.settle(t, settlement),
            TicketInner::Remote(t) => {
                let (cancelled, actual) = match settlement {
                    Settlement::Cancelled => (true, PerBucket::default()),
                    Settlement::Used(c) => (false, PerBucket::from(c)),
                };
                let entry = t.entry.clone();
                self.send(
                    entry,
                    Op::Settle {
                        ticket: t,
                        cancelled,
                        actual,
                    },
                );
            }
        }
    }

    fn paused_for(&self, ticket: &RedisTicket) -> Option<Duration> {
        match &ticket.0 {
            TicketInner::Local(t) => self.shared.local.paused_for(t),
            TicketInner::Remote(t) => t.entry.paused_for(),
        }
    }

    fn pause(&self, key: &K, duration: Duration) {
        // At most a year: the server's arithmetic (µs in a Lua number) stays exact.
        let duration = duration.min(portcullis_core::config::MAX_DURATION);
        self.shared.local.pause(key, duration);
        let entry = self.entry(key);
        entry.pause_locally(duration);
        self.send(entry, Op::Pause(duration));
    }

    fn clear_pause(&self, key: &K) {
        self.shared.local.clear_pause(key);
        let entry = self.entry(key);
        if let Some(seen) = lock(&entry.state).seen.as_mut() {
            seen.0.paused = 0;
        }
        self.send(entry, Op::ClearPause);
    }

    fn clamp(&self, key: &K, remaining: Remaining) {
        self.shared.local.clamp(key, remaining);
        self.send(self.entry(key), Op::Clamp(remaining));
    }

    fn set_limits(&self, key: &K, limits: KeyLimits) {
        let share = self.shared.remote.config.fail_open_share;
        // Scaling valid limits by a share in (0, 1] cannot fail.
        if let Ok(local) = scale(limits, share) {
            self.shared.local.set_limits(key, local);
        }
        let entry = self.entry(key);
        let old = std::mem::replace(&mut lock(&entry.state).limits, limits);
        self.send(entry, Op::SetLimits { old, new: limits });
    }

    fn levels<Q>(&self, key: &Q) -> Option<Levels>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if self.fallback() {
            if let Some(l) = self.shared.local.levels(key) {
                return Some(l);
            }
        }
        let entry = self
            .shared
            .keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .cloned()?;
        entry.levels()
    }

    fn snapshot(&self) -> Vec<(K, Levels)> {
        if self.fallback() {
            return self.shared.local.snapshot();
        }
        let keys = self
            .shared
            .keys
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        keys.iter()
            .filter_map(|(k, e)| Some((k.clone(), e.levels()?)))
            .collect()
    }
}
