//! Attempt timeouts and overall deadlines.
//!
//! - [`TimeoutLayer`]: bounds one attempt; on expiry the call fails with
//!   [`AttemptTimedOut`](portcullis_core::AttemptTimedOut), which classifies as
//!   [`Timeout`](portcullis_core::ErrorKind::Timeout): retried, a breaker failure, failed over.
//!   A request may ask for its own attempt timeout
//!   ([`RequestInfo::attempt_timeout`](portcullis_core::RequestInfo::attempt_timeout)). An
//!   attempt never outlives the request's deadline: if the deadline comes first, the error is
//!   [`DeadlineExceeded`](portcullis_core::DeadlineExceeded).
//! - [`DeadlineLayer`]: stamps an overall deadline on the request (keeping an earlier one the
//!   caller set), so that every inner layer that sleeps (retry backoff, token-bucket waits)
//!   respects it, and fails the whole call with
//!   [`DeadlineExceeded`](portcullis_core::DeadlineExceeded) when it passes.
//!
//! For streams, the provider's future resolves at the first content chunk, so the attempt
//! timeout is also the time-to-first-chunk limit; the idle limit between chunks is
//! [`ChatStream::idle_timeout`](portcullis_core::ChatStream::idle_timeout), applied by
//! [`StreamIdleLayer`].
//!
//! ```
//! use std::time::Duration;
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use portcullis_core::{BoxError, ErrorKind, LlmError};
//! use portcullis_layers::timeout::{DeadlineLayer, TimeoutLayer};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let slow = service_fn(|_req: String| async {
//!     tokio::time::sleep(Duration::from_secs(60)).await;
//!     Ok::<_, LlmError>("done")
//! });
//! let svc = ServiceBuilder::new()
//!     .layer(DeadlineLayer::new(Duration::from_secs(30)))
//!     .layer(TimeoutLayer::new(Duration::from_secs(10)))
//!     .service(slow);
//! let err = svc.oneshot("hi".to_string()).await.unwrap_err();
//! assert_eq!(err.kind(), ErrorKind::Timeout);
//! # }
//! ```

mod future;
mod layer;
mod service;

pub use future::{DeadlineFuture, IdleFuture, TimeoutFuture};
pub use layer::{DeadlineLayer, StreamIdleLayer, TimeoutLayer};
pub use service::{Deadline, StreamIdle, Timeout};
