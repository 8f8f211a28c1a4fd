//! Azure OpenAI: the wire against Azure's shapes on a canned loopback server (what is sent; the
//! content-filter annotations, errors and rate-limit sentinels Azure answers with), then end to
//! end against the simulator's Azure route (completion, stream, hints, a 429's retry delay).

mod common;

use std::time::Duration;

use common::{Canned, Server, data_path, request};
use portcullis_core::{Classify, ErrorKind, FinishReason};
use portcullis_providers::{ApiKey, AzureOpenAi, AzureOpenAiProvider};
use portcullis_sim::{Limits, OpenAiLimits, Simulator};
use tower::ServiceExt;

fn data(name: &str) -> Vec<u8> {
    std::fs::read(data_path(&format!("azure/{name}"))).unwrap()
}

fn key() -> ApiKey {
    ApiKey::new("azure-key-5e1f").unwrap()
}

fn azure(base: String, wire: AzureOpenAi) -> AzureOpenAiProvider {
    AzureOpenAiProvider::builder_for(wire)
        .base_url(base)
        .api_key(key())
        .build()
        .unwrap()
}

#[tokio::test]
async fn sends_the_deployment_url_and_api_key_and_reads_azures_answer() {
    let server = Server::start().await;
    server.set(
        Canned::new(200, "application/json", data("chat.json"))
            .header("apim-request-id", "bb943c68-99ed")
            .header("x-request-id", "3a8b1a44-a02c")
            .header("x-ratelimit-remaining-requests", "79")
            .header("x-ratelimit-remaining-tokens", "61353"),
    );
    let p = azure(server.base(), AzureOpenAi::new("gpt-4o-eu"));
    let res = p.oneshot(request("gpt-4o")).await.unwrap();
    assert_eq!(res.content, "Pelicans can hold three gallons of water.");
    assert_eq!(res.finish_reason, FinishReason::Stop);
    assert_eq!(res.usage.total_tokens, 23);
    assert_eq!(res.provider, "azure-openai");
    assert_eq!(res.request_id.as_deref(), Some("bb943c68-99ed"));
    let hints = res.rate_limits.unwrap();
    assert_eq!(hints.requests.remaining, Some(79));
    assert_eq!(hints.tokens.remaining, Some(61_353));

    let seen = server.last();
    assert_eq!(seen.path, "/openai/deployments/gpt-4o-eu/chat/completions");
    assert_eq!(seen.headers["api-key"], "azure-key-5e1f");
    assert!(!seen.headers.contains_key("authorization"));
    assert_eq!(seen.body["model"], "gpt-4o", "the body's model is kept");

    // Entra ID: a bearer token instead.
    let p = azure(server.base(), AzureOpenAi::new("gpt-4o-eu").bearer());
    p.oneshot(request("gpt-4o")).await.unwrap();
    let seen = server.last();
    assert_eq!(seen.headers["authorization"], "Bearer azure-key-5e1f");
    assert!(!seen.headers.contains_key("api-key"));

    // The v1 API.
    let p = azure(server.base(), AzureOpenAi::v1());
    p.oneshot(request("gpt-4o-eu")).await.unwrap();
    let seen = server.last();
    assert_eq!(seen.path, "/openai/v1/chat/completions");
    assert_eq!(seen.body["model"], "gpt-4o-eu");
}

#[tokio::test]
async fn the_no_figure_sentinels_are_not_an_exhausted_limit() {
    let server = Server::start().await;
    server.set(
        Canned::new(200, "application/json", data("chat.json"))
            .header("x-ratelimit-limit-tokens", "-1")
            .header("x-ratelimit-remaining-tokens", "-1")
            .header("x-ratelimit-reset-tokens", "0")
            .header("x-ratelimit-limit-requests", "0")
            .header("x-ratelimit-remaining-requests", "0"),
    );
    let res = azure(server.base(), AzureOpenAi::new("ptu"))
        .oneshot(request("gpt-4o"))
        .await
        .unwrap();
    // Nothing known: nothing for a token bucket to clamp or pause by.
    assert!(res.rate_limits.is_none_or(|h| h.is_empty()));
}

#[tokio::test]
async fn streams_with_the_asynchronous_content_filter_and_a_filtered_end() {
    let server = Server::start().await;
    let p = azure(server.base(), AzureOpenAi::new("gpt-4o-eu"));
    // Annotation chunks without `delta`, one of them after the finish reason, are skipped;
    // split into 7-byte frames so that every event crosses reads.
    server.set(Canned::new(200, "text/event-stream", data("stream_async_filter.sse")).chunk(7));
    let stream = p
        .clone()
        .streaming()
        .oneshot(request("gpt-4o"))
        .await
        .unwrap();
    assert_eq!(stream.meta().model, "gpt-4o-2024-11-20");
    let res = stream.collect().await.unwrap();
    assert_eq!(res.content, "Colors of the rainbow.");
    assert_eq!(res.finish_reason, FinishReason::Stop);
    assert_eq!(res.usage.total_tokens, 16);

    server.set(Canned::new(
        200,
        "text/event-stream",
        data("stream_filtered.sse"),
    ));
    let res = p
        .streaming()
        .oneshot(request("gpt-4o"))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(res.content, "Here is how");
    assert_eq!(res.finish_reason, FinishReason::ContentFilter);
}

