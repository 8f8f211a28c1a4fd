//! Streaming costs.
//!
//! - `sse/decode`: [`SseDecoder`] throughput (MB/s) over the real recorded streams in
//!   `crates/portcullis-providers/tests/data`, fed in 64-byte pieces as a network would split
//!   them, every event taken out.
//! - `sse/e2e`: one streamed completion of the same simulated stream from the in-process
//!   simulator over loopback, read (a) with raw hyper, frames drained and dropped, and (b)
//!   through `OpenAiStream`: HTTP, SSE decoding, JSON parsing into `StreamChunk`s. The
//!   difference is Portcullis' streaming overhead per call.
//!
//! Run: `cargo bench --bench sse`.
#![allow(missing_docs)]

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use portcullis_core::{ChatMessage, ChatRequest};
use portcullis_providers::sse::SseDecoder;
use portcullis_providers::{ApiKey, OpenAiProvider};
use portcullis_sim::Simulator;
use tower::ServiceExt;

const RECORDINGS: &[(&str, &[u8])] = &[
    (
        "openai_text",
        include_bytes!(
            "../crates/portcullis-providers/tests/data/openai/openai-python_stream_stop_with_usage_chunk.sse"
        ),
    ),
    (
        "openai_tool_calls",
        include_bytes!(
            "../crates/portcullis-providers/tests/data/openai/openai-python_stream_parallel_tool_calls.sse"
        ),
    ),
    (
        "openai_gpt5",
        include_bytes!(
            "../crates/portcullis-providers/tests/data/openai/ai-gateway_stream_text.sse"
        ),
    ),
    (
        "anthropic_text",
        include_bytes!(
            "../crates/portcullis-providers/tests/data/anthropic/llm-anthropic_stream_text.sse"
        ),
    ),
    (
        "anthropic_tool_use",
        include_bytes!(
            "../crates/portcullis-providers/tests/data/anthropic/llm-anthropic_stream_tool_use.sse"
        ),
    ),
];

/// Decodes a whole body pushed in `piece`-byte chunks; returns the number of events.
fn decode(body: &[u8], piece: usize) -> usize {
    let mut dec = SseDecoder::new();
    let mut events = 0;
    for chunk in body.chunks(piece) {
        dec.push(chunk);
        while let Some(ev) = dec.next_event().expect("valid stream") {
            black_box(&ev);
            events += 1;
        }
    }
    if dec.finish().expect("valid end").is_some() {
        events += 1;
    }
    events
}

fn decode_bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("sse/decode");
    for (name, body) in RECORDINGS {
        assert!(decode(body, 64) > 0, "{name}: no event");
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_function(*name, |b| b.iter(|| decode(black_box(body), 64)));
    }
    g.finish();
}

const MAX_TOKENS: u32 = 200;

fn e2e_bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let sim = rt
        .block_on(Simulator::builder().seed(1).start())
        .expect("simulator");
    let base = sim.openai_base_url();
    let req = ChatRequest::new(
        "gpt-4o-mini",
        vec![ChatMessage::user("Tell me about pelicans")],
    )
    .max_tokens(MAX_TOKENS);

    // (a) raw hyper: the same request body the provider sends, the body drained frame by frame.
    // TCP_NODELAY, as the provider's transport sets it (without it, Nagle + delayed ACK add
    // ~40 ms to each request on loopback).
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    let client = Client::builder(TokioExecutor::new()).build::<_, Full<Bytes>>(connector);
    let body = Bytes::from(
        serde_json::json!({
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "Tell me about pelicans"}],
            "max_tokens": MAX_TOKENS,
            "temperature": 0.0,
            "stream": true,
            "stream_options": {"include_usage": true},
        })
        .to_string(),
    );
    let url = format!("{}/chat/completions", base.trim_end_matches('/'));
    let raw = async || {
        let request = http::Request::post(&url)
            .header("content-type", "application/json")
            .header("authorization", "Bearer sk-bench")
            .body(Full::new(body.clone()))
            .expect("request");
        let mut res = client.request(request).await.expect("response");
        assert!(res.status().is_success(), "status {}", res.status());
        let mut bytes = 0usize;
        while let Some(frame) = res.body_mut().frame().await {
            if let Some(data) = frame.expect("frame").data_ref() {
                bytes += data.len();
            }
        }
        bytes
    };
    let streamed = rt.block_on(raw());
    assert!(streamed > 1000, "the simulated stream is {streamed} bytes");

    // (b) Portcullis: OpenAiStream, every chunk parsed.
    let provider = OpenAiProvider::builder()
        .base_url(base.clone())
        .api_key(ApiKey::new("sk-bench").expect("key"))
        .build()
        .expect("provider")
        .streaming();
    let ours = async || {
        let mut stream = provider.clone().oneshot(req.clone()).await.expect("stream");
        let mut chunks = 0usize;
        while let Some(chunk) = stream.next().await {
            black_box(chunk.expect("chunk"));
            chunks += 1;
        }
        chunks
    };
    assert!(rt.block_on(ours()) > 10);

    let mut g = c.benchmark_group("sse/e2e");
    g.throughput(Throughput::Bytes(streamed as u64));
    g.bench_function("raw_hyper", |b| b.to_async(&rt).iter(raw));
    g.bench_function("portcullis_openai_stream", |b| b.to_async(&rt).iter(ours));
    g.finish();
    rt.block_on(sim.shutdown());
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = decode_bench, e2e_bench
}
criterion_main!(benches);
