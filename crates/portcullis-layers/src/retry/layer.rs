//! [`RetryLayer`]: wraps a service in [`Retry`].

use std::sync::Arc;

use tower_layer::Layer;

use super::policy::StandardPolicy;
use super::service::Retry;

/// Retries failed calls of the inner service, as its [`Policy`](super::Policy) decides.
///
/// The policy sits behind an `Arc`: every service this layer wraps, and every clone of those,
/// shares it (and so shares the standard policy's retry budget and RNG).
///
/// ```
/// use portcullis_core::{BoxError, ErrorKind, LlmError};
/// use portcullis_layers::retry::{RetryLayer, StandardPolicy};
/// use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let policy = StandardPolicy::builder().seed(1).build().unwrap();
/// let mut svc = ServiceBuilder::new()
///     .layer(RetryLayer::new(policy))
///     .service(service_fn(|_req: String| async {
///         Err::<String, _>(LlmError::new(ErrorKind::Overloaded, "busy").with_provider("anthropic"))
///     }));
/// let err = svc.ready().await.unwrap().call("hi".into()).await.unwrap_err();
/// assert_eq!(err.kind(), ErrorKind::Overloaded);
/// assert_eq!(err.attempts(), Some(4)); // the first attempt and 3 retries
/// # }
/// ```
#[derive(Debug)]
pub struct RetryLayer<P> {
    policy: Arc<P>,
}

impl<P> RetryLayer<P> {
    /// A layer that decides through `policy`.
    pub fn new(policy: P) -> Self {
        Self::from_arc(Arc::new(policy))
    }

    /// A layer over a policy already shared elsewhere.
    pub fn from_arc(policy: Arc<P>) -> Self {
        RetryLayer { policy }
    }

    /// The policy.
    pub fn policy(&self) -> &Arc<P> {
        &self.policy
    }
}

impl RetryLayer<StandardPolicy> {
    /// The [`StandardPolicy`] with its defaults: 3 retries, 1 s doubling to 30 s with full
    /// jitter, `Retry-After` up to 60 s, a 20 % budget.
    pub fn standard() -> Self {
        Self::new(StandardPolicy::default())
    }
}

impl Default for RetryLayer<StandardPolicy> {
    fn default() -> Self {
        Self::standard()
    }
}

impl<P> Clone for RetryLayer<P> {
    fn clone(&self) -> Self {
        RetryLayer {
            policy: self.policy.clone(),
        }
    }
}

impl<S, P> Layer<S> for RetryLayer<P> {
    type Service = Retry<P, S>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry::from_arc(self.policy.clone(), inner)
    }
}
