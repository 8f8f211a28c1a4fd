//! [`RedisStore`]: the token bucket's state in Redis, shared by every instance that points at
//! the same server and prefix.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::fmt::{self, Debug};
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use portcullis_core::{RateLimitHints, TokenCost};
use portcullis_layers::token_bucket::{
    Admission, BucketStore, Denied, KeyLabel, KeyLimits, Levels, MemoryStore, MemoryTicket,
    PerBucket, Rate, Remaining, Settlement, TokenBucketConfig,
};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::script::{BOUND, Scripts, State};
use crate::{Error, FailurePolicy, RedisConfig};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One key of the store: its Redis key, its limits, what the last round trip said, and this
/// instance's waiters (whose slots a refund may move earlier).
pub(crate) struct Entry {
    pub(crate) redis_key: String,
    state: Mutex<EntryState>,
    waiters: Mutex<HashMap<i64, Arc<Waiting>>>,
    tx: mpsc::UnboundedSender<Job>,
}

/// A waiter's slot on the local clock, and its task, woken when a refund moves the slot.
#[derive(Debug)]
struct Waiting(Mutex<(Instant, Option<Waker>)>);

impl Waiting {
    fn wait(&self, waker: &Waker) -> Duration {
        let mut w = lock(&self.0);
        let left = w.0.saturating_duration_since(Instant::now());
        if !left.is_zero() && !w.1.as_ref().is_some_and(|old| old.will_wake(waker)) {
            w.1 = Some(waker.clone());
        }
        left
    }

    fn move_to(&self, slot: Instant) {
        let mut w = lock(&self.0);
        if slot < w.0 {
            w.0 = slot;
            if let Some(waker) = w.1.take() {
                waker.wake();
            }
        }
    }
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

    /// Moves this instance's waiters as a refund's reply says: `(seq, slot)` pairs, slots on
    /// the server's clock, whose time was `server_now` when the reply left.
    fn moved(&self, pairs: &[i64], server_now: i64) {
        let arrived = Instant::now();
        let waiters = lock(&self.waiters);
        for pair in pairs.chunks_exact(2) {
            if let Some(w) = waiters.get(&pair[0]) {
                let ahead = pair[1].saturating_sub(server_now).clamp(0, BOUND) as u64;
                w.move_to(arrived + Duration::from_micros(ahead));
            }
        }
    }

    /// Sends an update to the background task.
    fn send(self: &Arc<Self>, op: Op) {
        // The receiver lives as long as the runtime; after it shut down there is no one to
        // send to, and nothing to do.
        let _ = self.tx.send(Job::Op(self.clone(), op));
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
        // (A float to integer cast saturates; the state's values are within `BOUND` of now.)
        queued = queued.max(tat.saturating_sub((cap * upu).floor() as i64));
        Some(cap - tat.saturating_sub(now).max(0) as f64 / upu)
    });
    let paused = s.paused.saturating_sub(now);
    Levels::new(
        limits,
        levels,
        (paused > 0).then(|| Duration::from_micros(paused as u64)),
        Duration::from_micros(queued.saturating_sub(now).clamp(0, BOUND) as u64),
    )
}

pub(crate) fn micros(d: Duration) -> i64 {
    d.as_micros().min(i64::MAX as u128) as i64
}

pub(crate) fn micros_per_unit(r: Rate) -> f64 {
    1e6 / r.refill_per_sec()
}

/// Successful probes in a row that bring a store that was off Redis back onto it: one lucky
/// reply from a Redis that is still flapping does not.
const RECOVER_AFTER: u32 = 2;
/// At most one line about Redis going away per this long (its return is logged when its
/// going was); the next line counts the transitions left unsaid.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Whether Redis is answering, and when to try it again if not.
#[derive(Debug)]
struct Health {
    down: bool,
    retry_at: Instant,
    /// Successful probes in a row while down.
    good: u32,
    /// When a health line was last logged.
    logged_at: Option<Instant>,
    /// Transitions (and key errors) not logged since.
    unlogged: u32,
    /// Whether the last time the store left Redis was logged: its return then is, too, so
    /// that every logged outage has its end in the log.
    said_down: bool,
}

