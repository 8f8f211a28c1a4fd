//! [`ResponseFuture`]: the inner call with its permit, or an immediate `CircuitOpen`.

use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;
use portcullis_core::{Classify, Finish, OnFinish};

use super::machine::{Outcome, Permit};
use super::state::Complete;

/// An admitted call's permit. The outcome is recorded once: explicitly, or as ignored when it
/// is dropped first (a cancelled call), which also releases a half-open probe slot.
pub(crate) struct Guard {
    state: Arc<dyn Complete>,
    permit: Permit,
    done: bool,
}

impl Guard {
    pub(crate) fn new(state: Arc<dyn Complete>, permit: Permit) -> Self {
        Guard {
            state,
            permit,
            done: false,
        }
    }

    fn record(mut self, outcome: Outcome) {
        self.done = true;
        self.state.complete(&self.permit, outcome);
    }

    /// How a response that is over counts: a stream that failed after its commit point with a
    /// breaker failure is a failure; a completed one a success; a cancelled one nothing.
    fn finish(self, how: &Finish) {
        let outcome = match how {
            Finish::Completed { .. } => Outcome::Success,
            Finish::Failed { class, .. } if class.breaker_failure => Outcome::Failure,
            Finish::Failed { .. } | Finish::Cancelled { .. } => Outcome::Ignored,
        };
        self.record(outcome);
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if !self.done {
            self.state.complete(&self.permit, Outcome::Ignored);
        }
    }
}

pin_project! {
    /// The future of [`CircuitBreaker`](super::CircuitBreaker): the inner service's future
    /// holding the call's permit, or a `CircuitOpen` refusal that resolves on first poll.
    ///
    /// Dropping it before it resolves releases the permit (a cancellation never counts).
    pub struct ResponseFuture<F, E> {
        #[pin]
        kind: Kind<F, E>,
        guard: Option<Guard>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, E> {
        Called { #[pin] future: F },
        Rejected { error: Option<E> },
    }
}

impl<F, E> ResponseFuture<F, E> {
    pub(crate) fn called(future: F, guard: Guard) -> Self {
        ResponseFuture {
            kind: Kind::Called { future },
            guard: Some(guard),
        }
    }

    pub(crate) fn rejected(error: E) -> Self {
        ResponseFuture {
            kind: Kind::Rejected { error: Some(error) },
            guard: None,
        }
    }
}

impl<F, T, E> Future for ResponseFuture<F, E>
where
    F: Future<Output = Result<T, E>>,
    T: OnFinish,
    E: Classify,
{
    type Output = Result<T, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.kind.project() {
            KindProj::Rejected { error } => Poll::Ready(Err(error
                .take()
                .expect("ResponseFuture polled after completion"))),
            KindProj::Called { future } => {
                // Inspected in place and returned as is: a response is not moved again.
                let mut result = ready!(future.poll(cx));
                if let Some(guard) = this.guard.take() {
                    let failure = match &mut result {
                        Ok(response) => match response.failure() {
                            // An `Ok` that stands for a failure (an HTTP 503) counts as one.
                            Some(class) => class,
                            // At once for a complete response; at its end for a stream.
                            None => {
                                response.on_finish(move |how| guard.finish(how));
                                return Poll::Ready(result);
                            }
                        },
                        Err(e) => e.classify(),
                    };
                    guard.record(if failure.breaker_failure {
                        Outcome::Failure
                    } else {
                        Outcome::Ignored
                    });
                }
                Poll::Ready(result)
            }
        }
    }
}

impl<F, E> Debug for ResponseFuture<F, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("admitted", &self.guard.is_some())
            .finish_non_exhaustive()
    }
}
