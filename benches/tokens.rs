//! What a request's admission costs as its prompt grows: [`ChatCost`] (the token bucket's
//! standard cost) over prompts of 256 B, 16 KiB, 512 KiB and 2 MiB, beside the exact count
//! ([`Encoding::count_exact`]) and tiktoken-rs (the reference), in the same run.
//!
//! `ChatCost` is exact up to 64 KiB of text and sampled above (constant cost); the exact count
//! and tiktoken-rs grow with the text. The text is built in code (English prose, code and
//! numbers, as prompts mix them), so the bench depends on nothing outside the repo.
//!
//! Run: `cargo bench --bench tokens -- --quick`.
#![allow(missing_docs)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use portcullis_core::{ChatCost, ChatMessage, ChatRequest, CostOf, Encoding};

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

/// About `bytes` of text in other scripts (accents, CJK, Cyrillic), mixed with ASCII.
fn text_intl(bytes: usize) -> String {
    let parts = [
        "Le pélican brun vit sur les côtes des Amériques; ",
        "東京は日本の首都であり、世界最大の都市圏の一つです。",
        "Пеликан — крупная водоплавающая птица. ",
        PROSE,
    ];
    let mut s = String::with_capacity(bytes + 512);
    let mut i = 0usize;
    while s.len() < bytes {
        s.push_str(parts[i % parts.len()]);
        i += 1;
    }
    s
}

fn tokens(c: &mut Criterion) {
    let mut g = c.benchmark_group("tokens");
    let tiktoken = tiktoken_rs::o200k_base_singleton();
    // Build the BPE tables before measuring.
    black_box(Encoding::O200k.count_exact("warm") + tiktoken.encode_ordinary("warm").len() as u64);
    for (size, label) in [
        (256usize, "256B"),
        (16 * 1024, "16KiB"),
        (512 * 1024, "512KiB"),
        (2 * 1024 * 1024, "2MiB"),
    ] {
        let t = text(size);
        let messages = vec![
            ChatMessage::system("You are a helpful assistant."),
            ChatMessage::user(t.clone()),
        ];
        g.throughput(Throughput::Bytes(t.len() as u64));
        for model in ["gpt-4o-mini", "claude-sonnet-4-5"] {
            let req = ChatRequest::new(model, messages.clone()).max_tokens(256);
            g.bench_function(format!("chat_cost/{model}/{label}"), |b| {
                b.iter(|| ChatCost.cost(black_box(&req)))
            });
        }
        if size == 16 * 1024 {
            // Other scripts take the regex splitter, not the ASCII one.
            let intl = text_intl(size);
            g.throughput(Throughput::Bytes(intl.len() as u64));
            g.bench_function(format!("exact_o200k/non-ascii/{label}"), |b| {
                b.iter(|| Encoding::O200k.count_exact(black_box(&intl)))
            });
            g.throughput(Throughput::Bytes(t.len() as u64));
        }
        if size <= 512 * 1024 {
            g.bench_function(format!("exact_o200k/{label}"), |b| {
                b.iter(|| Encoding::O200k.count_exact(black_box(&t)))
            });
            g.bench_function(format!("tiktoken_rs_o200k/{label}"), |b| {
                b.iter(|| tiktoken.encode_ordinary(black_box(&t)).len())
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
