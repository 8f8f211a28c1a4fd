//! Enforced rate limits: a 429 exactly at the configured limits, with the right headers, and
//! continuous refill on a compressed minute (paused time).

mod common;

use std::time::Duration;

use common::*;
use portcullis_core::hints::parse_go_duration;
use portcullis_core::{ChatMessage, OpenAiTokenizer, TokenEstimator};
use portcullis_sim::{AnthropicLimits, Limits, OpenAiLimits, Simulator};
use serde_json::json;

fn limits(openai: OpenAiLimits, anthropic: AnthropicLimits) -> Limits {
    Limits {
        time_scale: 60.0, // a one-second "minute"
        openai,
        anthropic,
        ..Limits::default()
    }
}

#[tokio::test(start_paused = true)]
async fn openai_rpm_refuses_the_request_after_the_limit() {
    let sim = Simulator::builder()
        .limits(limits(
            OpenAiLimits {
                rpm: 3,
                tpm: 1_000_000,
            },
            AnthropicLimits::default(),
        ))
        .start()
        .await
        .unwrap();
    for i in 0..3 {
        let r = openai(sim.addr(), chat("gpt-4o-mini", "hi")).await;
        assert_eq!(r.status, 200, "request {i}");
        assert_eq!(r.header("x-ratelimit-limit-requests"), "3");
        assert_eq!(
            r.header("x-ratelimit-remaining-requests"),
            (2 - i).to_string()
        );
    }
    let r = openai(sim.addr(), chat("gpt-4o-mini", "hi")).await;
    assert_eq!(r.status, 429);
    let e = r.json();
    assert_eq!(e["error"]["type"], "requests");
    assert_eq!(e["error"]["code"], "rate_limit_exceeded");
    assert!(e["error"]["param"].is_null());
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("requests per min (RPM): Limit 3, Used 3, Requested 1"),
        "{msg}"
    );
    // One request refills in 1/3 s: retry-after rounds up to 1 s, retry-after-ms is exact.
    assert_eq!(r.header("retry-after"), "1");
    assert_eq!(r.header("retry-after-ms"), "334");
    assert_eq!(r.header("x-ratelimit-remaining-requests"), "0");
    assert_eq!(
        parse_go_duration(r.header("x-ratelimit-reset-requests")),
        Some(Duration::from_secs(1))
    );

    // Other keys and other models have their own windows.
    assert_eq!(
        openai_with_key(sim.addr(), "another-key", chat("gpt-4o-mini", "hi"))
            .await
            .status,
        200
    );
    assert_eq!(openai(sim.addr(), chat("gpt-4o", "hi")).await.status, 200);

    // Continuous refill: after 1/3 s exactly one more request passes.
    tokio::time::advance(Duration::from_millis(334)).await;
    assert_eq!(
        openai(sim.addr(), chat("gpt-4o-mini", "hi")).await.status,
        200
    );
    assert_eq!(
        openai(sim.addr(), chat("gpt-4o-mini", "hi")).await.status,
        429
    );
    let s = sim.stats();
    assert_eq!(s.outcome("rate_limited"), 2);
    assert_eq!(s.outcome("ok"), 6);
    assert_eq!(s.status(429), 2);
}

#[tokio::test(start_paused = true)]
async fn openai_tpm_precharges_max_tokens() {
    let tok = OpenAiTokenizer::for_model("gpt-4o-mini");
    let prompt = tok.count_messages(&[ChatMessage::user("hi")]);
    let per_request = prompt + 100;
    // Room for exactly two requests.
    let tpm = 2 * per_request + per_request / 2;
    let sim = Simulator::builder()
        .limits(limits(
            OpenAiLimits { rpm: 1000, tpm },
            AnthropicLimits::default(),
        ))
        .start()
        .await
        .unwrap();
    let mut req = chat("gpt-4o-mini", "hi");
    req["max_tokens"] = json!(100);
    for _ in 0..2 {
        let r = openai(sim.addr(), req.clone()).await;
        assert_eq!(r.status, 200);
    }
    let r = openai(sim.addr(), req.clone()).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"]["type"], "tokens");
    let left = tpm - 2 * per_request;
    assert_eq!(r.header("x-ratelimit-remaining-tokens"), left.to_string());
    // Waiting for (per_request - left) tokens at tpm per second.
    let wait_ms = ((per_request - left) as f64 * 1000.0 / tpm as f64).ceil() as u64;
    assert_eq!(r.header("retry-after-ms"), wait_ms.to_string());
    // A smaller max_tokens still fits.
    let mut small = req.clone();
    small["max_tokens"] = json!(left - prompt);
    assert_eq!(openai(sim.addr(), small).await.status, 200);
}

#[tokio::test(start_paused = true)]
async fn anthropic_rpm_and_split_tpm() {
    let sim = Simulator::builder()
        .limits(limits(
            OpenAiLimits::default(),
            AnthropicLimits {
                rpm: 2,
                input_tpm: 1_000_000,
                output_tpm: 1_000_000,
            },
        ))
        .start()
        .await
        .unwrap();
    for _ in 0..2 {
        assert_eq!(
            anthropic(sim.addr(), message("claude-haiku-4-5", "hi", 10))
                .await
                .status,
            200
        );
    }
    let r = anthropic(sim.addr(), message("claude-haiku-4-5", "hi", 10)).await;
    assert_eq!(r.status, 429);
    let v = r.json();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "rate_limit_error");
    assert_eq!(v["request_id"], r.header("request-id"));
    assert_eq!(r.header("retry-after"), "1");
    assert!(r.headers.get("retry-after-ms").is_none());
    assert_eq!(r.header("anthropic-ratelimit-requests-limit"), "2");
    assert_eq!(r.header("anthropic-ratelimit-requests-remaining"), "0");

    // Output TPM is charged max_tokens up front: 600 of 1000 fits once, not twice at once.
    sim.set_limits(limits(
        OpenAiLimits::default(),
        AnthropicLimits {
            rpm: 100,
            input_tpm: 1_000_000,
            output_tpm: 1000,
        },
    ))
    .unwrap();
    let big = message("claude-haiku-4-5", "hi", 600);
    let ok = anthropic(sim.addr(), big.clone()).await;
    assert_eq!(ok.status, 200);
    let out = ok.json()["usage"]["output_tokens"].as_u64().unwrap();
    // The unused part is refunded at the end, so a second 600 fits only if the answer was short.
    let second = anthropic(sim.addr(), big.clone()).await;
    assert_eq!(second.status, if 1000 - out >= 600 { 200 } else { 429 });
    let r = anthropic(sim.addr(), message("claude-haiku-4-5", "hi", 1001)).await;
    assert_eq!(r.status, 429, "more than the whole output window");
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("output tokens")
    );

    // Input TPM.
    sim.set_limits(limits(
        OpenAiLimits::default(),
        AnthropicLimits {
            rpm: 100,
            input_tpm: 20,
            output_tpm: 100_000,
        },
    ))
    .unwrap();
    let long = message("claude-haiku-4-5", &"word ".repeat(30), 10);
    let r = anthropic(sim.addr(), long).await;
    assert_eq!(r.status, 429);
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("input tokens")
    );
}
