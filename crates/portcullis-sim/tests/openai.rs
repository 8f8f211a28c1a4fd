//! `/v1/chat/completions` and `/v1/models`: shapes, usage, headers and request errors.

mod common;

use common::*;
use portcullis_core::hints::parse_go_duration;
use portcullis_core::{ChatMessage, OpenAiTokenizer, TokenEstimator};
use portcullis_sim::Simulator;
use serde_json::{Value, json};

fn assert_openai_error(r: &Reply, status: u16, kind: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    let e = r.json();
    let err = e["error"].as_object().expect("error object");
    assert_eq!(err.len(), 4, "exactly message/type/param/code: {e}");
    assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert_eq!(err["type"], kind);
    assert!(err.contains_key("param") && err.contains_key("code"));
    assert!(r.header("x-request-id").starts_with("req_"));
}

#[tokio::test(start_paused = true)]
async fn completion_shape_usage_and_headers() {
    let sim = Simulator::builder().seed(1).start().await.unwrap();
    let req = json!({
        "model": "gpt-4o-mini",
        "max_tokens": 500,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hello there"}]}
        ]
    });
    let r = openai(sim.addr(), req.clone()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), "application/json");
    let rid = r.header("x-request-id");
    assert!(rid.starts_with("req_") && rid.len() == 36, "{rid}");
    assert_eq!(r.header("x-ratelimit-limit-requests"), "10000");
    assert_eq!(r.header("x-ratelimit-remaining-requests"), "9999");
    assert!(parse_go_duration(r.header("x-ratelimit-reset-requests")).is_some());
    assert!(parse_go_duration(r.header("x-ratelimit-reset-tokens")).is_some());

    let v = r.json();
    let id = v["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-") && id.len() == 38, "{id}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "gpt-4o-mini");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text.len() > 20);

    // Prompt tokens exactly as the client counts them; completion = tokens of the text.
    let tok = OpenAiTokenizer::for_model("gpt-4o-mini");
    let prompt = tok.count_messages(&[
        ChatMessage::system("Be brief."),
        ChatMessage::user("Hello there"),
    ]);
    let u = &v["usage"];
    assert_eq!(u["prompt_tokens"], prompt);
    assert_eq!(u["completion_tokens"], tok.count_text(text));
    assert_eq!(u["total_tokens"], prompt + tok.count_text(text));
    // The TPM pre-charge is prompt + max_tokens.
    assert_eq!(
        r.header("x-ratelimit-remaining-tokens"),
        (10_000_000 - prompt - 500).to_string()
    );

    // Deterministic: the same request and seed, the same text; another seed, another text.
    let again = openai(sim.addr(), req.clone()).await.json();
    assert_eq!(again["choices"][0]["message"]["content"], text);
    assert_ne!(again["id"], v["id"]);
    let other = Simulator::builder().seed(2).start().await.unwrap();
    let o = openai(other.addr(), req).await.json();
    assert_ne!(o["choices"][0]["message"]["content"], text);
}

#[tokio::test]
async fn stream_with_usage_matches_the_plain_answer() {
    let sim = Simulator::builder().start().await.unwrap();
    let plain = openai(sim.addr(), chat("gpt-4o-mini", "Tell me a story"))
        .await
        .json();
    let mut req = chat("gpt-4o-mini", "Tell me a story");
    req["stream"] = json!(true);
    req["stream_options"] = json!({"include_usage": true});
    let r = openai(sim.addr(), req).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), "text/event-stream; charset=utf-8");
    let events = r.events();
    assert!(events.iter().all(|(name, _)| name.is_none()));
    assert_eq!(events.last().unwrap().1, "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect();
    assert!(chunks.len() >= 8, "several chunks");
    let id = &chunks[0]["id"];
    assert!(
        chunks
            .iter()
            .all(|c| c["id"] == *id && c["object"] == "chat.completion.chunk")
    );
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, plain["choices"][0]["message"]["content"]);
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    assert_eq!(finish["choices"][0]["delta"], json!({}));
    assert!(finish["usage"].is_null());
    let last = &chunks[chunks.len() - 1];
    assert_eq!(last["choices"], json!([]));
    assert_eq!(
        last["usage"]["prompt_tokens"],
        plain["usage"]["prompt_tokens"]
    );
    assert_eq!(
        last["usage"]["completion_tokens"],
        plain["usage"]["completion_tokens"]
    );

    // Without include_usage: no usage chunk at all.
    let mut req = chat("gpt-4o-mini", "Tell me a story");
    req["stream"] = json!(true);
    let events = openai(sim.addr(), req).await.events();
    let n = events.len();
    let finish: Value = serde_json::from_str(&events[n - 2].1).unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    assert!(finish.get("usage").is_none());
}

