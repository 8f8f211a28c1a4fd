//! Keys: which breaker or bucket a request belongs to.
//!
//! The circuit breaker and the token bucket keep one state per key. By default the key is the
//! request's model ([`ByModel`]), and each layer instance carries a name (its provider), so a
//! key reads as `provider:model`. Supply your own with a closure `Fn(&Req) -> K`.

use std::fmt::Debug;
use std::hash::Hash;
use std::sync::Arc;

/// Maps a request to the key of its state.
pub trait KeyFn<Req>: Send + Sync + 'static {
    /// The key type. Cloning it should be cheap (an `Arc<str>`, an integer).
    type Key: Clone + Eq + Hash + Debug + Send + Sync + 'static;
    /// The request's key.
    fn key(&self, req: &Req) -> Self::Key;

    /// Whether `req`'s key is `key`. The layers ask this first, to reuse the state of the
    /// previous call's key without building (cloning, hashing) a key; override it when that
    /// can be answered without building one. The default builds the key and compares.
    fn is_key(&self, req: &Req, key: &Self::Key) -> bool {
        self.key(req) == *key
    }
}

/// The default key: the request's model name (`Arc<str>`, cloned without allocating when the
/// request keeps its model in an `Arc`, as [`ChatRequest`](portcullis_core::ChatRequest) does).
/// Requests that name no model share the key `""`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ByModel;

impl KeyFn<portcullis_core::ChatRequest> for ByModel {
    type Key = Arc<str>;
    fn key(&self, req: &portcullis_core::ChatRequest) -> Arc<str> {
        req.model.clone()
    }

    fn is_key(&self, req: &portcullis_core::ChatRequest, key: &Arc<str>) -> bool {
        Arc::ptr_eq(&req.model, key) || *req.model == **key
    }
}

/// One key for every request: a single shared state.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleKey;

impl<Req> KeyFn<Req> for SingleKey {
    type Key = ();
    fn key(&self, _req: &Req) -> Self::Key {}
    fn is_key(&self, _req: &Req, _key: &()) -> bool {
        true
    }
}

/// A key function from a closure.
#[derive(Clone)]
pub struct KeyClosure<F>(pub F);

impl<F> Debug for KeyClosure<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyClosure")
    }
}

impl<Req, K, F> KeyFn<Req> for KeyClosure<F>
where
    F: Fn(&Req) -> K + Send + Sync + 'static,
    K: Clone + Eq + Hash + Debug + Send + Sync + 'static,
{
    type Key = K;
    fn key(&self, req: &Req) -> K {
        (self.0)(req)
    }
}

/// The model name of a request, for logs: `"-"` when it names none.
pub(crate) fn model_of<Req: portcullis_core::RequestInfo>(req: &Req) -> &str {
    req.model().unwrap_or("-")
}
