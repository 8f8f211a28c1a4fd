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

/// The hasher of the in-memory token bucket's key map, which is looked up on every call:
/// FxHash (a rotate, a xor and a multiply per word), far cheaper than the default SipHash for
/// the short keys it holds (a model name). It is not keyed: a client that chooses the keys
/// could aim many at the same buckets and slow lookups down (the map is bounded in size, see
/// [`KeyBounds`](crate::KeyBounds), not in probe length). The circuit breaker, whose common
/// path does not hash, keeps SipHash.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct FxHasher {
    hash: u64,
}

/// Builds [`FxHasher`]s.
pub(crate) type FxBuildHasher = std::hash::BuildHasherDefault<FxHasher>;

impl FxHasher {
    const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(Self::SEED);
    }
}

impl std::hash::Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for word in &mut words {
            let mut w = [0; 8];
            w.copy_from_slice(word);
            self.add(u64::from_le_bytes(w));
        }
        let rest = words.remainder();
        if !rest.is_empty() {
            let mut w = [0; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w));
        }
    }

    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }

    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    /// The multiply leaves the low bits, which pick the bucket, depending only on the low bits
    /// of the input (the first bytes of a string): rotating brings the well-mixed high bits
    /// down, as rustc-hash 2 does. Without it, `m10000` … `m19999` fall into 32 buckets.
    fn finish(&self) -> u64 {
        self.hash.rotate_left(26)
    }
}
