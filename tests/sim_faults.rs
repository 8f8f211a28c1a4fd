//! The classification table end to end: every fault the simulator injects, through both
//! providers, gives the `ErrorKind` (and the retry / breaker / failover row) the table says.

use std::time::Duration;

use futures_util::StreamExt;
use portcullis::layers::TimeoutLayer;
use portcullis::providers::{AnthropicProvider, ApiKey, OpenAiProvider};
use portcullis::{ChatMessage, ChatRequest, ChatStream, Classify, ErrorKind, Failover, LlmError};
use portcullis_sim::{FaultKind, FaultRule, Limits, OpenAiLimits, SimHandle, Simulator};
use tower::{Layer, ServiceExt};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Api {
    OpenAi,
    Anthropic,
}

fn req(api: Api) -> ChatRequest {
    let model = match api {
        Api::OpenAi => "gpt-4o-mini",
        Api::Anthropic => "claude-haiku-4-5",
    };
    ChatRequest::new(model, vec![ChatMessage::user("Tell me about owls")]).max_tokens(40)
}

async fn complete(sim: &SimHandle, api: Api) -> Result<portcullis::CompletionResult, LlmError> {
    let key = ApiKey::new("sk-test").unwrap();
    let timeout = TimeoutLayer::new(Duration::from_millis(500));
    match api {
        Api::OpenAi => {
            let p = OpenAiProvider::builder()
                .base_url(sim.openai_base_url())
                .api_key(key)
                .build()?;
            timeout.layer(p).oneshot(req(api)).await
        }
        Api::Anthropic => {
            let p = AnthropicProvider::builder()
                .base_url(sim.anthropic_base_url())
                .api_key(key)
                .build()?;
            timeout.layer(p).oneshot(req(api)).await
        }
    }
}

async fn stream(sim: &SimHandle, api: Api) -> Result<ChatStream, LlmError> {
    let key = ApiKey::new("sk-test").unwrap();
    match api {
        Api::OpenAi => {
            let p = OpenAiProvider::builder()
                .base_url(sim.openai_base_url())
                .api_key(key)
                .build()?;
            p.streaming().oneshot(req(api)).await
        }
        Api::Anthropic => {
            let p = AnthropicProvider::builder()
                .base_url(sim.anthropic_base_url())
                .api_key(key)
                .build()?;
            p.streaming().oneshot(req(api)).await
        }
    }
}

async fn with_fault(rule: FaultRule) -> SimHandle {
    Simulator::builder()
        .seed(5)
        .fault(rule)
        .start()
        .await
        .unwrap()
}

#[tokio::test]
async fn every_status_fault_maps_to_its_kind() {
    let cases = [
        (FaultRule::new(FaultKind::RateLimit), ErrorKind::RateLimited),
        (
            FaultRule::new(FaultKind::InsufficientQuota),
            ErrorKind::QuotaExhausted,
        ),
        (
            FaultRule::new(FaultKind::Billing),
            ErrorKind::QuotaExhausted,
        ),
        (FaultRule::new(FaultKind::Overloaded), ErrorKind::Overloaded),
        (FaultRule::status(500), ErrorKind::Server),
        (FaultRule::status(502), ErrorKind::Server),
        (FaultRule::status(503), ErrorKind::Overloaded),
        (FaultRule::status(529), ErrorKind::Overloaded),
        (FaultRule::status(504), ErrorKind::Timeout),
        (FaultRule::status(400), ErrorKind::InvalidRequest),
        (FaultRule::status(401), ErrorKind::Authentication),
        (FaultRule::status(403), ErrorKind::PermissionDenied),
        (FaultRule::status(404), ErrorKind::NotFound),
        (FaultRule::new(FaultKind::Hang), ErrorKind::Timeout),
        (
            FaultRule::new(FaultKind::MalformedJson),
            ErrorKind::Protocol,
        ),
        (FaultRule::new(FaultKind::Reset), ErrorKind::Connect),
    ];
    for api in [Api::OpenAi, Api::Anthropic] {
        for (rule, kind) in &cases {
            let sim = with_fault(rule.clone()).await;
            let err = complete(&sim, api).await.unwrap_err();
            assert_eq!(err.kind(), *kind, "{api:?} {rule:?}: {err}");
            if let Some(status) = err.status() {
                assert_eq!(sim.stats().status(status), 1);
            }
            let class = err.classify();
            // The table's rows, end to end.
            match kind {
                ErrorKind::RateLimited => {
                    assert!(class.retry && !class.breaker_failure && class.rate_limited);
                    assert!(class.retry_after.is_some(), "a 429 carries retry-after");
                }
                ErrorKind::QuotaExhausted => {
                    assert!(!class.retry && !class.breaker_failure);
                    assert_eq!(class.failover, Failover::Eligible);
                }
                ErrorKind::Overloaded
                | ErrorKind::Server
                | ErrorKind::Timeout
                | ErrorKind::Protocol
                | ErrorKind::Connect => {
                    assert!(class.retry && class.breaker_failure);
                    assert_eq!(class.failover, Failover::Eligible);
                }
                _ => {
                    assert!(!class.retry && !class.breaker_failure);
                    assert_eq!(class.failover, Failover::Never);
                }
            }
        }
    }
}

