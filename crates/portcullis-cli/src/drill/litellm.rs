//! `litellm-like`: a port of LiteLLM's router with its usage-based routing
//! (`routing_strategy="usage-based-routing-v2"`, `router_strategy/lowest_tpm_rpm_v2.py`), its
//! cooldowns and its retries, for `drill pool`. What it does, as LiteLLM does it:
//!
//! - **Usage in fixed minute windows.** Each deployment's requests and tokens are counted per
//!   clock minute (`{deployment}:rpm:{HH-MM}`), and the counts start again at zero when the
//!   minute changes.
//! - **Requests before, tokens after.** A call adds one to its deployment's requests before it
//!   is sent (the pre-call check), but its tokens only when it succeeds (the success callback),
//!   from the usage the provider reported. Calls in flight are not counted.
//! - **The choice.** Among the deployments not cooling down, those whose counted tokens plus
//!   this request's input tokens stay within their TPM, and whose requests plus one within
//!   their RPM; of these the one with the fewest tokens counted. None: "No deployments
//!   available" (a rate-limit error raised locally).
//! - **Cooldown.** A deployment that answers 429 is cooled down at once; one that fails
//!   otherwise, when it failed more than `allowed_fails` (3) times in the minute. A cooldown
//!   lasts `cooldown_time` (5 s).
//! - **Retries.** `num_retries` (2) by the router, each on a new choice: with no sleep while
//!   a healthy deployment remains, else the `Retry-After` or an exponential backoff.
//!
//! Every duration is scaled as the drills scale them ([`scaled`]); the SDK clients under the
//! router do not retry (LiteLLM's router does).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use portcullis::{ChatCost, ChatRequest, CompletionResult, CostOf, ErrorKind, LlmError};
use tokio::time::Instant;
use tower::{Service, ServiceExt};

use super::scaled;
use super::workload::StackService;

/// LiteLLM's `allowed_fails` default.
const ALLOWED_FAILS: u32 = 3;
/// LiteLLM's `cooldown_time` default, before scaling.
const COOLDOWN: Duration = Duration::from_secs(5);
/// The router's retries.
const NUM_RETRIES: u32 = 2;

/// One deployment: its service and its limits per minute.
pub struct Deployment {
    /// The service (no retry of its own).
    pub service: StackService,
    /// Its TPM.
    pub tpm: u64,
    /// Its RPM.
    pub rpm: u64,
}

#[derive(Default, Clone, Copy)]
struct Usage {
    tokens: u64,
    requests: u64,
    fails: u32,
}

struct State {
    minute: u64,
    usage: Vec<Usage>,
    cooldown_until: Vec<Option<Instant>>,
}

/// The router: `Clone` shares its state, as LiteLLM's in-memory cache does in one process.
#[derive(Clone)]
pub struct Router {
    deployments: Arc<[(StackService, u64, u64)]>,
    state: Arc<Mutex<State>>,
    start: Instant,
}

impl Router {
    /// A router over `deployments`.
    pub fn new(deployments: Vec<Deployment>) -> Self {
        let n = deployments.len();
        Router {
            deployments: deployments
                .into_iter()
                .map(|d| (d.service, d.tpm, d.rpm))
                .collect(),
            state: Arc::new(Mutex::new(State {
                minute: 0,
                usage: vec![Usage::default(); n],
                cooldown_until: vec![None; n],
            })),
            start: Instant::now(),
        }
    }

