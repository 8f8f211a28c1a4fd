use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;
use portcullis_core::{Classify, Failover, OnFinish, Replay};
use tower_service::Service;

use super::service::Entry;

pin_project! {
    /// The response future of [`Fallback`](super::Fallback).
    pub struct FallbackFuture<S, Req>
    where
        S: Service<Req>,
    {
        #[pin]
        state: State<S::Future, S, Req>,
        chain: Arc<[Entry<S, Req>]>,
        // The caller's request, before any remap; `None` once the last entry took it.
        req: Option<Req>,
        idx: usize,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, S, Req> {
        Calling { #[pin] fut: F },
        Readying { svc: S, req: Option<Req> },
    }
}

impl<S, Req> fmt::Debug for FallbackFuture<S, Req>
where
    S: Service<Req>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FallbackFuture")
            .field("entry", &self.idx)
            .finish()
    }
}

impl<S, Req> FallbackFuture<S, Req>
where
    S: Service<Req>,
{
    pub(super) fn new(fut: S::Future, chain: Arc<[Entry<S, Req>]>, req: Option<Req>) -> Self {
        FallbackFuture {
            state: State::Calling { fut },
            chain,
            req,
            idx: 0,
        }
    }
}

impl<S, Req> Future for FallbackFuture<S, Req>
where
    S: Service<Req> + Clone,
    S::Response: OnFinish,
    S::Error: Classify + fmt::Display,
    Req: Replay,
{
    type Output = Result<S::Response, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Calling { fut } => {
                    let outcome = ready!(fut.poll(cx));
                    // An `Ok` that stands for a failure (an HTTP 503) fails over as the error
                    // would; with nowhere to go it is returned as it is.
                    let class = match &outcome {
                        Ok(res) => match res.failure() {
                            Some(class) => class,
                            None => return Poll::Ready(outcome),
                        },
                        Err(err) => err.classify(),
                    };
                    let from = *this.idx;
                    let next = match class.failover {
                        Failover::Never => None,
                        Failover::Eligible => Some(from + 1).filter(|i| *i < this.chain.len()),
                        Failover::LargerContext => {
                            (from + 1..this.chain.len()).find(|i| this.chain[*i].larger_context)
                        }
                    };
                    let Some(next) = next else {
                        return Poll::Ready(outcome);
                    };
                    // The last entry takes the caller's request; earlier ones get a clone.
                    let req = if next + 1 == this.chain.len() {
                        this.req.take()
                    } else {
                        this.req.as_ref().and_then(Replay::replay)
                    };
                    if req.is_none() {
                        return Poll::Ready(outcome);
                    }
                    match &outcome {
                        Err(err) => tracing::warn!(
                            from = %this.chain[from].name,
                            to = %this.chain[next].name,
                            reason = %err,
                            "failing over"
                        ),
                        Ok(_) => tracing::warn!(
                            from = %this.chain[from].name,
                            to = %this.chain[next].name,
                            reason = "a response that classifies as a failure",
                            "failing over"
                        ),
                    }
                    *this.idx = next;
                    let svc = this.chain[next].service.clone();
                    this.state.set(State::Readying { svc, req });
                }
                StateProj::Readying { svc, req } => {
                    if let Err(err) = ready!(svc.poll_ready(cx)) {
                        return Poll::Ready(Err(err));
                    }
                    let entry = &this.chain[*this.idx];
                    let req = req.take().expect("an entry's request is taken once");
                    let req = match &entry.remap {
                        Some(remap) => remap(req),
                        None => req,
                    };
                    let fut = svc.call(req);
                    this.state.set(State::Calling { fut });
                }
            }
        }
    }
}
