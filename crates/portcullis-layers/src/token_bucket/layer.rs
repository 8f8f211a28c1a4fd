use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use portcullis_core::ChatCost;
use tower_layer::Layer;

use super::config::{ConfigError, TokenBucketConfig};
use super::handle::TokenBucketHandle;
use super::memory::MemoryStore;
use super::service::TokenBucket;
use super::store::KeyLabel;
use crate::key::{ByModel, KeyClosure, SingleKey};

/// What every clone of the layer and of its services shares.
#[derive(Debug)]
pub(crate) struct Settings<KF, C> {
    pub(crate) key_fn: KF,
    pub(crate) cost: C,
    pub(crate) name: Arc<str>,
    pub(crate) max_wait: Duration,
    pub(crate) max_pause: Duration,
    /// This layer's metric handles (nothing without the `metrics` feature).
    pub(crate) meters: crate::telemetry::BucketMeters,
}

/// Applies a dual RPM / TPM token bucket to a service. See the [module docs](super).
///
/// ```
/// use portcullis_core::{ChatMessage, ChatRequest, CompletionResult, ErrorKind, LlmError, Usage};
/// use portcullis_layers::token_bucket::{KeyLimits, TokenBucketConfig, TokenBucketLayer};
/// use tower::{Service, ServiceBuilder, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// // 500 RPM / 200 000 TPM for openai:gpt-4o-mini (the seed's table); at most 1 s of waiting.
/// let config = TokenBucketConfig::new()
///     .limit("openai:gpt-4o-mini", KeyLimits::rpm_tpm(500, 200_000)?)
///     .max_wait(std::time::Duration::from_secs(1));
/// let layer = TokenBucketLayer::new("openai", config)?;
/// let handle = layer.handle();
///
/// let provider = tower::service_fn(|req: ChatRequest| async move {
///     Ok::<_, LlmError>(CompletionResult::new("openai", &*req.model, "hi").with_usage(Usage::new(9, 1)))
/// });
/// let mut svc = ServiceBuilder::new().layer(layer).service(provider);
///
/// let req = ChatRequest::new("gpt-4o-mini", vec![ChatMessage::user("Hello there")]).max_tokens(100);
/// let res = svc.ready().await?.call(req).await?;
/// assert_eq!(res.content, "hi");
///
/// // 109 tokens were reserved (9 prompt + 100 max_tokens); 10 were used: 99 came back.
/// let levels = handle.level("gpt-4o-mini").unwrap();
/// assert!((levels.tokens().unwrap() - 199_990.0).abs() < 1.0);
///
/// // A request that could never fit is refused at once.
/// let huge = ChatRequest::new("gpt-4o-mini", vec![ChatMessage::user("x")]).max_tokens(300_000);
/// let err = svc.ready().await?.call(huge).await.unwrap_err();
/// assert_eq!(err.kind(), ErrorKind::Throttled);
/// # Ok(())
/// # }
/// ```
pub struct TokenBucketLayer<KF = ByModel, C = ChatCost, St = MemoryStore> {
    settings: Arc<Settings<KF, C>>,
    store: St,
}

impl<KF, C, St: Clone> Clone for TokenBucketLayer<KF, C, St> {
    fn clone(&self) -> Self {
        TokenBucketLayer {
            settings: self.settings.clone(),
            store: self.store.clone(),
        }
    }
}

impl<KF, C, St: std::fmt::Debug> std::fmt::Debug for TokenBucketLayer<KF, C, St> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenBucketLayer")
            .field("name", &self.settings.name)
            .field("max_wait", &self.settings.max_wait)
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl TokenBucketLayer {
    /// A layer for `ChatRequest`s keyed by model, with an in-memory store, for the provider
    /// `name` (keys read `name:model`). The configuration is validated. Key by something else
    /// with [`key_by`](Self::key_by), [`key_fn`](Self::key_fn) or
    /// [`single_key`](Self::single_key) (any request type).
    pub fn new(name: impl Into<Arc<str>>, config: TokenBucketConfig) -> Result<Self, ConfigError> {
        let name = name.into();
        let (max_wait, max_pause) = (config.max_wait, config.max_pause);
        let store = MemoryStore::new(name.clone(), config)?;
        Ok(Self::from_store(name, store, max_wait).max_pause(max_pause))
    }
}

