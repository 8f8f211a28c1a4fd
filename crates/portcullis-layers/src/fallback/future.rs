use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use pin_project_lite::pin_project;
use portcullis_core::{
    Classification, Classify, DeadlineExceeded, Failover, OnFinish, Refusal, Replay, RequestInfo,
    RetryStop,
};
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use super::choose::{FailoverPolicy, choose};
use super::service::Entry;
use crate::retry::{Attempt, Decision, Policy};

pin_project! {
    /// The response future of [`Fallback`](super::Fallback): `Calling` (an attempt in flight)
    /// → the next entry is chosen → `Readying` (its clone driven ready) → `Calling` …, with
    /// `Waiting` (a backoff sleep) only when no entry can take the call now.
    ///
    /// Dropping it drops whatever it holds at that moment (the attempt and the permits and
    /// reservations of its layers, or the timer): nothing runs after it is gone.
    pub struct FallbackFuture<S, Req, P>
    where
        S: Service<Req>,
    {
        #[pin]
        state: State<S::Future, S>,
        chain: Arc<[Entry<S, Req, P>]>,
        order: FailoverPolicy,
        // The caller's request, before any remap; `None` when it cannot be replayed.
        req: Option<Req>,
        // The (remapped) copy the entry being readied will get.
        next: Option<Req>,
        // The entry of the attempt in flight, being readied, or slept for.
        idx: usize,
        started: Instant,
        attempts: u32,
        // Per entry, once a first attempt failed (nothing is allocated on the happy path).
        slots: Option<Box<[Slot]>>,
        // The entries best first, when a ranking ordered them for this request (a pool);
        // `None`: in the chain's order.
        ranked: Option<Box<[usize]>>,
        // The `gen_ai.attempt` span of the attempt in flight (disabled without a subscriber).
        span: tracing::Span,
    }
}

/// The span of one attempt: a child of the call's span, entered while the attempt is made and
/// polled. The breaker records its state at admission on it, the bucket its wait.
pub(super) fn attempt_span(entry: &str, attempt: u32) -> tracing::Span {
    tracing::info_span!(
        "gen_ai.attempt",
        portcullis.attempt = attempt,
        portcullis.entry = entry,
        portcullis.breaker.state = tracing::field::Empty,
        portcullis.bucket.wait_ms = tracing::field::Empty,
        error.type = tracing::field::Empty,
        portcullis.retry.reason = tracing::field::Empty,
        portcullis.retry.delay_ms = tracing::field::Empty,
    )
}

pin_project! {
    #[project = StateProj]
    enum State<F, S> {
        Calling { #[pin] fut: F },
        Readying { svc: S },
        // Boxed: a backoff is the rare path.
        Waiting { sleep: Pin<Box<Sleep>> },
        // The request's deadline had passed at the call: no attempt is made.
        Expired,
    }
}

/// What a call knows of one entry.
#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    /// Attempts sent to it.
    tries: u32,
    /// Not before this: its policy's backoff or `Retry-After`.
    ready_at: Option<Instant>,
    /// The delay its policy gave last.
    last_delay: Duration,
    /// Out of this call: its policy gave up, or the failure allows no fallback to it.
    out: bool,
}

/// Where the next attempt goes.
enum Next {
    /// This entry, at once.
    Now(usize),
    /// No entry can take the call now: sleep until this entry's backoff ends.
    Sleep(usize, Instant),
}

impl<S, Req, P> fmt::Debug for FallbackFuture<S, Req, P>
where
    S: Service<Req>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::Calling { .. } => "calling",
            State::Readying { .. } => "readying",
            State::Waiting { .. } => "waiting",
            State::Expired => "expired",
        };
        f.debug_struct("FallbackFuture")
            .field("state", &state)
            .field("entry", &self.idx)
            .field("attempts", &self.attempts)
            .finish_non_exhaustive()
    }
}

