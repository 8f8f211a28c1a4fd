//! `/v1/chat/completions` with tools, images, structured output, reasoning and prompt caching:
//! the request rules (status and body), the deterministic answers, and the stream shapes.

mod common;

use common::*;
use portcullis_sim::Simulator;
use serde_json::{Value, json};

const PNG: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==";

fn weather() -> Value {
    json!({"type": "function", "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
                "detailed": {"type": "boolean"},
                "where": {"type": "object", "properties": {"lat": {"type": "number"}},
                          "required": ["lat"]}
            },
            "required": ["city", "unit", "days", "detailed", "where"]
        }
    }})
}

fn time_tool() -> Value {
    json!({"type": "function", "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}},
                       "required": ["zone"]}
    }})
}

fn with_tools(prompt: &str, tools: Value) -> Value {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prompt}],
           "tools": tools})
}

/// A 400 `invalid_request_error` whose message contains `needle`, with this `param`.
fn assert_400(r: &Reply, needle: &str, param: Value) {
    assert_eq!(r.status, 400, "{}", r.text());
    let e = &r.json()["error"];
    assert_eq!(e["type"], "invalid_request_error", "{e}");
    let msg = e["message"].as_str().unwrap();
    assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
    assert_eq!(e["param"], param, "{e}");
    assert!(e.as_object().unwrap().contains_key("code"));
}

/// A small JSON Schema checker for what the generator uses: type, enum, required, properties,
/// items, minimum/maximum, $ref to $defs, anyOf.
fn validates(schema: &Value, v: &Value, root: &Value) -> bool {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        return validates(root.pointer(&r[1..]).unwrap(), v, root);
    }
    if let Some(any) = schema.get("anyOf").and_then(Value::as_array) {
        return any.iter().any(|s| validates(s, v, root));
    }
    if let Some(e) = schema.get("enum").and_then(Value::as_array) {
        if !e.contains(v) {
            return false;
        }
    }
    let ok = match schema.get("type").and_then(Value::as_str) {
        Some("object") => {
            let Some(o) = v.as_object() else { return false };
            let req = schema.get("required").and_then(Value::as_array);
            let props = schema.get("properties").and_then(Value::as_object);
            req.into_iter()
                .flatten()
                .all(|k| o.contains_key(k.as_str().unwrap()))
                && o.iter().all(|(k, val)| {
                    props
                        .and_then(|p| p.get(k))
                        .is_none_or(|s| validates(s, val, root))
                })
        }
        Some("string") => v.is_string(),
        Some("integer") => v.is_i64() || v.is_u64(),
        Some("number") => v.is_number(),
        Some("boolean") => v.is_boolean(),
        Some("array") => v.as_array().is_some_and(|a| {
            a.iter()
                .all(|x| validates(schema.get("items").unwrap_or(&json!({})), x, root))
        }),
        Some("null") => v.is_null(),
        _ => true,
    };
    let n = v.as_f64();
    ok && schema
        .get("minimum")
        .and_then(Value::as_f64)
        .is_none_or(|m| n.is_some_and(|n| n >= m))
        && schema
            .get("maximum")
            .and_then(Value::as_f64)
            .is_none_or(|m| n.is_some_and(|n| n <= m))
}

