//! The provider-neutral vocabulary on each wire: a tool-using conversation with images,
//! thinking and tool results, as OpenAI and Anthropic take it; what each refuses before
//! sending; tool calls, thinking and cache usage read back, complete and streamed.

mod common;

use common::{Canned, Server, request};
use futures_util::StreamExt;
use portcullis_core::{
    CacheControl, ChatMessage, ChatRequest, Classify, ErrorKind, Failover, FinishReason,
    MediaSource, Part, Reasoning, ReasoningEffort, ResponseFormat, Role, ThinkingDelta, Tool,
    ToolCall, ToolChoice,
};
use portcullis_providers::{AnthropicProvider, StructuredOutput};
use serde_json::{Value, json};
use tower::ServiceExt;

/// A 1×1 PNG.
const PNG: &[u8] = &[
    0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52,
    0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x02, 0x00, 0x00, 0x00, 0x90, 0x77, 0x53,
    0xde, 0x00, 0x00, 0x00, 0x0c, 0x49, 0x44, 0x41, 0x54, 0x78, 0x9c, 0x63, 0xf8, 0xcf, 0xc0, 0x00,
    0x00, 0x03, 0x01, 0x01, 0x00, 0xc9, 0xfe, 0x92, 0xef, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45, 0x4e,
    0x44, 0xae, 0x42, 0x60, 0x82,
];
const PNG_B64: &str =
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC";

fn weather() -> Tool {
    Tool::new(
        "get_weather",
        "The weather in a city.",
        json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
    )
    .unwrap()
}

/// A conversation in the middle of a tool loop: images in, thinking and two parallel calls
/// out, both answered (one failed), then the user again.
fn conversation() -> Vec<ChatMessage> {
    vec![
        ChatMessage::system("Be brief."),
        ChatMessage::user_parts(vec![
            Part::text("Weather where these were taken?"),
            Part::image_bytes("image/png", PNG),
            Part::image_url("https://example.com/b.jpg"),
        ]),
        ChatMessage::assistant_parts(vec![
            Part::Thinking {
                thinking: "Two cities.".into(),
                signature: Some("sig-1".into()),
            },
            Part::text("Checking."),
            Part::ToolCall(ToolCall::new(
                "call_1",
                "get_weather",
                r#"{"city":"Paris"}"#,
            )),
            Part::ToolCall(ToolCall::new("call.2", "get_weather", "")),
        ]),
        ChatMessage::tool_result("call_1", "18 C"),
        ChatMessage::with_parts(
            Role::Tool,
            vec![Part::ToolResult {
                call_id: "call.2".into(),
                content: vec![Part::text("no city")],
                is_error: true,
                cache_control: None,
            }],
        ),
        ChatMessage::user("Thanks. And tomorrow?"),
    ]
}

fn tool_request(model: &str) -> ChatRequest {
    ChatRequest::new(model, conversation())
        .max_tokens(64)
        .tools(vec![weather()])
        .parallel_tool_calls(false)
}