    /// The state, its counts reset if the minute changed.
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let minute = (self.start.elapsed().as_secs_f64()
            / scaled(Duration::from_secs(60)).as_secs_f64()) as u64;
        if minute != s.minute {
            s.minute = minute;
            s.usage.iter_mut().for_each(|u| *u = Usage::default());
        }
        s
    }

    /// The pre-call check and choice: the deployment with the fewest tokens counted that fits.
    fn choose(&self, input_tokens: u64) -> Option<usize> {
        let mut s = self.state();
        let now = Instant::now();
        let pick = (0..self.deployments.len())
            .filter(|&i| s.cooldown_until[i].is_none_or(|t| t <= now))
            .filter(|&i| {
                let (_, tpm, rpm) = self.deployments[i];
                s.usage[i].tokens + input_tokens <= tpm && s.usage[i].requests < rpm
            })
            .min_by_key(|&i| s.usage[i].tokens)?;
        s.usage[pick].requests += 1;
        Some(pick)
    }

    fn healthy(&self) -> bool {
        let s = self.state();
        let now = Instant::now();
        s.cooldown_until.iter().any(|c| c.is_none_or(|t| t <= now))
    }

    fn succeeded(&self, i: usize, tokens: u64) {
        self.state().usage[i].tokens += tokens;
    }

    fn failed(&self, i: usize, e: &LlmError) {
        let mut s = self.state();
        s.usage[i].fails += 1;
        if e.status() == Some(429) || s.usage[i].fails > ALLOWED_FAILS {
            s.cooldown_until[i] = Some(Instant::now() + scaled(COOLDOWN));
        }
    }

    async fn route(self, req: ChatRequest) -> Result<CompletionResult, LlmError> {
        let input = ChatCost.cost(&req).input;
        let mut retries = 0;
        loop {
            let result = match self.choose(input) {
                None => Err(LlmError::new(
                    ErrorKind::RateLimited,
                    "No deployments available for selected model",
                )),
                Some(i) => {
                    let svc = self.deployments[i].0.clone();
                    let r = svc.oneshot(req.clone()).await;
                    match &r {
                        Ok(res) => self.succeeded(i, res.usage.total_tokens),
                        Err(e) => self.failed(i, e),
                    }
                    r
                }
            };
            let Err(e) = result else { return result };
            if retries >= NUM_RETRIES {
                return Err(e);
            }
            retries += 1;
            if !self.healthy() {
                let backoff = e.retry_after().unwrap_or_else(|| {
                    scaled(Duration::from_secs_f64(0.5 * 2f64.powi(retries as i32)))
                });
                tokio::time::sleep(backoff).await;
            }
        }
    }
}

impl Service<ChatRequest> for Router {
    type Response = CompletionResult;
    type Error = LlmError;
    type Future = Pin<Box<dyn Future<Output = Result<CompletionResult, LlmError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), LlmError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: ChatRequest) -> Self::Future {
        Box::pin(self.clone().route(req))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use portcullis::{ChatMessage, Usage};
    use tower::service_fn;
    use tower::util::BoxCloneSyncService;

    use super::*;

    /// A deployment answering with 50 tokens of usage, or 429 while `limited`.
    fn upstream(name: &'static str, limited: Arc<AtomicBool>) -> Deployment {
        let svc = service_fn(move |req: ChatRequest| {
            let limited = limited.load(Ordering::Relaxed);
            async move {
                if limited {
                    return Err(LlmError::new(ErrorKind::RateLimited, "429").with_status(429));
                }
                Ok(CompletionResult::new(name, req.model.to_string(), "ok")
                    .with_usage(Usage::new(40, 10)))
            }
        });
        Deployment {
            service: BoxCloneSyncService::new(svc),
            tpm: 120,
            rpm: 1_000,
        }
    }

    fn req() -> ChatRequest {
        ChatRequest::new("gpt-4o-mini", vec![ChatMessage::user("hi")]).max_tokens(10)
    }

    async fn call(r: &Router) -> Result<String, ErrorKind> {
        r.clone()
            .oneshot(req())
            .await
            .map(|res| res.provider.to_string())
            .map_err(|e| e.kind())
    }

    #[tokio::test(start_paused = true)]
    async fn fewest_tokens_first_counted_after_the_call_within_the_minute() {
        let ok = Arc::new(AtomicBool::new(false));
        let r = Router::new(vec![upstream("a", ok.clone()), upstream("b", ok.clone())]);
        // Counted after each call: a, b, a, b (50 tokens each; 120 a minute).
        let mut served = Vec::new();
        for _ in 0..4 {
            served.push(call(&r).await.unwrap());
        }
        assert_eq!(served, ["a", "b", "a", "b"]);
        // 100 counted on each: the next request's input (about 8 tokens) still fits, then
        // neither does.
        call(&r).await.unwrap();
        call(&r).await.unwrap();
        assert_eq!(call(&r).await, Err(ErrorKind::RateLimited));
        // A new minute starts every count at zero.
        tokio::time::sleep(scaled(Duration::from_secs(60))).await;
        assert!(call(&r).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_cools_its_deployment_down_and_the_router_retries_elsewhere_at_once() {
        let limited = Arc::new(AtomicBool::new(true));
        let fine = Arc::new(AtomicBool::new(false));
        let r = Router::new(vec![upstream("a", limited.clone()), upstream("b", fine)]);
        let start = Instant::now();
        assert_eq!(call(&r).await.unwrap(), "b");
        assert_eq!(
            start.elapsed(),
            Duration::ZERO,
            "no sleep while b is healthy"
        );
        limited.store(false, Ordering::Relaxed);
        // `a` cools down for 5 s (scaled): b takes the calls until then.
        assert_eq!(call(&r).await.unwrap(), "b");
        tokio::time::sleep(scaled(COOLDOWN)).await;
        tokio::time::sleep(scaled(Duration::from_secs(60))).await; // a fresh minute too
        assert_eq!(call(&r).await.unwrap(), "a");
    }
}