fn calls(v: &Value) -> Vec<Value> {
    v["choices"][0]["message"]["tool_calls"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn names(v: &Value) -> Vec<String> {
    calls(v)
        .iter()
        .map(|c| c["function"]["name"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn request_rules_refuse_with_the_real_errors() {
    let sim = Simulator::builder().start().await.unwrap();
    let a = sim.addr();
    let call = json!({"id": "call_1", "type": "function",
                      "function": {"name": "get_time", "arguments": "{}"}});

    let r = openai(
        a,
        json!({"model": "gpt-4o-mini", "messages": [
        {"role": "user", "content": "hi"},
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}]}),
    )
    .await;
    assert_400(
        &r,
        "messages with role 'tool' must be a response to a preceeding message with 'tool_calls'",
        json!("messages.[1].role"),
    );

    let r = openai(
        a,
        json!({"model": "gpt-4o-mini", "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": null, "tool_calls": [call]},
        {"role": "user", "content": "and?"}]}),
    )
    .await;
    assert_400(
        &r,
        "The following tool_call_ids did not have response messages: call_1",
        json!("messages.[2].role"),
    );

    let r = openai(
        a,
        json!({"model": "gpt-4o-mini", "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": null, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_2", "content": "12:00"}]}),
    )
    .await;
    assert_400(
        &r,
        "'tool_call_id' of 'call_2' not found",
        json!("messages.[2].tool_call_id"),
    );

    let mut bad_name = with_tools("hi", json!([time_tool()]));
    bad_name["tools"][0]["function"]["name"] = json!("get time");
    let r = openai(a, bad_name).await;
    assert_400(
        &r,
        "string does not match pattern",
        json!("tools[0].function.name"),
    );
    assert_eq!(r.json()["error"]["code"], "invalid_value");

    let mut bad_params = with_tools("hi", json!([time_tool()]));
    bad_params["tools"][0]["function"]["parameters"] = json!({"type": "array"});
    let r = openai(a, bad_params).await;
    assert_400(
        &r,
        "Invalid schema for function 'get_time': schema must be a JSON Schema of 'type: \"object\"', got 'type: \"array\"'.",
        json!("tools[0].function.parameters"),
    );

    let mut bad_type = with_tools("hi", json!([time_tool()]));
    bad_type["tools"][0]["type"] = json!("retrieval");
    assert_400(
        &openai(a, bad_type).await,
        "Supported values are",
        json!("tools[0].type"),
    );

    let mut no_tools = chat("gpt-4o-mini", "hi");
    no_tools["tool_choice"] = json!("required");
    assert_400(
        &openai(a, no_tools).await,
        "'tool_choice' is only allowed when 'tools' are specified",
        json!("tool_choice"),
    );

    let mut schema = chat("gpt-4o-mini", "hi");
    schema["response_format"] = json!({"type": "json_schema", "json_schema": {
        "name": "List", "schema": {"type": "array"}, "strict": true}});
    let r = openai(a, schema).await;
    assert_400(
        &r,
        "Invalid schema for response_format 'List'",
        json!("response_format"),
    );
    assert_eq!(r.json()["error"]["code"], "invalid_json_schema");

    let mut json_object = chat("gpt-4o-mini", "hi");
    json_object["response_format"] = json!({"type": "json_object"});
    assert_400(
        &openai(a, json_object).await,
        "'messages' must contain the word 'json'",
        json!("messages"),
    );

    let image = |url: String| {
        json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": url}}]}]})
    };
    let field = json!("messages[0].content[1].image_url.url");
    let r = openai(a, image(format!("data:image/svg+xml;base64,{PNG}"))).await;
    assert_400(&r, "unsupported MIME type 'image/svg+xml'", field.clone());
    let r = openai(a, image("data:image/png;base64,!!!".into())).await;
    assert_400(&r, "invalid base64", field);
    // "GIF?" is no image at all.
    let r = openai(a, image("data:image/png;base64,R0lGPw==".into())).await;
    assert_400(&r, "You uploaded an unsupported image", Value::Null);
    assert_eq!(r.json()["error"]["code"], "invalid_image_format");
    let ok = openai(a, image(format!("data:image/png;base64,{PNG}"))).await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    let plain = openai(a, chat("gpt-4o-mini", "What is this?")).await.json();
    assert_eq!(
        ok.json()["usage"]["prompt_tokens"].as_u64().unwrap(),
        plain["usage"]["prompt_tokens"].as_u64().unwrap() + 85,
        "an image costs 85 prompt tokens"
    );

    let mut effort = chat("gpt-4o-mini", "hi");
    effort["reasoning_effort"] = json!("high");
    let r = openai(a, effort).await;
    assert_400(
        &r,
        "'reasoning_effort' is not supported with this model",
        json!("reasoning_effort"),
    );
    assert_eq!(r.json()["error"]["code"], "unsupported_parameter");
    let mut effort = chat("gpt-5-nano", "hi");
    effort["reasoning_effort"] = json!("extreme");
    assert_400(
        &openai(a, effort).await,
        "Supported values are",
        json!("reasoning_effort"),
    );
}

#[tokio::test]
async fn tool_choice_decides_the_calls() {
    let sim = Simulator::builder().start().await.unwrap();
    let a = sim.addr();
    let tools = json!([weather(), time_tool()]);

    // auto: a named tool is called, with arguments that validate against its schema.
    let r = openai(
        a,
        with_tools("What is get_weather in Paris?", tools.clone()),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    assert!(v["choices"][0]["message"]["content"].is_null());
    let c = &calls(&v)[0];
    assert_eq!(c["type"], "function");
    let id = c["id"].as_str().unwrap();
    assert!(id.starts_with("call_") && id.len() == 29, "{id}");
    let args: Value = serde_json::from_str(c["function"]["arguments"].as_str().unwrap()).unwrap();
    let schema = &weather()["function"]["parameters"];
    assert!(validates(schema, &args, schema), "{args}");
    assert_eq!(args["unit"], "celsius");
    assert_eq!(args["days"], 1);
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    // Deterministic per request: the same ids and arguments again.
    let again = openai(
        a,
        with_tools("What is get_weather in Paris?", tools.clone()),
    )
    .await;
    assert_eq!(calls(&again.json()), calls(&v));

    // auto, no tool named: text.
    let v = openai(a, with_tools("Hello", tools.clone())).await.json();
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert!(v["choices"][0]["message"].get("tool_calls").is_none());

    // auto, two named: parallel calls in the order mentioned; one with parallel calls off.
    let both = "get_time first, then get_weather";
    let v = openai(a, with_tools(both, tools.clone())).await.json();
    assert_eq!(names(&v), ["get_time", "get_weather"]);
    assert_ne!(calls(&v)[0]["id"], calls(&v)[1]["id"]);
    let mut serial = with_tools(both, tools.clone());
    serial["parallel_tool_calls"] = json!(false);
    assert_eq!(names(&openai(a, serial).await.json()), ["get_time"]);

    // required: a call even when no tool is named; named: that tool; none: text.
    let mut req = with_tools("Hello", tools.clone());
    req["tool_choice"] = json!("required");
    assert_eq!(names(&openai(a, req).await.json()), ["get_weather"]);
    let mut named = with_tools("get_weather please", tools.clone());
    named["tool_choice"] = json!({"type": "function", "function": {"name": "get_time"}});
    assert_eq!(names(&openai(a, named).await.json()), ["get_time"]);
    let mut none = with_tools("get_weather please", tools.clone());
    none["tool_choice"] = json!("none");
    let v = openai(a, none).await.json();
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert!(
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .len()
            > 10
    );
}

#[tokio::test]
async fn a_tool_loop_ends_with_text() {
    let sim = Simulator::builder().start().await.unwrap();
    let a = sim.addr();
    let tools = json!([weather()]);
    let first = openai(a, with_tools("get_weather for Oslo", tools.clone()))
        .await
        .json();
    let call = calls(&first)[0].clone();
    let req = json!({"model": "gpt-4o-mini", "tools": tools, "messages": [
        {"role": "user", "content": "get_weather for Oslo"},
        first["choices"][0]["message"],
        {"role": "tool", "tool_call_id": call["id"], "content": "Sunny, 21 C"}]});
    let r = openai(a, req).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(
        text.starts_with("The tool returned: Sunny, 21 C."),
        "{text}"
    );
}

#[tokio::test]
async fn structured_output_validates() {
    let sim = Simulator::builder().start().await.unwrap();
    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer", "minimum": 18},
            "tags": {"type": "array", "items": {"type": "string"}},
            "pet": {"anyOf": [{"$ref": "#/$defs/Pet"}, {"type": "null"}]}
        },
        "required": ["name", "age", "tags", "pet"],
        "additionalProperties": false,
        "$defs": {"Pet": {"type": "object", "properties": {"kind": {"type": "string",
                  "enum": ["cat", "dog"]}}, "required": ["kind"], "additionalProperties": false}}
    });
    let mut req = chat("gpt-4o-mini", "Describe a person");
    req["response_format"] = json!({"type": "json_schema",
        "json_schema": {"name": "Person", "schema": schema, "strict": true}});
    let v = openai(sim.addr(), req).await.json();
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    let out: Value = serde_json::from_str(content).unwrap();
    assert!(validates(&schema, &out, &schema), "{out}");
    assert_eq!(out["age"], 18);
    assert_eq!(out["pet"], json!({"kind": "cat"}));

    let mut req = chat("gpt-4o-mini", "Answer in JSON");
    req["response_format"] = json!({"type": "json_object"});
    let v = openai(sim.addr(), req).await.json();
    let out: Value =
        serde_json::from_str(v["choices"][0]["message"]["content"].as_str().unwrap()).unwrap();
    assert!(out["answer"].is_string());
}

#[tokio::test]
async fn reasoning_models_spend_hidden_tokens() {
    let sim = Simulator::builder().start().await.unwrap();
    let plain = openai(sim.addr(), chat("gpt-4o-mini", "Think"))
        .await
        .json();
    assert_eq!(
        plain["usage"]["completion_tokens_details"]["reasoning_tokens"],
        0
    );
    for (effort, n) in [(None, 192), (Some("low"), 64), (Some("high"), 448)] {
        let mut req = chat("gpt-5-nano", "Think");
        if let Some(e) = effort {
            req["reasoning_effort"] = json!(e);
        }
        let v = openai(sim.addr(), req).await.json();
        let u = &v["usage"];
        assert_eq!(
            u["completion_tokens_details"]["reasoning_tokens"], n,
            "{effort:?}"
        );
        let text = v["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(!text.is_empty());
        assert!(u["completion_tokens"].as_u64().unwrap() > n);
    }
    // max_completion_tokens covers the reasoning: spent on it, nothing is left for text.
    let mut req = chat("gpt-5-nano", "Think");
    req["max_completion_tokens"] = json!(100);
    let v = openai(sim.addr(), req).await.json();
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["choices"][0]["message"]["content"], "");
    assert_eq!(v["usage"]["completion_tokens"], 100);
}

#[tokio::test(start_paused = true)]
async fn repeated_long_prefixes_are_read_from_the_cache() {
    let sim = Simulator::builder().start().await.unwrap();
    let a = sim.addr();
    let long = "the harbor keeps watch over quiet boats ".repeat(250);
    let req = |question: &str| {
        json!({"model": "gpt-4o-mini", "messages": [
            {"role": "system", "content": long},
            {"role": "user", "content": question}]})
    };
    let cached = |v: &Value| {
        v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
    };

    let first = openai(a, req("First question?")).await.json();
    let prompt = first["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt > 1500, "{prompt}");
    assert_eq!(cached(&first), 0);
    let second = openai(a, req("Second question?")).await.json();
    let hit = cached(&second);
    assert!(
        hit >= 1024 && hit % 128 == 0 && hit <= prompt,
        "{hit} of {prompt}"
    );
    assert_eq!(
        second["usage"]["prompt_tokens"].as_u64().unwrap(),
        prompt,
        "still counted"
    );
    // The same request again: the whole prompt, rounded down to 128.
    let third = openai(a, req("Second question?")).await.json();
    assert_eq!(cached(&third), prompt / 128 * 128);
    // Another key shares nothing; short prompts are never cached.
    let other = openai_with_key(a, "sk-other", req("Second question?"))
        .await
        .json();
    assert_eq!(cached(&other), 0);
    openai(a, chat("gpt-4o-mini", "short")).await;
    assert_eq!(
        cached(&openai(a, chat("gpt-4o-mini", "short")).await.json()),
        0
    );
    // Past five minutes without use, the prefix is gone.
    tokio::time::advance(std::time::Duration::from_secs(301)).await;
    assert_eq!(cached(&openai(a, req("Second question?")).await.json()), 0);
    // /_sim/reset empties the cache.
    sim.reset();
    assert_eq!(cached(&openai(a, req("Second question?")).await.json()), 0);
}

/// The chunks of a stream, without `[DONE]`.
fn chunks(r: &Reply) -> Vec<Value> {
    let events = r.events();
    assert_eq!(events.last().unwrap().1, "[DONE]");
    events[..events.len() - 1]
        .iter()
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect()
}

#[tokio::test]
async fn streamed_tool_calls_reassemble_to_the_plain_answer() {
    let sim = Simulator::builder().start().await.unwrap();
    let req = with_tools("get_weather and get_time", json!([weather(), time_tool()]));
    let plain = openai(sim.addr(), req.clone()).await.json();
    let mut streamed = req;
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let r = openai(sim.addr(), streamed).await;
    assert_eq!(r.status, 200);
    let chunks = chunks(&r);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks[0]["choices"][0]["delta"]["content"].is_null());

    let mut assembled: Vec<Value> = Vec::new();
    for c in &chunks {
        let Some(deltas) = c["choices"][0]["delta"]["tool_calls"].as_array() else {
            continue;
        };
        for d in deltas {
            let i = d["index"].as_u64().unwrap() as usize;
            if i == assembled.len() {
                // The first fragment of a call: id, type, name and empty arguments.
                assert!(d["id"].is_string() && d["type"] == "function", "{d}");
                assert_eq!(d["function"]["arguments"], "");
                assembled.push(json!({"id": d["id"], "type": "function",
                    "function": {"name": d["function"]["name"], "arguments": ""}}));
            } else {
                assert!(d.get("id").is_none(), "{d}");
                let frag = d["function"]["arguments"].as_str().unwrap();
                let args = &mut assembled[i]["function"]["arguments"];
                *args = json!(format!("{}{frag}", args.as_str().unwrap()));
            }
        }
    }
    assert_eq!(assembled, calls(&plain));
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(chunks[chunks.len() - 1]["usage"], plain["usage"]);
}
