//! `/v1/messages` and `/v1/messages/count_tokens`: shapes, usage, headers and request errors.

mod common;

use common::*;
use portcullis_core::hints::parse_rfc3339;
use portcullis_core::{AnthropicEstimator, ChatMessage, TokenEstimator};
use portcullis_sim::Simulator;
use serde_json::{Value, json};

fn assert_anthropic_error(r: &Reply, status: u16, kind: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    let v = r.json();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], kind, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
    assert_eq!(v["request_id"], r.header("request-id"));
    assert_eq!(v.as_object().unwrap().len(), 3);
}

// Paused time: the windows do not refill between the two requests.
#[tokio::test(start_paused = true)]
async fn message_shape_usage_and_headers() {
    let sim = Simulator::builder().start().await.unwrap();
    let req = json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": 300,
        "system": "You are a helpful assistant.",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}]
    });
    let r = anthropic(sim.addr(), req.clone()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), "application/json");
    assert_eq!(
        r.header("content-length").parse::<usize>().unwrap(),
        r.body.len()
    );
    let rid = r.header("request-id");
    assert!(rid.starts_with("req_011C") && rid.len() == 28, "{rid}");
    for name in ["requests", "tokens", "input-tokens", "output-tokens"] {
        r.header(&format!("anthropic-ratelimit-{name}-limit"));
        r.header(&format!("anthropic-ratelimit-{name}-remaining"));
        let reset = r.header(&format!("anthropic-ratelimit-{name}-reset"));
        assert!(parse_rfc3339(reset).is_some(), "{reset}");
    }
    assert_eq!(r.header("anthropic-ratelimit-requests-remaining"), "3999");
    let v = r.json();
    let id = v["id"].as_str().unwrap();
    assert!(id.starts_with("msg_01") && id.len() == 28, "{id}");
    assert_eq!(v["type"], "message");
    assert_eq!(v["role"], "assistant");
    assert_eq!(v["stop_reason"], "end_turn");
    assert!(v["stop_sequence"].is_null());
    assert_eq!(v["content"][0]["type"], "text");
    let u = &v["usage"];
    let input = u["input_tokens"].as_u64().unwrap();
    // The client's estimate errs high against the simulator's "true" count, but not by much.
    let est = AnthropicEstimator::new().count_messages(&[
        ChatMessage::system("You are a helpful assistant."),
        ChatMessage::user("What is the capital of France?"),
    ]);
    assert!(
        est >= input && est <= input + 3,
        "estimate {est}, true {input}"
    );
    // Output TPM was charged max_tokens, then settled to the real output.
    let out = u["output_tokens"].as_u64().unwrap();
    assert!(out > 5);
    assert_eq!(
        r.header("anthropic-ratelimit-output-tokens-remaining"),
        (400_000 - 300).to_string()
    );
    let r2 = anthropic(sim.addr(), req.clone()).await;
    assert_eq!(
        r2.header("anthropic-ratelimit-output-tokens-remaining"),
        (400_000 - out - 300).to_string()
    );

    // count_tokens agrees, with either auth form.
    let mut count_req = req.clone();
    count_req.as_object_mut().unwrap().remove("max_tokens");
    let c = send(
        sim.addr(),
        "POST",
        "/v1/messages/count_tokens",
        &[
            ("authorization", "Bearer k"),
            ("anthropic-version", "2023-06-01"),
        ],
        count_req.to_string(),
    )
    .await
    .unwrap();
    assert_eq!(c.status, 200);
    assert_eq!(c.json(), json!({"input_tokens": input}));
    assert!(c.header("request-id").starts_with("req_"));
}

