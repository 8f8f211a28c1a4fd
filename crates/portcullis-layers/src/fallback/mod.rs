//! Fallback across providers: an ordered chain of services, primary first.
//!
//! A call goes to the primary. When it fails with an error whose
//! [`Classification::failover`](portcullis_core::Classification::failover) allows it, the same
//! request (remapped for the entry, e.g. to its own model name) goes to the next entry, and so
//! on; the last error is returned when every entry has failed.
//!
//! - It fails over on the classes the shared table marks: overloaded, server, connect, timeout,
//!   protocol, rate limited, quota exhausted, circuit open, throttled.
//! - It never fails over on an invalid request or an authentication error: another provider
//!   would refuse it too, or the caller must fix something.
//! - A context-length error goes only to an entry declared [`larger_context`](Entry::larger_context).
//! - Streams fail over only before the commit point: a streaming provider's future resolves at
//!   the first content chunk, and an error after it is a stream item, not a call failure.
//!
//! Each entry gets its own `poll_ready` before its call: the primary through this service's
//! `poll_ready`, the others by driving a clone to readiness inside the response future.
//!
//! ```
//! use tower::{ServiceExt, service_fn};
//! use portcullis_core::{ChatMessage, ChatRequest, CompletionResult, ErrorKind, LlmError};
//! use portcullis_layers::fallback::{Entry, Fallback};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let openai = service_fn(|_req: ChatRequest| async {
//!     Err::<CompletionResult, _>(LlmError::new(ErrorKind::Overloaded, "down").with_provider("openai"))
//! });
//! let anthropic = service_fn(|req: ChatRequest| async move {
//!     Ok::<_, LlmError>(CompletionResult::new("anthropic", req.model.to_string(), "hi"))
//! });
//! // Both entries must have one service type: box them (or use an enum of your providers).
//! let svc = Fallback::new(vec![
//!     Entry::new("openai", tower::util::BoxCloneService::new(openai)),
//!     Entry::new("anthropic", tower::util::BoxCloneService::new(anthropic)).model("claude-haiku-4-5"),
//! ]).unwrap();
//! let req = ChatRequest::new("gpt-4o-mini", vec![ChatMessage::user("hello")]);
//! let res = svc.oneshot(req).await.unwrap();
//! assert_eq!(res.provider, "anthropic");
//! assert_eq!(res.model, "claude-haiku-4-5");
//! # }
//! ```

mod future;
mod layer;
mod service;

pub use future::FallbackFuture;
pub use layer::FallbackLayer;
pub use service::{Entry, Fallback, FallbackError};