/// What a health change should log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Say {
    /// Nothing (inside the log interval): counted for the next line.
    Nothing,
    /// A line, with how many went unsaid before it.
    Line { unsaid: u32 },
}

impl Health {
    fn new(now: Instant) -> Self {
        Health {
            down: false,
            retry_at: now,
            good: 0,
            logged_at: None,
            unlogged: 0,
            said_down: false,
        }
    }

    /// Whether this call should go to Redis: always while it is up; while it is down, one call
    /// per retry interval (the probe), and at once after a probe that succeeded (to confirm).
    fn gate(&mut self, now: Instant, interval: Duration) -> bool {
        if !self.down || self.good > 0 {
            return true;
        }
        if now >= self.retry_at {
            self.retry_at = now + interval;
            return true;
        }
        false
    }

    /// A round trip succeeded; `Line` when the store is back on Redis and says so.
    fn succeeded(&mut self, now: Instant) -> Option<Say> {
        if !self.down {
            return None;
        }
        self.good += 1;
        if self.good < RECOVER_AFTER {
            return None;
        }
        self.down = false;
        self.good = 0;
        if std::mem::take(&mut self.said_down) {
            self.logged_at = Some(now);
            return Some(Say::Line {
                unsaid: std::mem::take(&mut self.unlogged),
            });
        }
        self.unlogged += 1;
        Some(Say::Nothing)
    }

    /// Redis failed (down, slow, or refusing): `Line` when the store leaves Redis and says so.
    fn failed(&mut self, now: Instant, interval: Duration) -> Option<Say> {
        self.retry_at = now + interval;
        self.good = 0;
        if self.down {
            return None;
        }
        self.down = true;
        let say = self.say(now);
        self.said_down = say != Say::Nothing;
        Some(say)
    }

    /// Whether to log now, at most once per [`LOG_EVERY`].
    fn say(&mut self, now: Instant) -> Say {
        match self.logged_at {
            Some(at) if now.saturating_duration_since(at) < LOG_EVERY => {
                self.unlogged += 1;
                Say::Nothing
            }
            _ => {
                self.logged_at = Some(now);
                Say::Line {
                    unsaid: std::mem::take(&mut self.unlogged),
                }
            }
        }
    }
}

/// Everything the background task shares with the store (no key type).
pub(crate) struct Remote {
    conn: ConnectionManager,
    pub(crate) scripts: Scripts,
    config: RedisConfig,
    health: Mutex<Health>,
    /// This instance's id in the reservations it makes (48 bits: exact in Lua's numbers).
    owner: i64,
    /// Numbers the reservations in flight, to forget one whose caller gave up.
    tokens: AtomicI64,
}

impl Remote {
    /// Whether this call should go to Redis (see [`Health::gate`]).
    fn gate(&self) -> bool {
        lock(&self.health).gate(Instant::now(), self.config.retry_interval)
    }

    fn until_retry(&self) -> Duration {
        let h = lock(&self.health);
        h.retry_at
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    }

    fn succeeded(&self) {
        let say = lock(&self.health).succeeded(Instant::now());
        if let Some(Say::Line { unsaid }) = say {
            tracing::info!(
                url = %self.config.url,
                unsaid,
                "token bucket: redis answers again; back to the shared buckets"
            );
        }
    }