#[tokio::test]
async fn openai_takes_a_tool_conversation() {
    let server = Server::start().await;
    server.set(common::fixture("openai/ai-gateway_tool_calls.json").canned());
    let req = tool_request("gpt-4o")
        .tool_choice(ToolChoice::Tool("get_weather".into()))
        .reasoning(Reasoning::effort(ReasoningEffort::High))
        .response_format(ResponseFormat::json_schema(
            "answer",
            json!({"type": "object"}),
        ))
        .extra("openai", "service_tier", json!("flex"))
        .extra("anthropic", "ignored", json!(true));
    server.openai().oneshot(req).await.unwrap();
    let body = server.last().body;
    let m = body["messages"].as_array().unwrap();
    assert_eq!(m[0], json!({"role": "system", "content": "Be brief."}));
    assert_eq!(
        m[1]["content"],
        json!([
            {"type": "text", "text": "Weather where these were taken?"},
            {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{PNG_B64}")}},
            {"type": "image_url", "image_url": {"url": "https://example.com/b.jpg"}},
        ])
    );
    // Thinking is dropped (OpenAI takes no reasoning back); the calls keep their raw arguments.
    assert_eq!(
        m[2],
        json!({"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
            {"id": "call.2", "type": "function", "function": {"name": "get_weather", "arguments": ""}},
        ]})
    );
    assert_eq!(
        m[3],
        json!({"role": "tool", "content": "18 C", "tool_call_id": "call_1"})
    );
    assert_eq!(
        m[4],
        json!({"role": "tool", "content": "Error: no city", "tool_call_id": "call.2"})
    );
    assert_eq!(
        m[5],
        json!({"role": "user", "content": "Thanks. And tomorrow?"})
    );
    assert_eq!(m.len(), 6);
    assert_eq!(
        body["tools"],
        json!([{"type": "function", "function": {
            "name": "get_weather", "description": "The weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        }}])
    );
    assert_eq!(
        body["tool_choice"],
        json!({"type": "function", "function": {"name": "get_weather"}})
    );
    assert_eq!(body["parallel_tool_calls"], false);
    assert_eq!(body["reasoning_effort"], "high");
    assert!(
        body.get("temperature").is_none(),
        "reasoning models take no temperature"
    );
    assert_eq!(
        body["max_completion_tokens"],
        64 + 16_384,
        "the visible answer's 64 + the high thinking budget"
    );
    assert_eq!(
        body["response_format"],
        json!({"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": true}})
    );
    assert_eq!(body["service_tier"], "flex");
    assert!(body.get("ignored").is_none());
}

#[tokio::test]
async fn anthropic_takes_a_tool_conversation() {
    let server = Server::start().await;
    server.set(common::fixture("anthropic/pydantic-ai_message_nonstream.json").canned());
    let req = tool_request("claude-sonnet-4-5").reasoning(Reasoning::budget(2000));
    server.anthropic().oneshot(req).await.unwrap();
    let body = server.last().body;
    assert_eq!(body["system"], "Be brief.");
    let m = body["messages"].as_array().unwrap();
    assert_eq!(m.len(), 3, "user, assistant, user (two results + text)");
    assert_eq!(
        m[0],
        json!({"role": "user", "content": [
            {"type": "text", "text": "Weather where these were taken?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64}},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/b.jpg"}},
        ]})
    );
    assert_eq!(
        m[1],
        json!({"role": "assistant", "content": [
            {"type": "thinking", "thinking": "Two cities.", "signature": "sig-1"},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {}},
        ]})
    );
    assert_eq!(
        m[2],
        json!({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "call_1", "content": "18 C"},
            {"type": "tool_result", "tool_use_id": "call_2", "content": "no city", "is_error": true},
            {"type": "text", "text": "Thanks. And tomorrow?"},
        ]})
    );
    assert_eq!(
        body["tools"],
        json!([{"name": "get_weather", "description": "The weather in a city.",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}])
    );
    assert_eq!(
        body["tool_choice"],
        json!({"type": "auto", "disable_parallel_tool_use": true})
    );
    assert_eq!(
        body["thinking"],
        json!({"type": "enabled", "budget_tokens": 2000})
    );
    assert_eq!(body["max_tokens"], 64 + 2000);
    assert!(body.get("temperature").is_none());
}

