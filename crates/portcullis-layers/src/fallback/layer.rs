use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use tower_layer::Layer;

use super::choose::FailoverPolicy;
use super::service::{Entry, Fallback};

/// Puts a wrapped service first in a chain of fallbacks.
///
/// `FallbackLayer::new("openai", secondaries).layer(primary)` is
/// `Fallback::new([Entry::new("openai", primary), secondaries...])`.
///
/// The wrapped service's entry has no gate and no retry policy of its own.
pub struct FallbackLayer<S, Req> {
    name: Cow<'static, str>,
    rest: Arc<[Entry<S, Req>]>,
    order: FailoverPolicy,
}

impl<S, Req> Clone for FallbackLayer<S, Req> {
    fn clone(&self) -> Self {
        FallbackLayer {
            name: self.name.clone(),
            rest: self.rest.clone(),
            order: self.order,
        }
    }
}

impl<S, Req> fmt::Debug for FallbackLayer<S, Req> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FallbackLayer")
            .field("name", &self.name)
            .field("rest", &self.rest)
            .field("order", &self.order)
            .finish()
    }
}

impl<S, Req> FallbackLayer<S, Req> {
    /// The wrapped service is the primary, named `name`; `rest` follow in order.
    pub fn new(name: impl Into<Cow<'static, str>>, rest: Vec<Entry<S, Req>>) -> Self {
        FallbackLayer {
            name: name.into(),
            rest: rest.into(),
            order: FailoverPolicy::default(),
        }
    }

    /// Sets the order in which attempts are spent after a failure (default
    /// [`FailoverPolicy::FailoverFirst`]).
    pub fn failover(mut self, order: FailoverPolicy) -> Self {
        self.order = order;
        self
    }
}

impl<S: Clone, Req> Layer<S> for FallbackLayer<S, Req> {
    type Service = Fallback<S, Req>;

    fn layer(&self, primary: S) -> Fallback<S, Req> {
        let mut entries = Vec::with_capacity(self.rest.len() + 1);
        entries.push(Entry::new(self.name.clone(), primary.clone()));
        entries.extend(self.rest.iter().cloned());
        Fallback {
            primary,
            chain: entries.into(),
            rank: None,
            order: self.order,
        }
    }
}
