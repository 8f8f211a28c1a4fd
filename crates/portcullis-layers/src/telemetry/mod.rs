//! Metrics in the names people already scrape: OpenTelemetry's GenAI client conventions
//! (semantic conventions v1.37+: `gen_ai.provider.name`, `gen_ai.client.token.usage`,
//! `gen_ai.client.operation.duration`, `gen_ai.client.operation.time_to_first_chunk`) and ours
//! under `portcullis.`.
//!
//! # The facade
//!
//! The [`metrics`](https://docs.rs/metrics) crate, behind this crate's `metrics` feature:
//! - **nothing when off**: without the feature every recording function here is an empty
//!   inline function, so a user who wants no metrics compiles no metrics code at all;
//! - **any backend when on**: a Prometheus exporter (`metrics-exporter-prometheus`), an
//!   OpenTelemetry bridge (`metrics-exporter-opentelemetry`), statsd, or a test recorder
//!   (`metrics-util`'s `DebuggingRecorder`), installed once by the application; with none
//!   installed a recording is one atomic load.
//!
//! `opentelemetry`'s own metrics API was the other candidate: it would tie every user to one
//! SDK version and make a Prometheus-only service carry the OpenTelemetry SDK; `metrics`
//! exports to OpenTelemetry as well, and is what tower-adjacent crates (`axum-prometheus`,
//! `metrics-tower`) already use.
//!
//! # Bounded labels
//!
//! A model name comes from the request, so it could create a series per distinct string. The
//! first [`MAX_MODEL_LABELS`] distinct model names each get their label; every later one is
//! recorded as `other` ([`model_label`]). Provider, breaker and bucket names come from the
//! configuration, not from requests.
//!
//! Every name is a constant of [`attr`] or [`metric`].

mod future;
mod layer;
mod service;

pub use future::TelemetryFuture;
pub use layer::TelemetryLayer;
pub use service::{Served, Telemetry};

/// Attribute (label) names.
pub mod attr {
    /// The operation: always `chat` here.
    pub const GEN_AI_OPERATION_NAME: &str = "gen_ai.operation.name";
    /// The provider that served the call (`openai`, `anthropic`, `azure.ai.openai`, or the
    /// entry's name for one of your own).
    pub const GEN_AI_PROVIDER_NAME: &str = "gen_ai.provider.name";
    /// The model the request asked for (bounded, see [`model_label`](super::model_label)).
    pub const GEN_AI_REQUEST_MODEL: &str = "gen_ai.request.model";
    /// The model that answered.
    pub const GEN_AI_RESPONSE_MODEL: &str = "gen_ai.response.model";
    /// `input` or `output`.
    pub const GEN_AI_TOKEN_TYPE: &str = "gen_ai.token.type";
    /// The error kind of a failed call (`rate_limited`, `overloaded`, …).
    pub const ERROR_TYPE: &str = "error.type";
    /// Why a retry was made (its error kind).
    pub const RETRY_REASON: &str = "portcullis.retry.reason";
    /// A breaker's or a bucket's name (the provider's, in a `Stack`).
    pub const LAYER: &str = "portcullis.layer";
    /// A breaker's state: `closed`, `open`, `half_open`.
    pub const STATE: &str = "portcullis.breaker.state";
    /// A transition's origin state.
    pub const FROM: &str = "portcullis.from";
    /// A transition's or a failover's destination.
    pub const TO: &str = "portcullis.to";
    /// A bucket: `requests`, `tokens`, `input_tokens`, `output_tokens`.
    pub const BUCKET: &str = "portcullis.bucket";
    /// Why the client refused a call itself: `throttled`, `over_capacity`.
    pub const REFUSAL: &str = "portcullis.refusal";
}

