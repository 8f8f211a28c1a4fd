//! Metrics through the whole `Stack`, read back from a test recorder after scripted scenarios:
//! an outage with failover, a 429 storm, and a stream cut after its first chunk. Runs with the
//! `metrics` feature (CI runs `--all-features`).
#![cfg(feature = "metrics")]

mod common;

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use portcullis::layers::retry::RetryConfig;
use portcullis::layers::telemetry::{attr, metric};
use portcullis::{ChatMessage, ChatRequest, ProviderStack, Stack};
use portcullis_sim::{Family, FaultKind, FaultRule, SimHandle, Simulator};
use tower::ServiceExt;

fn retry() -> RetryConfig {
    common::fast_retry(2)
}

fn stack(sim: &SimHandle, with_fallback: bool) -> Stack {
    let openai = common::openai(sim);
    let mut b = Stack::builder().provider(ProviderStack::openai(openai).retry(retry()));
    if with_fallback {
        let anthropic = common::anthropic(sim);
        b = b.provider(
            ProviderStack::anthropic(anthropic)
                .model("claude-haiku-4-5")
                .retry(retry()),
        );
    }
    b.build().unwrap()
}

fn req() -> ChatRequest {
    ChatRequest::new("gpt-4o-mini", vec![ChatMessage::user("Hello there")]).max_tokens(20)
}

/// Every series recorded: name, labels (sorted), value. One snapshot (a snapshot drains the
/// histograms).
type Series = Vec<(String, Vec<(String, String)>, DebugValue)>;

/// Runs `scenario` on a current-thread runtime with a thread-local test recorder: every task
/// (the simulator's included) runs on this thread, so every recording lands in it.
fn recorded<F: std::future::Future<Output = ()>>(scenario: impl FnOnce() -> F) -> Series {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(scenario());
    });
    all(&snapshotter)
}

fn all(s: &Snapshotter) -> Series {
    s.snapshot()
        .into_vec()
        .into_iter()
        .map(|(k, _, _, v)| {
            let mut labels: Vec<(String, String)> = k
                .key()
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            labels.sort();
            (k.key().name().to_owned(), labels, v)
        })
        .collect()
}