#[tokio::test]
async fn stream_has_the_full_event_sequence() {
    let sim = Simulator::builder().start().await.unwrap();
    let plain = anthropic(
        sim.addr(),
        message("claude-haiku-4-5", "Name a pelican", 200),
    )
    .await
    .json();
    let mut req = message("claude-haiku-4-5", "Name a pelican", 200);
    req["stream"] = json!(true);
    let r = anthropic(sim.addr(), req).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), "text/event-stream; charset=utf-8");
    let events = r.events();
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_deref().unwrap()).collect();
    let deltas = names
        .iter()
        .filter(|n| **n == "content_block_delta")
        .count();
    assert!(deltas >= 5);
    let mut expected = vec!["message_start", "content_block_start", "ping"];
    expected.extend(std::iter::repeat_n("content_block_delta", deltas));
    expected.extend(["content_block_stop", "message_delta", "message_stop"]);
    assert_eq!(names, expected);
    let data: Vec<Value> = events
        .iter()
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect();
    for (name, d) in names.iter().zip(&data) {
        assert_eq!(d["type"], *name, "each event's data names its type");
    }
    let start = &data[0]["message"];
    assert!(start["id"].as_str().unwrap().starts_with("msg_01"));
    assert_eq!(start["usage"]["output_tokens"], 1);
    assert_eq!(
        start["usage"]["input_tokens"],
        plain["usage"]["input_tokens"]
    );
    let text: String = data
        .iter()
        .filter_map(|d| d["delta"]["text"].as_str())
        .collect();
    assert_eq!(text, plain["content"][0]["text"]);
    let delta = &data[data.len() - 2];
    assert_eq!(delta["delta"]["stop_reason"], "end_turn");
    assert_eq!(
        delta["usage"]["output_tokens"],
        plain["usage"]["output_tokens"]
    );
    assert_eq!(
        delta["usage"]["input_tokens"],
        plain["usage"]["input_tokens"]
    );
}

#[tokio::test]
async fn max_tokens_and_stop_sequences() {
    let sim = Simulator::builder().start().await.unwrap();
    let v = anthropic(sim.addr(), message("claude-sonnet-4-5", "Write", 3))
        .await
        .json();
    assert_eq!(v["stop_reason"], "max_tokens");
    assert_eq!(v["usage"]["output_tokens"], 3);

    let full = anthropic(sim.addr(), message("claude-sonnet-4-5", "Write", 500))
        .await
        .json();
    let full = full["content"][0]["text"].as_str().unwrap().to_owned();
    let mut req = message("claude-sonnet-4-5", "Write", 500);
    req["stop_sequences"] = json!(["."]);
    req["stream"] = json!(true);
    let events = anthropic(sim.addr(), req).await.events();
    let delta: Value = serde_json::from_str(&events[events.len() - 2].1).unwrap();
    assert_eq!(delta["delta"]["stop_reason"], "stop_sequence");
    assert_eq!(delta["delta"]["stop_sequence"], ".");
    let text: String = events
        .iter()
        .filter_map(|(_, d)| serde_json::from_str::<Value>(d).ok())
        .filter_map(|d| d["delta"]["text"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(text, full[..full.find('.').unwrap()]);
}

#[tokio::test]
async fn request_errors_in_anthropic_shape() {
    let sim = Simulator::builder()
        .max_body_bytes(1024)
        .start()
        .await
        .unwrap();
    let addr = sim.addr();
    let body = message("claude-sonnet-4-5", "hi", 10).to_string();
    let r = send(addr, "POST", "/v1/messages", &[], body.clone())
        .await
        .unwrap();
    assert_anthropic_error(&r, 401, "authentication_error");
    let r = send(addr, "POST", "/v1/messages", &[("x-api-key", "")], body)
        .await
        .unwrap();
    assert_anthropic_error(&r, 401, "authentication_error");
    let r = anthropic(addr, json!({"model": "claude-sonnet-4-5", "messages": []})).await;
    assert_anthropic_error(&r, 400, "invalid_request_error");
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_tokens")
    );
    let r = anthropic(addr, json!([1, 2])).await;
    assert_anthropic_error(&r, 400, "invalid_request_error");
    let r = anthropic(addr, message("claude-sonnet-4-5", &"x".repeat(2000), 10)).await;
    assert_anthropic_error(&r, 413, "request_too_large");
    let r = send(addr, "POST", "/v1/messages", &[("x-api-key", "k")], "{{{")
        .await
        .unwrap();
    assert_anthropic_error(&r, 400, "invalid_request_error");
    let s = sim.stats();
    assert_eq!((s.requests, s.endpoint("messages")), (6, 6));
    assert_eq!(s.outcome("unauthorized"), 2);
    assert_eq!(s.outcome("bad_request"), 3);
    assert_eq!(s.status(413), 1);
}
