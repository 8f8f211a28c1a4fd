//! Azure OpenAI against the simulator's Azure-shaped endpoint: deployment URLs with an
//! `api-version`, the `api-key` header (or a bearer token), Azure's request id, rate-limit
//! headers read into hints, a 429 with `retry-after-ms`, and per-deployment limits in one
//! simulator, then two deployments as one pool.

use std::time::Duration;

use portcullis::layers::pool::PoolConfig;
use portcullis::providers::{ApiKey, AzureOpenAi, AzureOpenAiProvider};
use portcullis::{ChatMessage, ChatRequest, ErrorKind, ProviderStack, Stack};
use portcullis_sim::{Limits, OpenAiLimits, SimHandle, Simulator};
use tower::ServiceExt;

fn key() -> ApiKey {
    ApiKey::new("azure-test-key").unwrap()
}

/// Two deployments: `eu` with 5 requests a (1 s) minute, `us` with the default limits.
async fn sim() -> SimHandle {
    let mut limits = Limits {
        time_scale: 60.0,
        ..Limits::default()
    };
    limits.models.insert(
        "gpt-4o-eu".into(),
        OpenAiLimits {
            rpm: 5,
            tpm: 100_000,
        },
    );
    Simulator::builder().limits(limits).start().await.unwrap()
}

fn azure(sim: &SimHandle, wire: AzureOpenAi) -> AzureOpenAiProvider {
    AzureOpenAiProvider::builder_for(wire)
        .base_url(format!("http://{}", sim.addr()))
        .api_key(key())
        .build()
        .unwrap()
}

fn req() -> ChatRequest {
    ChatRequest::new("gpt-4o", vec![ChatMessage::user("Hello there")]).max_tokens(20)
}

#[tokio::test]
async fn a_deployment_answers_with_its_name_request_id_and_limits() {
    let sim = sim().await;
    let us = azure(&sim, AzureOpenAi::new("gpt-4o-us"));
    let res = us.clone().oneshot(req()).await.unwrap();
    assert_eq!(res.provider, "azure-openai");
    assert_eq!(res.model, "gpt-4o-us");
    assert!(!res.content.is_empty());
    assert!(res.request_id.is_some(), "apim-request-id is read");
    let hints = res.rate_limits.expect("x-ratelimit-* read");
    assert!(hints.requests.remaining.is_some() && hints.tokens.remaining.is_some());
    assert_eq!(sim.stats().endpoint("azure_chat_completions"), 1);

    let stream = us.streaming().oneshot(req()).await.unwrap();
    let streamed = stream.collect().await.unwrap();
    assert!(!streamed.content.is_empty());

    // Entra ID: the token as a bearer is accepted too.
    let bearer = azure(&sim, AzureOpenAi::new("gpt-4o-us").bearer());
    bearer.oneshot(req()).await.unwrap();
}

#[tokio::test]
async fn each_deployment_has_its_own_limits_and_a_429_says_when() {
    let sim = sim().await;
    let eu = azure(&sim, AzureOpenAi::new("gpt-4o-eu"));
    let us = azure(&sim, AzureOpenAi::new("gpt-4o-us"));
    for _ in 0..5 {
        eu.clone().oneshot(req()).await.unwrap();
    }
    let e = eu.clone().oneshot(req()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::RateLimited);
    let wait = e.retry_after().expect("retry-after-ms");
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_secs(1),
        "{wait:?}"
    );
    // The other deployment is untouched.
    us.oneshot(req()).await.unwrap();
}

#[tokio::test]
async fn a_missing_version_or_key_is_refused_as_azure_does() {
    let sim = sim().await;
    let no_key = AzureOpenAiProvider::builder_for(AzureOpenAi::new("gpt-4o-us"))
        .base_url(format!("http://{}", sim.addr()))
        .without_api_key()
        .build()
        .unwrap();
    let e = no_key.oneshot(req()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Authentication);
    let v1 = azure(&sim, AzureOpenAi::v1()); // the sim serves deployment URLs only
    let e = v1.oneshot(req()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
}

#[tokio::test]
async fn two_azure_regions_as_one_pool() {
    let sim = sim().await;
    let deployment = |name: &'static str, d: &str| {
        let p = azure(&sim, AzureOpenAi::new(d));
        ProviderStack::new(name, p.clone(), p.streaming())
    };
    let stack = Stack::builder()
        .pool(
            "gpt-4o",
            PoolConfig::default(),
            vec![deployment("eu", "gpt-4o-eu"), deployment("us", "gpt-4o-us")],
        )
        .build()
        .unwrap();
    // `eu` allows 5 a minute: the pool learns it from the headers and sends the rest to `us`,
    // without a 429.
    for _ in 0..20 {
        stack.completions().oneshot(req()).await.unwrap();
    }
    assert_eq!(sim.stats().status(429), 0);
    let status = stack.pool("gpt-4o").unwrap().status(&req());
    assert_eq!(status.iter().map(|d| d.finished).sum::<u64>(), 20);
}

#[tokio::test]
async fn azure_deployments_from_a_configuration() {
    let sim = sim().await;
    // Any non-empty key passes the simulator; the test reads one from a variable every
    // environment has, so that it sets none.
    let json = format!(
        r#"{{"providers": [
            {{"name": "eu", "api": "azure_openai", "base_url": "http://{addr}", "api_key_env": "PATH",
              "deployment": "gpt-4o-eu", "api_version": "2024-10-21", "pool": "gpt-4o"}},
            {{"name": "us", "api": "azure_openai", "base_url": "http://{addr}", "api_key_env": "PATH",
              "deployment": "gpt-4o-us", "pool": "gpt-4o"}}]}}"#,
        addr = sim.addr()
    );
    let config: portcullis::StackConfig = serde_json::from_str(&json).unwrap();
    let stack = Stack::from_config(&config).unwrap();
    let res = stack.completions().oneshot(req()).await.unwrap();
    assert!(["gpt-4o-eu", "gpt-4o-us"].contains(&res.model.as_str()));
    assert_eq!(sim.stats().endpoint("azure_chat_completions"), 1);

    // Azure has no public default endpoint: a configuration without one is refused.
    let json = r#"{"providers": [{"name": "x", "api": "azure_openai", "api_key_env": "PATH", "deployment": "d"}]}"#;
    let config: portcullis::StackConfig = serde_json::from_str(json).unwrap();
    let err = Stack::from_config(&config).unwrap_err();
    assert!(err.to_string().contains("base_url"), "{err}");
}
