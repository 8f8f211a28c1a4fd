//! The workload: requests at a constant rate through one stack, every outcome recorded.

use std::time::Duration;

use portcullis::{ChatMessage, ChatRequest, CompletionResult, ErrorKind, LlmError};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};
use tower::ServiceExt;
use tower::util::BoxCloneSyncService;

/// A stack under test, boxed so that every stack has one type.
pub type StackService = BoxCloneSyncService<ChatRequest, CompletionResult, LlmError>;

/// What happened to one request.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// When it was sent, from the start of the run.
    pub sent: Duration,
    /// When it finished, from the start of the run.
    pub done: Duration,
    /// The provider that served it, or the error kind.
    pub result: Result<Served, ErrorKind>,
}

/// A served request.
#[derive(Debug, Clone)]
pub struct Served {
    /// Which provider answered.
    pub provider: String,
    /// Input plus output tokens it reported.
    pub tokens: u64,
}

impl Outcome {
    /// Its latency.
    pub fn latency(&self) -> Duration {
        self.done.saturating_sub(self.sent)
    }
}

/// The prompt of request `i`: varied, deterministic in the seed.
pub fn request(i: u64, seed: u64, model: &str, max_tokens: u32) -> ChatRequest {
    const TOPICS: [&str; 6] = ["tides", "bridges", "owls", "compilers", "glaciers", "bread"];
    let topic = TOPICS[((i ^ seed) % TOPICS.len() as u64) as usize];
    ChatRequest::new(
        model,
        vec![ChatMessage::user(format!(
            "Request {i}: tell me one short fact about {topic}."
        ))],
    )
    .max_tokens(max_tokens)
}

/// Sends `rate` requests per second for `duration`, each through a clone of `svc`, and waits
/// for all of them.
pub async fn run(
    svc: StackService,
    rate: f64,
    duration: Duration,
    make: impl Fn(u64) -> ChatRequest,
) -> Vec<Outcome> {
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let total = (rate * duration.as_secs_f64()).round() as u64;
    let mut tasks = JoinSet::new();
    for i in 0..total {
        tick.tick().await;
        let req = make(i);
        let svc = svc.clone();
        tasks.spawn(async move {
            let sent = start.elapsed();
            let result = svc.oneshot(req).await;
            Outcome {
                sent,
                done: start.elapsed(),
                result: result
                    .map(|r| Served {
                        provider: r.provider.to_string(),
                        tokens: r.usage.total_tokens,
                    })
                    .map_err(|e| e.kind()),
            }
        });
    }
    let mut out = Vec::with_capacity(total as usize);
    while let Some(r) = tasks.join_next().await {
        if let Ok(o) = r {
            out.push(o);
        }
    }
    out.sort_by_key(|o| o.sent);
    out
}

/// Tokens of the calls served that finished in `[from, to)`.
pub fn tokens_done(outcomes: &[Outcome], from: Duration, to: Duration) -> u64 {
    outcomes
        .iter()
        .filter(|o| o.done >= from && o.done < to)
        .filter_map(|o| o.result.as_ref().ok())
        .map(|s| s.tokens)
        .sum()
}

/// The `p`-th percentile (0..=100) of the latencies, in milliseconds.
pub fn percentile_ms(outcomes: &[Outcome], p: f64) -> f64 {
    let mut v: Vec<f64> = outcomes
        .iter()
        .map(|o| o.latency().as_secs_f64() * 1000.0)
        .collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    (v[rank.min(v.len() - 1)] * 10.0).round() / 10.0
}
