//! `/v1/messages` with tools, images, documents, thinking and prompt caching: the request
//! rules (status and body), the deterministic answers, and the stream shapes.

mod common;

use std::time::Duration;

use common::*;
use portcullis_sim::Simulator;
use serde_json::{Value, json};

const PNG: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==";
const MODEL: &str = "claude-sonnet-4-5";

fn weather() -> Value {
    json!({"name": "get_weather", "description": "The weather in a city",
           "input_schema": {"type": "object",
               "properties": {"city": {"type": "string"},
                              "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
               "required": ["city", "unit"]}})
}

fn time_tool() -> Value {
    json!({"name": "get_time",
           "input_schema": {"type": "object", "properties": {"zone": {"type": "string"}},
                            "required": ["zone"]}})
}

fn with_tools(prompt: &str, tools: Value) -> Value {
    let mut m = message(MODEL, prompt, 2048);
    m["tools"] = tools;
    m
}

/// A 400 `invalid_request_error` in Anthropic's envelope with exactly this message.
fn assert_400(r: &Reply, message: &str) {
    assert_eq!(r.status, 400, "{}", r.text());
    let v = r.json();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    assert_eq!(v["error"]["message"], message);
    assert!(v["request_id"].as_str().unwrap().starts_with("req_011C"));
}

fn convo(messages: Value) -> Value {
    json!({"model": MODEL, "max_tokens": 2048, "tools": [weather()], "messages": messages})
}

fn image(media_type: &str, data: &str) -> Value {
    json!({"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}})
}

fn tool_uses(v: &Value) -> Vec<Value> {
    v["content"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["type"] == "tool_use")
        .cloned()
        .collect()
}

fn names(v: &Value) -> Vec<String> {
    tool_uses(v)
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn request_rules_refuse_with_the_real_errors() {
    let sim = Simulator::builder().start().await.unwrap();
    let a = sim.addr();
    let use_block = json!({"type": "tool_use", "id": "toolu_01A", "name": "get_weather",
                           "input": {"city": "Oslo", "unit": "celsius"}});
    let result = |id: &str| json!({"type": "tool_result", "tool_use_id": id, "content": "Sunny"});

    let r = anthropic(
        a,
        convo(json!([{"role": "user", "content": [result("toolu_01X")]}])),
    )
    .await;
    assert_400(
        &r,
        "messages.0.content.0: unexpected `tool_use_id` found in `tool_result` blocks: toolu_01X. \
         Each `tool_result` block must have a corresponding `tool_use` block in the previous message.",
    );
    let r = anthropic(
        a,
        convo(json!([
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": [use_block]},
        {"role": "user", "content": [result("toolu_01B")]}])),
    )
    .await;
    assert!(r.json()["error"]["message"].as_str().unwrap().starts_with(
        "messages.2.content.0: unexpected `tool_use_id` found in `tool_result` blocks: toolu_01B."
    ));
    let r = anthropic(
        a,
        convo(json!([
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": [use_block]},
        {"role": "user", "content": "never mind"}])),
    )
    .await;
    assert_400(
        &r,
        "messages.1: `tool_use` ids were found without `tool_result` blocks immediately after: \
         toolu_01A. Each `tool_use` block must have a corresponding `tool_result` block in the \
         next message.",
    );
    let ok = anthropic(
        a,
        convo(json!([
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": [use_block]},
        {"role": "user", "content": [result("toolu_01A")]}])),
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.text());

    let mut bad = weather();
    bad["name"] = json!("get weather!");
    let r = anthropic(a, with_tools("hi", json!([bad]))).await;
    assert_400(
        &r,
        "tools.0.custom.name: String should match pattern '^[a-zA-Z0-9_-]{1,64}$'",
    );
    let mut bad = weather();
    bad["input_schema"] = json!({"type": "string"});
    let r = anthropic(a, with_tools("hi", json!([time_tool(), bad]))).await;
    assert_400(
        &r,
        "tools.1.custom.input_schema.type: Input should be 'object'",
    );
    let mut bad = weather();
    bad.as_object_mut().unwrap().remove("input_schema");
    assert_400(
        &anthropic(a, with_tools("hi", json!([bad]))).await,
        "tools.0.custom.input_schema: Field required",
    );
    assert_400(
        &anthropic(a, with_tools("hi", json!([weather(), weather()]))).await,
        "tools: Tool names must be unique.",
    );

    let mut t = message(MODEL, "hi", 2048);
    t["thinking"] = json!({"type": "enabled", "budget_tokens": 512});
    assert_400(
        &anthropic(a, t).await,
        "thinking.enabled.budget_tokens: Input should be greater than or equal to 1024",
    );
    let mut t = message(MODEL, "hi", 2048);
    t["thinking"] = json!({"type": "enabled", "budget_tokens": 2048});
    assert_400(
        &anthropic(a, t).await,
        "`max_tokens` must be greater than `thinking.budget_tokens`. Please consult our \
         documentation at https://docs.claude.com/en/docs/build-with-claude/extended-thinking#max-tokens-and-context-window-size",
    );
    let mut t = with_tools("hi", json!([weather()]));
    t["thinking"] = json!({"type": "enabled", "budget_tokens": 1024});
    t["tool_choice"] = json!({"type": "any"});
    assert_400(
        &anthropic(a, t).await,
        "Thinking may not be enabled when tool_choice forces tool use.",
    );

    let with_block = |block: Value| {
        json!({"model": MODEL, "max_tokens": 100, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"}, block]}]})
    };
    let at = "messages.0.content.1.image.source.base64";
    assert_400(
        &anthropic(a, with_block(image("image/bmp", PNG))).await,
        &format!(
            "{at}.media_type: Input should be 'image/jpeg', 'image/png', 'image/gif' or 'image/webp'"
        ),
    );
    assert_400(
        &anthropic(a, with_block(image("image/jpeg", PNG))).await,
        &format!(
            "{at}: The image was specified using the image/jpeg media type, but the image appears to be a image/png image"
        ),
    );
    assert_400(
        &anthropic(a, with_block(image("image/png", "R0lGPw=="))).await,
        &format!("{at}: Could not process image"),
    );
    assert_400(
        &anthropic(a, with_block(image("image/png", "not base64!"))).await,
        &format!("{at}.data: The image data is not valid base64."),
    );
    let ok = anthropic(a, with_block(image("image/png", PNG))).await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    let doc = |media_type: &str, data: &str| {
        json!({"type": "document", "source": {"type": "base64", "media_type": media_type,
                                              "data": data}})
    };
    assert_400(
        &anthropic(a, with_block(doc("text/html", "PGh0bWw+"))).await,
        "messages.0.content.1.document.source.base64.media_type: Input should be 'application/pdf'",
    );
    // "%PDF-1.4" in base64.
    let ok = anthropic(a, with_block(doc("application/pdf", "JVBERi0xLjQ="))).await;
    assert_eq!(ok.status, 200, "{}", ok.text());

    let cached = |i: usize| json!({"type": "text", "text": format!("part {i}"), "cache_control": {"type": "ephemeral"}});
    let r = anthropic(
        a,
        json!({"model": MODEL, "max_tokens": 100, "messages": [
        {"role": "user", "content": (0..5).map(cached).collect::<Vec<_>>()}]}),
    )
    .await;
    assert_400(
        &r,
        "A maximum of 4 blocks with cache_control may be provided. Found 5.",
    );
}

#[tokio::test]
async fn tool_choice_decides_the_calls() {
    let sim = Simulator::builder().start().await.unwrap();
    let a = sim.addr();
    let tools = json!([weather(), time_tool()]);

    let r = anthropic(a, with_tools("Use get_weather for Oslo", tools.clone())).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["stop_reason"], "tool_use");
    let u = &tool_uses(&v)[0];
    let id = u["id"].as_str().unwrap();
    assert!(id.starts_with("toolu_01") && id.len() == 30, "{id}");
    assert_eq!(u["input"]["unit"], "celsius");
    assert!(u["input"]["city"].is_string());
    assert_eq!(v["content"].as_array().unwrap().len(), 1, "only the call");
    let again = anthropic(a, with_tools("Use get_weather for Oslo", tools.clone())).await;
    assert_eq!(tool_uses(&again.json()), tool_uses(&v), "deterministic");

    let both = "get_time, then get_weather";
    assert_eq!(
        names(&anthropic(a, with_tools(both, tools.clone())).await.json()),
        ["get_time", "get_weather"]
    );
    let mut serial = with_tools(both, tools.clone());
    serial["tool_choice"] = json!({"type": "auto", "disable_parallel_tool_use": true});
    assert_eq!(names(&anthropic(a, serial).await.json()), ["get_time"]);

    let v = anthropic(a, with_tools("Hello", tools.clone()))
        .await
        .json();
    assert_eq!(v["stop_reason"], "end_turn");
    assert_eq!(v["content"][0]["type"], "text");

    let mut any = with_tools("Hello", tools.clone());
    any["tool_choice"] = json!({"type": "any"});
    assert_eq!(names(&anthropic(a, any).await.json()), ["get_weather"]);
    let mut named = with_tools("get_weather", tools.clone());
    named["tool_choice"] = json!({"type": "tool", "name": "get_time"});
    assert_eq!(names(&anthropic(a, named).await.json()), ["get_time"]);
    let mut none = with_tools("get_weather", tools.clone());
    none["tool_choice"] = json!({"type": "none"});
    assert_eq!(anthropic(a, none).await.json()["stop_reason"], "end_turn");
    let mut missing = with_tools("hi", tools.clone());
    missing["tool_choice"] = json!({"type": "tool", "name": "nope"});
    assert_400(
        &anthropic(a, missing).await,
        "tool_choice.tool.name: Tool 'nope' not found in provided tools",
    );
}

#[tokio::test]
async fn thinking_round_trips_in_a_tool_loop_and_a_tampered_signature_is_refused() {
    let sim = Simulator::builder().start().await.unwrap();
    let a = sim.addr();
    let mut first = with_tools("Use get_weather for Oslo", json!([weather()]));
    first["thinking"] = json!({"type": "enabled", "budget_tokens": 1024});
    let v = anthropic(a, first.clone()).await.json();
    let content = v["content"].as_array().unwrap();
    assert_eq!(content[0]["type"], "thinking");
    assert!(content[0]["thinking"].as_str().unwrap().len() > 20);
    assert!(content[0]["signature"].as_str().unwrap().len() > 40);
    assert_eq!(content[1]["type"], "tool_use");
    assert_eq!(v["stop_reason"], "tool_use");

    let reply = |assistant: Value| {
        let mut next = first.clone();
        next["messages"] = json!([
            {"role": "user", "content": "Use get_weather for Oslo"},
            {"role": "assistant", "content": assistant},
            {"role": "user", "content": [{"type": "tool_result",
                "tool_use_id": content[1]["id"], "content": "Rain, 9 C"}]}]);
        next
    };
    let r = anthropic(a, reply(v["content"].clone())).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let done = r.json();
    assert_eq!(done["stop_reason"], "end_turn");
    assert_eq!(done["content"][0]["type"], "thinking");
    let text = done["content"][1]["text"].as_str().unwrap();
    assert!(text.starts_with("The tool returned: Rain, 9 C."), "{text}");

    let mut tampered = v["content"].clone();
    tampered[0]["thinking"] = json!("I changed my mind.");
    assert_400(
        &anthropic(a, reply(tampered)).await,
        "messages.1.content.0: Invalid `signature` in `thinking` block",
    );
    let mut forged = v["content"].clone();
    forged[0]["signature"] = json!("c2lnbmF0dXJl");
    assert_400(
        &anthropic(a, reply(forged)).await,
        "messages.1.content.0: Invalid `signature` in `thinking` block",
    );
}

#[tokio::test(start_paused = true)]
async fn cache_breakpoints_create_then_read() {
    let sim = Simulator::builder().start().await.unwrap();
    let a = sim.addr();
    let long = "the harbor keeps watch over quiet boats ".repeat(200);
    let req = |question: &str, ttl: Option<&str>| {
        let mut cc = json!({"type": "ephemeral"});
        if let Some(t) = ttl {
            cc["ttl"] = json!(t);
        }
        json!({"model": MODEL, "max_tokens": 100,
               "system": [{"type": "text", "text": long, "cache_control": cc}],
               "messages": [{"role": "user", "content": question}]})
    };
    let total = send(
        a,
        "POST",
        "/v1/messages/count_tokens",
        &[
            ("x-api-key", ANTHROPIC_KEY),
            ("anthropic-version", "2023-06-01"),
        ],
        req("First?", None).to_string(),
    )
    .await
    .unwrap()
    .json()["input_tokens"]
        .as_u64()
        .unwrap();
    let u = |v: &Value, k: &str| v["usage"][k].as_u64().unwrap();

    let first = anthropic(a, req("First?", None)).await.json();
    let created = u(&first, "cache_creation_input_tokens");
    assert!(created >= 1024 && created < total, "{created} of {total}");
    assert_eq!(u(&first, "cache_read_input_tokens"), 0);
    assert_eq!(
        first["usage"]["cache_creation"]["ephemeral_5m_input_tokens"],
        created
    );
    assert_eq!(
        u(&first, "input_tokens") + created,
        total,
        "input_tokens is the uncached rest"
    );

    let second = anthropic(a, req("Second?", None)).await.json();
    assert_eq!(u(&second, "cache_read_input_tokens"), created);
    assert_eq!(u(&second, "cache_creation_input_tokens"), 0);
    assert!(u(&second, "input_tokens") < 20);

    // Within five minutes of the last use it stays; past them it is written afresh.
    tokio::time::advance(Duration::from_secs(290)).await;
    assert_eq!(
        u(
            &anthropic(a, req("Third?", None)).await.json(),
            "cache_read_input_tokens"
        ),
        created
    );
    tokio::time::advance(Duration::from_secs(301)).await;
    let expired = anthropic(a, req("Fourth?", None)).await.json();
    assert_eq!(u(&expired, "cache_read_input_tokens"), 0);
    assert_eq!(u(&expired, "cache_creation_input_tokens"), created);

    // A one-hour breakpoint outlives five minutes.
    sim.reset();
    let hour = anthropic(a, req("First?", Some("1h"))).await.json();
    assert_eq!(
        hour["usage"]["cache_creation"]["ephemeral_1h_input_tokens"],
        created
    );
    tokio::time::advance(Duration::from_secs(1800)).await;
    let later = anthropic(a, req("Later?", Some("1h"))).await.json();
    assert_eq!(u(&later, "cache_read_input_tokens"), created);

    // Below the model's minimum (1024 tokens) nothing is cached.
    let short = json!({"model": MODEL, "max_tokens": 100,
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": "Hi"}]});
    anthropic(a, short.clone()).await;
    let again = anthropic(a, short).await.json();
    assert_eq!(u(&again, "cache_read_input_tokens"), 0);
    assert_eq!(u(&again, "cache_creation_input_tokens"), 0);
}

#[tokio::test]
async fn streamed_thinking_and_tool_use_reassemble_to_the_plain_answer() {
    let sim = Simulator::builder().start().await.unwrap();
    let mut req = with_tools("get_weather and get_time", json!([weather(), time_tool()]));
    req["thinking"] = json!({"type": "enabled", "budget_tokens": 1024});
    let plain = anthropic(sim.addr(), req.clone()).await.json();
    req["stream"] = json!(true);
    let r = anthropic(sim.addr(), req).await;
    assert_eq!(r.status, 200);

    let mut blocks: Vec<Value> = Vec::new();
    let mut partial: Vec<String> = Vec::new();
    let mut names = Vec::new();
    let mut stop_reason = Value::Null;
    let mut usage = Value::Null;
    for (name, data) in r.events() {
        let e: Value = serde_json::from_str(&data).unwrap();
        let name = name.unwrap();
        assert_eq!(e["type"], name.as_str());
        names.push(name.clone());
        match name.as_str() {
            "content_block_start" => {
                assert_eq!(e["index"].as_u64().unwrap() as usize, blocks.len());
                let b = e["content_block"].clone();
                if b["type"] == "tool_use" {
                    assert_eq!(b["input"], json!({}));
                }
                blocks.push(b);
                partial.push(String::new());
            }
            "content_block_delta" => {
                let i = e["index"].as_u64().unwrap() as usize;
                let d = &e["delta"];
                let b = &mut blocks[i];
                match d["type"].as_str().unwrap() {
                    "thinking_delta" => {
                        let t = format!(
                            "{}{}",
                            b["thinking"].as_str().unwrap(),
                            d["thinking"].as_str().unwrap()
                        );
                        b["thinking"] = json!(t);
                    }
                    "signature_delta" => b["signature"] = d["signature"].clone(),
                    "text_delta" => {
                        let t = format!(
                            "{}{}",
                            b["text"].as_str().unwrap(),
                            d["text"].as_str().unwrap()
                        );
                        b["text"] = json!(t);
                    }
                    "input_json_delta" => partial[i].push_str(d["partial_json"].as_str().unwrap()),
                    other => panic!("unexpected delta {other}"),
                }
            }
            "content_block_stop" => {
                let i = e["index"].as_u64().unwrap() as usize;
                if blocks[i]["type"] == "tool_use" {
                    blocks[i]["input"] = serde_json::from_str(&partial[i]).unwrap();
                }
            }
            "message_delta" => {
                stop_reason = e["delta"]["stop_reason"].clone();
                usage = e["usage"].clone();
            }
            _ => {}
        }
    }
    assert_eq!(names[0], "message_start");
    assert_eq!(names.last().unwrap(), "message_stop");
    assert_eq!(Value::Array(blocks), plain["content"]);
    assert_eq!(stop_reason, "tool_use");
    assert_eq!(usage["output_tokens"], plain["usage"]["output_tokens"]);
}
