//! [`ResponseFuture`]: the retry state machine.

use std::fmt::{self, Display};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use pin_project_lite::pin_project;
use portcullis_core::{Classify, DeadlineExceeded, Refusal, Replay, RequestInfo, RetryStop};
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use super::policy::{Attempt, Decision, Policy};

pin_project! {
    /// The future of [`Retry`](super::Retry): `Called` (an attempt in flight) → `Waiting`
    /// (the backoff sleep) → `Checking` (driving the inner service ready) → `Called` …
    ///
    /// Dropping it drops whatever it holds at that moment (the attempt, or the timer): nothing
    /// runs after it is gone.
    pub struct ResponseFuture<S, Req, P>
    where
        S: Service<Req>,
    {
        #[pin]
        state: State<S::Future>,
        service: S,
        // `None` when the request cannot be replayed: it is sent once.
        request: Option<Req>,
        // The copy the next attempt sends, made when a retry is decided.
        next: Option<Req>,
        policy: Arc<P>,
        attempts: u32,
        started: Instant,
        last_delay: Duration,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Called { #[pin] future: F },
        // Boxed: a backoff is the rare path, and an inline timer would make every call's
        // future (moved on each return) several hundred bytes larger.
        Waiting { sleep: Pin<Box<Sleep>> },
        Checking,
        // The request's deadline had passed at the call: no attempt is made.
        Expired,
    }
}

impl<S, Req, P> ResponseFuture<S, Req, P>
where
    S: Service<Req>,
{
    pub(super) fn new(
        first: Option<S::Future>,
        service: S,
        request: Option<Req>,
        policy: Arc<P>,
        started: Instant,
    ) -> Self {
        ResponseFuture {
            state: match first {
                Some(future) => State::Called { future },
                None => State::Expired,
            },
            service,
            request,
            next: None,
            policy,
            attempts: 1,
            started,
            last_delay: Duration::ZERO,
        }
    }
}

impl<S, Req, P> fmt::Debug for ResponseFuture<S, Req, P>
where
    S: Service<Req>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::Called { .. } => "called",
            State::Waiting { .. } => "waiting",
            State::Checking => "checking",
            State::Expired => "expired",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .field("attempts", &self.attempts)
            .field("last_delay", &self.last_delay)
            .finish_non_exhaustive()
    }
}

impl<S, Req, P> Future for ResponseFuture<S, Req, P>
where
    S: Service<Req>,
    S::Error: From<Refusal> + Display + Classify,
    P: Policy<Req, S::Response, S::Error>,
    Req: Replay + RequestInfo,
{
    type Output = Result<S::Response, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Called { future } => {
                    let outcome = ready!(future.poll(cx));
                    if outcome.as_ref().is_ok_and(|r| this.policy.accepts(r)) {
                        return Poll::Ready(outcome);
                    }
                    let Some(request) = this.request.as_ref() else {
                        return Poll::Ready(outcome);
                    };
                    let attempt = Attempt {
                        request,
                        number: *this.attempts,
                        elapsed: this.started.elapsed(),
                        last_delay: *this.last_delay,
                        deadline: request.deadline(),
                    };
                    let delay = match this.policy.decide(&attempt, outcome.as_ref()) {
                        Decision::Accept => return Poll::Ready(outcome),
                        Decision::Retry(delay) if attempt.allows(delay) => delay,
                        Decision::Retry(_) => {
                            return give_up(outcome, *this.attempts, RetryStop::Deadline);
                        }
                        Decision::GiveUp(stop) => return give_up(outcome, *this.attempts, stop),
                    };
                    let Some(next) = request.replay() else {
                        return give_up(outcome, *this.attempts, RetryStop::NotRetryable);
                    };
                    *this.next = Some(next);
                    log_retry(&attempt, delay, outcome.as_ref().err());
                    *this.last_delay = delay;
                    if delay.is_zero() {
                        this.state.set(State::Checking);
                    } else {
                        let sleep = Box::pin(tokio::time::sleep(delay));
                        this.state.set(State::Waiting { sleep });
                    }
                }
                StateProj::Waiting { sleep } => {
                    ready!(sleep.as_mut().poll(cx));
                    this.state.set(State::Checking);
                }
                StateProj::Checking => {
                    ready!(this.service.poll_ready(cx))?;
                    *this.attempts = this.attempts.saturating_add(1);
                    let request = this
                        .next
                        .take()
                        .expect("a retry's copy is made when it is decided");
                    let future = this.service.call(request);
                    this.state.set(State::Called { future });
                }
                StateProj::Expired => {
                    return Poll::Ready(Err(crate::refuse(DeadlineExceeded {})));
                }
            }
        }
    }
}

/// Ends the call: a success as is, an error told how many attempts were made and why they
/// stopped ([`Classify::retries_exhausted`]).
fn give_up<R, E: Classify>(
    outcome: Result<R, E>,
    attempts: u32,
    stop: RetryStop,
) -> Poll<Result<R, E>> {
    Poll::Ready(outcome.map_err(|last| last.retries_exhausted(attempts, stop)))
}

fn log_retry<Req: RequestInfo, E: Display + Classify>(
    attempt: &Attempt<'_, Req>,
    delay: Duration,
    error: Option<&E>,
) {
    crate::telemetry::retry(error.map_or("rejected_response", |e| {
        crate::telemetry::reason(&e.classify())
    }));
    let reason = match error {
        Some(e) => tracing::field::display(e as &dyn Display),
        None => tracing::field::display(&"response rejected by the policy" as &dyn Display),
    };
    tracing::warn!(
        provider = error.and_then(|e| e.provider()).unwrap_or("-"),
        model = attempt.request.model().unwrap_or("-"),
        attempt = attempt.number,
        delay_ms = delay.as_millis() as u64,
        reason,
        "retrying",
    );
}
