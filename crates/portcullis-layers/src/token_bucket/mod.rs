//! A dual requests-per-minute / tokens-per-minute token bucket that never over-admits.
//!
//! [`TokenBucketLayer`] keeps a client under a provider's RPM and TPM limits, per key (by default
//! `provider:model`), so that 429s are avoided before they happen while nearly all of the
//! allowed throughput is used.
//!
//! - **Two buckets per key** (requests and tokens), or four with Anthropic's split input /
//!   output limits ([`KeyLimits`]), reserved atomically: all or none.
//! - **Cost** of a request: [`CostOf`](portcullis_core::CostOf), by default
//!   [`ChatCost`](portcullis_core::ChatCost): estimated prompt + `max_tokens`.
//! - **Reservation at decision time**: each caller gets its own slot when it calls, and sleeps
//!   until then. Slots are handed out in FIFO order, so a large request is never starved, and
//!   concurrent waiters can never all pass at once (the seed's bug). See [`gcra`] for the
//!   algorithm (GCRA) and its proof obligation: the cost admitted in any window `T` is at most
//!   `capacity + rate·T`.
//! - **Fail fast, consuming nothing**: a cost above a capacity is
//!   [`OverCapacity`](portcullis_core::OverCapacity); a slot further than `max_wait` or than the
//!   request's deadline is [`Throttled`](portcullis_core::Throttled), with the wait as
//!   `retry_after`; a request whose deadline has already passed is
//!   [`DeadlineExceeded`](portcullis_core::DeadlineExceeded), before any reservation.
//! - **Cancellation**: dropping the response future before the inner call (even before its
//!   first poll) refunds the reservation exactly, in any order: the key is as if the request
//!   had never come, and the waiters behind it move up (see [`gcra`] for the invariant).
//! - **Reconciliation**: when the response is over (at once for a
//!   [`CompletionResult`](portcullis_core::CompletionResult), at the end of a
//!   [`ChatStream`](portcullis_core::ChatStream)), the estimate is replaced by the reported
//!   usage: the difference is refunded, or the overrun charged. Without reported usage (or on
//!   an error) the estimate stays charged. The usage counts as the provider counts it against
//!   its limits ([`UsageRule`](portcullis_core::tokens::UsageRule), from the cost function's
//!   [`usage_rule`](portcullis_core::CostOf::usage_rule); [`ChatCost`](portcullis_core::ChatCost)
//!   picks it by model): OpenAI counts cached prompt tokens toward TPM, so every input token is
//!   charged; current Anthropic models do not count cache reads toward ITPM
//!   (`cache_read_input_tokens`), so they are refunded, while cache writes are charged. Output
//!   tokens, reasoning included, are charged in full: the reservation of `max_tokens` already
//!   bounds them.
//! - **Feedback**: a rate-limited error ([`Classification::rate_limited`]) pauses the key for its
//!   `retry_after`, cut to `max_pause` ([`TokenBucketConfig::max_pause`]); the handle reads and
//!   clears a pause; the `remaining` rate-limit headers of responses and errors clamp the local
//!   levels down, never up.
//! - **A store** ([`BucketStore`]) keeps the state: [`MemoryStore`] by default, a shared one
//!   (Redis) for fleets.
//! - **A handle** ([`TokenBucketHandle`]) reads levels and changes limits at run time.
//!
//! [`Classification::rate_limited`]: portcullis_core::Classification::rate_limited
//!
//! # Readiness
//!
//! The service is always ready: a request is accepted and waits for its slot inside the
//! response future. After the wait, the future drives `poll_ready` on its own clone of the inner
//! service, then calls it (the pattern of tower's `Retry`), so the inner service is never called
//! unready and no inner permit is held while sleeping. Hence `S: Clone`.
//!
//! # Layout
//!
//! - [`store`]: the [`BucketStore`] trait and its vocabulary ([`PerBucket`], [`Levels`], …);
//! - [`gcra`]: the admission arithmetic of one key, pure (no locks, no clock);
//! - `memory`: [`MemoryStore`], the arithmetic behind a lock per key in a map of keys;
//! - `layer`, `service`, `future`, `handle`: the tower side.

mod config;
mod future;
pub mod gcra;
mod handle;
mod layer;
mod memory;
mod per_bucket;
mod service;
pub mod store;

pub use crate::keyed::KeyBounds;
pub use config::{
    ConfigError, DEFAULT_MAX_PAUSE, DEFAULT_MAX_WAIT, KeyLimits, Rate, TokenBucketConfig,
};
pub use future::ResponseFuture;
pub use handle::TokenBucketHandle;
pub use layer::TokenBucketLayer;
pub use memory::{MemoryReserve, MemoryStore, MemoryTicket};
pub use per_bucket::{PerBucket, Remaining};
pub use service::TokenBucket;
pub use store::{Admission, BucketStore, Denied, KeyLabel, Levels, Settlement};

/// A key as logs show it: `name:label`.
pub(crate) struct KeyDisplay<'a>(pub(crate) &'a str, pub(crate) &'a str);

impl std::fmt::Display for KeyDisplay<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.0.is_empty(), self.1.is_empty()) {
            (_, true) => f.write_str(self.0),
            (true, false) => f.write_str(self.1),
            (false, false) => write!(f, "{}:{}", self.0, self.1),
        }
    }
}
