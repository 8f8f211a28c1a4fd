//! Token estimator throughput, in bytes of prompt per second (criterion reports MB/s).
//!
//! The token bucket's standard cost ([`ChatCost`]) tokenises every request's prompt, so this is
//! the price a call pays for an exact TPM charge. The text is built in code (English prose,
//! code and numbers, as prompts mix them), so the bench depends on nothing outside the repo.
//!
//! Run: `cargo bench --bench tokens`.
#![allow(missing_docs)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use portcullis_core::{
    AnthropicEstimator, ChatCost, ChatMessage, ChatRequest, CostOf, Encoding, OpenAiTokenizer,
    TokenEstimator,
};

const PROSE: &str = "The pelican is a large water bird with a distinctive pouch under its beak. \
It hunts by plunge-diving, and a flock can herd fish into shallow water before scooping them \
up together. Brown pelicans live along the coasts of the Americas; they were endangered in the \
1970s, and recovered after DDT was banned. ";
const CODE: &str = "fn describe(p: &Pelican) -> String {\n    format!(\"{} ({} kg, {:.1} m wingspan)\", \
p.name, p.mass_kg, p.wingspan_m)\n}\n";
const DATA: &str = "id=48213, lat=37.8199, lon=-122.4783, ts=2025-06-01T12:34:56Z, ok=true; ";

/// About `bytes` of mixed prompt text.
fn text(bytes: usize) -> String {
    let mut s = String::with_capacity(bytes + 512);
    let mut i = 0usize;
    while s.len() < bytes {
        s.push_str([PROSE, CODE, DATA][i % 3]);
        i += 1;
    }
    s
}

fn tokens(c: &mut Criterion) {
    let mut g = c.benchmark_group("tokens");
    for size in [256usize, 16 * 1024] {
        let t = text(size);
        let messages = vec![
            ChatMessage::system("You are a helpful assistant."),
            ChatMessage::user(t.clone()),
        ];
        let bytes: usize = messages.iter().map(|m| m.content.len()).sum();
        g.throughput(Throughput::Bytes(bytes as u64));

        let o200k = OpenAiTokenizer::new(Encoding::O200k);
        let cl100k = OpenAiTokenizer::new(Encoding::Cl100k);
        let claude = AnthropicEstimator::new();
        // Build the BPE tables before measuring.
        black_box(o200k.count_text("warm") + cl100k.count_text("warm"));

        g.bench_function(format!("o200k/{size}B"), |b| {
            b.iter(|| o200k.count_messages(black_box(&messages)))
        });
        g.bench_function(format!("cl100k/{size}B"), |b| {
            b.iter(|| cl100k.count_messages(black_box(&messages)))
        });
        g.bench_function(format!("anthropic_estimate/{size}B"), |b| {
            b.iter(|| claude.count_messages(black_box(&messages)))
        });
        for model in ["gpt-4o-mini", "claude-sonnet-4-5"] {
            let req = ChatRequest::new(model, messages.clone()).max_tokens(256);
            g.bench_function(format!("chat_cost/{model}/{size}B"), |b| {
                b.iter(|| ChatCost.cost(black_box(&req)))
            });
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = tokens
}
criterion_main!(benches);