#[tokio::test]
async fn stream_faults_map_before_and_after_the_commit_point() {
    for api in [Api::OpenAi, Api::Anthropic] {
        // An error event before any content: the call itself fails, typed by the event.
        let sim = with_fault(FaultRule::new(FaultKind::ErrorBeforeContent)).await;
        let err = stream(&sim, api).await.unwrap_err();
        assert!(
            matches!(err.kind(), ErrorKind::Overloaded | ErrorKind::Server),
            "{api:?}: {err}"
        );
        assert!(err.classify().retry);

        // After content reached the caller: the call succeeds, the stream ends in an error.
        for kind in [FaultKind::ErrorAfterContent, FaultKind::Truncated] {
            let sim = with_fault(FaultRule::new(kind)).await;
            let mut s = stream(&sim, api).await.unwrap();
            let mut got_text = false;
            let mut err = None;
            while let Some(item) = s.next().await {
                match item {
                    Ok(c) => got_text |= !c.delta.is_empty(),
                    Err(e) => err = Some(e),
                }
            }
            assert!(got_text, "{api:?} {kind:?}");
            let err = err.unwrap_or_else(|| panic!("{api:?} {kind:?}: no error"));
            assert_eq!(
                err.kind(),
                ErrorKind::StreamInterrupted,
                "{api:?} {kind:?}: {err}"
            );
            let class = err.classify();
            assert!(!class.retry && class.breaker_failure && class.failover == Failover::Never);
        }
    }
}

#[tokio::test]
async fn latency_delays_but_succeeds() {
    let sim = with_fault(FaultRule::latency(100)).await;
    let start = tokio::time::Instant::now();
    let res = complete(&sim, Api::OpenAi).await.unwrap();
    assert!(start.elapsed() >= Duration::from_millis(100));
    assert!(!res.content.is_empty());
    assert_eq!(sim.stats().requests, 1);
}

#[tokio::test]
async fn enforced_limits_answer_429_exactly_at_the_limit() {
    let limits = Limits {
        time_scale: 1.0,
        openai: OpenAiLimits {
            rpm: 3,
            tpm: 1_000_000,
        },
        ..Limits::default()
    };
    let sim = Simulator::builder().limits(limits).start().await.unwrap();
    for i in 0..3 {
        let res = complete(&sim, Api::OpenAi)
            .await
            .unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(res.rate_limits.as_ref().unwrap().requests.limit, Some(3));
        assert_eq!(
            res.rate_limits.as_ref().unwrap().requests.remaining,
            Some(2 - i)
        );
    }
    let err = complete(&sim, Api::OpenAi).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::RateLimited);
    assert_eq!(err.status(), Some(429));
    assert!(
        err.retry_after()
            .is_some_and(|d| d > Duration::ZERO && d <= Duration::from_secs(20))
    );
    assert_eq!(sim.stats().status(429), 1);
    assert_eq!(sim.stats().requests, 4);
}
