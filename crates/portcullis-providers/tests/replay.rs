//! Every fitting recording replayed from a loopback server through the providers, complete and
//! streaming: content, usage, model, finish reason and request id.

mod common;

use common::{CANARY, Canned, Server, fixture, request};
use futures_util::StreamExt;
use portcullis_core::{
    ANTHROPIC, ChatStream, CompletionResult, ErrorKind, FinishReason, OPENAI, Usage,
};
use tower::{Service, ServiceExt};

struct Expect {
    file: &'static str,
    content: &'static str,
    finish: FinishReason,
    usage: Option<Usage>,
    model: &'static str,
    /// Tool calls: id, name, arguments (whole).
    calls: &'static [(&'static str, &'static str, &'static str)],
}

fn usage(i: u64, o: u64, t: u64) -> Option<Usage> {
    Some(Usage {
        input_tokens: i,
        output_tokens: o,
        total_tokens: t,
        ..Usage::default()
    })
}

fn openai_streams() -> Vec<Expect> {
    let m = "gpt-4o-2024-08-06";
    vec![
        Expect {
            file: "openai/ai-gateway_stream_text.sse",
            content: "Hi there! How can I help today? I can answer questions, explain concepts, help with writing or brainstorming, code, plan something, and more. Tell me what you\u{2019}d like to work on or a topic you\u{2019}re curious about.",
            finish: FinishReason::Stop,
            usage: None, // recorded without stream_options: no usage key at all
            model: "gpt-5-nano-2025-08-07",
            calls: &[],
        },
        Expect {
            file: "openai/openai-python_stream_finish_length.sse",
            content: "{\"",
            finish: FinishReason::Length,
            usage: usage(79, 1, 80),
            model: m,
            calls: &[],
        },
        Expect {
            file: "openai/openai-python_stream_parallel_tool_calls.sse",
            content: "",
            finish: FinishReason::ToolCalls,
            usage: usage(149, 60, 209),
            model: m,
            calls: &[
                (
                    "call_JMW1whyEaYG438VE1OIflxA2",
                    "GetWeatherArgs",
                    r#"{"city": "Edinburgh", "country": "GB", "units": "c"}"#,
                ),
                (
                    "call_DNYTawLBoN8fj3KN6qU9N1Ou",
                    "get_stock_price",
                    r#"{"ticker": "AAPL", "exchange": "NASDAQ"}"#,
                ),
            ],
        },
        Expect {
            file: "openai/openai-python_stream_refusal_delta.sse",
            content: "I'm sorry, I can't assist with that request.",
            finish: FinishReason::Refusal,
            usage: usage(79, 11, 90),
            model: m,
            calls: &[],
        },
        Expect {
            file: "openai/openai-python_stream_stop_with_usage_chunk.sse",
            content: "I'm unable to provide real-time weather updates. To get the current weather in San Francisco, I recommend checking a reliable weather website or a weather app.",
            finish: FinishReason::Stop,
            usage: usage(14, 30, 44),
            model: m,
            calls: &[],
        },
        Expect {
            file: "openai/openai-python_stream_tool_call.sse",
            content: "",
            finish: FinishReason::ToolCalls,
            usage: usage(76, 24, 100),
            model: m,
            calls: &[(
                "call_c91SqDXlYFuETYv8mUHzz6pp",
                "GetWeatherArgs",
                r#"{"city":"Edinburgh","country":"UK","units":"c"}"#,
            )],
        },
    ]
}

