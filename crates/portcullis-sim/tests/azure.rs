//! The Azure OpenAI route: a deployment's URL with an `api-version`, `api-key` (or bearer)
//! auth, Azure's request id and rate-limit headers, per-deployment limits shared by every key,
//! and the 404s of a missing version and of an undeclared deployment.

mod common;

use common::*;
use portcullis_sim::{Limits, OpenAiLimits, Simulator};
use serde_json::json;

const VERSION: &str = "api-version=2024-10-21";

fn path(deployment: &str) -> String {
    format!("/openai/deployments/{deployment}/chat/completions?{VERSION}")
}

async fn azure(
    addr: std::net::SocketAddr,
    deployment: &str,
    auth: Option<(&str, &str)>,
    body: serde_json::Value,
) -> Reply {
    let mut headers = vec![("content-type", "application/json")];
    headers.extend(auth);
    send(addr, "POST", &path(deployment), &headers, body.to_string())
        .await
        .expect("azure request")
}

const KEY: Option<(&str, &str)> = Some(("api-key", "azure-key-1"));

#[tokio::test(start_paused = true)]
async fn a_deployment_answers_like_the_openai_route_as_itself() {
    let sim = Simulator::builder().start().await.unwrap();
    let r = azure(sim.addr(), "gpt-4o-eu", KEY, chat("gpt-4o", "Hello there")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "gpt-4o-eu", "answers as the deployment");
    assert!(
        !body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .is_empty()
    );
    assert!(body["usage"]["total_tokens"].as_u64().unwrap() > 0);
    assert_eq!(r.header("apim-request-id"), r.header("x-request-id"));
    for h in [
        "x-ratelimit-remaining-requests",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-limit-requests",
        "x-ratelimit-limit-tokens",
    ] {
        assert!(r.header(h).parse::<u64>().is_ok(), "{h}");
    }
    // The same generator as `/v1/chat/completions` for the same model name.
    let mut same = chat("gpt-4o-eu", "Hello there");
    same["model"] = json!("gpt-4o-eu");
    let openai = openai(sim.addr(), same).await.json();
    assert_eq!(
        openai["choices"][0]["message"]["content"],
        body["choices"][0]["message"]["content"]
    );

    // Streamed, with the usage chunk.
    let mut req = chat("gpt-4o", "Hello there");
    req["stream"] = json!(true);
    req["stream_options"] = json!({"include_usage": true});
    let r = azure(sim.addr(), "gpt-4o-eu", KEY, req).await;
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").starts_with("text/event-stream"));
    let events = r.events();
    assert_eq!(events.last().unwrap().1, "[DONE]");
    let usage: serde_json::Value = serde_json::from_str(&events[events.len() - 2].1).unwrap();
    assert!(usage["usage"]["total_tokens"].as_u64().unwrap() > 0);

    let stats = sim.stats();
    assert_eq!(stats.endpoint("azure_chat_completions"), 2);
    assert_eq!(stats.by_model.get("gpt-4o-eu"), Some(&3));
}

#[tokio::test(start_paused = true)]
async fn auth_by_api_key_or_bearer_and_the_404_without_a_version() {
    let sim = Simulator::builder().start().await.unwrap();
    let r = azure(sim.addr(), "d", None, chat("m", "hi")).await;
    assert_eq!(r.status, 401);
    let r = azure(sim.addr(), "d", Some(("api-key", "")), chat("m", "hi")).await;
    assert_eq!(r.status, 401, "an empty key is no key");
    let r = azure(
        sim.addr(),
        "d",
        Some(("authorization", "Bearer entra-token")),
        chat("m", "hi"),
    )
    .await;
    assert_eq!(r.status, 200, "an Entra ID bearer token");
    let r = send(
        sim.addr(),
        "POST",
        "/openai/deployments/d/chat/completions",
        &[("api-key", "k")],
        chat("m", "hi").to_string(),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "404");
}

#[tokio::test(start_paused = true)]
async fn each_deployment_has_its_own_limits_shared_by_every_key() {
    let sim = Simulator::builder()
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
        .deployment(
            "us",
            OpenAiLimits {
                rpm: 3,
                tpm: 100_000,
            },
        )
        .deployment("asia", OpenAiLimits::default())
        .start()
        .await
        .unwrap();
    for i in 0..2 {
        let r = azure(sim.addr(), "eu", KEY, chat("m", "hi")).await;
        assert_eq!(r.status, 200, "eu {i}");
        assert_eq!(r.header("x-ratelimit-limit-requests"), "2");
    }
    let r = azure(sim.addr(), "eu", KEY, chat("m", "hi")).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("x-ratelimit-remaining-requests"), "0");
    let ms: u64 = r.header("retry-after-ms").parse().unwrap();
    assert!(ms > 0 && ms <= 1000, "{ms}");
    assert!(r.header("retry-after").parse::<u64>().is_ok());
    // The resource's other key shares the deployment's quota.
    let r = azure(
        sim.addr(),
        "eu",
        Some(("api-key", "azure-key-2")),
        chat("m", "hi"),
    )
    .await;
    assert_eq!(r.status, 429);

    // The other deployments are untouched, each with its own limit.
    let r = azure(sim.addr(), "us", KEY, chat("m", "hi")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-ratelimit-limit-requests"), "3");
    assert_eq!(r.header("x-ratelimit-remaining-requests"), "2");
    let r = azure(sim.addr(), "asia", KEY, chat("m", "hi")).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("x-ratelimit-limit-requests"),
        OpenAiLimits::default().rpm.to_string()
    );

    // A (compressed) half minute later `eu` has a request again.
    tokio::time::advance(std::time::Duration::from_millis(501)).await;
    assert_eq!(
        azure(sim.addr(), "eu", KEY, chat("m", "hi")).await.status,
        200
    );
}

#[tokio::test(start_paused = true)]
async fn an_undeclared_deployment_is_not_found() {
    let sim = Simulator::builder()
        .deployment("gpt-4o-eu", OpenAiLimits::default())
        .start()
        .await
        .unwrap();
    let r = azure(sim.addr(), "gpt-4o-eu", KEY, chat("m", "hi")).await;
    assert_eq!(r.status, 200);
    let r = azure(sim.addr(), "gpt-4o-xx", KEY, chat("m", "hi")).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "DeploymentNotFound");
    // Without a key, the 401 comes first.
    let r = azure(sim.addr(), "gpt-4o-xx", None, chat("m", "hi")).await;
    assert_eq!(r.status, 401);
    assert_eq!(sim.stats().by_outcome.get("deployment_not_found"), Some(&1));
}

#[test]
fn deployments_load_from_a_scenario_file() {
    let s: portcullis_sim::Scenario = toml::from_str(
        r#"
        deployments = ["eu", "us"]
        [limits]
        models = { eu = { rpm = 60, tpm = 30000 } }
        "#,
    )
    .unwrap();
    assert_eq!(s.deployments, ["eu", "us"]);
    assert_eq!(s.limits.models["eu"].rpm, 60);
}
