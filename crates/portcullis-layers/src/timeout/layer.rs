use std::time::Duration;

use tower_layer::Layer;

use super::service::{Deadline, StreamIdle, Timeout};

/// Applies a per-attempt timeout to the inner service. See the [module docs](super).
#[derive(Debug, Clone, Copy)]
pub struct TimeoutLayer {
    timeout: Duration,
}

impl TimeoutLayer {
    /// A layer bounding each attempt by `timeout` (the seed's default is 30 s).
    pub fn new(timeout: Duration) -> Self {
        TimeoutLayer { timeout }
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;
    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout::new(inner, self.timeout)
    }
}

/// Stamps an overall deadline on each request and enforces it. See the [module docs](super).
#[derive(Debug, Clone, Copy)]
pub struct DeadlineLayer {
    budget: Duration,
}

impl DeadlineLayer {
    /// Each call must be over within `budget` of its start.
    pub fn new(budget: Duration) -> Self {
        DeadlineLayer { budget }
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;
    fn layer(&self, inner: S) -> Deadline<S> {
        Deadline::new(inner, self.budget)
    }
}

/// Ends a [`ChatStream`](portcullis_core::ChatStream) that goes quiet for longer than `idle`,
/// and optionally one still running `total` after its commit point.
#[derive(Debug, Clone, Copy)]
pub struct StreamIdleLayer {
    idle: Duration,
    total: Option<Duration>,
}

impl StreamIdleLayer {
    /// Streams fail with a timeout after `idle` without a chunk.
    pub fn new(idle: Duration) -> Self {
        StreamIdleLayer { idle, total: None }
    }

    /// Streams also fail with a timeout once they have run `total` since their first chunk,
    /// however steadily chunks arrive (off by default: an upstream that keeps sending is
    /// otherwise bounded only by the caller).
    pub fn total(mut self, total: Duration) -> Self {
        self.total = Some(total);
        self
    }
}

impl<S> Layer<S> for StreamIdleLayer {
    type Service = StreamIdle<S>;
    fn layer(&self, inner: S) -> StreamIdle<S> {
        StreamIdle {
            inner,
            idle: self.idle,
            total: self.total,
        }
    }
}
