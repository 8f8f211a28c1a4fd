//! The token bucket charges what the provider counts: the standard cost ([`ChatCost`]) includes
//! tools and images, and reconciliation follows each provider's rule for cached input tokens.
//! All in paused time, with rates slow enough that nothing refills during a test.

use std::time::Duration;

use portcullis_core::{
    ChatCost, ChatMessage, ChatRequest, CompletionResult, CostOf, LlmError, Part, Tool, Usage,
};
use portcullis_layers::token_bucket::{KeyLimits, Rate, TokenBucketConfig, TokenBucketLayer};
use serde_json::json;
use tower::{Layer, Service, ServiceExt};

const CAP: u64 = 1_000_000;

/// Requests, total tokens, input and output buckets, each of `CAP`, refilling 1 a minute.
fn limits() -> KeyLimits {
    let r = || Rate::new(CAP, 1.0 / 60.0).unwrap();
    KeyLimits::unlimited()
        .with_requests(r())
        .with_tokens(r())
        .with_input_tokens(r())
        .with_output_tokens(r())
}

fn layer(provider: &str) -> TokenBucketLayer {
    let cfg = TokenBucketConfig::new()
        .default_limits(limits())
        .max_wait(Duration::from_secs(1));
    TokenBucketLayer::new(provider, cfg).unwrap()
}

/// Calls once through a layer whose provider reports `usage` (or none), and returns what the
/// key's total and input buckets were charged.
async fn charged(provider: &str, req: ChatRequest, usage: Option<Usage>) -> (f64, f64) {
    let l = layer(provider);
    let h = l.handle();
    let model = req.model.to_string();
    let name = provider.to_string();
    let mut svc = l.layer(tower::service_fn(move |r: ChatRequest| {
        let mut res = CompletionResult::new(name.clone(), &*r.model, "ok");
        if let Some(u) = usage {
            res = res.with_usage(u);
        }
        async move { Ok::<_, LlmError>(res) }
    }));
    svc.ready().await.unwrap().call(req).await.unwrap();
    let levels = h.level(&*model).unwrap().levels;
    let spent = |x: Option<f64>| CAP as f64 - x.unwrap();
    (spent(levels.tokens), spent(levels.input))
}

fn close(a: f64, b: u64) -> bool {
    (a - b as f64).abs() < 1.0
}

/// 10 000 prompt tokens of which 9 000 read from the cache and 500 written to it; 200 out.
fn cached_usage() -> Usage {
    Usage::new(10_000, 200).with_cache(9_000, 500)
}

#[tokio::test(start_paused = true)]
async fn anthropic_cache_reads_do_not_count_toward_itpm() {
    let req = ChatRequest::new("claude-sonnet-4-5", vec![ChatMessage::user("hi")]).max_tokens(300);
    let (total, input) = charged("anthropic", req, Some(cached_usage())).await;
    // Uncached 500 + cache writes 500 = 1 000 input; cache reads (9 000) refunded.
    assert!(close(input, 1_000), "input charged {input}");
    assert!(close(total, 1_200), "total charged {total}");
}

#[tokio::test(start_paused = true)]
async fn older_claude_models_count_cache_reads() {
    let req = ChatRequest::new("claude-3-5-haiku-latest", vec![ChatMessage::user("hi")]);
    let (_, input) = charged("anthropic", req, Some(cached_usage())).await;
    assert!(close(input, 10_000), "input charged {input}");
}

#[tokio::test(start_paused = true)]
async fn openai_cached_tokens_count_toward_tpm() {
    let req = ChatRequest::new("gpt-4o", vec![ChatMessage::user("hi")]).max_tokens(300);
    let (total, input) = charged("openai", req, Some(cached_usage())).await;
    assert!(close(input, 10_000), "input charged {input}");
    assert!(close(total, 10_200), "total charged {total}");
}

/// Reasoning tokens are part of the output tokens: charged in full, never twice.
#[tokio::test(start_paused = true)]
async fn reasoning_is_charged_once_as_output() {
    let req = ChatRequest::new("o3-mini", vec![ChatMessage::user("hi")]).max_tokens(5_000);
    let usage = Usage::new(100, 3_000).with_reasoning(2_500);
    let (total, _) = charged("openai", req, Some(usage)).await;
    assert!(close(total, 3_100), "total charged {total}");
}

/// Without reported usage the estimate stays charged: it includes the image and the tools.
#[tokio::test(start_paused = true)]
async fn the_estimate_includes_images_and_tools() {
    let mut png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR".to_vec();
    png.extend_from_slice(&1024u32.to_be_bytes());
    png.extend_from_slice(&1024u32.to_be_bytes());
    png.extend_from_slice(&[8, 6, 0, 0, 0, 0, 0, 0, 0]);
    let text = ChatRequest::new("gpt-4o", vec![ChatMessage::user("What is this?")]).max_tokens(10);
    let image = ChatRequest::new(
        "gpt-4o",
        vec![ChatMessage::user_parts(vec![
            Part::text("What is this?"),
            Part::image_bytes("image/png", &png),
        ])],
    )
    .max_tokens(10);
    let tool = Tool::new(
        "get_weather",
        "The weather now in a city",
        json!({"type":"object","properties":{"city":{"type":"string"}}}),
    )
    .unwrap();
    let tools = text.clone().tools(vec![tool]);

    let (plain, _) = charged("openai", text.clone(), None).await;
    let (with_image, _) = charged("openai", image.clone(), None).await;
    let (with_tools, _) = charged("openai", tools.clone(), None).await;
    assert!(close(plain, ChatCost.cost(&text).total()));
    assert!(
        close(with_image - plain, 765),
        "image charged {}",
        with_image - plain
    );
    assert!(close(with_tools, ChatCost.cost(&tools).total()));
    assert!(
        with_tools - plain >= 12.0 + 10.0 + 10.0,
        "tools charged {}",
        with_tools - plain
    );
}