/// Metric names.
pub mod metric {
    /// Histogram, `{token}`: input and output tokens per call (GenAI convention).
    pub const GEN_AI_CLIENT_TOKEN_USAGE: &str = "gen_ai.client.token.usage";
    /// Histogram, `s`: the whole call, retries and fallbacks included (GenAI convention).
    pub const GEN_AI_CLIENT_OPERATION_DURATION: &str = "gen_ai.client.operation.duration";
    /// Histogram, `s`: time to a stream's first content chunk (GenAI convention).
    pub const GEN_AI_CLIENT_TIME_TO_FIRST_CHUNK: &str =
        "gen_ai.client.operation.time_to_first_chunk";
    /// Counter: retries made, by reason.
    pub const RETRIES: &str = "portcullis.retry.attempts";
    /// Counter: retries refused by the retry budget.
    pub const RETRY_BUDGET_REFUSALS: &str = "portcullis.retry.budget_refusals";
    /// Counter: breaker transitions, by layer, from, to.
    pub const BREAKER_TRANSITIONS: &str = "portcullis.breaker.transitions";
    /// Gauge: a breaker's state (0 closed, 1 half-open, 2 open), by layer.
    pub const BREAKER_STATE: &str = "portcullis.breaker.state";
    /// Histogram, `s`: how long an admitted call waited in its bucket.
    pub const BUCKET_WAIT: &str = "portcullis.bucket.wait";
    /// Gauge: a bucket's level, by layer, model and bucket.
    pub const BUCKET_LEVEL: &str = "portcullis.bucket.level";
    /// Gauge: a bucket's limit (its capacity), by layer, model and bucket.
    pub const BUCKET_LIMIT: &str = "portcullis.bucket.limit";
    /// Counter: calls the client refused itself, by layer and refusal.
    pub const REFUSALS: &str = "portcullis.bucket.refusals";
    /// Counter: failovers, by from and to.
    pub const FAILOVERS: &str = "portcullis.fallback.failovers";
    /// Counter: streams that failed after their first chunk, by provider.
    pub const STREAM_INTERRUPTIONS: &str = "portcullis.stream.interruptions";
}

/// The reason label of a retry, from its row of the classification table: `rate_limited`
/// (a 429), `unavailable` (a breaker failure: 5xx, 529, timeouts, connection errors),
/// `retry_after` (the provider asked for a wait), else `retryable`.
pub fn reason(class: &portcullis_core::Classification) -> &'static str {
    if class.rate_limited {
        "rate_limited"
    } else if class.breaker_failure {
        "unavailable"
    } else if class.retry_after.is_some() {
        "retry_after"
    } else {
        "retryable"
    }
}

/// How many distinct model names get their own label; later ones are `other`.
pub const MAX_MODEL_LABELS: usize = 64;

/// The label of a model name: itself for the first [`MAX_MODEL_LABELS`] distinct names seen
/// in this process, `other` after. A name seen before costs a lookup, no allocation.
pub fn model_label(model: &str) -> std::sync::Arc<str> {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock, PoisonError};
    static SEEN: OnceLock<Mutex<HashMap<Box<str>, Arc<str>>>> = OnceLock::new();
    static OTHER: OnceLock<Arc<str>> = OnceLock::new();
    let mut seen = SEEN
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some(label) = seen.get(model) {
        return label.clone();
    }
    if seen.len() < MAX_MODEL_LABELS {
        let label: Arc<str> = Arc::from(model);
        seen.insert(Box::from(model), label.clone());
        return label;
    }
    OTHER.get_or_init(|| Arc::from("other")).clone()
}

#[cfg(feature = "metrics")]
mod on {
    use super::{attr, metric, model_label};
    use metrics::SharedString;
    use std::sync::Arc;
    use std::time::Duration;

    pub(crate) fn retry(reason: &'static str) {
        metrics::counter!(metric::RETRIES, attr::RETRY_REASON => reason).increment(1);
    }

    pub(crate) fn budget_refused() {
        metrics::counter!(metric::RETRY_BUDGET_REFUSALS).increment(1);
    }

    pub(crate) fn breaker(layer: &Arc<str>, from: &'static str, to: &'static str, state: f64) {
        let layer = SharedString::from(layer.clone());
        metrics::counter!(metric::BREAKER_TRANSITIONS, attr::LAYER => layer.clone(), attr::FROM => from, attr::TO => to)
            .increment(1);
        metrics::gauge!(metric::BREAKER_STATE, attr::LAYER => layer).set(state);
    }

    pub(crate) fn bucket_wait(layer: &Arc<str>, wait: Duration) {
        metrics::histogram!(metric::BUCKET_WAIT, attr::LAYER => SharedString::from(layer.clone()))
            .record(wait.as_secs_f64());
    }

    pub(crate) fn refused(layer: &Arc<str>, refusal: &'static str) {
        metrics::counter!(metric::REFUSALS, attr::LAYER => SharedString::from(layer.clone()), attr::REFUSAL => refusal)
            .increment(1);
    }

    /// Whether this admission refreshes its bucket's level gauges: one in [`LEVEL_EVERY`](super::LEVEL_EVERY).
    pub(crate) fn sample_levels() -> bool {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        N.fetch_add(1, Ordering::Relaxed) % super::LEVEL_EVERY == 0
    }

