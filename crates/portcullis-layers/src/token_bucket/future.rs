use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use pin_project_lite::pin_project;
use portcullis_core::{
    Classify, DeadlineExceeded, OnFinish, OverCapacity, RateLimitHints, Refusal, Throttled,
    TokenCost, Usage, tokens::UsageRule,
};
use tokio::time::{Instant, Sleep, sleep_until};
use tower_service::Service;

use super::KeyDisplay;
use super::per_bucket::Remaining;
use super::store::{BucketStore, Denied, KeyLabel, Settlement};

pin_project! {
    /// The response future of [`TokenBucket`](super::TokenBucket): reserves, sleeps until the
    /// slot, drives the inner service ready, calls it, then feeds the outcome back to the
    /// buckets. Dropping it before the inner call refunds the reservation.
    pub struct ResponseFuture<S, Req, St>
    where
        S: Service<Req>,
        St: BucketStore,
    {
        #[pin]
        state: State<St::Reserve, S::Future>,
        inner: S,
        req: Option<Req>,
        ctx: Ctx<St>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<R, F> {
        Reserve { #[pin] fut: R },
        // The request's deadline had passed at the call: nothing was reserved.
        Expired,
        // `limit`: the latest admission allowed, for a pause found on waking.
        Sleep { #[pin] sleep: Sleep, limit: Instant },
        Ready,
        Call { #[pin] fut: F },
        Done,
    }
}

/// Everything but the pinned state; its `Drop` refunds a reservation not yet used.
struct Ctx<St: BucketStore> {
    store: St,
    key: St::Key,
    name: Arc<str>,
    meters: crate::telemetry::BucketMeters,
    cost: TokenCost,
    /// Which reported tokens count against the limits (cache reads do not on current Anthropic
    /// models), from the cost function ([`CostOf::usage_rule`](portcullis_core::CostOf::usage_rule)).
    rule: UsageRule,
    /// The layer's longest wait, and the request's deadline: the latest admission allowed is
    /// the earlier of the two, worked out only when a wait is granted ([`Ctx::limit`]).
    max_wait: Duration,
    deadline: Option<Instant>,
    /// The longest pause a provider's hint may put on the key.
    max_pause: Duration,
    /// The reservation: refunded on drop while waiting; once `charged` (spent on the inner
    /// call), reconciled with the usage, never refunded.
    ticket: Option<St::Ticket>,
    charged: bool,
}

impl<St: BucketStore> Ctx<St> {
    /// The latest admission allowed: `max_wait` after `now` (when the wait was granted, which
    /// for the in-memory store is when the layer was called), or the deadline if earlier.
    fn limit(&self, now: Instant) -> Instant {
        let by_wait = crate::after(now, self.max_wait);
        self.deadline.map_or(by_wait, |d| d.min(by_wait))
    }

    /// The reservation while it is not spent.
    fn waiting(&self) -> Option<&St::Ticket> {
        self.ticket.as_ref().filter(|_| !self.charged)
    }

    fn refund(&mut self, why: &'static str) {
        if self.charged {
            return;
        }
        if let Some(t) = self.ticket.take() {
            tracing::debug!(
                key = %KeyDisplay(&self.name, &self.key.label()),
                cost = self.cost.total(),
                why,
                "token bucket: reservation refunded"
            );
            self.store.settle(t, Settlement::Cancelled);
        }
    }

    fn feedback(&self, hints: Option<&RateLimitHints>) {
        if let Some(h) = hints {
            self.store.learn_limits(&self.key, h);
            let remaining = Remaining::from_hints(h);
            if !remaining.is_empty() {
                self.store.clamp(&self.key, remaining);
            }
        }
    }

    fn rate_limited(&self, retry_after: Option<Duration>, hints: Option<&RateLimitHints>) {
        let from_resets = hints.and_then(|h| {
            [&h.requests, &h.tokens, &h.input_tokens, &h.output_tokens]
                .into_iter()
                .filter(|l| l.remaining == Some(0))
                .filter_map(|l| l.reset)
                .max()
        });
        let pause = retry_after
            .or_else(|| hints.and_then(|h| h.retry_after))
            .or(from_resets);
        let label = self.key.label();
        let key = tracing::field::display(KeyDisplay(&self.name, &label));
        match pause {
            Some(asked) => {
                let d = asked.min(self.max_pause);
                if d < asked {
                    tracing::warn!(
                        key,
                        asked_ms = u64::try_from(asked.as_millis()).unwrap_or(u64::MAX),
                        capped_ms = d.as_millis() as u64,
                        "token bucket: provider's pause longer than max_pause; capped"
                    );
                }
                tracing::warn!(
                    key,
                    pause_ms = d.as_millis() as u64,
                    "token bucket: provider rate-limited the key; pausing"
                );
                self.store.pause(&self.key, d);
            }
            None => {
                tracing::warn!(
                    key,
                    "token bucket: provider rate-limited the key without a reset hint; emptying its buckets"
                );
                self.store.clamp(&self.key, Remaining::splat(Some(0)));
            }
        }
    }
}

impl<St: BucketStore> Drop for Ctx<St> {
    fn drop(&mut self) {
        if self.charged {
            return;
        }
        if let Some(t) = self.ticket.take() {
            self.store.settle(t, Settlement::Cancelled);
        }
    }
}

impl<S, Req, St> ResponseFuture<S, Req, St>
where
    S: Service<Req>,
    St: BucketStore,
{
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        reserve: Option<St::Reserve>,
        inner: S,
        req: Req,
        store: St,
        key: St::Key,
        (name, meters): (Arc<str>, crate::telemetry::BucketMeters),
        cost: TokenCost,
        rule: UsageRule,
        max_wait: Duration,
        max_pause: Duration,
        deadline: Option<Instant>,
    ) -> Self {
        ResponseFuture {
            state: match reserve {
                Some(fut) => State::Reserve { fut },
                None => State::Expired,
            },
            inner,
            req: Some(req),
            ctx: Ctx {
                store,
                key,
                name,
                meters,
                cost,
                rule,
                max_wait,
                deadline,
                max_pause,
                ticket: None,
                charged: false,
            },
        }
    }
}

/// Usage a response reported, if it reported any (all zeros means none).
fn reported(usage: Option<Usage>) -> Option<Usage> {
    usage.filter(|u| u.input_tokens != 0 || u.output_tokens != 0 || u.total_tokens != 0)
}

impl<S, Req, St> Future for ResponseFuture<S, Req, St>
where
    S: Service<Req>,
    S::Response: OnFinish,
    S::Error: Classify + From<Refusal>,
    St: BucketStore,
{
    type Output = Result<S::Response, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Reserve { fut } => {
                    let ctx = &mut *this.ctx;
                    match ready!(fut.poll(cx)) {
                        Ok(adm) => {
                            ctx.ticket = Some(adm.ticket);
                            crate::telemetry::bucket_wait(&ctx.meters, &ctx.name, adm.wait);
                            tracing::Span::current()
                                .record("portcullis.bucket.wait_ms", adm.wait.as_millis() as u64);
                            #[cfg(feature = "metrics")]
                            if let Some(l) = crate::telemetry::sample_levels()
                                .then(|| ctx.store.levels(&ctx.key))
                                .flatten()
                            {
                                let limits = &l.limits;
                                let figures = |rate: Option<super::Rate>, level: Option<f64>| {
                                    Some((level?, rate?.capacity() as f64))
                                };
                                crate::telemetry::bucket_levels(
                                    &ctx.meters,
                                    &ctx.name,
                                    &ctx.key.label(),
                                    [
                                        ("requests", figures(limits.requests, l.levels.requests)),
                                        ("tokens", figures(limits.tokens, l.levels.tokens)),
                                        (
                                            "input_tokens",
                                            figures(limits.input_tokens, l.levels.input),
                                        ),
                                        (
                                            "output_tokens",
                                            figures(limits.output_tokens, l.levels.output),
                                        ),
                                    ],
                                );
                            }
                            if adm.wait.is_zero() {
                                this.state.set(State::Ready);
                            } else {
                                tracing::debug!(
                                    key = %KeyDisplay(&ctx.name, &ctx.key.label()),
                                    tokens = ctx.cost.total(),
                                    wait_ms = adm.wait.as_millis() as u64,
                                    "token bucket: waiting for a slot"
                                );
                                let now = Instant::now();
                                let limit = ctx.limit(now);
                                let sleep = sleep_until(crate::after(now, adm.wait));
                                this.state.set(State::Sleep { sleep, limit });
                            }
                        }
                        Err(refusal) => {
                            this.state.set(State::Done);
                            let label = ctx.key.label();
                            let key = tracing::field::display(KeyDisplay(&ctx.name, &label));
                            return Poll::Ready(Err(match refusal {
                                Denied::OverCapacity { cost, capacity } => {
                                    tracing::info!(
                                        key,
                                        cost,
                                        capacity,
                                        "token bucket: refused, cost over capacity"
                                    );
                                    crate::telemetry::refused(
                                        &ctx.meters,
                                        &ctx.name,
                                        "over_capacity",
                                    );
                                    crate::refuse(OverCapacity { cost, capacity })
                                }
                                Denied::Throttled { retry_after } => {
                                    tracing::info!(
                                        key,
                                        tokens = ctx.cost.total(),
                                        wait_ms = retry_after.as_millis() as u64,
                                        "token bucket: refused, wait too long"
                                    );
                                    crate::telemetry::refused(&ctx.meters, &ctx.name, "throttled");
                                    crate::refuse(Throttled { retry_after })
                                }
                            }));
                        }
                    }
                }
                StateProj::Expired => {
                    this.state.set(State::Done);
                    tracing::debug!(
                        key = %KeyDisplay(&this.ctx.name, &this.ctx.key.label()),
                        "token bucket: refused, the deadline had passed"
                    );
                    return Poll::Ready(Err(crate::refuse(DeadlineExceeded {})));
                }
                StateProj::Sleep { mut sleep, limit } => {
                    // Asked on every wake: the slot may have moved earlier (a refund ahead of
                    // it; the store then wakes this task), or a pause may hold it longer. The
                    // clock is read first, so that `until` is never later than the slot.
                    let now = Instant::now();
                    let ctx = &mut *this.ctx;
                    let wait = ctx
                        .waiting()
                        .map_or(Duration::ZERO, |t| ctx.store.wait(t, cx.waker()));
                    if wait.is_zero() {
                        this.state.set(State::Ready);
                        continue;
                    }
                    let until = crate::after(now, wait);
                    if until > *limit {
                        ctx.refund("paused beyond the allowed wait");
                        crate::telemetry::refused(&ctx.meters, &ctx.name, "throttled");
                        this.state.set(State::Done);
                        return Poll::Ready(Err(crate::refuse(Throttled { retry_after: wait })));
                    }
                    if sleep.deadline() != until {
                        sleep.as_mut().reset(until);
                    }
                    ready!(sleep.poll(cx));
                }
                StateProj::Ready => {
                    if let Err(e) = ready!(this.inner.poll_ready(cx)) {
                        this.ctx.refund("inner service failed poll_ready");
                        this.state.set(State::Done);
                        return Poll::Ready(Err(e));
                    }
                    let req = this.req.take().expect("request taken only once");
                    // From here on the reservation is spent: it is reconciled, not refunded.
                    this.ctx.charged = true;
                    let fut = this.inner.call(req);
                    this.state.set(State::Call { fut });
                }
                StateProj::Call { fut } => {
                    // Inspected in place and returned as is: a response is not moved again.
                    let mut out = ready!(fut.poll(cx));
                    this.state.set(State::Done);
                    let ctx = &mut *this.ctx;
                    let ticket = ctx.ticket.take();
                    match &mut out {
                        Ok(res) => {
                            ctx.feedback(res.rate_limits());
                            if let Some(class) = res.failure().filter(|c| c.rate_limited) {
                                ctx.rate_limited(class.retry_after, res.rate_limits());
                            }
                            if let Some(ticket) = ticket {
                                let (store, rule) = (ctx.store.clone(), ctx.rule);
                                res.on_finish(move |finish| {
                                    if let Some(u) = reported(finish.usage()) {
                                        let used = rule.charged(&u);
                                        store.settle(ticket, Settlement::Used(used));
                                    }
                                });
                            }
                        }
                        Err(e) => {
                            ctx.feedback(e.rate_limits());
                            let class = e.classify();
                            if class.rate_limited {
                                ctx.rate_limited(class.retry_after, e.rate_limits());
                            }
                        }
                    }
                    return Poll::Ready(out);
                }
                StateProj::Done => panic!("ResponseFuture polled after completion"),
            }
        }
    }
}
