//! Portcullis inside async-openai 0.43 (feature `async-openai`): every call goes through
//! async-openai's own client and types, against the simulator on loopback, on paused time (the
//! simulator's limits, faults and our layers all run on tokio's clock), with the adapter's
//! defaults unless a test says otherwise.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_openai::Client;
use async_openai::config::{AzureConfig, OpenAIConfig};
use async_openai::error::OpenAIError;
use async_openai::middleware::HttpRequestFactory;
use async_openai::types::chat::{
    ChatCompletionRequestUserMessageArgs, ChatCompletionStreamOptions, ChatCompletionTool,
    ChatCompletionTools, CreateChatCompletionRequest, CreateChatCompletionRequestArgs,
    FunctionObjectArgs, ResponseFormat, ResponseFormatJsonSchema,
};
use futures_util::StreamExt;
use portcullis::async_openai::{self as adapter, AsyncOpenAi, Config};
use portcullis::layers::circuit_breaker::CircuitState;
use portcullis::layers::token_bucket::{KeyLimits, TokenBucketConfig};
use portcullis::{ErrorKind, Refusal};
use portcullis_sim::{FaultKind, FaultRule, Limits, OpenAiLimits, SimHandle, Simulator};
use tokio::time::Instant;
use tower::ServiceExt;

const MODEL: &str = "gpt-4o-mini";

fn config() -> Config {
    let mut config = Config::default();
    config.http.retry.seed = Some(7);
    config
}

fn client(sim: &SimHandle, config: Config) -> (Client<OpenAIConfig>, AsyncOpenAi) {
    let svc = adapter::service(config).unwrap();
    let openai = OpenAIConfig::new()
        .with_api_base(sim.openai_base_url())
        .with_api_key("sk-test");
    (
        Client::with_config(openai).with_http_service(svc.clone()),
        svc,
    )
}

fn request(i: usize) -> CreateChatCompletionRequest {
    let msg = ChatCompletionRequestUserMessageArgs::default()
        .content(format!("Request {i}: one short fact about owls."))
        .build()
        .unwrap();
    CreateChatCompletionRequestArgs::default()
        .model(MODEL)
        .max_completion_tokens(16u32)
        .messages(vec![msg.into()])
        .build()
        .unwrap()
}