fn anthropic_streams() -> Vec<Expect> {
    vec![
        Expect {
            file: "anthropic/anthropic-sdk-python_basic_response.sse",
            content: "Hello there!",
            finish: FinishReason::Stop,
            usage: usage(11, 6, 17),
            model: "claude-3-opus-latest",
            calls: &[],
        },
        Expect {
            file: "anthropic/anthropic-sdk-python_refusal_response.sse",
            content: "",
            finish: FinishReason::Refusal,
            usage: usage(20, 0, 20),
            model: "claude-opus-4-7",
            calls: &[],
        },
        Expect {
            file: "anthropic/anthropic-sdk-python_tool_use_response.sse",
            content: "I'll check the current weather in Paris for you.",
            finish: FinishReason::ToolCalls,
            usage: usage(377, 65, 442),
            model: "claude-sonnet-4-20250514",
            calls: &[(
                "toolu_01NRLabsLyVHZPKxbKvkfSMn",
                "get_weather",
                r#"{"location": "Paris"}"#,
            )],
        },
        Expect {
            file: "anthropic/llm-anthropic_stream_stop_sequence.sse",
            content: "\ndef pelican():\n    return \"A large waterbird with a long bill and a throat pouch for catching fish.\"\n",
            finish: FinishReason::Stop,
            usage: usage(16, 28, 44),
            model: "claude-haiku-4-5-20251001",
            calls: &[],
        },
        Expect {
            file: "anthropic/llm-anthropic_stream_text.sse",
            content: "- Captain\n- Scoop",
            finish: FinishReason::Stop,
            usage: usage(17, 10, 27),
            model: "claude-sonnet-4-5-20250929",
            calls: &[],
        },
        Expect {
            file: "anthropic/llm-anthropic_stream_tool_use.sse",
            content: "",
            finish: FinishReason::ToolCalls,
            usage: usage(542, 62, 604),
            model: "claude-haiku-4-5-20251001",
            // Empty input (`partial_json: ""` only) is the empty object.
            calls: &[
                (
                    "toolu_01LtHJmixrs9NcWQkK8hu8hj",
                    "pelican_name_generator",
                    "{}",
                ),
                (
                    "toolu_01N8a4jWyf116qKTMqKKmjyt",
                    "pelican_name_generator",
                    "{}",
                ),
            ],
        },
    ]
}

/// Reads a stream to the end, checking its shape: content chunks, then exactly one final chunk
/// (the last item) with the finish reason, the usage and the assembled message, which must
/// agree with the chunks.
async fn drain(mut s: ChatStream) -> (String, FinishReason, Option<Usage>, CompletionResult) {
    let mut content = String::new();
    let mut finish = None;
    let mut usage = None;
    let mut message = None;
    let mut first = true;
    let mut ids = Vec::new();
    while let Some(item) = s.next().await {
        let c = item.expect("no error in a recording");
        assert!(finish.is_none(), "nothing after the final chunk");
        if first && c.finish_reason.is_none() {
            assert!(
                c.has_content(),
                "the first item is content (the commit point)"
            );
        }
        first = false;
        content.push_str(&c.delta);
        ids.extend(c.tool_calls.iter().filter_map(|d| d.id.clone()));
        if c.finish_reason.is_some() {
            finish = c.finish_reason;
            usage = c.usage;
            message = c.message;
        }
    }
    let message = *message.expect("the final chunk carries the assembled message");
    assert_eq!(message.content, content, "assembled text = the deltas");
    let assembled: Vec<_> = message.tool_calls.iter().map(|c| c.id.clone()).collect();
    assert_eq!(
        assembled, ids,
        "one assembled call per started call, in order"
    );
    (content, finish.expect("a final chunk"), usage, message)
}

fn calls_of(r: &CompletionResult) -> Vec<(&str, &str, &str)> {
    r.tool_calls
        .iter()
        .map(|c| (c.id.as_str(), c.name.as_str(), c.arguments.as_str()))
        .collect()
}

async fn replay_streams(server: &Server, cases: Vec<Expect>, provider: &str) {
    for e in cases {
        let f = fixture(e.file);
        for chunk in [1, 7, 4096] {
            server.set(f.canned().chunk(chunk));
            let model = e.model;
            let s = if provider == OPENAI {
                server.openai().streaming().oneshot(request(model)).await
            } else {
                let mut svc = server.anthropic().streaming();
                svc.ready().await.unwrap();
                svc.call(request(model)).await
            };
            let s = s.unwrap_or_else(|err| panic!("{}: {err}", e.file));
            assert_eq!(s.meta().model, e.model, "{}", e.file);
            assert_eq!(s.meta().provider, provider);
            assert_eq!(s.meta().request_id, f.request_id, "{}", e.file);
            let (content, finish, usage, message) = drain(s).await;
            assert_eq!(content, e.content, "{}", e.file);
            assert_eq!(finish, e.finish, "{}", e.file);
            assert_eq!(usage, e.usage, "{}", e.file);
            assert_eq!(
                calls_of(&message),
                e.calls,
                "{} (chunks of {chunk})",
                e.file
            );
            assert_eq!(message.finish_reason, e.finish, "{}", e.file);
            for call in &message.tool_calls {
                assert!(call.arguments_json().unwrap().is_object(), "{}", e.file);
            }
        }
    }
}

#[tokio::test]
async fn openai_streams_replay() {
    let server = Server::start().await;
    replay_streams(&server, openai_streams(), OPENAI).await;
    let seen = server.last();
    assert_eq!(seen.path, "/v1/chat/completions");
    assert_eq!(seen.body["stream"], true);
    assert_eq!(seen.body["stream_options"]["include_usage"], true);
    assert_eq!(seen.headers["accept"], "text/event-stream");
}

