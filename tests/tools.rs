//! Tool-using conversations through the whole Stack against the simulator, which validates
//! them by the real rules: one that starts on OpenAI and fails over to Anthropic in the middle,
//! the other way round, and an entry that refuses a request before sending it, so that the
//! fallback takes it.

mod common;

use common::key;

use portcullis::layers::retry::RetryConfig;
use portcullis::providers::{AnthropicProvider, OpenAiProvider};
use portcullis::{
    ChatMessage, ChatRequest, CompletionResult, FinishReason, Part, ProviderStack, Reasoning,
    Stack, Tool, ToolChoice,
};
use portcullis_sim::{Family, FaultRule, SimHandle, Simulator};
use serde_json::json;
use tower::ServiceExt;

fn retry() -> RetryConfig {
    common::fast_retry(1)
}

fn openai(sim: &SimHandle) -> ProviderStack {
    let p = OpenAiProvider::builder()
        .base_url(sim.openai_base_url())
        .api_key(key())
        .build()
        .unwrap();
    ProviderStack::openai(p).model("gpt-4o-mini").retry(retry())
}

fn anthropic(sim: &SimHandle) -> ProviderStack {
    let p = AnthropicProvider::builder()
        .base_url(sim.anthropic_base_url())
        .api_key(key())
        .build()
        .unwrap();
    ProviderStack::anthropic(p)
        .model("claude-haiku-4-5")
        .retry(retry())
}

fn tools() -> Vec<Tool> {
    let city =
        json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]});
    vec![
        Tool::new("get_weather", "Weather in a city", city.clone()).unwrap(),
        Tool::new("get_time", "Local time in a city", city).unwrap(),
    ]
}

/// Turn 1 on the first entry (two parallel calls), then the first entry's family goes down
/// and turn 2 (the results) must be finished by the second, translated.
async fn fails_over_mid_conversation(first: Family, entries: [ProviderStack; 2], sim: &SimHandle) {
    let stack = Stack::builder()
        .provider(entries[0].clone())
        .provider(entries[1].clone())
        .build()
        .unwrap();
    let mut conversation = vec![
        ChatMessage::system("Use the tools."),
        ChatMessage::user("Use get_weather and get_time for Paris."),
    ];
    let req = |c: &Vec<ChatMessage>| ChatRequest::new("gpt-4o-mini", c.clone()).tools(tools());
    let turn1: CompletionResult = stack
        .completions()
        .oneshot(req(&conversation))
        .await
        .unwrap();
    assert_eq!(turn1.finish_reason, FinishReason::ToolCalls, "{first:?}");
    let names: Vec<_> = turn1.tool_calls.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        ["get_weather", "get_time"],
        "{first:?}: parallel calls"
    );
    for c in &turn1.tool_calls {
        let args: serde_json::Value = c.arguments_json().unwrap();
        assert!(
            args["city"].is_string(),
            "{first:?}: arguments follow the schema: {args}"
        );
    }
    conversation.push(turn1.message());
    for c in &turn1.tool_calls {
        conversation.push(ChatMessage::tool_result(
            c.id.clone(),
            format!("{} says: fine", c.name),
        ));
    }
    sim.set_faults(vec![FaultRule::status(503).family(first)])
        .unwrap();
    let turn2 = stack
        .completions()
        .oneshot(req(&conversation))
        .await
        .unwrap();
    assert_ne!(
        turn2.provider, turn1.provider,
        "{first:?}: the fallback finished it"
    );
    assert_eq!(turn2.finish_reason, FinishReason::Stop, "{first:?}");
    assert!(!turn2.content.is_empty(), "{first:?}");
    sim.set_faults(vec![]).unwrap();
}

#[tokio::test]
async fn a_tool_conversation_fails_over_from_openai_to_anthropic() {
    let sim = Simulator::builder().seed(1).start().await.unwrap();
    fails_over_mid_conversation(Family::Openai, [openai(&sim), anthropic(&sim)], &sim).await;
}

#[tokio::test]
async fn a_tool_conversation_fails_over_from_anthropic_to_openai() {
    let sim = Simulator::builder().seed(2).start().await.unwrap();
    fails_over_mid_conversation(Family::Anthropic, [anthropic(&sim), openai(&sim)], &sim).await;
}

#[tokio::test]
async fn an_entry_that_cannot_carry_the_request_refuses_before_sending() {
    let sim = Simulator::builder().seed(3).start().await.unwrap();
    // Anthropic refuses a forced tool with thinking on; the wire refuses it first, typed
    // Unsupported, and the fallback moves on without a byte sent to Anthropic.
    let stack = Stack::builder()
        .provider(anthropic(&sim))
        .provider(openai(&sim).model("o3-mini"))
        .build()
        .unwrap();
    let req = ChatRequest::new("m", vec![ChatMessage::user("Use get_weather for Oslo.")])
        .tools(tools())
        .tool_choice(ToolChoice::Required)
        .reasoning(Reasoning::budget(2048));
    let r = stack.completions().oneshot(req).await.unwrap();
    assert_eq!(r.provider, "openai");
    assert_eq!(r.finish_reason, FinishReason::ToolCalls);
    let stats = sim.stats();
    assert_eq!(
        stats.endpoint("messages"),
        0,
        "nothing was sent to Anthropic"
    );
    assert_eq!(stats.endpoint("chat_completions"), 1);

    // Thinking from Anthropic goes back to Anthropic with its signature, and is dropped for
    // OpenAI (documented rule): a conversation carrying it still runs on both.
    let thinking = ChatMessage::assistant_parts(vec![
        Part::Thinking {
            thinking: "plan".into(),
            signature: Some("not-a-real-signature".into()),
        },
        Part::text("Hello."),
    ]);
    let req = ChatRequest::new(
        "m",
        vec![
            ChatMessage::user("Hi"),
            thinking,
            ChatMessage::user("Again"),
        ],
    );
    let only_openai = Stack::builder().provider(openai(&sim)).build().unwrap();
    only_openai.completions().oneshot(req).await.unwrap();
}