    pub(crate) fn bucket_level(
        layer: &Arc<str>,
        model: &str,
        bucket: &'static str,
        level: f64,
        limit: f64,
    ) {
        let (layer, model) = (
            SharedString::from(layer.clone()),
            SharedString::from(model_label(model)),
        );
        metrics::gauge!(metric::BUCKET_LEVEL, attr::LAYER => layer.clone(), attr::GEN_AI_REQUEST_MODEL => model.clone(), attr::BUCKET => bucket)
            .set(level);
        metrics::gauge!(metric::BUCKET_LIMIT, attr::LAYER => layer, attr::GEN_AI_REQUEST_MODEL => model, attr::BUCKET => bucket)
            .set(limit);
    }

    pub(crate) fn failover(from: &str, to: &str) {
        metrics::counter!(metric::FAILOVERS, attr::FROM => from.to_owned(), attr::TO => to.to_owned())
            .increment(1);
    }

    /// One finished call: its duration, and its tokens when it reported usage.
    pub(crate) fn call(
        c: &super::service::Call,
        provider: &str,
        usage: Option<(u64, u64)>,
        error: Option<&'static str>,
    ) {
        let model = SharedString::from(model_label(&c.model));
        let provider = SharedString::from(provider.to_owned());
        let mut labels = Vec::with_capacity(5);
        labels.push(metrics::Label::from_static_parts(
            attr::GEN_AI_OPERATION_NAME,
            "chat",
        ));
        labels.push(metrics::Label::new(attr::GEN_AI_PROVIDER_NAME, provider));
        labels.push(metrics::Label::new(attr::GEN_AI_REQUEST_MODEL, model));
        if let Some(e) = error {
            labels.push(metrics::Label::from_static_parts(attr::ERROR_TYPE, e));
        }
        metrics::histogram!(metric::GEN_AI_CLIENT_OPERATION_DURATION, labels.clone())
            .record(c.started.elapsed().as_secs_f64());
        if let Some((input, output)) = usage {
            for (kind, n) in [("input", input), ("output", output)] {
                let mut l = labels.clone();
                l.push(metrics::Label::new(attr::GEN_AI_TOKEN_TYPE, kind));
                metrics::histogram!(metric::GEN_AI_CLIENT_TOKEN_USAGE, l).record(n as f64);
            }
        }
    }

    pub(crate) fn first_chunk(c: &super::service::Call, provider: &str, after: Duration) {
        metrics::histogram!(
            metric::GEN_AI_CLIENT_TIME_TO_FIRST_CHUNK,
            attr::GEN_AI_OPERATION_NAME => "chat",
            attr::GEN_AI_PROVIDER_NAME => provider.to_owned(),
            attr::GEN_AI_REQUEST_MODEL => model_label(&c.model)
        )
        .record(after.as_secs_f64());
    }

    pub(crate) fn interrupted(provider: &str) {
        metrics::counter!(metric::STREAM_INTERRUPTIONS, attr::GEN_AI_PROVIDER_NAME => provider.to_owned())
            .increment(1);
    }
}

#[cfg(not(feature = "metrics"))]
mod on {
    use std::time::Duration;
    #[inline(always)]
    pub(crate) fn retry(_: &'static str) {}
    #[inline(always)]
    pub(crate) fn budget_refused() {}
    #[inline(always)]
    pub(crate) fn breaker(_: &str, _: &'static str, _: &'static str, _: f64) {}
    #[inline(always)]
    pub(crate) fn bucket_wait(_: &str, _: Duration) {}
    #[inline(always)]
    pub(crate) fn refused(_: &str, _: &'static str) {}
    #[inline(always)]
    pub(crate) fn failover(_: &str, _: &str) {}
    #[inline(always)]
    pub(crate) fn call(
        _: &super::service::Call,
        _: &(),
        _: Option<(u64, u64)>,
        _: Option<&'static str>,
    ) {
    }
    #[inline(always)]
    pub(crate) fn first_chunk(_: &super::service::Call, _: &str, _: Duration) {}
    #[inline(always)]
    pub(crate) fn interrupted(_: &()) {}
}

#[cfg(feature = "metrics")]
pub(crate) use on::{bucket_level, sample_levels};

/// The bucket level and limit gauges are refreshed at one admission in this many (a gauge
/// keeps its last value; the handles read the levels exactly at any time).
pub const LEVEL_EVERY: u32 = 16;
pub(crate) use on::{
    breaker, bucket_wait, budget_refused, call, failover, first_chunk, interrupted, refused, retry,
};

/// Whether metrics are compiled in (this crate's `metrics` feature).
pub const ENABLED: bool = cfg!(feature = "metrics");