impl<S, Req, P> FallbackFuture<S, Req, P>
where
    S: Service<Req>,
{
    fn with(
        state: State<S::Future, S>,
        chain: Arc<[Entry<S, Req, P>]>,
        order: FailoverPolicy,
        req: Option<Req>,
        started: Instant,
    ) -> Self {
        FallbackFuture {
            state,
            chain,
            order,
            req,
            next: None,
            idx: 0,
            started,
            attempts: 0,
            slots: None,
            ranked: None,
            span: tracing::Span::none(),
        }
    }

    /// Sets the order this call tries the entries in (a ranking's, best first).
    pub(super) fn ranked(mut self, ranked: Option<Box<[usize]>>) -> Self {
        self.ranked = ranked;
        self
    }

    /// The first attempt, sent to the primary the service drove ready.
    pub(super) fn called(
        fut: S::Future,
        span: tracing::Span,
        chain: Arc<[Entry<S, Req, P>]>,
        order: FailoverPolicy,
        req: Option<Req>,
        started: Instant,
    ) -> Self {
        let mut f = Self::with(State::Calling { fut }, chain, order, req, started);
        f.attempts = 1;
        f.span = span;
        f
    }

    /// The first attempt, for entry `idx` (the primary could not take it now).
    pub(super) fn readying(
        svc: S,
        idx: usize,
        copy: Req,
        chain: Arc<[Entry<S, Req, P>]>,
        order: FailoverPolicy,
        req: Option<Req>,
        started: Instant,
    ) -> Self {
        let mut f = Self::with(State::Readying { svc }, chain, order, req, started);
        f.idx = idx;
        f.next = Some(copy);
        f
    }

    /// A request whose deadline had passed.
    pub(super) fn expired(
        chain: Arc<[Entry<S, Req, P>]>,
        order: FailoverPolicy,
        started: Instant,
    ) -> Self {
        Self::with(State::Expired, chain, order, None, started)
    }
}