#[tokio::test]
async fn anthropic_cache_breakpoints_and_structured_output() {
    let server = Server::start().await;
    server.set(common::fixture("anthropic/pydantic-ai_message_nonstream.json").canned());
    let long = "A long, stable instruction. ".repeat(8);
    let req = ChatRequest::new(
        "claude-sonnet-4-5",
        vec![
            ChatMessage::with_parts(
                Role::System,
                vec![Part::text(long.clone()).cached(CacheControl::ephemeral())],
            ),
            ChatMessage::user("Hi"),
        ],
    )
    .tools(vec![weather().cached(CacheControl {
        ttl: Some("1h".into()),
    })])
    .response_format(ResponseFormat::json_schema(
        "answer",
        json!({"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": false}),
    ));
    server.anthropic().oneshot(req.clone()).await.unwrap();
    let body = server.last().body;
    assert_eq!(
        body["system"],
        json!([{"type": "text", "text": long, "cache_control": {"type": "ephemeral"}}])
    );
    assert_eq!(
        body["tools"][0]["cache_control"],
        json!({"type": "ephemeral", "ttl": "1h"})
    );
    assert_eq!(
        body["output_config"],
        json!({"format": {"type": "json_schema", "schema": {"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": false}}})
    );

    // The forced-tool emulation refuses to hide the caller's tools …
    let forced: AnthropicProvider = AnthropicProvider::builder()
        .base_url(server.base())
        .without_api_key()
        .structured_output(StructuredOutput::ForcedTool)
        .build()
        .unwrap();
    let sent = server.seen().len();
    let e = forced.clone().oneshot(req).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert_eq!(server.seen().len(), sent, "refused before sending");

    // … and without them, the tool's input is the answer's text.
    let req = ChatRequest::new("claude-3-haiku", vec![ChatMessage::user("Hi")]).response_format(
        ResponseFormat::json_schema("answer", json!({"type": "object"})),
    );
    server.set(Canned::json(
        200,
        r#"{"model":"claude-3-haiku","content":[{"type":"tool_use","id":"toolu_1","name":"answer","input":{"a":"b"}}],"stop_reason":"tool_use","usage":{"input_tokens":5,"output_tokens":3}}"#,
    ));
    let r = forced.clone().oneshot(req.clone()).await.unwrap();
    assert_eq!(r.content, r#"{"a":"b"}"#);
    assert_eq!(r.finish_reason, FinishReason::Stop);
    assert!(r.tool_calls.is_empty());
    let body = server.last().body;
    assert_eq!(
        body["tool_choice"],
        json!({"type": "tool", "name": "answer"})
    );
    assert_eq!(body["tools"][0]["input_schema"], json!({"type": "object"}));

    // Streamed, the input's fragments are the text.
    server.set(sse(concat!(
        an_start!(),
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"tool_use\",\"id\":\"toolu_1\",\"name\":\"answer\",\"input\":{}}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"a\\\":\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"\\\"b\\\"}\"}}\n\n",
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\"},\"usage\":{\"output_tokens\":3}}\n\n",
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    )));
    let r = forced
        .streaming()
        .oneshot(req)
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(r.content, r#"{"a":"b"}"#);
    assert_eq!(r.finish_reason, FinishReason::Stop);
}

macro_rules! an_start {
    () => {
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-sonnet-4-5\",\"usage\":{\"input_tokens\":20,\"cache_read_input_tokens\":100,\"cache_creation_input_tokens\":50,\"output_tokens\":1}}}\n\n"
    };
}
use an_start;

fn sse(body: &str) -> Canned {
    Canned::new(200, "text/event-stream", body.to_owned())
}

#[tokio::test]
async fn each_wire_refuses_what_it_cannot_carry_before_sending() {
    let server = Server::start().await;
    let raw = Part::Raw {
        provider: "anthropic".into(),
        value: json!({"type": "server_tool_use"}),
    };
    let big = vec![0u8; 6 * 1024 * 1024];
    let openai_cases = [
        (
            "raw block from another provider",
            ChatMessage::assistant_parts(vec![raw.clone()]),
        ),
        (
            "image in a tool result",
            ChatMessage::with_parts(
                Role::Tool,
                vec![Part::ToolResult {
                    call_id: "c".into(),
                    content: vec![Part::image_bytes("image/png", PNG)],
                    is_error: false,
                    cache_control: None,
                }],
            ),
        ),
        (
            "document by URL",
            ChatMessage::user_parts(vec![Part::Document {
                source: MediaSource::Url {
                    url: "https://example.com/a.pdf".into(),
                },
                title: None,
                cache_control: None,
            }]),
        ),
    ];
    let anthropic_cases = [
        (
            "raw block from another provider",
            ChatMessage::assistant_parts(vec![Part::Raw {
                provider: "openai".into(),
                value: json!({"type": "custom"}),
            }]),
        ),
        (
            "arguments that are not JSON",
            ChatMessage::assistant_parts(vec![Part::ToolCall(ToolCall::new("c", "f", "{\"a\":"))]),
        ),
        (
            "a BMP image",
            ChatMessage::user_parts(vec![Part::image_bytes("image/bmp", PNG)]),
        ),
        (
            "a 6 MB image",
            ChatMessage::user_parts(vec![Part::image_bytes("image/png", &big)]),
        ),
    ];
    for (what, m) in openai_cases {
        let e = server
            .openai()
            .oneshot(ChatRequest::new("m", vec![m]))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported, "openai: {what}: {e}");
        let c = e.classify();
        assert!(
            !c.retry && !c.breaker_failure && c.failover == Failover::Eligible,
            "openai: {what}: fails over, nothing else"
        );
    }
    for (what, m) in anthropic_cases {
        let e = server
            .anthropic()
            .oneshot(ChatRequest::new("c", vec![m]))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported, "anthropic: {what}: {e}");
    }
    // A tool that did not go through Tool::new (deserialized here) is checked too: no provider
    // would take a schema that is not an object, so it is InvalidRequest, not a failover.
    let bad: Tool =
        serde_json::from_value(json!({"name": "f", "parameters": {"type": "string"}})).unwrap();
    for e in [
        server
            .openai()
            .oneshot(request("m").tools(vec![bad.clone()]))
            .await
            .unwrap_err(),
        server
            .anthropic()
            .oneshot(request("c").tools(vec![bad]))
            .await
            .unwrap_err(),
    ] {
        assert_eq!(e.kind(), ErrorKind::InvalidRequest, "{e}");
    }
    // Thinking with a forced tool: Anthropic refuses that combination, so the wire does first.
    let req = tool_request("c")
        .reasoning(Reasoning::budget(1024))
        .tool_choice(ToolChoice::Required);
    let e = server.anthropic().oneshot(req).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert!(server.seen().is_empty(), "nothing was sent");
}

