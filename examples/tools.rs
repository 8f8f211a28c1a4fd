//! # Tools: an agent loop that survives its provider going down mid-conversation
//!
//! Two tools (`get_weather`, `get_time`) over the recommended [`portcullis::Stack`]: OpenAI
//! first, Anthropic second. The model asks for both tools; the loop runs them and sends the
//! results back. Between the two turns the primary goes down, so the fallback finishes the
//! conversation: the stack hands Anthropic the same conversation, and its wire translates the
//! OpenAI tool calls (ids, JSON-string arguments) into `tool_use` blocks and the two tool
//! messages into one user turn of `tool_result` blocks.
//!
//! ```text
//! cargo run --example tools
//! ```
//!
//! Against the embedded simulator by default (see `common/mod.rs` for the real APIs). The
//! simulator calls the tools the last user message names, and answers in text once the last
//! message is a tool result.

mod common;

use portcullis::{ChatMessage, ChatRequest, CompletionResult, FinishReason, Tool, ToolCall};
use portcullis_sim::{Family, FaultRule, Simulator};
use serde_json::{Value, json};
use tower::ServiceExt;

use common::MODEL;

fn tools() -> Result<Vec<Tool>, portcullis::InvalidTool> {
    let city = json!({
        "type": "object",
        "properties": {"city": {"type": "string", "description": "A city name"}},
        "required": ["city"],
    });
    Ok(vec![
        Tool::new(
            "get_weather",
            "The current weather in a city.",
            city.clone(),
        )?,
        Tool::new("get_time", "The local time in a city.", city)?,
    ])
}

/// Runs one tool call locally. Bad arguments (models do write them) become an error result
/// the model can read, not a panic.
fn run_tool(call: &ToolCall) -> (String, bool) {
    let args: Value = match call.arguments_json() {
        Ok(v) => v,
        Err(e) => return (format!("bad arguments: {e}"), true),
    };
    let city = args["city"].as_str().unwrap_or("nowhere");
    match call.name.as_str() {
        "get_weather" => (format!("{city}: 18 °C, light rain"), false),
        "get_time" => (format!("{city}: 14:05"), false),
        other => (format!("no tool named {other}"), true),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let backend = common::backend(Simulator::builder().seed(7)).await?;
    let stack = backend.stack().build()?;
    let tools = tools()?;

    let mut conversation = vec![
        ChatMessage::system("You are a travel assistant. Use the tools."),
        ChatMessage::user("Use get_weather and get_time for Paris, please."),
    ];
    for turn in 1..=4 {
        let req = ChatRequest::new(MODEL, conversation.clone())
            .tools(tools.clone())
            .max_tokens(200);
        let res: CompletionResult = stack.completions().oneshot(req).await?;
        println!(
            "turn {turn}: served by {} ({}), finish {}",
            res.provider, res.model, res.finish_reason
        );
        // The assistant's whole message (text, tool calls, thinking) goes back as it came.
        conversation.push(res.message());
        if res.finish_reason != FinishReason::ToolCalls {
            println!("   > {}", res.content.trim());
            break;
        }
        for call in &res.tool_calls {
            let (answer, is_error) = run_tool(call);
            println!(
                "   tool {} {}({}) -> {answer}",
                call.id, call.name, call.arguments
            );
            conversation.push(if is_error {
                ChatMessage::tool_error(call.id.clone(), answer)
            } else {
                ChatMessage::tool_result(call.id.clone(), answer)
            });
        }
        if turn == 1 {
            match &backend.sim {
                Some(sim) => {
                    println!("   (the primary goes down: every OpenAI call now answers 503)");
                    sim.set_faults(vec![FaultRule::status(503).family(Family::Openai)])?;
                }
                None => println!("   (real APIs: no outage can be ordered; the primary goes on)"),
            }
        }
    }
    if let Some(sim) = &backend.sim {
        let stats = sim.stats();
        println!(
            "the simulator saw {} OpenAI and {} Anthropic calls",
            stats.endpoint("chat_completions"),
            stats.endpoint("messages")
        );
    }
    Ok(())
}
