//! What a pool knows of each deployment's load: calls in flight and a peak-EWMA of latency,
//! measured by [`Tracked`] around the deployment's service.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower_service::Service;

/// How fast the latency estimate forgets: the weight of an old sample halves every
/// `DECAY × ln 2` (about 7 s), as in `tower::load::PeakEwma`'s default.
const DECAY: Duration = Duration::from_secs(10);

/// One deployment's load: calls in flight, and a peak-EWMA of its latency (a slower sample
/// counts at once, a faster one decays in over about ten seconds).
#[derive(Debug, Default)]
pub struct Load {
    in_flight: AtomicUsize,
    finished: AtomicU64,
    ewma: Mutex<Option<(f64, Instant)>>,
}

impl Load {
    fn ewma(&self) -> MutexGuard<'_, Option<(f64, Instant)>> {
        self.ewma.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Calls in flight now (started, neither finished nor dropped).
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Calls that finished (answered or failed; not those dropped before the end): the
    /// deployment's share of the traffic.
    pub fn finished(&self) -> u64 {
        self.finished.load(Ordering::Relaxed)
    }

    /// The latency estimate (zero before the first call finished). Between calls it decays
    /// toward zero at the same rate, as `tower::load::PeakEwma`'s does, so that a deployment
    /// passed over for being slow is tried again after a while and can show it recovered.
    pub fn latency(&self) -> Duration {
        Duration::from_secs_f64(self.secs())
    }

    fn secs(&self) -> f64 {
        self.ewma().map_or(0.0, |(secs, at)| {
            let idle = Instant::now().saturating_duration_since(at).as_secs_f64();
            secs * (-idle / DECAY.as_secs_f64()).exp()
        })
    }

    /// The cost the latency strategy ranks by: the estimate times the calls in flight plus
    /// this one, so that a fast deployment is not piled onto.
    pub(super) fn cost(&self) -> f64 {
        self.secs() * (self.in_flight() + 1) as f64
    }

    fn observe(&self, rtt: Duration, now: Instant) {
        self.finished.fetch_add(1, Ordering::Relaxed);
        let rtt = rtt.as_secs_f64();
        let mut ewma = self.ewma();
        let next = match *ewma {
            None => rtt,
            Some((old, _)) if rtt > old => rtt,
            Some((old, at)) => {
                let elapsed = now.saturating_duration_since(at).as_secs_f64();
                let w = (-elapsed / DECAY.as_secs_f64()).exp();
                old * w + rtt * (1.0 - w)
            }
        };
        *ewma = Some((next, now));
    }
}

/// Counts one call in flight until dropped (finished, failed or cancelled).
struct InFlight(Arc<Load>);

impl InFlight {
    fn new(load: Arc<Load>) -> Self {
        load.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(load)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A deployment's service, measured: each call counts in flight until its future finishes or
/// is dropped, and its latency (to the response, or to a stream's first chunk) feeds the
/// estimate. Clones share the [`Load`].
#[derive(Clone)]
pub struct Tracked<S> {
    inner: S,
    load: Option<Arc<Load>>,
}

impl<S> fmt::Debug for Tracked<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let load = self.load.as_deref();
        f.debug_struct("Tracked")
            .field("in_flight", &load.map(Load::in_flight))
            .field("latency", &load.map(Load::latency))
            .finish_non_exhaustive()
    }
}

impl<S> Tracked<S> {
    /// Measures `inner` into `load`.
    pub fn new(inner: S, load: Arc<Load>) -> Self {
        Tracked {
            inner,
            load: Some(load),
        }
    }

    /// Passes `inner` through unmeasured (no clock read, no counter): the same type as a
    /// measured service, for a chain where only some entries are pool deployments.
    pub fn untracked(inner: S) -> Self {
        Tracked { inner, load: None }
    }

    /// The load it measures into (`None`: [untracked](Self::untracked)).
    pub fn load(&self) -> Option<&Arc<Load>> {
        self.load.as_ref()
    }
}

impl<S: Service<Req>, Req> Service<Req> for Tracked<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = TrackedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let measured = self
            .load
            .as_ref()
            .map(|l| (InFlight::new(l.clone()), Instant::now()));
        TrackedFuture {
            inner: self.inner.call(req),
            measured,
        }
    }
}

pin_project! {
    /// The future of a [`Tracked`] call.
    pub struct TrackedFuture<F> {
        #[pin]
        inner: F,
        measured: Option<(InFlight, Instant)>,
    }
}

impl<F> fmt::Debug for TrackedFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrackedFuture").finish_non_exhaustive()
    }
}

impl<F: Future> Future for TrackedFuture<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let out = ready!(this.inner.poll(cx));
        if let Some((guard, started)) = this.measured.take() {
            let now = Instant::now();
            guard.0.observe(now.saturating_duration_since(started), now);
        }
        Poll::Ready(out)
    }
}