async fn sim(limits: Option<Limits>, fault: Option<FaultRule>) -> SimHandle {
    let mut b = Simulator::builder().seed(3);
    if let Some(l) = limits {
        b = b.limits(l);
    }
    if let Some(f) = fault {
        b = b.fault(f);
    }
    b.start().await.unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_completion_and_a_stream_parse_and_reconcile_the_bucket() {
    let sim = sim(None, None).await;
    let mut config = config();
    config.http.limits =
        TokenBucketConfig::new().limit(MODEL, KeyLimits::rpm_tpm(600, 100_000).unwrap());
    let (client, svc) = client(&sim, config);

    let res = client.chat().create(request(1)).await.unwrap();
    let answer = res.choices[0].message.content.clone().unwrap_or_default();
    assert!(!answer.is_empty());
    let first = res.usage.unwrap().total_tokens as f64;

    let mut req = request(2);
    req.stream_options = Some(ChatCompletionStreamOptions {
        include_usage: Some(true),
        ..Default::default()
    });
    let mut stream = client.chat().create_stream(req).await.unwrap();
    let (mut text, mut usage) = (String::new(), None);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        if let Some(c) = chunk.choices.first().and_then(|c| c.delta.content.clone()) {
            text.push_str(&c);
        }
        usage = chunk.usage.or(usage);
    }
    assert!(!text.is_empty());
    let second = usage.expect("include_usage").total_tokens as f64;

    // Both reservations (prompt estimate + 16) were replaced by the usage reported.
    let levels = svc.limiter().level(MODEL).unwrap();
    assert_eq!(levels.reservations, 0, "nothing left unsettled");
    let used = 100_000.0 - levels.tokens().unwrap();
    assert!(
        (used - (first + second)).abs() < 1.0,
        "used {used}, reported {first} + {second}"
    );
    sim.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_burst_over_the_limit_is_paced_locally() {
    let limits = Limits {
        time_scale: 1.0,
        openai: OpenAiLimits {
            rpm: 60,
            tpm: 1_000_000,
        },
        ..Limits::default()
    };
    let sim = sim(Some(limits), None).await;
    let (client, _) = client(&sim, config());
    client.chat().create(request(0)).await.unwrap(); // the limits are learned from its headers

    let t0 = Instant::now();
    let calls = (1..=100).map(|i| {
        let client = client.clone();
        tokio::spawn(async move { client.chat().create(request(i)).await })
    });
    let results: Vec<_> = futures_util::future::join_all(calls).await;
    let took = t0.elapsed();
    let (mut ok, mut throttled) = (0, 0);
    for r in results {
        match r.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => match adapter::refusal(&e) {
                Some(Refusal::Throttled(t)) => {
                    assert!(t.retry_after > Duration::ZERO);
                    assert!(adapter::retry_after(&e).is_some());
                    throttled += 1;
                }
                _ => panic!("neither served nor throttled: {e}"),
            },
        }
    }
    let stats = sim.stats();
    println!(
        "burst: {ok} ok, {throttled} throttled, {} upstream 429s, {} upstream requests, {took:?}",
        stats.status(429),
        stats.requests
    );
    assert!(
        stats.status(429) <= 2,
        "{} upstream 429s",
        stats.status(429)
    );
    assert!(ok >= 85, "only {ok} of 100 served");
    assert_eq!(ok + throttled, 100);
    assert_eq!(
        stats.requests,
        1 + ok as u64 + stats.status(429),
        "a throttled call never reached the upstream"
    );
    sim.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn an_outage_opens_the_breaker_and_later_calls_fail_at_once() {
    let sim = sim(None, Some(FaultRule::status(503))).await;
    let (client, svc) = client(&sim, config());

    // The first call: the first attempt and 3 retries, then the upstream's typed error.
    let err = client.chat().create(request(1)).await.unwrap_err();
    let upstream = adapter::llm_error(&err).expect("a typed upstream error");
    assert_eq!(
        (upstream.kind(), upstream.status()),
        (ErrorKind::Overloaded, Some(503))
    );
    assert_eq!(sim.stats().requests, 4);

    // The second: its first attempt is the fifth failure; the breaker opens.
    let err = client.chat().create(request(2)).await.unwrap_err();
    assert!(
        matches!(adapter::refusal(&err), Some(Refusal::CircuitOpen(_))),
        "{err}"
    );
    assert_eq!(sim.stats().requests, 5);
    assert_eq!(svc.breaker().state(MODEL), CircuitState::Open);

    // Open: refused at once, no upstream request. (The median, so that a test run beside
    // others on 2 cores is not failed by one descheduling; about 0.16 ms in a debug build,
    // 0.01 ms in release, async-openai's own request building included.)
    let mut took = Vec::new();
    for i in 3..14 {
        let t0 = std::time::Instant::now();
        let err = client.chat().create(request(i)).await.unwrap_err();
        took.push(t0.elapsed());
        match adapter::refusal(&err) {
            Some(Refusal::CircuitOpen(open)) => assert!(open.retry_after > Duration::ZERO),
            other => panic!("{other:?}: {err}"),
        }
    }
    took.sort();
    println!("open: refused in {:?} (median)", took[took.len() / 2]);
    assert!(took[took.len() / 2] < Duration::from_millis(1), "{took:?}");
    assert_eq!(sim.stats().requests, 5);

    // After the recovery timeout (60 s), a probe reaches the upstream again.
    tokio::time::sleep(Duration::from_secs(61)).await;
    client.chat().create(request(13)).await.unwrap_err();
    assert!(sim.stats().requests > 5);
    sim.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_hang_ends_within_the_deadline_with_a_typed_timeout() {
    let sim = sim(None, Some(FaultRule::new(FaultKind::Hang))).await;
    let (client, _) = client(&sim, config());
    let t0 = Instant::now();
    let err = client.chat().create(request(1)).await.unwrap_err();
    let took = t0.elapsed();
    println!(
        "hang: {err} after {took:?}, {} upstream requests",
        sim.stats().requests
    );
    assert!(took <= portcullis::stack::DEFAULT_DEADLINE, "{took:?}");
    assert!(
        matches!(
            adapter::refusal(&err),
            Some(Refusal::AttemptTimedOut(_) | Refusal::DeadlineExceeded(_))
        ),
        "{err}"
    );
    assert_eq!(sim.stats().requests, 4, "each attempt cut at 30 s");
    sim.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_long_retry_after_ends_within_the_deadline_and_holds_the_others_back() {
    let rule = FaultRule::new(FaultKind::RateLimit).retry_after_secs(20);
    let sim = sim(None, Some(rule)).await;
    let (client, svc) = client(&sim, config());
    let t0 = Instant::now();
    let first = {
        let client = client.clone();
        tokio::spawn(async move { client.chat().create(request(0)).await })
    };
    // After the first 429 the key is paused for 20 s: concurrent calls wait on it (or are
    // refused locally), and none reaches the upstream before it ends.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(sim.stats().requests, 1);
    assert!(svc.limiter().paused_for(MODEL).is_some());
    let others: Vec<_> = (1..=5)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move { client.chat().create(request(i)).await })
        })
        .collect();
    tokio::time::sleep_until(t0 + Duration::from_millis(19_900)).await;
    assert_eq!(
        sim.stats().requests,
        1,
        "nothing reached the upstream during the pause"
    );

    let mut errors = vec![first.await.unwrap().unwrap_err()];
    for o in others {
        errors.push(o.await.unwrap().unwrap_err());
    }
    let took = t0.elapsed();
    println!(
        "retry-after 20: all ended after {took:?}, {} upstream requests",
        sim.stats().requests
    );
    assert!(took <= portcullis::stack::DEFAULT_DEADLINE, "{took:?}");
    for err in &errors {
        match (adapter::llm_error(err), adapter::refusal(err)) {
            (Some(e), _) => {
                assert_eq!(e.kind(), ErrorKind::RateLimited, "{err}");
                assert_eq!(e.retry_after(), Some(Duration::from_secs(20)), "{err}");
            }
            (None, Some(Refusal::Throttled(t))) => assert!(t.retry_after > Duration::ZERO),
            _ => panic!("{err}"),
        }
    }
    let first = &errors[0];
    assert_eq!(adapter::retry_after(first), Some(Duration::from_secs(20)));
    sim.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn insufficient_quota_makes_exactly_one_upstream_request() {
    let sim = sim(None, Some(FaultRule::new(FaultKind::InsufficientQuota))).await;
    let (client, _) = client(&sim, config());
    let err = client.chat().create(request(1)).await.unwrap_err();
    assert_eq!(sim.stats().requests, 1);
    // Never retried, so it reaches the caller as async-openai's own error.
    match err {
        OpenAIError::ApiError(e) => {
            assert_eq!(e.status_code.as_u16(), 429);
            assert_eq!(e.api_error.code.as_deref(), Some("insufficient_quota"));
        }
        other => panic!("{other}"),
    }
    sim.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn other_endpoints_are_keyed_by_their_path() {
    let sim = sim(None, None).await;
    let (_, svc) = client(&sim, config());
    // The simulator serves `GET /v1/models`, and answers 404 to embeddings: either passes.
    for (method, path, status) in [
        (reqwest::Method::GET, "/models", 200),
        (reqwest::Method::POST, "/embeddings", 404),
    ] {
        let url = format!("{}{path}", sim.openai_base_url());
        let factory = HttpRequestFactory::new(move || {
            let (method, url) = (method.clone(), url.clone());
            async move {
                Ok(reqwest::Client::new()
                    .request(method, url)
                    .bearer_auth("sk-test")
                    .body(r#"{"model":"text-embedding-3-small","input":"hi"}"#)
                    .build()?)
            }
        });
        let res = svc.clone().oneshot(factory).await.unwrap();
        assert_eq!(res.status().as_u16(), status, "{path}");
        assert_eq!(res.url().path(), format!("/v1{path}"), "the request's URL");
        let key = format!("/v1{path}");
        let m = svc
            .breaker()
            .metrics(key.as_str())
            .expect("a breaker for the path");
        assert_eq!(m.calls, 1, "{key}");
        assert!(svc.limiter().level(key.as_str()).is_some(), "{key}");
    }
    sim.shutdown().await;
}

/// Azure's URL and `api-key` header, and a request with tools and a JSON schema: the body
/// reaches the upstream exactly as async-openai serialized it.
#[tokio::test(start_paused = true)]
async fn azure_with_tools_and_structured_output_passes_untouched() {
    use axum::routing::post;

    /// What the upstream saw: the URI, the `api-key` header, the body.
    type Seen = Arc<Mutex<Vec<(String, Option<String>, bytes::Bytes)>>>;
    let seen: Seen = Arc::default();
    let log = seen.clone();
    let app = axum::Router::new().route(
        "/openai/deployments/{deployment}/chat/completions",
        post(
            move |uri: axum::http::Uri, headers: axum::http::HeaderMap, body: bytes::Bytes| {
                let log = log.clone();
                async move {
                    let key = headers.get("api-key").map(|v| v.to_str().unwrap().to_owned());
                    log.lock().unwrap().push((uri.to_string(), key, body));
                    let json = r#"{"id":"c1","object":"chat.completion","created":1,"model":"gpt-4o",
                        "choices":[{"index":0,"message":{"role":"assistant","content":"{\"ok\":true}"},"finish_reason":"stop","logprobs":null}],
                        "usage":{"prompt_tokens":5,"completion_tokens":4,"total_tokens":9}}"#;
                    ([("content-type", "application/json")], json)
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let azure = AzureConfig::new()
        .with_api_base(format!("http://{addr}"))
        .with_deployment_id("gpt4o")
        .with_api_version("2024-10-21")
        .with_api_key("azure-key");
    let svc = adapter::service(config()).unwrap();
    let client = Client::with_config(azure).with_http_service(svc.clone());

    let mut req = request(1);
    req.tools = Some(vec![ChatCompletionTools::Function(ChatCompletionTool {
        function: FunctionObjectArgs::default()
            .name("lookup")
            .description("Looks a bird up")
            .parameters(
                serde_json::json!({"type":"object","properties":{"name":{"type":"string"}}}),
            )
            .build()
            .unwrap(),
    })]);
    req.response_format = Some(ResponseFormat::JsonSchema {
        json_schema: ResponseFormatJsonSchema {
            description: None,
            name: "fact".into(),
            schema: serde_json::json!({"type":"object","properties":{"ok":{"type":"boolean"}}}),
            strict: Some(true),
        },
    });
    let res = client.chat().create(req.clone()).await.unwrap();
    assert_eq!(
        res.choices[0].message.content.as_deref(),
        Some("{\"ok\":true}")
    );

    let seen = seen.lock().unwrap();
    let (uri, key, body) = &seen[0];
    assert_eq!(
        uri,
        "/openai/deployments/gpt4o/chat/completions?api-version=2024-10-21"
    );
    assert_eq!(key.as_deref(), Some("azure-key"));
    let sent: serde_json::Value = serde_json::from_slice(body).unwrap();
    assert_eq!(
        sent,
        serde_json::to_value(&req).unwrap(),
        "the body is async-openai's"
    );
    // Keyed by the body's model; its usage settled the reservation.
    assert_eq!(svc.limiter().level(MODEL).unwrap().reservations, 0);
}
