//! The circuit breaker: CLOSED → OPEN → HALF_OPEN → CLOSED, one breaker per key, that cannot
//! wedge.
//!
//! - **CLOSED**: calls flow; their outcomes feed the [`TripPolicy`] (consecutive failures, or a
//!   failure rate over a count- or time-based sliding window with a minimum number of calls)
//!   and, optionally, a [`SlowCallPolicy`]. When one says so the breaker opens.
//! - **OPEN**: `call` refuses with [`CircuitOpen`](portcullis_core::CircuitOpen) carrying the
//!   time left, without touching the inner service. After the recovery timeout (optionally
//!   growing on consecutive trips, see [`OpenBackoff`]) the next call or query finds it
//!   HALF_OPEN: no background task is involved, time comes from `tokio::time`.
//! - **HALF_OPEN**: at most `half_open_probes` calls are in flight at once; further calls are
//!   refused. That many successes close the breaker; any probe failure reopens it. A probe's
//!   permit returns when its future (or stream) is dropped, and expires after
//!   `max_probe_wait`, so a hung probe cannot wedge the breaker.
//!
//! Only errors that [`Classify`](portcullis_core::Classify) marks as breaker failures count.
//! Client errors, local refusals (`CircuitOpen`, `Throttled`, budgets) and cancellations are
//! ignored. A stream's outcome is taken when it ends, through
//! [`OnFinish`](portcullis_core::OnFinish): a failure after its commit point still counts.
//! Every admission records the breaker's generation; an outcome from an earlier generation
//! (a slow call admitted while CLOSED that ends during HALF_OPEN) is ignored.
//!
//! Each transition is sent once to [`CircuitBreakerHandle::subscribe`] receivers and logged
//! with `tracing` (warn when opening, info otherwise).
//!
//! See [`CircuitBreakerLayer`] for an example.

mod config;
mod events;
mod future;
mod handle;
mod layer;
mod machine;
mod service;
mod state;
mod window;

pub use crate::keyed::KeyBounds;
pub use config::{
    CircuitBreakerConfig, ConfigError, MAX_DURATION, MAX_HALF_OPEN_PROBES, MAX_WINDOW_CALLS,
    OpenBackoff, SlowCallPolicy, TripPolicy, Window,
};
pub use events::{CircuitMetrics, CircuitState, Transition, TransitionReason};
pub use future::ResponseFuture;
pub use handle::CircuitBreakerHandle;
pub use layer::CircuitBreakerLayer;
pub use service::CircuitBreaker;

/// How many transition events a [`CircuitBreakerHandle::subscribe`] receiver may fall behind.
pub const EVENT_CAPACITY: usize = 1024;