#[tokio::test]
async fn azures_errors_are_typed_by_the_one_table() {
    let server = Server::start().await;
    let p = azure(server.base(), AzureOpenAi::new("gpt-4o-eu"));

    server.set(
        Canned::new(400, "application/json", data("error_content_filter.json"))
            .header("apim-request-id", "cf-1"),
    );
    let e = p.clone().oneshot(request("gpt-4o")).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidRequest);
    assert_eq!(e.code(), Some("content_filter"));
    assert_eq!(e.request_id(), Some("cf-1"));
    let c = e.classify();
    assert!(!c.retry && !c.breaker_failure, "{c:?}");
    assert_eq!(c.failover, portcullis_core::Failover::Never);

    server.set(
        Canned::new(429, "application/json", data("error_429.json"))
            .header("retry-after", "2")
            .header("retry-after-ms", "1500")
            .header("x-ratelimit-remaining-requests", "0"),
    );
    let e = p.clone().oneshot(request("gpt-4o")).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::RateLimited);
    assert_eq!(e.retry_after(), Some(Duration::from_millis(1500)));
    assert!(e.classify().retry);

    // The 2023 shape: no `retry-after`, only the hyphenated reset in seconds.
    server.set(
        Canned::new(429, "application/json", data("error_429.json"))
            .header("x-rate-limit-reset-tokens", "55"),
    );
    let e = p.clone().oneshot(request("gpt-4o")).await.unwrap_err();
    assert_eq!(e.retry_after(), Some(Duration::from_secs(55)));

    server.set(Canned::json(
        404,
        r#"{"error":{"code":"DeploymentNotFound","message":"The API deployment for this resource does not exist."}}"#,
    ));
    let e = p.oneshot(request("gpt-4o")).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
}

#[test]
fn a_key_never_goes_over_plain_http_to_another_host() {
    for base in [
        "http://my-resource.openai.azure.com",
        "http://10.0.0.7:8080",
        "http://localhost.evil.example",
    ] {
        let built = AzureOpenAiProvider::builder_for(AzureOpenAi::new("d").bearer())
            .base_url(base)
            .api_key(key())
            .build();
        let e = built.expect_err(base);
        assert_eq!(e.kind(), ErrorKind::Configuration, "{base}");
        assert!(!e.to_string().contains("azure-key-5e1f"));
    }
    for base in [
        "https://my-resource.openai.azure.com",
        "http://127.0.0.1:9",
        "http://[::1]:9",
    ] {
        AzureOpenAiProvider::builder_for(AzureOpenAi::new("d"))
            .base_url(base)
            .api_key(key())
            .build()
            .unwrap();
    }
}

/// Against the simulator: `eu` allows 2 requests a (1 s) minute, `us` the defaults.
async fn sim() -> portcullis_sim::SimHandle {
    Simulator::builder()
        .limits(Limits {
            time_scale: 60.0,
            ..Limits::default()
        })
        .deployment(
            "eu",
            OpenAiLimits {
                rpm: 2,
                tpm: 100_000,
            },
        )
        .deployment("us", OpenAiLimits::default())
        .start()
        .await
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn end_to_end_against_the_simulator() {
    let sim = sim().await;
    let base = format!("http://{}", sim.addr());
    let eu = azure(base.clone(), AzureOpenAi::new("eu"));

    let res = eu.clone().oneshot(request("gpt-4o")).await.unwrap();
    assert_eq!(res.model, "eu");
    assert!(!res.content.is_empty());
    assert!(res.usage.total_tokens > 0);
    assert!(res.request_id.as_deref().is_some_and(|id| !id.is_empty()));
    let hints = res.rate_limits.expect("hints");
    assert_eq!(hints.requests.limit, Some(2));
    assert_eq!(hints.requests.remaining, Some(1));
    assert_eq!(hints.tokens.limit, Some(100_000));
    assert!(hints.tokens.remaining.is_some_and(|t| t < 100_000));

    let stream = eu
        .clone()
        .streaming()
        .oneshot(request("gpt-4o"))
        .await
        .unwrap();
    assert_eq!(stream.meta().rate_limits.requests.remaining, Some(0));
    assert!(stream.meta().request_id.is_some());
    let streamed = stream.collect().await.unwrap();
    assert_eq!(streamed.content, res.content, "the same generator");
    assert_eq!(streamed.usage.total_tokens, res.usage.total_tokens);

    // The third request in the minute: a typed 429 with the retry delay.
    let e = eu.clone().oneshot(request("gpt-4o")).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::RateLimited);
    assert_eq!(e.provider(), Some("azure-openai"));
    let wait = e.retry_after().expect("retry-after-ms");
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_secs(1),
        "{wait:?}"
    );
    assert_eq!(e.rate_limits().and_then(|h| h.requests.remaining), Some(0));
    assert!(e.request_id().is_some());

    // `us` still answers; `eu` does again once the delay has passed.
    let us = azure(base.clone(), AzureOpenAi::new("us").bearer());
    us.oneshot(request("gpt-4o")).await.unwrap();
    tokio::time::advance(wait).await;
    eu.clone().oneshot(request("gpt-4o")).await.unwrap();

    // An undeclared deployment.
    let e = azure(base, AzureOpenAi::new("xx"))
        .oneshot(request("gpt-4o"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert_eq!(e.code(), Some("DeploymentNotFound"));
    assert_eq!(sim.stats().endpoint("azure_chat_completions"), 6);
}