#[tokio::test]
async fn anthropic_streams_replay() {
    let server = Server::start().await;
    replay_streams(&server, anthropic_streams(), ANTHROPIC).await;
    assert_eq!(server.last().body["stream"], true);
}

#[tokio::test]
async fn openai_complete_replay() {
    let server = Server::start().await;
    let cases = [
        (
            "openai/ai-gateway_chat_basic.json",
            "Hi there! How can I help you today? I can explain concepts, answer questions, help with writing or editing, brainstorm ideas, assist with coding or math, plan tasks, and more. Tell me what you\u{2019}d like to do.",
            FinishReason::Stop,
            usage(8, 377, 385).map(|u| u.with_reasoning(320)),
            &[][..],
        ),
        (
            "openai/ai-gateway_tool_calls.json",
            "",
            FinishReason::ToolCalls,
            usage(162, 219, 381).map(|u| u.with_reasoning(192)),
            &[(
                "call_Xc4Aiih37EUJvqjoZlu4Vdoi",
                "get_current_weather",
                r#"{"location":"San Francisco, CA"}"#,
            )][..],
        ),
    ];
    for (file, content, finish, u, calls) in cases {
        let f = fixture(file);
        server.set(f.canned());
        let r = server
            .openai()
            .oneshot(request("gpt-5-nano"))
            .await
            .unwrap();
        assert_eq!(r.content, content);
        assert_eq!(r.finish_reason, finish);
        assert_eq!(Some(r.usage), u, "{file}");
        assert_eq!(calls_of(&r), calls, "{file}");
        assert_eq!(r.model, "gpt-5-nano-2025-08-07");
        assert_eq!(r.provider, OPENAI);
        assert_eq!(r.request_id, f.request_id);
        assert_eq!(
            r.rate_limits.as_ref().unwrap().requests.remaining,
            Some(499)
        );
    }
    // The request on the wire.
    let seen = server.last();
    assert_eq!(seen.path, "/v1/chat/completions");
    assert_eq!(
        seen.headers["authorization"],
        format!("Bearer {CANARY}").as_str()
    );
    assert_eq!(seen.body["max_completion_tokens"], 64);
    assert!(seen.body.get("max_tokens").is_none());
    assert!(seen.body.get("stream").is_none());
    assert_eq!(seen.body["messages"][0]["role"], "system");
    assert_eq!(seen.body["messages"][1]["content"], "Hello!");
}

#[tokio::test]
async fn openai_legacy_max_tokens_and_options() {
    let server = Server::start().await;
    server.set(fixture("openai/ai-gateway_chat_basic.json").canned());
    let p = portcullis_providers::OpenAiProvider::builder()
        .base_url(format!("{}/v1/", server.base()))
        .without_api_key()
        .legacy_max_tokens(true)
        .build()
        .unwrap();
    let req = request("m")
        .stop_sequences(["END"])
        .response_format(portcullis_core::ResponseFormat::JsonObject)
        .temperature(0.5);
    p.oneshot(req).await.unwrap();
    let seen = server.last();
    assert_eq!(seen.body["max_tokens"], 64);
    assert!(seen.body.get("max_completion_tokens").is_none());
    assert_eq!(seen.body["stop"][0], "END");
    assert_eq!(seen.body["response_format"]["type"], "json_object");
    assert_eq!(seen.body["temperature"], 0.5);
    assert!(seen.headers.get("authorization").is_none());
}

#[tokio::test]
async fn anthropic_complete_replay() {
    let server = Server::start().await;
    let f = fixture("anthropic/pydantic-ai_message_nonstream.json");
    server.set(f.canned());
    let req = request("claude-3-opus").stop_sequences(["###"]);
    let r = server.anthropic().oneshot(req).await.unwrap();
    assert_eq!(r.content, "The capital of France is Paris.");
    assert_eq!(r.finish_reason, FinishReason::Stop);
    assert_eq!(r.usage, Usage::new(20, 10));
    assert_eq!(r.model, "claude-3-opus-20240229");
    assert_eq!(r.provider, ANTHROPIC);
    assert_eq!(r.request_id, f.request_id);
    let seen = server.last();
    assert_eq!(seen.path, "/v1/messages");
    assert_eq!(seen.headers["x-api-key"], CANARY);
    assert_eq!(seen.headers["anthropic-version"], "2023-06-01");
    assert_eq!(seen.body["system"], "Be brief.");
    assert_eq!(seen.body["messages"].as_array().unwrap().len(), 1);
    assert_eq!(seen.body["messages"][0]["role"], "user");
    assert_eq!(seen.body["max_tokens"], 64);
    assert_eq!(seen.body["stop_sequences"][0], "###");
}