#[tokio::test]
async fn anthropic_thinking_tool_use_and_cache_usage_stream() {
    let server = Server::start().await;
    server.set(sse(concat!(
        an_start!(),
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"thinking\",\"thinking\":\"\",\"signature\":\"\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"thinking_delta\",\"thinking\":\"Paris, \"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"thinking_delta\",\"thinking\":\"so weather.\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"signature_delta\",\"signature\":\"EqQBsig\"}}\n\n",
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"redacted_thinking\",\"data\":\"opaque\"}}\n\n",
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":1}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":2,\"content_block\":{\"type\":\"web_search_tool_result\",\"tool_use_id\":\"srvtoolu_1\",\"content\":[]}}\n\n",
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":2}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":3,\"content_block\":{\"type\":\"tool_use\",\"id\":\"toolu_9\",\"name\":\"get_weather\",\"input\":{}}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":3,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"city\\\": \"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":3,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"\\\"Paris\\\"}\"}}\n\n",
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":3}\n\n",
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\"},\"usage\":{\"output_tokens\":42}}\n\n",
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    )));
    let mut s = server
        .anthropic()
        .streaming()
        .oneshot(request("claude-sonnet-4-5"))
        .await
        .unwrap();
    let first = s.next().await.unwrap().unwrap();
    assert_eq!(
        first.thinking,
        Some(ThinkingDelta::Text {
            index: 0,
            text: "Paris, ".into()
        }),
        "the first thinking fragment is the commit point"
    );
    let r = s.collect().await.unwrap();
    assert_eq!(
        r.reasoning,
        vec![
            Part::Thinking {
                thinking: "Paris, so weather.".into(),
                signature: Some("EqQBsig".into()),
            },
            Part::RedactedThinking {
                data: "opaque".into()
            },
        ]
    );
    assert_eq!(
        r.tool_calls,
        vec![ToolCall::new(
            "toolu_9",
            "get_weather",
            r#"{"city": "Paris"}"#
        )]
    );
    assert_eq!(r.finish_reason, FinishReason::ToolCalls);
    assert!(
        matches!(&r.other[..], [Part::Raw { value, .. }] if value["type"] == "web_search_tool_result"),
        "an unknown block is kept whole: {:?}",
        r.other
    );
    // Anthropic's input_tokens leaves the cache out; Usage counts all of it.
    assert_eq!(r.usage.input_tokens, 170);
    assert_eq!(r.usage.cached_input_tokens, 100);
    assert_eq!(r.usage.cache_creation_input_tokens, 50);
    assert_eq!(r.usage.output_tokens, 42);
    // The assembled message goes back unchanged, signature included.
    let back = r.message();
    assert!(back.content.contains(&Part::Thinking {
        thinking: "Paris, so weather.".into(),
        signature: Some("EqQBsig".into()),
    }));
}

#[tokio::test]
async fn openai_reads_only_choice_zero_of_an_n3_stream() {
    let server = Server::start().await;
    let chunk = |i: u32, text: &str| {
        format!(
            "data: {{\"model\":\"gpt-4o\",\"choices\":[{{\"index\":{i},\"delta\":{{\"content\":\"{text}\"}},\"finish_reason\":null}}]}}\n\n"
        )
    };
    let mut body = String::new();
    for (i, t) in [(0, "A"), (1, "X"), (2, "Y"), (0, "B"), (2, "Z"), (1, "W")] {
        body.push_str(&chunk(i, t));
    }
    for i in [1, 0, 2] {
        body.push_str(&format!(
            "data: {{\"model\":\"gpt-4o\",\"choices\":[{{\"index\":{i},\"delta\":{{}},\"finish_reason\":\"stop\"}}]}}\n\n"
        ));
    }
    body.push_str("data: {\"model\":\"gpt-4o\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":6,\"total_tokens\":11,\"prompt_tokens_details\":{\"cached_tokens\":0},\"completion_tokens_details\":{\"reasoning_tokens\":0}}}\n\ndata: [DONE]\n\n");
    server.set(sse(&body));
    let r = server
        .openai()
        .streaming()
        .oneshot(request("gpt-4o"))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(r.content, "AB");
    assert_eq!(r.finish_reason, FinishReason::Stop);
    assert_eq!(r.usage.total_tokens, 11);
}