impl<S, Req, P> Future for FallbackFuture<S, Req, P>
where
    S: Service<Req> + Clone,
    S::Response: OnFinish,
    S::Error: Classify + From<Refusal> + fmt::Display,
    Req: Replay + RequestInfo,
    P: Policy<Req, S::Response, S::Error>,
{
    type Output = Result<S::Response, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Calling { fut } => {
                    let outcome = {
                        let _attempt = this.span.enter();
                        ready!(fut.poll(cx))
                    };
                    // An `Ok` that stands for a failure (an HTTP 503) is treated as the error
                    // would be; with nowhere to go it is returned as it is.
                    let class = match &outcome {
                        Ok(res) => match res.failure() {
                            Some(class) => class,
                            None => return Poll::Ready(outcome),
                        },
                        Err(err) => err.classify(),
                    };
                    let Some(req) = this.req.as_ref() else {
                        return Poll::Ready(outcome);
                    };
                    let chain = &**this.chain;
                    let from = *this.idx;
                    let now = Instant::now();
                    let slots = this.slots.get_or_insert_with(|| {
                        let mut slots = vec![Slot::default(); chain.len()].into_boxed_slice();
                        // Only the first attempt was made, to this entry.
                        slots[from].tries = 1;
                        slots
                    });
                    scope(chain, slots, from, &class);
                    this.span
                        .record("error.type", crate::telemetry::reason(&class));
                    let stop = judge(chain, slots, from, req, &outcome, *this.started, now);
                    let next = match this.order {
                        FailoverPolicy::FailoverFirst => {
                            fail_over_first(chain, slots, this.ranked.as_deref(), req, now)
                        }
                        FailoverPolicy::RetryEachThenFallback => retry_each(slots, from, now),
                    };
                    match next {
                        None => return give_up(outcome, *this.attempts, stop),
                        Some(Next::Sleep(to, until)) => {
                            log_backoff(chain, to, until - now, &outcome, &class);
                            this.span.record(
                                "portcullis.retry.delay_ms",
                                (until - now).as_millis() as u64,
                            );
                            this.span.record(
                                "portcullis.retry.reason",
                                crate::telemetry::reason(&class),
                            );
                            crate::telemetry::retry(crate::telemetry::reason(&class));
                            *this.idx = to;
                            let sleep = Box::pin(tokio::time::sleep_until(until));
                            this.state.set(State::Waiting { sleep });
                        }
                        Some(Next::Now(to)) => {
                            let Some(copy) = req.replay() else {
                                return Poll::Ready(outcome);
                            };
                            log_failover(chain, from, to, &outcome);
                            match from == to {
                                true => crate::telemetry::retry(crate::telemetry::reason(&class)),
                                false => {
                                    crate::telemetry::failover(&chain[from].name, &chain[to].name)
                                }
                            }
                            *this.idx = to;
                            *this.next = Some(chain[to].remapped(copy));
                            let svc = chain[to].service.clone();
                            this.state.set(State::Readying { svc });
                        }
                    }
                }
                StateProj::Waiting { sleep } => {
                    ready!(sleep.as_mut().poll(cx));
                    let (chain, now) = (&**this.chain, Instant::now());
                    let (Some(req), Some(slots)) = (this.req.as_ref(), this.slots.as_deref())
                    else {
                        unreachable!("a backoff follows a failure of a replayable request");
                    };
                    // Entries in order again: the first that can take the call now (the one
                    // slept for, at the latest).
                    let to = match this.order {
                        FailoverPolicy::FailoverFirst => {
                            match fail_over_first(chain, slots, this.ranked.as_deref(), req, now) {
                                Some(Next::Now(to)) => to,
                                _ => *this.idx,
                            }
                        }
                        FailoverPolicy::RetryEachThenFallback => *this.idx,
                    };
                    let Some(copy) = req.replay() else {
                        unreachable!("a replayable request replays");
                    };
                    *this.idx = to;
                    *this.next = Some(chain[to].remapped(copy));
                    let svc = chain[to].service.clone();
                    this.state.set(State::Readying { svc });
                }
                StateProj::Readying { svc } => {
                    ready!(svc.poll_ready(cx))?;
                    let entry = &this.chain[*this.idx];
                    if let Some(slot) = this.slots.as_deref_mut().map(|s| &mut s[*this.idx]) {
                        // A budget counts each entry's calls as requests, as a retry layer
                        // inside the entry would.
                        if slot.tries == 0 {
                            if let (Some(p), Some(req)) = (&entry.policy, this.req.as_ref()) {
                                p.on_request_at(req, Instant::now());
                            }
                        }
                        slot.tries = slot.tries.saturating_add(1);
                    }
                    *this.attempts = this.attempts.saturating_add(1);
                    let copy = this
                        .next
                        .take()
                        .expect("an attempt's copy is made when it is chosen");
                    *this.span = attempt_span(&entry.name, *this.attempts);
                    let fut = {
                        let _attempt = this.span.enter();
                        svc.call(copy)
                    };
                    this.state.set(State::Calling { fut });
                }
                StateProj::Expired => {
                    return Poll::Ready(Err(crate::refuse(DeadlineExceeded {})));
                }
            }
        }
    }
}

/// Narrows the entries left by what the failure allows: none but the failed one when it
/// allows no fallback (the request itself is wrong), only larger-context entries after a
/// context-length error.
fn scope<S, Req, P>(
    chain: &[Entry<S, Req, P>],
    slots: &mut [Slot],
    from: usize,
    c: &Classification,
) {
    for (i, (slot, entry)) in slots.iter_mut().zip(chain).enumerate() {
        slot.out |= match c.failover {
            Failover::Eligible => false,
            Failover::Never => i != from,
            Failover::LargerContext => !entry.larger_context,
        };
    }
}

/// Asks the failed entry's policy whether and when it may be tried again in this call; returns
/// why it stopped, if it gave up.
fn judge<S, Req, P, T, E>(
    chain: &[Entry<S, Req, P>],
    slots: &mut [Slot],
    from: usize,
    req: &Req,
    outcome: &Result<T, E>,
    started: Instant,
    now: Instant,
) -> Option<RetryStop>
where
    Req: RequestInfo,
    P: Policy<Req, T, E>,
{
    let slot = &mut slots[from];
    let Some(policy) = &chain[from].policy else {
        slot.out = true;
        return None;
    };
    let attempt = Attempt {
        request: req,
        number: slot.tries,
        elapsed: now.saturating_duration_since(started),
        last_delay: slot.last_delay,
        deadline: req.deadline(),
    };
    match policy.decide(&attempt, outcome.as_ref()) {
        Decision::Accept => {
            slot.out = true;
            None
        }
        Decision::Retry(delay) if attempt.allows(delay) => {
            slot.ready_at = Some(crate::after(now, delay));
            slot.last_delay = delay;
            None
        }
        Decision::Retry(_) => {
            slot.out = true;
            Some(RetryStop::Deadline)
        }
        Decision::GiveUp(stop) => {
            slot.out = true;
            Some(stop)
        }
    }
}

