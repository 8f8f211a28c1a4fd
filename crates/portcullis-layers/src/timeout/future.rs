use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use pin_project_lite::pin_project;
use portcullis_core::{AttemptTimedOut, ChatStream, DeadlineExceeded, Refusal};
use tokio::time::{Instant, Sleep, sleep_until};

pin_project! {
    /// The response future of [`Timeout`](super::Timeout).
    ///
    /// Its timer is only created when the inner future first returns `Pending`: a call that is
    /// over on its first poll never touches the timer wheel.
    #[derive(Debug)]
    pub struct TimeoutFuture<F> {
        // `None` when the deadline had passed at the call: the inner service was not called.
        #[pin]
        inner: Option<F>,
        #[pin]
        sleep: Option<Sleep>,
        // When the attempt fails: the call's time plus the timeout, or the deadline if earlier.
        at: Instant,
        timeout: Duration,
        // Whether the sleep ends at the deadline rather than at the attempt timeout.
        at_deadline: bool,
    }
}

impl<F> TimeoutFuture<F> {
    pub(super) fn new(inner: Option<F>, timeout: Duration, deadline: Option<Instant>) -> Self {
        let by_timeout = crate::after(Instant::now(), timeout);
        let (at, at_deadline) = match deadline {
            Some(d) if d < by_timeout => (d, true),
            _ => (by_timeout, false),
        };
        TimeoutFuture {
            inner,
            sleep: None,
            at,
            timeout,
            at_deadline,
        }
    }
}

/// Polls the timer that ends at `at`, creating it on the first call.
fn poll_timer(mut sleep: Pin<&mut Option<Sleep>>, at: Instant, cx: &mut Context<'_>) -> Poll<()> {
    if sleep.is_none() {
        sleep.set(Some(sleep_until(at)));
    }
    match sleep.as_pin_mut() {
        Some(sleep) => sleep.poll(cx),
        None => Poll::Pending,
    }
}

impl<F, T, E> Future for TimeoutFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: From<Refusal>,
{
    type Output = Result<T, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Some(inner) = this.inner.as_pin_mut() else {
            return Poll::Ready(Err(crate::refuse(DeadlineExceeded {})));
        };
        if let Poll::Ready(out) = inner.poll(cx) {
            return Poll::Ready(out);
        }
        ready!(poll_timer(this.sleep, *this.at, cx));
        if *this.at_deadline {
            Poll::Ready(Err(crate::refuse(DeadlineExceeded {})))
        } else {
            Poll::Ready(Err(crate::refuse(AttemptTimedOut {
                after: *this.timeout,
            })))
        }
    }
}

pin_project! {
    /// The response future of [`Deadline`](super::Deadline). Like the timeout's, its timer is
    /// only created when the inner future first returns `Pending`.
    #[derive(Debug)]
    pub struct DeadlineFuture<F> {
        // `None` when the deadline had passed at the call: the inner service was not called.
        #[pin]
        inner: Option<F>,
        #[pin]
        sleep: Option<Sleep>,
        at: Instant,
    }
}

impl<F> DeadlineFuture<F> {
    pub(super) fn new(inner: Option<F>, at: Instant) -> Self {
        DeadlineFuture {
            inner,
            sleep: None,
            at,
        }
    }
}

impl<F, T, E> Future for DeadlineFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: From<Refusal>,
{
    type Output = Result<T, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Some(inner) = this.inner.as_pin_mut() else {
            return Poll::Ready(Err(crate::refuse(DeadlineExceeded {})));
        };
        if let Poll::Ready(out) = inner.poll(cx) {
            return Poll::Ready(out);
        }
        ready!(poll_timer(this.sleep, *this.at, cx));
        Poll::Ready(Err(crate::refuse(DeadlineExceeded {})))
    }
}

pin_project! {
    /// The response future of [`StreamIdle`](super::StreamIdle).
    #[derive(Debug)]
    pub struct IdleFuture<F> {
        #[pin]
        pub(super) inner: F,
        pub(super) idle: Duration,
        pub(super) total: Option<Duration>,
    }
}

impl<F, E> Future for IdleFuture<F>
where
    F: Future<Output = Result<ChatStream, E>>,
{
    type Output = Result<ChatStream, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let stream = ready!(this.inner.poll(cx))?;
        let stream = stream.idle_timeout(*this.idle);
        Poll::Ready(Ok(match *this.total {
            Some(total) => stream.total_timeout(total),
            None => stream,
        }))
    }
}