#[tokio::test]
async fn finish_reason_mapping() {
    let server = Server::start().await;
    let oa = |reason: &str| {
        format!(
            r#"{{"model":"m","choices":[{{"message":{{"content":"x"}},"finish_reason":"{reason}"}}],"usage":{{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}}}"#
        )
    };
    for (raw, want) in [
        ("stop", FinishReason::Stop),
        ("length", FinishReason::Length),
        ("content_filter", FinishReason::ContentFilter),
        ("tool_calls", FinishReason::ToolCalls),
        ("function_call", FinishReason::ToolCalls),
        ("brand_new", FinishReason::Other("brand_new".into())),
    ] {
        server.set(Canned::json(200, &oa(raw)));
        let r = server.openai().oneshot(request("m")).await.unwrap();
        assert_eq!(r.finish_reason, want, "{raw}");
    }
    // A refusal is Refusal with the refusal text as content.
    server.set(Canned::json(200, r#"{"model":"m","choices":[{"message":{"content":null,"refusal":"I can't."},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#));
    let r = server.openai().oneshot(request("m")).await.unwrap();
    assert_eq!(
        (r.content.as_str(), r.finish_reason),
        ("I can't.", FinishReason::Refusal)
    );

    let an = |reason: &str| {
        format!(
            r#"{{"model":"c","content":[{{"type":"text","text":"x"}},{{"type":"tool_use","id":"t","name":"n","input":{{}}}}],"stop_reason":"{reason}","usage":{{"input_tokens":1,"output_tokens":2}}}}"#
        )
    };
    for (raw, want) in [
        ("end_turn", FinishReason::Stop),
        ("stop_sequence", FinishReason::Stop),
        ("max_tokens", FinishReason::Length),
        ("refusal", FinishReason::Refusal),
        ("tool_use", FinishReason::ToolCalls),
        ("pause_turn", FinishReason::Other("pause_turn".into())),
        ("brand_new", FinishReason::Other("brand_new".into())),
    ] {
        server.set(Canned::json(200, &an(raw)));
        let r = server.anthropic().oneshot(request("c")).await.unwrap();
        assert_eq!(r.finish_reason, want, "{raw}");
        assert_eq!(r.content, "x");
    }
}

#[tokio::test]
async fn missing_required_fields_are_protocol_errors() {
    let server = Server::start().await;
    for body in [
        r#"{"choices":[{"message":{"content":"x"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#,
        r#"{"model":"m","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#,
        // (No `usage` is not one: compatible servers omit it; see tests/compat.rs.)
        r#"{"model":"m","choices":[{"message":{"content":"x"}}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#,
        "not json",
    ] {
        server.set(Canned::json(200, body));
        let e = server.openai().oneshot(request("m")).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Protocol, "{body}");
        assert_eq!(e.provider(), Some(OPENAI));
    }
    for body in [
        r#"{"content":[],"stop_reason":"end_turn","usage":{"input_tokens":1,"output_tokens":2}}"#,
        r#"{"model":"c","content":[],"stop_reason":null,"usage":{"input_tokens":1,"output_tokens":2}}"#,
        r#"{"model":"c","content":[],"stop_reason":"end_turn"}"#,
    ] {
        server.set(Canned::json(200, body));
        let e = server.anthropic().oneshot(request("c")).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Protocol, "{body}");
    }
}

#[tokio::test]
async fn clones_share_the_pool_and_poll_ready_is_always_ready() {
    let server = Server::start().await;
    let provider = server.openai();
    let mut streaming = provider.streaming();
    server.set(fixture("openai/ai-gateway_chat_basic.json").canned());
    for i in 0..3 {
        let mut p = provider.clone();
        tokio_poll_ready_now(&mut p);
        p.call(request("m")).await.unwrap();
        assert_eq!(
            server.connections(),
            1,
            "call {i}: one pooled connection, shared by clones"
        );
    }
    // The streaming service is ready at once too, before every call.
    server.set(fixture("openai/openai-python_stream_finish_length.sse").canned());
    for _ in 0..2 {
        tokio_poll_ready_now(&mut streaming);
        drain(streaming.call(request("m")).await.unwrap()).await;
    }
}

/// `poll_ready` is ready at once (no buffer, no waiting).
fn tokio_poll_ready_now<S: Service<portcullis_core::ChatRequest>>(s: &mut S)
where
    S::Error: std::fmt::Debug,
{
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    assert!(matches!(
        s.poll_ready(&mut cx),
        std::task::Poll::Ready(Ok(()))
    ));
}