/// Failing over first: the first entry, in order, that can take the call now (neither backing
/// off nor refused by its gate). If none can, and the soonest is backing off, sleep until its
/// backoff ends; if the soonest is only held by its gate (an open breaker, a paused bucket), it
/// is called: its own layers refuse at once or wait as they are configured to.
fn fail_over_first<S, Req, P>(
    chain: &[Entry<S, Req, P>],
    slots: &[Slot],
    ranked: Option<&[usize]>,
    req: &Req,
    now: Instant,
) -> Option<Next> {
    let backoff = |i: usize| {
        slots[i]
            .ready_at
            .map_or(Duration::ZERO, |t| t.saturating_duration_since(now))
    };
    let candidates = in_order(chain.len(), ranked)
        .filter(|i| !slots[*i].out)
        .map(|i| (i, backoff(i).max(chain[i].wait(req))));
    let choice = choose(candidates)?;
    let backing_off = backoff(choice.index);
    Some(match backing_off.is_zero() {
        true => Next::Now(choice.index),
        false => Next::Sleep(choice.index, now + backing_off),
    })
}

/// The entries' indices in the order to try them: the ranking's, else the chain's.
pub(super) fn in_order(n: usize, ranked: Option<&[usize]>) -> impl Iterator<Item = usize> + '_ {
    (0..n).map(move |k| ranked.map_or(k, |r| r[k]))
}

/// Retrying each entry, then falling back: the failed entry after its backoff while its policy
/// allows, else the next entry left, at once.
fn retry_each(slots: &[Slot], from: usize, now: Instant) -> Option<Next> {
    let slot = &slots[from];
    if !slot.out {
        return Some(match slot.ready_at {
            Some(t) if t > now => Next::Sleep(from, t),
            _ => Next::Now(from),
        });
    }
    (from + 1..slots.len())
        .find(|i| !slots[*i].out)
        .map(Next::Now)
}

/// Ends the call: a success as is, an error told how many attempts were made and why they
/// stopped ([`Classify::retries_exhausted`]), if a policy gave up.
fn give_up<R, E: Classify>(
    outcome: Result<R, E>,
    attempts: u32,
    stop: Option<RetryStop>,
) -> Poll<Result<R, E>> {
    Poll::Ready(match stop {
        Some(stop) => outcome.map_err(|last| last.retries_exhausted(attempts, stop)),
        None => outcome,
    })
}

/// Why an attempt failed, for logs.
fn reason<T, E: fmt::Display>(
    outcome: &Result<T, E>,
) -> tracing::field::DisplayValue<&dyn fmt::Display> {
    match outcome {
        Err(e) => tracing::field::display(e as &dyn fmt::Display),
        Ok(_) => {
            tracing::field::display(&"a response that classifies as a failure" as &dyn fmt::Display)
        }
    }
}

fn log_failover<S, Req, P, T, E: fmt::Display>(
    chain: &[Entry<S, Req, P>],
    from: usize,
    to: usize,
    outcome: &Result<T, E>,
) {
    match from == to {
        true => tracing::warn!(provider = %chain[to].name, reason = reason(outcome), "retrying"),
        false => tracing::warn!(
            from = %chain[from].name,
            to = %chain[to].name,
            reason = reason(outcome),
            "failing over"
        ),
    }
}

fn log_backoff<S, Req, P, T, E: fmt::Display>(
    chain: &[Entry<S, Req, P>],
    to: usize,
    delay: Duration,
    outcome: &Result<T, E>,
    class: &Classification,
) {
    tracing::warn!(
        provider = %chain[to].name,
        delay_ms = delay.as_millis() as u64,
        retry_after = class.retry_after.is_some(),
        reason = reason(outcome),
        "no entry can take the call now; retrying after a backoff"
    );
}