/// The series of `name` that carry all of `labels`.
fn matching<'a>(
    s: &'a Series,
    name: &'a str,
    labels: &'a [(&str, &str)],
) -> impl Iterator<Item = &'a DebugValue> + 'a {
    s.iter()
        .filter(move |(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|(_, _, v)| v)
}

fn counter(s: &Series, name: &str, labels: &[(&str, &str)]) -> u64 {
    matching(s, name, labels)
        .map(|v| match v {
            DebugValue::Counter(n) => *n,
            _ => 0,
        })
        .sum()
}

fn samples(s: &Series, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
    matching(s, name, labels)
        .flat_map(|v| match v {
            DebugValue::Histogram(h) => h.iter().map(|x| x.into_inner()).collect(),
            _ => Vec::new(),
        })
        .collect()
}

#[test]
fn an_outage_with_failover() {
    let s = recorded(|| async {
        let sim = Simulator::builder()
            .fault(FaultRule::status(503).family(Family::Openai))
            .start()
            .await
            .unwrap();
        let stack = stack(&sim, true);
        for _ in 0..3 {
            let res = stack.completions().oneshot(req()).await.unwrap();
            assert_eq!(res.provider, "anthropic");
        }
    });
    // Each call: openai 503, then anthropic at once.
    let failovers = counter(
        &s,
        metric::FAILOVERS,
        &[(attr::FROM, "openai"), (attr::TO, "anthropic")],
    );
    assert_eq!(failovers, 3);
    let chat = [
        (attr::GEN_AI_OPERATION_NAME, "chat"),
        (attr::GEN_AI_PROVIDER_NAME, "anthropic"),
    ];
    let durations = samples(&s, metric::GEN_AI_CLIENT_OPERATION_DURATION, &chat);
    assert_eq!(durations.len(), 3);
    let input = [
        (attr::GEN_AI_TOKEN_TYPE, "input"),
        (attr::GEN_AI_REQUEST_MODEL, "gpt-4o-mini"),
    ];
    let tokens = samples(&s, metric::GEN_AI_CLIENT_TOKEN_USAGE, &input);
    assert_eq!(tokens.len(), 3);
    assert!(tokens.iter().all(|t| *t > 0.0));
    // No breaker opened (3 failures < 5), so no transition.
    assert_eq!(counter(&s, metric::BREAKER_TRANSITIONS, &[]), 0);
}

#[test]
fn a_429_storm() {
    let s = recorded(|| async {
        let storm = FaultRule::new(FaultKind::RateLimit).family(Family::Openai);
        let sim = Simulator::builder().fault(storm).start().await.unwrap();
        let stack = stack(&sim, false);
        let e = stack.completions().oneshot(req()).await.unwrap_err();
        assert_eq!(e.kind(), portcullis::ErrorKind::RateLimited);
    });
    // The 429 paused the bucket with its retry-after; the retries it allowed are rate_limited.
    let retries = counter(&s, metric::RETRIES, &[(attr::RETRY_REASON, "rate_limited")]);
    assert!(retries >= 1, "{retries}");
    let failed = samples(
        &s,
        metric::GEN_AI_CLIENT_OPERATION_DURATION,
        &[(attr::ERROR_TYPE, "rate_limited")],
    );
    assert_eq!(failed.len(), 1);
    assert_eq!(samples(&s, metric::GEN_AI_CLIENT_TOKEN_USAGE, &[]).len(), 0);
    // Every admission recorded its wait.
    assert!(!samples(&s, metric::BUCKET_WAIT, &[(attr::LAYER, "openai")]).is_empty());
}

#[test]
fn a_stream_cut_after_its_first_chunk() {
    let s = recorded(|| async {
        let cut = FaultRule::new(FaultKind::ErrorAfterContent).family(Family::Openai);
        let sim = Simulator::builder().fault(cut).start().await.unwrap();
        let stack = stack(&sim, false);
        let stream = stack.streams().oneshot(req()).await.unwrap();
        let e = stream.collect().await.unwrap_err();
        assert_eq!(e.kind(), portcullis::ErrorKind::StreamInterrupted);
    });
    let openai = [(attr::GEN_AI_PROVIDER_NAME, "openai")];
    assert_eq!(counter(&s, metric::STREAM_INTERRUPTIONS, &openai), 1);
    assert_eq!(
        samples(&s, metric::GEN_AI_CLIENT_TIME_TO_FIRST_CHUNK, &openai).len(),
        1
    );
    let errors = samples(
        &s,
        metric::GEN_AI_CLIENT_OPERATION_DURATION,
        &[(attr::ERROR_TYPE, "stream_interrupted")],
    );
    assert_eq!(errors.len(), 1);
}

#[test]
fn bucket_levels_and_limits() {
    use portcullis::layers::token_bucket::{KeyLimits, TokenBucketConfig};
    let s = recorded(|| async {
        let sim = Simulator::builder().start().await.unwrap();
        let limits = KeyLimits::rpm_tpm(600, 100_000).unwrap();
        let stack = Stack::builder()
            .provider(
                ProviderStack::openai(common::openai(&sim))
                    .limits(TokenBucketConfig::new().default_limits(limits)),
            )
            .build()
            .unwrap();
        // More than one refresh period, so the cached gauges are set twice.
        for _ in 0..2 * portcullis::layers::telemetry::LEVEL_EVERY {
            stack.completions().oneshot(req()).await.unwrap();
        }
    });
    let gauge = |name: &str, bucket: &str| -> Vec<f64> {
        let labels = [
            (attr::LAYER, "openai"),
            (attr::GEN_AI_REQUEST_MODEL, "gpt-4o-mini"),
            (attr::BUCKET, bucket),
        ];
        matching(&s, name, &labels)
            .map(|v| match v {
                DebugValue::Gauge(g) => g.into_inner(),
                other => panic!("{other:?}"),
            })
            .collect()
    };
    assert_eq!(gauge(metric::BUCKET_LIMIT, "requests"), [600.0]);
    assert_eq!(gauge(metric::BUCKET_LIMIT, "tokens"), [100_000.0]);
    let requests = gauge(metric::BUCKET_LEVEL, "requests");
    assert_eq!(requests.len(), 1);
    // Refreshed at one of the 32 admissions (the 17th when this test runs alone; the
    // sampling counter is the process's): at most 32 requests taken, a few refilled since.
    assert!((560.0..600.0).contains(&requests[0]), "{requests:?}");
    // Buckets this key does not have get no series.
    assert!(gauge(metric::BUCKET_LIMIT, "input_tokens").is_empty());
    // One duration series for the one (provider, model), every call in it.
    let durations = matching(&s, metric::GEN_AI_CLIENT_OPERATION_DURATION, &[]).count();
    assert_eq!(durations, 1);
    assert_eq!(
        samples(&s, metric::GEN_AI_CLIENT_OPERATION_DURATION, &[]).len(),
        32
    );
}