impl<St> TokenBucketLayer<ByModel, ChatCost, St> {
    /// A layer over any store (a shared one, for a fleet). The store carries the limits;
    /// `max_wait` is the longest admission wait; a provider's pause is cut to
    /// [`DEFAULT_MAX_PAUSE`](super::DEFAULT_MAX_PAUSE) unless [`max_pause`](Self::max_pause)
    /// says otherwise.
    pub fn from_store(name: impl Into<Arc<str>>, store: St, max_wait: Duration) -> Self {
        TokenBucketLayer {
            settings: Arc::new(Settings {
                key_fn: ByModel,
                cost: ChatCost,
                name: name.into(),
                max_wait,
                max_pause: super::DEFAULT_MAX_PAUSE,
                meters: Default::default(),
            }),
            store,
        }
    }
}

impl<KF, C, St> TokenBucketLayer<KF, C, St> {
    fn map_settings<KF2, C2, St2>(
        self,
        key_fn: KF2,
        cost: C2,
        store: St2,
    ) -> TokenBucketLayer<KF2, C2, St2> {
        TokenBucketLayer {
            settings: Arc::new(Settings {
                key_fn,
                cost,
                name: self.settings.name.clone(),
                max_wait: self.settings.max_wait,
                max_pause: self.settings.max_pause,
                meters: self.settings.meters.clone(),
            }),
            store,
        }
    }

    /// Sets the longest pause a provider's 429 may put on a key (see
    /// [`TokenBucketConfig::max_pause`](super::TokenBucketConfig::max_pause)).
    pub fn max_pause(self, max_pause: Duration) -> Self
    where
        KF: Clone,
        C: Clone,
    {
        let s = &self.settings;
        TokenBucketLayer {
            settings: Arc::new(Settings {
                key_fn: s.key_fn.clone(),
                cost: s.cost.clone(),
                name: s.name.clone(),
                max_wait: s.max_wait,
                max_pause,
                meters: s.meters.clone(),
            }),
            store: self.store,
        }
    }

    /// Uses another cost function (for another request type, or another estimate).
    pub fn with_cost<C2>(self, cost: C2) -> TokenBucketLayer<KF, C2, St>
    where
        KF: Clone,
        St: Clone,
    {
        let (kf, store) = (self.settings.key_fn.clone(), self.store.clone());
        self.map_settings(kf, cost, store)
    }

    /// Uses another store, keeping the key and cost functions.
    pub fn with_store<St2>(self, store: St2) -> TokenBucketLayer<KF, C, St2>
    where
        KF: Clone,
        C: Clone,
    {
        let (kf, cost) = (self.settings.key_fn.clone(), self.settings.cost.clone());
        self.map_settings(kf, cost, store)
    }

    /// The provider name keys are displayed under.
    pub fn name(&self) -> &str {
        &self.settings.name
    }

    /// A handle on the shared state: levels per key, limits at run time.
    pub fn handle(&self) -> TokenBucketHandle<St>
    where
        St: Clone,
    {
        TokenBucketHandle::new(
            self.store.clone(),
            self.settings.name.clone(),
            self.settings.max_wait,
        )
    }
}

impl<KF, C: Clone, K> TokenBucketLayer<KF, C, MemoryStore<K>> {
    /// Keys buckets with `key_fn` instead; `K2` is its key type for the requests served. The
    /// buckets are in a fresh in-memory store of that key type, with the same limits; buckets
    /// (and handles) of the previous key type are left behind.
    pub fn key_fn<KF2, K2>(self, key_fn: KF2) -> TokenBucketLayer<KF2, C, MemoryStore<K2>>
    where
        K2: Clone + Eq + Hash + KeyLabel + Send + Sync + 'static,
    {
        let store = self.store.rekeyed();
        let cost = self.settings.cost.clone();
        self.map_settings(key_fn, cost, store)
    }

    /// One set of buckets for every request ([`SingleKey`]).
    pub fn single_key(self) -> TokenBucketLayer<SingleKey, C, MemoryStore<()>> {
        self.key_fn(SingleKey)
    }

    /// Keys buckets with a closure of the request.
    pub fn key_by<Req, K2, F>(self, f: F) -> TokenBucketLayer<KeyClosure<F>, C, MemoryStore<K2>>
    where
        F: Fn(&Req) -> K2 + Send + Sync + 'static,
        K2: Clone + Eq + Hash + KeyLabel + Send + Sync + 'static,
    {
        self.key_fn(KeyClosure(f))
    }
}

impl<S, KF, C, St: Clone> Layer<S> for TokenBucketLayer<KF, C, St> {
    type Service = TokenBucket<S, KF, C, St>;

    fn layer(&self, inner: S) -> Self::Service {
        TokenBucket::new(inner, self.settings.clone(), self.store.clone())
    }
}