#[tokio::test]
async fn openai_cached_and_reasoning_usage_and_custom_calls() {
    let server = Server::start().await;
    server.set(Canned::json(
        200,
        r#"{"model":"o3","choices":[{"index":0,"message":{"content":null,"tool_calls":[
            {"id":"call_a","type":"function","function":{"name":"f","arguments":"{\"x\": 1"}},
            {"id":"call_b","type":"custom","custom":{"name":"g","input":"raw text"}}]},"finish_reason":"tool_calls"}],
           "usage":{"prompt_tokens":2000,"completion_tokens":500,"total_tokens":2500,
                    "prompt_tokens_details":{"cached_tokens":1920},"completion_tokens_details":{"reasoning_tokens":448}}}"#,
    ));
    let r = server.openai().oneshot(request("o3")).await.unwrap();
    assert_eq!(r.usage.input_tokens, 2000);
    assert_eq!(r.usage.cached_input_tokens, 1920);
    assert_eq!(r.usage.reasoning_tokens, 448);
    // Arguments that are not JSON are kept raw, and parsing them is a typed error.
    assert_eq!(r.tool_calls[0].arguments, "{\"x\": 1");
    let e = r.tool_calls[0].arguments_json().unwrap_err();
    assert_eq!((e.tool(), e.id()), ("f", "call_a"));
    assert!(
        matches!(&r.other[..], [Part::Raw { value, .. }] if value["type"] == "custom"),
        "a call type this library does not model is kept whole"
    );
    let _ = Value::Null;
}

#[tokio::test]
async fn the_commit_point_is_the_first_tool_call_or_thinking_chunk() {
    let server = Server::start().await;
    let error = "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n";
    let tool_start = "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"tool_use\",\"id\":\"toolu_1\",\"name\":\"f\",\"input\":{}}}\n\n";
    let thinking_start = "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"thinking\",\"thinking\":\"\",\"signature\":\"\"}}\n\n";
    let empty_text = "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n";

    // An empty block start is not content, nor is an empty thinking start: an error after
    // them fails the call itself, so retry and fallback still act.
    for before in [empty_text, thinking_start] {
        server.set(sse(&format!("{}{before}{error}", an_start!())));
        let e = server
            .anthropic()
            .streaming()
            .oneshot(request("c"))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Overloaded, "before the commit point");
    }
    // A tool call's first fragment is content: the call resolves there, and an error after it
    // ends the stream as StreamInterrupted (never retried).
    server.set(sse(&format!("{}{tool_start}{error}", an_start!())));
    let mut s = server
        .anthropic()
        .streaming()
        .oneshot(request("c"))
        .await
        .unwrap();
    let first = s.next().await.unwrap().unwrap();
    assert_eq!(first.tool_calls[0].name.as_deref(), Some("f"));
    let e = s.next().await.unwrap().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::StreamInterrupted);

    // The same on OpenAI: a role-only first delta is not content, a tool-call fragment is.
    let role = "data: {\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":null},\"finish_reason\":null}]}\n\n";
    let call = "data: {\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"call_1\",\"type\":\"function\",\"function\":{\"name\":\"f\",\"arguments\":\"\"}}]},\"finish_reason\":null}]}\n\n";
    let oa_error = "data: {\"error\":{\"type\":\"server_error\",\"message\":\"boom\"}}\n\n";
    server.set(sse(&format!("{role}{oa_error}")));
    let e = server
        .openai()
        .streaming()
        .oneshot(request("m"))
        .await
        .unwrap_err();
    assert_ne!(
        e.kind(),
        ErrorKind::StreamInterrupted,
        "before the commit point"
    );
    server.set(sse(&format!("{role}{call}{oa_error}")));
    let mut s = server
        .openai()
        .streaming()
        .oneshot(request("m"))
        .await
        .unwrap();
    assert_eq!(
        s.next().await.unwrap().unwrap().tool_calls[0].id.as_deref(),
        Some("call_1")
    );
    assert_eq!(
        s.next().await.unwrap().unwrap_err().kind(),
        ErrorKind::StreamInterrupted
    );
}
