use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use portcullis_core::{ChatRequest, Classify, OnFinish, Replay};
use tower_service::Service;

use super::future::FallbackFuture;

type Remap<Req> = Arc<dyn Fn(Req) -> Req + Send + Sync>;

/// One entry of a fallback chain: a service, its name, an optional request remap, and whether
/// it has a larger context window than the entries before it.
pub struct Entry<S, Req> {
    pub(super) name: Cow<'static, str>,
    pub(super) service: S,
    pub(super) remap: Option<Remap<Req>>,
    pub(super) larger_context: bool,
}

impl<S: Clone, Req> Clone for Entry<S, Req> {
    fn clone(&self) -> Self {
        Entry {
            name: self.name.clone(),
            service: self.service.clone(),
            remap: self.remap.clone(),
            larger_context: self.larger_context,
        }
    }
}

impl<S, Req> fmt::Debug for Entry<S, Req> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("name", &self.name)
            .field("remap", &self.remap.is_some())
            .field("larger_context", &self.larger_context)
            .finish()
    }
}

impl<S, Req> Entry<S, Req> {
    /// An entry named `name` (a provider, used in logs) that calls `service`.
    pub fn new(name: impl Into<Cow<'static, str>>, service: S) -> Self {
        Entry {
            name: name.into(),
            service,
            remap: None,
            larger_context: false,
        }
    }

    /// Rewrites the request before this entry sees it.
    pub fn remap<F>(mut self, f: F) -> Self
    where
        F: Fn(Req) -> Req + Send + Sync + 'static,
    {
        self.remap = Some(Arc::new(f));
        self
    }

    /// Declares this entry as having a larger context window: context-length errors of earlier
    /// entries fail over to it (and only to such entries).
    pub fn larger_context(mut self, yes: bool) -> Self {
        self.larger_context = yes;
        self
    }

    /// The entry's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The entry's service.
    pub fn get_ref(&self) -> &S {
        &self.service
    }

    /// The entry's service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.service
    }

    /// Unwraps the entry's service.
    pub fn into_inner(self) -> S {
        self.service
    }
}

impl<S> Entry<S, ChatRequest> {
    /// Sends this entry's requests to `model` instead of the caller's (no allocation per call:
    /// the name is shared).
    pub fn model(self, model: &str) -> Self {
        let model: Arc<str> = Arc::from(model);
        self.remap(move |req: ChatRequest| req.with_model(model.clone()))
    }
}

/// A fallback chain could not be built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FallbackError {
    /// The chain has no entry.
    Empty,
}

impl fmt::Display for FallbackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FallbackError::Empty => f.write_str("a fallback chain needs at least one entry"),
        }
    }
}

impl std::error::Error for FallbackError {}

/// An ordered chain of services, primary first. See the [module docs](super).
pub struct Fallback<S, Req> {
    pub(super) primary: S,
    pub(super) chain: Arc<[Entry<S, Req>]>,
}

impl<S: Clone, Req> Clone for Fallback<S, Req> {
    fn clone(&self) -> Self {
        Fallback {
            primary: self.primary.clone(),
            chain: self.chain.clone(),
        }
    }
}

impl<S, Req> fmt::Debug for Fallback<S, Req> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fallback")
            .field("chain", &self.chain)
            .finish()
    }
}

impl<S: Clone, Req> Fallback<S, Req> {
    /// A chain of entries, primary first.
    pub fn new(entries: Vec<Entry<S, Req>>) -> Result<Self, FallbackError> {
        let primary = entries.first().ok_or(FallbackError::Empty)?.service.clone();
        Ok(Fallback {
            primary,
            chain: entries.into(),
        })
    }

    /// The entries, primary first (shared by every clone).
    pub fn entries(&self) -> &[Entry<S, Req>] {
        &self.chain
    }

    /// The primary's service: the clone this `Fallback` drives readiness on.
    pub fn get_ref(&self) -> &S {
        &self.primary
    }

    /// The primary's service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.primary
    }

    /// Unwraps the primary's service.
    pub fn into_inner(self) -> S {
        self.primary
    }
}

impl<S, Req> Service<Req> for Fallback<S, Req>
where
    S: Service<Req> + Clone,
    S::Response: OnFinish,
    S::Error: Classify + fmt::Display,
    Req: Replay,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = FallbackFuture<S, Req>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.primary.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        // Keep the caller's request only while another entry may need it.
        // (A request that cannot be replayed is sent to the primary only.)
        let (first, kept) = match self.chain.len() > 1 {
            true => match req.replay() {
                Some(copy) => (copy, Some(req)),
                None => (req, None),
            },
            false => (req, None),
        };
        let first = match &self.chain[0].remap {
            Some(remap) => remap(first),
            None => first,
        };
        FallbackFuture::new(self.primary.call(first), self.chain.clone(), kept)
    }
}
