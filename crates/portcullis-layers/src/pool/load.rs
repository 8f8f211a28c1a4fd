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

/// How fast the latency estimate forgets by default: the weight of an old sample halves every
/// `DECAY × ln 2` (about 7 s), as in `tower::load::PeakEwma`'s default.
pub const DEFAULT_DECAY: Duration = Duration::from_secs(10);

/// One deployment's load: calls in flight, and a peak-EWMA of its latency (a slower sample
/// counts at once, a faster one decays in; between samples the estimate decays toward zero).
/// Calls still in flight count too: while they are older on average than the estimate, their
/// mean age is the estimate, so a deployment that just turned slow is seen before its first
/// slow answer.
#[derive(Debug)]
pub struct Load {
    in_flight: AtomicUsize,
    finished: AtomicU64,
    decay: Duration,
    epoch: Instant,
    est: Mutex<Estimate>,
}

#[derive(Debug, Default)]
struct Estimate {
    /// The peak-EWMA in seconds, and when it was last updated.
    ewma: Option<(f64, Instant)>,
    /// The sum of the start times of the calls in flight (seconds since `epoch`).
    started: f64,
}

impl Default for Load {
    fn default() -> Self {
        Load::new(DEFAULT_DECAY)
    }
}

impl Load {
    /// A load whose estimate forgets with time constant `decay`.
    pub fn new(decay: Duration) -> Self {
        Load {
            in_flight: AtomicUsize::new(0),
            finished: AtomicU64::new(0),
            decay,
            epoch: Instant::now(),
            est: Mutex::new(Estimate::default()),
        }
    }

    fn est(&self) -> MutexGuard<'_, Estimate> {
        self.est.lock().unwrap_or_else(PoisonError::into_inner)
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

    /// The latency estimate (zero before the first call): the decayed peak-EWMA, or the mean
    /// age of the calls in flight if that is longer.
    pub fn latency(&self) -> Duration {
        Duration::from_secs_f64(self.secs())
    }

    fn since_epoch(&self, at: Instant) -> f64 {
        at.saturating_duration_since(self.epoch).as_secs_f64()
    }

    fn secs(&self) -> f64 {
        let now = Instant::now();
        let est = self.est();
        let ewma = est.ewma.map_or(0.0, |(secs, at)| {
            let idle = now.saturating_duration_since(at).as_secs_f64();
            secs * (-idle / self.decay.as_secs_f64()).exp()
        });
        let n = self.in_flight();
        if n == 0 {
            return ewma;
        }
        let mean_age = self.since_epoch(now) - est.started / n as f64;
        ewma.max(mean_age)
    }

    /// The cost the latency strategy ranks by: the estimate times the calls in flight plus
    /// this one, so that a fast deployment is not piled onto.
    pub(super) fn cost(&self) -> f64 {
        self.secs() * (self.in_flight() + 1) as f64
    }

    fn start(&self, at: Instant) {
        let mut est = self.est();
        est.started += self.since_epoch(at);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    fn end(&self, started: Instant, rtt: Option<(Duration, Instant)>) {
        let mut est = self.est();
        est.started -= self.since_epoch(started);
        let n = self.in_flight.fetch_sub(1, Ordering::Relaxed) - 1;
        if n == 0 {
            est.started = 0.0; // no rounding left over
        }
        let Some((rtt, now)) = rtt else { return };
        self.finished.fetch_add(1, Ordering::Relaxed);
        let rtt = rtt.as_secs_f64();
        let next = match est.ewma {
            None => rtt,
            Some((old, _)) if rtt > old => rtt,
            Some((old, at)) => {
                let elapsed = now.saturating_duration_since(at).as_secs_f64();
                let w = (-elapsed / self.decay.as_secs_f64()).exp();
                old * w + rtt * (1.0 - w)
            }
        };
        est.ewma = Some((next, now));
    }
}

/// Counts one call in flight until dropped (finished, failed or cancelled); a finished call's
/// latency feeds the estimate.
struct InFlight {
    /// `None` once finished.
    load: Option<Arc<Load>>,
    started: Instant,
}

impl InFlight {
    fn new(load: Arc<Load>) -> Self {
        let started = Instant::now();
        load.start(started);
        InFlight {
            load: Some(load),
            started,
        }
    }

    fn finish(mut self) {
        if let Some(load) = self.load.take() {
            let now = Instant::now();
            let rtt = now.saturating_duration_since(self.started);
            load.end(self.started, Some((rtt, now)));
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(load) = self.load.take() {
            load.end(self.started, None);
        }
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
        let measured = self.load.as_ref().map(|l| InFlight::new(l.clone()));
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
        measured: Option<InFlight>,
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
        if let Some(guard) = this.measured.take() {
            guard.finish();
        }
        Poll::Ready(out)
    }
}
