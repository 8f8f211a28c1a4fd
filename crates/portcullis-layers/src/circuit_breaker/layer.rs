//! [`CircuitBreakerLayer`].

use std::fmt;
use std::hash::Hash;
use std::sync::Arc;

use tower_layer::Layer;

use super::config::{CircuitBreakerConfig, ConfigError};
use super::handle::CircuitBreakerHandle;
use super::service::CircuitBreaker;
use super::state::Shared;
use crate::key::{ByModel, KeyClosure, SingleKey};

/// Wraps a service in a [`CircuitBreaker`]: one breaker per key, CLOSED / OPEN / HALF_OPEN.
///
/// Every service the layer builds, and every clone of those, shares the same breakers; read
/// and steer them with [`handle`](Self::handle). The key defaults to the request's model
/// ([`ByModel`]); the layer's `name` (its provider) goes into events and logs.
///
/// ```
/// use portcullis_core::{ChatMessage, ChatRequest, CompletionResult, ErrorKind, LlmError};
/// use portcullis_layers::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer, CircuitState};
/// use tower::{Service, ServiceBuilder, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let layer = CircuitBreakerLayer::new("openai", CircuitBreakerConfig::default())?;
/// let handle = layer.handle();
/// let mut events = handle.subscribe();
///
/// // An upstream that is down: every call fails with a 503.
/// let mut svc = ServiceBuilder::new().layer(layer).service_fn(|_req: ChatRequest| async {
///     Err::<CompletionResult, _>(LlmError::new(ErrorKind::Overloaded, "down").with_status(503))
/// });
///
/// let req = ChatRequest::new("gpt-4o-mini", vec![ChatMessage::user("hi")]);
/// for _ in 0..5 {
///     let err = svc.ready().await?.call(req.clone()).await.unwrap_err();
///     assert_eq!(err.kind(), ErrorKind::Overloaded);
/// }
/// // Five failures in a row opened the breaker: the sixth call never reaches upstream.
/// assert_eq!(handle.state("gpt-4o-mini"), CircuitState::Open);
/// let err = svc.ready().await?.call(req).await.unwrap_err();
/// assert_eq!(err.kind(), ErrorKind::CircuitOpen);
///
/// let opened = events.recv().await?;
/// assert_eq!((opened.from, opened.to), (CircuitState::Closed, CircuitState::Open));
/// # Ok(())
/// # }
/// ```
pub struct CircuitBreakerLayer<F = ByModel, K = Arc<str>> {
    key_fn: Arc<F>,
    shared: Arc<Shared<K>>,
}

impl CircuitBreakerLayer {
    /// A layer named `name` (the provider, e.g. `"openai"`), keyed by model, with a validated
    /// configuration. Key by something else with [`key_by`](Self::key_by),
    /// [`key_fn`](Self::key_fn) or [`single_key`](Self::single_key) (any request type).
    pub fn new(
        name: impl Into<Arc<str>>,
        config: CircuitBreakerConfig,
    ) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(CircuitBreakerLayer {
            key_fn: Arc::new(ByModel),
            shared: Arc::new(Shared::new(name.into(), config)),
        })
    }
}

impl<F, K> CircuitBreakerLayer<F, K>
where
    K: Clone + Eq + Hash + fmt::Debug + Send + Sync + 'static,
{
    /// Keys breakers with `key_fn` instead; `K2` is its key type for the requests served.
    /// Breakers (and handles) of the previous key type are left behind.
    pub fn key_fn<F2, K2>(self, key_fn: F2) -> CircuitBreakerLayer<F2, K2>
    where
        K2: Clone + Eq + Hash + fmt::Debug + Send + Sync + 'static,
    {
        let common = &self.shared.common;
        CircuitBreakerLayer {
            key_fn: Arc::new(key_fn),
            shared: Arc::new(Shared::new(common.name.clone(), common.config.clone())),
        }
    }

    /// One breaker for every request ([`SingleKey`]).
    pub fn single_key(self) -> CircuitBreakerLayer<SingleKey, ()> {
        self.key_fn(SingleKey)
    }

    /// Keys breakers with a closure of the request.
    pub fn key_by<Req, K2, C>(self, f: C) -> CircuitBreakerLayer<KeyClosure<C>, K2>
    where
        C: Fn(&Req) -> K2 + Send + Sync + 'static,
        K2: Clone + Eq + Hash + fmt::Debug + Send + Sync + 'static,
    {
        self.key_fn(KeyClosure(f))
    }

    /// Reads and steers the breakers of this layer and of every service it builds.
    pub fn handle(&self) -> CircuitBreakerHandle<K> {
        CircuitBreakerHandle {
            shared: self.shared.clone(),
        }
    }

    /// The layer's name.
    pub fn name(&self) -> &str {
        &self.shared.common.name
    }

    /// The validated configuration.
    pub fn config(&self) -> &CircuitBreakerConfig {
        &self.shared.common.config
    }
}

impl<F, K> Clone for CircuitBreakerLayer<F, K> {
    fn clone(&self) -> Self {
        CircuitBreakerLayer {
            key_fn: self.key_fn.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<F, K> fmt::Debug for CircuitBreakerLayer<F, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerLayer")
            .field("name", &self.shared.common.name)
            .field("config", &self.shared.common.config)
            .finish_non_exhaustive()
    }
}

impl<S, F, K> Layer<S> for CircuitBreakerLayer<F, K> {
    type Service = CircuitBreaker<S, F, K>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreaker::from_parts(inner, self.key_fn.clone(), self.shared.clone())
    }
}