    /// Records a failed round trip. An error about one key's data (a script error, a reply
    /// that does not parse) leaves the store on Redis: that call alone falls back, and the
    /// scripts repair the key on its next call. Anything else (no connection, a timeout, a
    /// server that refuses) takes the store off Redis until it answers again.
    fn failed(&self, error: &Error) {
        let now = Instant::now();
        if error.is_about_one_key() {
            let say = lock(&self.health).say(now);
            if let Say::Line { unsaid } = say {
                tracing::warn!(
                    %error,
                    unsaid,
                    "token bucket: a redis key gave an error; this call fell back, the key is repaired on its next call"
                );
            }
            return;
        }
        let say = lock(&self.health).failed(now, self.config.retry_interval);
        match say {
            None => tracing::debug!(%error, "token bucket: redis still unavailable"),
            Some(Say::Nothing) => {}
            Some(Say::Line { unsaid }) => match self.config.failure_policy {
                FailurePolicy::FailOpen => tracing::warn!(
                    url = %self.config.url,
                    %error,
                    unsaid,
                    "token bucket: redis unavailable; failing open to local buckets until it answers"
                ),
                FailurePolicy::FailClosed => tracing::warn!(
                    url = %self.config.url,
                    %error,
                    unsaid,
                    "token bucket: redis unavailable; failing closed (refusing) until it answers"
                ),
            },
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

    /// Runs a script whose reply is the key's state (then, for a refund, the waiters of this
    /// instance it moved); records the outcome.
    async fn update(
        &self,
        entry: &Entry,
        script: &redis::Script,
        limits: KeyLimits,
        args: impl FnOnce(&mut redis::ScriptInvocation<'_>),
    ) {
        let result = self.run(entry, script, limits, args).await;
        match result.and_then(|r| Ok((State::parse(r.get(..7).unwrap_or(&r))?, r))) {
            Ok((state, reply)) => {
                entry.observe(state);
                entry.moved(&reply[7..], state.now);
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

/// How a reservation in Redis ends (the settle script's first argument).
#[derive(Debug, Clone, Copy)]
enum Ending {
    Cancelled = 0,
    Used = 1,
    /// Dropped unsettled: its charge stays.
    Kept = 2,
    /// Its caller gave up before the reply: `id` is its token, not its seq.
    Forgotten = 3,
}

/// A background update: what the synchronous methods send to Redis.
enum Op {
    Settle {
        ending: Ending,
        id: i64,
        estimate: PerBucket<u64>,
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

/// The most reservations forgotten while Redis was away that the worker keeps, to settle on
/// the next contact (beyond it the charge stays: the safe side).
const MAX_DEFERRED: usize = 10_000;

/// Sends the updates in order, one round trip each, each within the timeout. While Redis is
/// down they are dropped (a lost refund errs on the safe side; pauses and clamps also apply
/// locally), except the settlement of a reservation whose caller gave up before its reply
/// (the script may have run after all: a slow Redis still runs a script whose reply we
/// abandoned). Those are kept and sent on the next contact, so that a request that was never
/// sent is never charged to the shared bucket.
async fn worker(remote: Arc<Remote>, mut rx: mpsc::UnboundedReceiver<Job>) {
    let mut deferred: Vec<(Arc<Entry>, Op)> = Vec::new();
    while let Some(job) = rx.recv().await {
        let (entry, op) = match job {
            Job::Flush(done) => {
                if !deferred.is_empty() && !remote.is_down() {
                    for (entry, op) in std::mem::take(&mut deferred) {
                        apply(&remote, &entry, op).await;
                    }
                }
                let _ = done.send(());
                continue;
            }
            Job::Op(entry, op) => (entry, op),
        };
        if !remote.gate() {
            let forgotten = matches!(
                op,
                Op::Settle {
                    ending: Ending::Forgotten,
                    ..
                }
            );
            if forgotten && deferred.len() < MAX_DEFERRED {
                deferred.push((entry, op));
            } else {
                tracing::debug!(key = %entry.redis_key, "token bucket: redis down; update dropped");
            }
            continue;
        }
        apply(&remote, &entry, op).await;
        if !deferred.is_empty() && !remote.is_down() {
            for (entry, op) in std::mem::take(&mut deferred) {
                apply(&remote, &entry, op).await;
            }
        }
    }
}

/// Sends one update to Redis.
async fn apply(remote: &Remote, entry: &Entry, op: Op) {
    let limits = entry.limits();
    let s = &remote.scripts;
    match op {
        Op::Settle {
            ending,
            id,
            estimate,
            actual,
        } => {
            let mut args = vec![ending as i64, id, remote.owner];
            args.extend(estimate.map(sat));
            args.extend(actual.map(sat));
            remote
                .update(entry, &s.settle, limits, |i| ints(i, &args))
                .await;
        }
        Op::Pause(d) => {
            remote
                .update(entry, &s.pause, limits, |i| ints(i, &[micros(d)]))
                .await;
        }
        Op::ClearPause => {
            remote
                .update(entry, &s.clear_pause, limits, |i| ints(i, &[]))
                .await;
        }
        Op::Clamp(rem) => {
            let args = rem.map(|r| r.map_or(-1, sat)).into_array();
            remote
                .update(entry, &s.clamp, limits, |i| ints(i, &args))
                .await;
        }
        Op::SetLimits { old, new } => {
            // The old limits go as the common arguments, the new ones after them.
            remote
                .update(entry, &s.set_limits, old, |i| limit_args(i, new))
                .await;
        }
    }
}

/// A random id for this instance's reservations, 48 bits (exact in Lua's numbers). From the
/// standard library's per-process random hash keys: no dependency for one number.
fn owner_id() -> i64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    (h.finish() >> 16) as i64
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
///   methods for them are synchronous), one script call each. [`flush`](Self::flush) waits
///   for them.
/// - **Refunds** (see [Refunds in Redis](#refunds-in-redis)): exact, as in memory, for the
///   waiters of one instance; other instances' waiters keep their slots.
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
/// # Refunds in Redis
///
/// Redis keeps each key as the in-memory store's chain (see
/// [`gcra`](portcullis_layers::token_bucket::gcra)): a base, then one hash field per live
/// reservation (its slot, its cost, the instance that made it), each followed by the composed
/// step of what was settled, clamped or overrun after it. A reservation is O(1); a settlement
/// is one script call that reads the key's live reservations (O(their number)). What holds:
///
/// - **The chain is exact.** A cancellation removes its reservation and a refund lightens it,
///   in one script call, whatever the order: the levels in Redis are the GCRA over the
///   reservations not cancelled, and a queue cancelled in any order leaves the key as before
///   it.
/// - **Waiters move only within the instance that refunds.** The script reschedules the
///   waiters not yet due *of the instance that sends the refund*, to the earliest slot the
///   chain before them gives, and its reply moves and wakes them (one round trip after the
///   refund; in memory, at once). A script cannot reach another process's waiters, so theirs
///   keep their slots, exactly as due reservations do: nobody is ever admitted earlier than
///   the chain says. With every waiter of a key in one instance, queue and levels are those of
///   the in-memory store; across instances, a refund still reaches the refunding instance's
///   later waiters and every later arrival, but not the other instances' queued waiters.
/// - **A reservation whose caller gave up during its round trip** (dropped, or timed out) is
///   forgotten by a second script call, matched by a token of its instance.
/// - **What is lost**: updates dropped while Redis is unavailable (the charge stays: the safe
///   side), and refunds of reservations settled more than [`RedisConfig::idle_ttl`] after
///   their slot: a reservation nobody settles (its process crashed) keeps its charge and
///   leaves the chain then. Memory in Redis: one field per live reservation, plus those
///   abandoned within the idle TTL.
/// - **A limit change** starts a new chain, as in memory: reservations made before it keep
///   their slots and charges.
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

/// A reservation in Redis. Dropped unsettled, it tells Redis to keep its charge.
pub(crate) struct RemoteTicket {
    entry: Arc<Entry>,
    seq: i64,
    estimate: PerBucket<u64>,
    /// Its slot, while it is ahead (`None`: due at once).
    waiting: Option<Arc<Waiting>>,
    open: bool,
}

impl RemoteTicket {
    fn end(&mut self, ending: Ending, actual: PerBucket<u64>) {
        if !std::mem::take(&mut self.open) {
            return;
        }
        if self.waiting.take().is_some() {
            lock(&self.entry.waiters).remove(&self.seq);
        }
        let (id, estimate) = (self.seq, self.estimate);
        self.entry.send(Op::Settle {
            ending,
            id,
            estimate,
            actual,
        });
    }
}

impl Drop for RemoteTicket {
    fn drop(&mut self) {
        self.end(Ending::Kept, self.estimate);
    }
}

impl Debug for RemoteTicket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteTicket")
            .field("key", &self.entry.redis_key)
            .field("seq", &self.seq)
            .field("estimate", &self.estimate)
            .finish_non_exhaustive()
    }
}

/// Forgets a reservation in Redis whose reply never reached its caller (the caller gave up
/// during the round trip, or it timed out), unless disarmed.
struct Forget {
    entry: Arc<Entry>,
    token: i64,
    estimate: PerBucket<u64>,
    armed: bool,
}

impl Drop for Forget {
    fn drop(&mut self) {
        if self.armed {
            self.entry.send(Op::Settle {
                ending: Ending::Forgotten,
                id: self.token,
                estimate: self.estimate,
                actual: PerBucket::default(),
            });
        }
    }
}

impl RedisTicket {
    /// Whether the reservation was made in Redis (not in the local fallback).
    pub fn is_shared(&self) -> bool {
        matches!(self.0, TicketInner::Remote(_))
    }
}

/// The future of [`RedisStore::reserve`]: one round trip (boxed: the round trip, not the
/// allocation, is the cost). Dropped during the round trip, it has the reservation forgotten,
/// if the script made one.
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
            health: Mutex::new(Health::new(Instant::now())),
            owner: owner_id(),
            tokens: AtomicI64::new(0),
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
                    waiters: Mutex::new(HashMap::new()),
                    tx: self.shared.tx.clone(),
                })
            })
            .clone()
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
                let estimate = PerBucket::from(cost);
                let token = remote.tokens.fetch_add(1, Ordering::Relaxed);
                let mut forget = Forget {
                    entry: entry.clone(),
                    token,
                    estimate,
                    armed: true,
                };
                let mut args = estimate.map(sat).into_array().to_vec();
                args.extend([micros(max_wait), remote.owner, token]);
                let reply = remote
                    .run(&entry, &remote.scripts.reserve, limits, |i| ints(i, &args))
                    .await
                    .and_then(|r| crate::script::parse_reserve(&r));
                match reply {
                    Ok(r) => {
                        forget.armed = false;
                        remote.succeeded();
                        return r.map(|(wait, seq, state)| {
                            entry.observe(state);
                            let waiting = (!wait.is_zero()).then(|| {
                                let w =
                                    Arc::new(Waiting(Mutex::new((Instant::now() + wait, None))));
                                lock(&entry.waiters).insert(seq, w.clone());
                                w
                            });
                            let ticket = RemoteTicket {
                                entry: entry.clone(),
                                seq,
                                estimate,
                                waiting,
                                open: true,
                            };
                            Admission {
                                wait,
                                ticket: RedisTicket(TicketInner::Remote(ticket)),
                            }
                        });
                    }
                    // It may have run: `forget` has it forgotten.
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
            TicketInner::Remote(mut t) => match settlement {
                Settlement::Cancelled => t.end(Ending::Cancelled, PerBucket::default()),
                Settlement::Used(c) => t.end(Ending::Used, PerBucket::from(c)),
            },
        }
    }

    fn wait(&self, ticket: &RedisTicket, waker: &Waker) -> Duration {
        match &ticket.0 {
            TicketInner::Local(t) => self.shared.local.wait(t, waker),
            TicketInner::Remote(t) => {
                let slot = t.waiting.as_ref().map_or(Duration::ZERO, |w| w.wait(waker));
                slot.max(t.entry.paused_for().unwrap_or_default())
            }
        }
    }

    fn pause(&self, key: &K, duration: Duration) {
        // At most a year: the server's arithmetic (µs in a Lua number) stays exact.
        let duration = duration.min(portcullis_core::config::MAX_DURATION);
        self.shared.local.pause(key, duration);
        let entry = self.entry(key);
        entry.pause_locally(duration);
        entry.send(Op::Pause(duration));
    }

    fn clear_pause(&self, key: &K) {
        self.shared.local.clear_pause(key);
        let entry = self.entry(key);
        if let Some(seen) = lock(&entry.state).seen.as_mut() {
            seen.0.paused = 0;
        }
        entry.send(Op::ClearPause);
    }

    fn clamp(&self, key: &K, remaining: Remaining) {
        self.shared.local.clamp(key, remaining);
        self.entry(key).send(Op::Clamp(remaining));
    }

    fn set_limits(&self, key: &K, limits: KeyLimits) {
        let share = self.shared.remote.config.fail_open_share;
        // Scaling valid limits by a share in (0, 1] cannot fail.
        if let Ok(local) = scale(limits, share) {
            self.shared.local.set_limits(key, local);
        }
        let entry = self.entry(key);
        let old = std::mem::replace(&mut lock(&entry.state).limits, limits);
        entry.send(Op::SetLimits { old, new: limits });
    }

    fn learn_limits(&self, key: &K, stated: &RateLimitHints) {
        let shared = &self.shared;
        let Some(learned) = shared.config.learned(stated) else {
            return;
        };
        let limits = shared
            .config
            .with_learned(&shared.name, &key.label(), learned);
        if lock(&self.entry(key).state).limits != limits {
            self.set_limits(key, limits);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVAL: Duration = Duration::from_millis(100);

    /// Lines a run of outcomes logs: `true` a good round trip, `false` a failed one, each 50 ms
    /// apart.
    fn lines(outcomes: impl IntoIterator<Item = bool>) -> (usize, Health) {
        let t0 = Instant::now();
        let mut h = Health::new(t0);
        let mut said = 0;
        for (i, good) in outcomes.into_iter().enumerate() {
            let now = t0 + Duration::from_millis(50 * i as u64);
            let say = match good {
                true => h.succeeded(now),
                false => h.failed(now, INTERVAL),
            };
            if let Some(Say::Line { .. }) = say {
                said += 1;
            }
        }
        (said, h)
    }

    #[test]
    fn one_good_reply_does_not_end_an_outage() {
        let (_, h) = lines([false, true]);
        assert!(h.down);
        let (_, h) = lines([false, true, true]);
        assert!(!h.down);
        let (_, h) = lines([false, true, false, true]);
        assert!(h.down, "a failure in between starts the count again");
    }

    #[test]
    fn a_flapping_redis_logs_a_pair_per_interval_at_most() {
        // 8 s of a Redis that answers two in three: 160 round trips.
        let (said, h) = lines((0..160).map(|i| i % 3 != 0));
        // One outage and its end per 10 s: at most 2 lines.
        assert!(said <= 2, "{said} lines");
        assert!(h.unlogged > 0, "the transitions left unsaid are counted");
        // An outage and its end, alone: both logged.
        assert_eq!(lines([true, false, false, true, true]).0, 2);
    }

    #[test]
    fn while_down_one_probe_per_interval_and_a_confirmation_at_once() {
        let t0 = Instant::now();
        let mut h = Health::new(t0);
        assert!(h.gate(t0, INTERVAL));
        h.failed(t0, INTERVAL);
        assert!(!h.gate(t0 + Duration::from_millis(50), INTERVAL));
        assert!(h.gate(t0 + INTERVAL, INTERVAL), "the probe");
        assert!(!h.gate(t0 + INTERVAL, INTERVAL), "one per interval");
        h.succeeded(t0 + INTERVAL);
        assert!(
            h.gate(t0 + INTERVAL, INTERVAL),
            "a confirmation goes at once"
        );
    }
}