#[tokio::test]
async fn max_tokens_and_stop_sequences() {
    let sim = Simulator::builder().start().await.unwrap();
    let mut req = chat("gpt-4o-mini", "Write a lot");
    req["max_tokens"] = json!(4);
    let v = openai(sim.addr(), req.clone()).await.json();
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 4);
    // max_completion_tokens is the same thing.
    req.as_object_mut().unwrap().remove("max_tokens");
    req["max_completion_tokens"] = json!(4);
    let w = openai(sim.addr(), req).await.json();
    assert_eq!(w["choices"][0]["message"], v["choices"][0]["message"]);

    let full = openai(sim.addr(), chat("gpt-4o-mini", "Write a lot"))
        .await
        .json();
    let full = full["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut req = chat("gpt-4o-mini", "Write a lot");
    req["stop"] = json!(["zzz", "."]);
    let v = openai(sim.addr(), req).await.json();
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let cut = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(cut, &full[..full.find('.').unwrap()]);
}

#[tokio::test]
async fn request_errors_in_openai_shape() {
    let sim = Simulator::builder()
        .max_body_bytes(2048)
        .start()
        .await
        .unwrap();
    let addr = sim.addr();
    // No key.
    let r = send(
        addr,
        "POST",
        "/v1/chat/completions",
        &[],
        chat("gpt-4o", "hi").to_string(),
    )
    .await
    .unwrap();
    assert_openai_error(&r, 401, "invalid_request_error");
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("API key")
    );
    // x-api-key is not OpenAI's auth.
    let r = send(
        addr,
        "POST",
        "/v1/chat/completions",
        &[("x-api-key", "k")],
        "{}",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 401);
    // Not JSON.
    let r = send(
        addr,
        "POST",
        "/v1/chat/completions",
        &[("authorization", "Bearer k")],
        "{not json",
    )
    .await
    .unwrap();
    assert_openai_error(&r, 400, "invalid_request_error");
    // Missing messages names the param.
    let r = openai(addr, json!({"model": "gpt-4o"})).await;
    assert_openai_error(&r, 400, "invalid_request_error");
    assert_eq!(r.json()["error"]["param"], "messages");
    assert_eq!(r.json()["error"]["code"], "missing_required_parameter");
    let mut req = chat("gpt-4o", "hi");
    req["max_tokens"] = json!(0);
    let r = openai(addr, req).await;
    assert_openai_error(&r, 400, "invalid_request_error");
    assert_eq!(r.json()["error"]["code"], "integer_below_min_value");
    // Too large.
    let r = openai(addr, chat("gpt-4o", &"x".repeat(4096))).await;
    assert_openai_error(&r, 413, "invalid_request_error");
    // Unknown path.
    let r = send(addr, "POST", "/v1/nope", &[], "").await.unwrap();
    assert_openai_error(&r, 404, "invalid_request_error");

    let s = sim.stats();
    assert_eq!(s.requests, 7);
    assert_eq!(s.outcome("unauthorized"), 2);
    assert_eq!(s.outcome("bad_request"), 3);
    assert_eq!(s.outcome("too_large"), 1);
    assert_eq!(s.outcome("not_found"), 1);
    assert_eq!(s.status(400), 3);
    assert_eq!(s.endpoint("chat_completions"), 6);
}

#[tokio::test]
async fn models_in_both_shapes() {
    let sim = Simulator::builder().start().await.unwrap();
    let o = send(
        sim.addr(),
        "GET",
        "/v1/models",
        &[("authorization", "Bearer k")],
        "",
    )
    .await
    .unwrap()
    .json();
    assert_eq!(o["object"], "list");
    assert!(
        o["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["object"] == "model")
    );
    let a = send(
        sim.addr(),
        "GET",
        "/v1/models",
        &[("x-api-key", "k"), ("anthropic-version", "2023-06-01")],
        "",
    )
    .await
    .unwrap()
    .json();
    assert_eq!(a["has_more"], false);
    assert!(
        a["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["type"] == "model")
    );
    assert_eq!(sim.stats().endpoint("models"), 2);
}
