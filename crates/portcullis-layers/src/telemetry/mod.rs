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
//! # Handles, registered once
//!
//! Each layer registers its metric handles at its first use and records through them after:
//! the token bucket's wait histogram and refusal counters per layer, its level and limit gauges
//! per (layer, model), the telemetry layer's series per (provider, model, error). A recording
//! then makes no lookup in the recorder and no allocation. So install the recorder before the
//! first call (as any `metrics` user does): a layer that recorded before keeps the no-op
//! handles it got then.
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
    use metrics::{Counter, Gauge, Histogram, SharedString};
    use std::sync::{Arc, OnceLock, PoisonError, RwLock};
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

    /// A token bucket layer's series, registered at its first admission (so against the
    /// recorder installed by then) and shared by its clones: an admission then records
    /// through a handle, with no lookup and no allocation.
    #[derive(Clone, Default)]
    pub(crate) struct BucketMeters {
        series: Arc<OnceLock<BucketSeries>>,
        levels: Arc<RwLock<Vec<LevelSeries>>>,
    }

    struct BucketSeries {
        wait: Histogram,
        throttled: Counter,
        over_capacity: Counter,
    }

    impl BucketMeters {
        fn get(&self, layer: &Arc<str>) -> &BucketSeries {
            self.series.get_or_init(|| {
                let layer = SharedString::from(layer.clone());
                let refusals = |r: &'static str| {
                    metrics::counter!(metric::REFUSALS, attr::LAYER => layer.clone(), attr::REFUSAL => r)
                };
                BucketSeries {
                    wait: metrics::histogram!(metric::BUCKET_WAIT, attr::LAYER => layer.clone()),
                    throttled: refusals("throttled"),
                    over_capacity: refusals("over_capacity"),
                }
            })
        }
    }

    pub(crate) fn bucket_wait(m: &BucketMeters, layer: &Arc<str>, wait: Duration) {
        m.get(layer).wait.record(wait.as_secs_f64());
    }

    pub(crate) fn refused(m: &BucketMeters, layer: &Arc<str>, refusal: &'static str) {
        let series = m.get(layer);
        match refusal {
            "over_capacity" => &series.over_capacity,
            _ => &series.throttled,
        }
        .increment(1);
    }

    /// Whether this admission refreshes its bucket's level gauges: one in [`LEVEL_EVERY`](super::LEVEL_EVERY).
    pub(crate) fn sample_levels() -> bool {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        N.fetch_add(1, Ordering::Relaxed) % super::LEVEL_EVERY == 0
    }

    /// One model's level and limit gauges, per bucket, registered at first use.
    struct LevelSeries {
        model: Box<str>,
        gauges: [OnceLock<(Gauge, Gauge)>; 4],
    }

    /// Sets the level and limit gauges of `model`'s buckets (`None`: a bucket it does not
    /// have). The first [`MAX_MODEL_LABELS`](super::MAX_MODEL_LABELS) models keep their handles.
    pub(crate) fn bucket_levels(
        m: &BucketMeters,
        layer: &Arc<str>,
        model: &str,
        buckets: [(&'static str, Option<(f64, f64)>); 4],
    ) {
        let set = |s: &LevelSeries| {
            for (i, (bucket, figures)) in buckets.iter().enumerate() {
                if let Some((level, limit)) = figures {
                    let (l, c) = s.gauges[i].get_or_init(|| {
                        let labels = [
                            metrics::Label::new(attr::LAYER, SharedString::from(layer.clone())),
                            metrics::Label::new(
                                attr::GEN_AI_REQUEST_MODEL,
                                SharedString::from(model_label(&s.model)),
                            ),
                            metrics::Label::from_static_parts(attr::BUCKET, bucket),
                        ];
                        (
                            metrics::gauge!(metric::BUCKET_LEVEL, labels.to_vec()),
                            metrics::gauge!(metric::BUCKET_LIMIT, labels.to_vec()),
                        )
                    });
                    l.set(*level);
                    c.set(*limit);
                }
            }
        };
        let is = |s: &&LevelSeries| *s.model == *model;
        {
            let all = m.levels.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(s) = all.iter().find(is) {
                return set(s);
            }
        }
        let mut all = m.levels.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(s) = all.iter().find(is) {
            return set(s);
        }
        let series = LevelSeries {
            model: model.into(),
            gauges: Default::default(),
        };
        set(&series);
        if all.len() < super::MAX_MODEL_LABELS {
            all.push(series);
        }
    }

    pub(crate) fn failover(from: &str, to: &str) {
        metrics::counter!(metric::FAILOVERS, attr::FROM => from.to_owned(), attr::TO => to.to_owned())
            .increment(1);
    }

    /// How many (provider, model, error) series one [`Telemetry`](super::Telemetry) keeps
    /// handles for; a call outside them records through the recorder's lookup instead.
    const MAX_CALL_SERIES: usize = 256;

    /// A [`Telemetry`](super::Telemetry) service's call series, shared by its clones: each
    /// (provider, model, error) registers its handles once, at its first call, and a call
    /// then records through them under a read lock, with no allocation.
    #[derive(Clone, Default)]
    pub(crate) struct CallMeters(Arc<RwLock<Vec<CallSeries>>>);

    struct CallSeries {
        provider: Arc<str>,
        /// The request's model (its label is [`model_label`]'s).
        model: Arc<str>,
        error: Option<&'static str>,
        labels: Vec<metrics::Label>,
        duration: Histogram,
        // Registered on first use, so that no empty series is exported for what never
        // happened (tokens of a failed call, a completion's first chunk).
        input: OnceLock<Histogram>,
        output: OnceLock<Histogram>,
        first_chunk: OnceLock<Histogram>,
        interrupted: OnceLock<Counter>,
    }

    impl CallSeries {
        fn new(provider: &str, model: &Arc<str>, error: Option<&'static str>) -> Self {
            let mut labels = vec![
                metrics::Label::from_static_parts(attr::GEN_AI_OPERATION_NAME, "chat"),
                metrics::Label::new(attr::GEN_AI_PROVIDER_NAME, provider.to_owned()),
                metrics::Label::new(
                    attr::GEN_AI_REQUEST_MODEL,
                    SharedString::from(model_label(model)),
                ),
            ];
            if let Some(e) = error {
                labels.push(metrics::Label::from_static_parts(attr::ERROR_TYPE, e));
            }
            CallSeries {
                duration: metrics::histogram!(
                    metric::GEN_AI_CLIENT_OPERATION_DURATION,
                    labels.clone()
                ),
                provider: provider.into(),
                model: model.clone(),
                error,
                labels,
                input: OnceLock::new(),
                output: OnceLock::new(),
                first_chunk: OnceLock::new(),
                interrupted: OnceLock::new(),
            }
        }

        fn tokens(&self, kind: &'static str) -> &Histogram {
            let cell = if kind == "input" {
                &self.input
            } else {
                &self.output
            };
            cell.get_or_init(|| {
                let mut l = self.labels.clone();
                l.push(metrics::Label::from_static_parts(
                    attr::GEN_AI_TOKEN_TYPE,
                    kind,
                ));
                metrics::histogram!(metric::GEN_AI_CLIENT_TOKEN_USAGE, l)
            })
        }

        fn first_chunk(&self) -> &Histogram {
            self.first_chunk.get_or_init(|| {
                metrics::histogram!(
                    metric::GEN_AI_CLIENT_TIME_TO_FIRST_CHUNK,
                    self.labels[..3].to_vec()
                )
            })
        }

        fn interrupted(&self) -> &Counter {
            self.interrupted.get_or_init(|| {
                metrics::counter!(metric::STREAM_INTERRUPTIONS, self.labels[1..2].to_vec())
            })
        }
    }

    impl CallMeters {
        /// `provider` as a shared string: the one of a series already registered (no
        /// allocation), else a new one (at a provider's first call only).
        pub(crate) fn provider(&self, provider: &str) -> Arc<str> {
            let all = self.0.read().unwrap_or_else(PoisonError::into_inner);
            match all.iter().find(|s| *s.provider == *provider) {
                Some(s) => s.provider.clone(),
                None => Arc::from(provider),
            }
        }

        /// Runs `record` on the series of (provider, model, error), registering it first if
        /// this is its first call.
        fn with(
            &self,
            provider: &str,
            model: &Arc<str>,
            error: Option<&'static str>,
            record: impl FnOnce(&CallSeries),
        ) {
            let is = |s: &CallSeries| {
                s.error == error && *s.provider == *provider && *s.model == **model
            };
            {
                let all = self.0.read().unwrap_or_else(PoisonError::into_inner);
                if let Some(s) = all.iter().find(|s| is(s)) {
                    return record(s);
                }
            }
            let mut all = self.0.write().unwrap_or_else(PoisonError::into_inner);
            if let Some(s) = all.iter().find(|s| is(s)) {
                return record(s);
            }
            let series = CallSeries::new(provider, model, error);
            record(&series);
            if all.len() < MAX_CALL_SERIES {
                all.push(series);
            }
        }
    }

    /// One finished call: its duration, and its tokens when it reported usage.
    pub(crate) fn call(
        c: &super::service::Call,
        provider: &str,
        usage: Option<(u64, u64)>,
        error: Option<&'static str>,
    ) {
        let elapsed = c.started.elapsed().as_secs_f64();
        c.meters.with(provider, &c.model, error, |s| {
            s.duration.record(elapsed);
            if let Some((input, output)) = usage {
                s.tokens("input").record(input as f64);
                s.tokens("output").record(output as f64);
            }
        });
    }

    pub(crate) fn first_chunk(c: &super::service::Call, provider: &str, after: Duration) {
        c.meters.with(provider, &c.model, None, |s| {
            s.first_chunk().record(after.as_secs_f64())
        });
    }

    pub(crate) fn interrupted(c: &super::service::Call, provider: &str) {
        c.meters
            .with(provider, &c.model, None, |s| s.interrupted().increment(1));
    }
}

#[cfg(not(feature = "metrics"))]
mod on {
    use std::time::Duration;
    /// Nothing: no metrics compiled in.
    #[derive(Clone, Default)]
    pub(crate) struct BucketMeters;
    /// Nothing: no metrics compiled in.
    #[derive(Clone, Default)]
    pub(crate) struct CallMeters;
    #[inline(always)]
    pub(crate) fn retry(_: &'static str) {}
    #[inline(always)]
    pub(crate) fn budget_refused() {}
    #[inline(always)]
    pub(crate) fn breaker(_: &str, _: &'static str, _: &'static str, _: f64) {}
    #[inline(always)]
    pub(crate) fn bucket_wait(_: &BucketMeters, _: &str, _: Duration) {}
    #[inline(always)]
    pub(crate) fn refused(_: &BucketMeters, _: &str, _: &'static str) {}
    #[inline(always)]
    pub(crate) fn failover(_: &str, _: &str) {}
    #[inline(always)]
    pub(crate) fn call<P: ?Sized>(
        _: &super::service::Call,
        _: &P,
        _: Option<(u64, u64)>,
        _: Option<&'static str>,
    ) {
    }
    #[inline(always)]
    pub(crate) fn first_chunk(_: &super::service::Call, _: &str, _: Duration) {}
    #[inline(always)]
    pub(crate) fn interrupted(_: &super::service::Call, _: &()) {}
}

impl std::fmt::Debug for BucketMeters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BucketMeters")
    }
}

impl std::fmt::Debug for CallMeters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CallMeters")
    }
}

#[cfg(feature = "metrics")]
pub(crate) use on::{bucket_levels, sample_levels};

/// The bucket level and limit gauges are refreshed at one admission in this many (a gauge
/// keeps its last value; the handles read the levels exactly at any time).
pub const LEVEL_EVERY: u32 = 16;
pub(crate) use on::{
    BucketMeters, CallMeters, breaker, bucket_wait, budget_refused, call, failover, first_chunk,
    interrupted, refused, retry,
};

/// Whether metrics are compiled in (this crate's `metrics` feature).
pub const ENABLED: bool = cfg!(feature = "metrics");
