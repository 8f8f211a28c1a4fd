//! A Redis store for portcullis' token bucket: one set of RPM / TPM buckets shared by a fleet.
//!
//! Provider limits belong to the API key, not to one process. With an in-memory bucket per
//! replica, N replicas send N times the allowed traffic. [`RedisStore`] implements the token
//! bucket's [`BucketStore`](portcullis_layers::token_bucket::BucketStore) in Redis, so every
//! replica draws from the same buckets:
//!
//! - one atomic round trip (a Lua script, on the server's clock) per admission, reserving every
//!   bucket of the key or none;
//! - the in-memory store's semantics: reservation at decision time, FIFO slots, exact refunds
//!   in any order of cancellation (waiters behind a refund move up within the refunding
//!   instance: see [`RedisStore`]), reconciliation with real usage, pauses after a 429, clamps
//!   from `remaining` headers, limits changed at run time;
//! - idle keys expire; keys are prefixed (`portcullis:` by default);
//! - a bounded timeout per round trip and a [`FailurePolicy`] for when Redis is away
//!   (fail open to local buckets, or fail closed with `Throttled`), never a hang;
//!   reconnection when it returns.
//!
//! [`LocalRedis`] starts a throwaway `redis-server` for tests and drills.
//!
//! See the crate's README for running a fleet.

#![forbid(unsafe_code)]

mod config;
mod error;
mod local;
mod script;
mod store;

pub use config::{FailurePolicy, RedisConfig};
pub use error::Error;
pub use local::LocalRedis;
pub use store::{RedisStore, RedisTicket, ReserveFuture};
