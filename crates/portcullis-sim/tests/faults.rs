//! Fault injection: each kind's wire behaviour, families, `times`, probability, the timeline
//! (paused time), the control endpoints, and shutdown.

mod common;

use std::time::Duration;

use common::*;
use portcullis_core::ErrorKind;
use portcullis_sim::{Family, FaultKind, FaultRule, Phase, SimHandle, Simulator};
use serde_json::{Value, json};

async fn sim() -> SimHandle {
    Simulator::builder().start().await.unwrap()
}

fn streaming(mut v: Value) -> Value {
    v["stream"] = json!(true);
    v
}

/// The kind the client will classify an error response as (core's one mapping).
fn kind_of(family: Family, r: &Reply) -> ErrorKind {
    let v = r.json();
    let (t, c) = match family {
        Family::Anthropic => (v["error"]["type"].as_str(), None),
        _ => (v["error"]["type"].as_str(), v["error"]["code"].as_str()),
    };
    ErrorKind::from_wire(Some(r.status), t, c)
}

#[tokio::test]
async fn error_faults_answer_in_each_providers_shape() {
    let sim = sim().await;
    let cases: Vec<(FaultRule, u16, &str, ErrorKind, u16, &str, ErrorKind)> = vec![
        (
            FaultRule::new(FaultKind::RateLimit),
            429,
            "requests",
            ErrorKind::RateLimited,
            429,
            "rate_limit_error",
            ErrorKind::RateLimited,
        ),
        (
            FaultRule::new(FaultKind::InsufficientQuota),
            429,
            "insufficient_quota",
            ErrorKind::QuotaExhausted,
            402,
            "billing_error",
            ErrorKind::QuotaExhausted,
        ),
        (
            FaultRule::new(FaultKind::Billing),
            402,
            "invalid_request_error",
            ErrorKind::QuotaExhausted,
            402,
            "billing_error",
            ErrorKind::QuotaExhausted,
        ),
        (
            FaultRule::status(500),
            500,
            "server_error",
            ErrorKind::Server,
            500,
            "api_error",
            ErrorKind::Server,
        ),
        (
            FaultRule::status(502),
            502,
            "server_error",
            ErrorKind::Server,
            502,
            "api_error",
            ErrorKind::Server,
        ),
        (
            FaultRule::status(503),
            503,
            "server_error",
            ErrorKind::Overloaded,
            503,
            "api_error",
            ErrorKind::Overloaded,
        ),
        (
            FaultRule::new(FaultKind::Overloaded),
            503,
            "server_error",
            ErrorKind::Overloaded,
            529,
            "overloaded_error",
            ErrorKind::Overloaded,
        ),
    ];
    for (rule, o_status, o_type, o_kind, a_status, a_type, a_kind) in cases {
        sim.set_faults(vec![rule.clone()]).unwrap();
        let r = openai(sim.addr(), chat("gpt-4o-mini", "hi")).await;
        assert_eq!(
            (r.status, r.json()["error"]["type"].as_str().unwrap()),
            (o_status, o_type),
            "{rule:?}"
        );
        assert_eq!(kind_of(Family::Openai, &r), o_kind, "{rule:?}");
        assert!(r.header("x-request-id").starts_with("req_"));
        let a = anthropic(sim.addr(), message("claude-haiku-4-5", "hi", 10)).await;
        assert_eq!(
            (a.status, a.json()["error"]["type"].as_str().unwrap()),
            (a_status, a_type),
            "{rule:?}"
        );
        assert_eq!(a.json()["request_id"], a.header("request-id"));
        assert_eq!(kind_of(Family::Anthropic, &a), a_kind, "{rule:?}");
        if rule.kind == FaultKind::RateLimit {
            assert_eq!(r.json()["error"]["code"], "rate_limit_exceeded");
            assert_eq!(r.header("retry-after"), "1");
            assert_eq!(r.header("retry-after-ms"), "1000");
            assert_eq!(a.header("retry-after"), "1");
        }
    }
    sim.set_faults(vec![
        FaultRule::new(FaultKind::RateLimit).retry_after_secs(7),
    ])
    .unwrap();
    let r = openai(sim.addr(), chat("gpt-4o-mini", "hi")).await;
    assert_eq!(
        (r.header("retry-after"), r.header("retry-after-ms")),
        ("7", "7000")
    );

    let s = sim.stats();
    assert_eq!(s.requests, 15);
    assert_eq!(s.outcome("fault_rate_limit"), 3);
    assert_eq!(s.outcome("fault_status_503"), 2);
    assert_eq!(s.outcome("fault_overloaded"), 2);
    assert_eq!(s.status(529), 1);
    assert_eq!(s.outcome("ok"), 0);
}

#[tokio::test]
async fn reset_closes_the_connection_without_an_answer() {
    let sim = sim().await;
    sim.set_faults(vec![FaultRule::new(FaultKind::Reset).times(1)])
        .unwrap();
    let body = chat("gpt-4o-mini", "hi").to_string();
    let r = send(
        sim.addr(),
        "POST",
        "/v1/chat/completions",
        &[("authorization", "Bearer k")],
        body,
    )
    .await;
    let err = r.expect_err("no response");
    assert!(err.is_incomplete_message() || err.is_closed(), "{err:?}");
    // `times = 1`: the next request is served.
    assert_eq!(
        openai(sim.addr(), chat("gpt-4o-mini", "hi")).await.status,
        200
    );
    let s = sim.stats();
    assert_eq!(
        (s.outcome("fault_reset"), s.outcome("ok"), s.requests),
        (1, 1, 2)
    );
    assert_eq!(
        s.by_status.values().sum::<u64>(),
        1,
        "a reset sends no status"
    );
}

#[tokio::test(start_paused = true)]
async fn hang_lasts_until_the_client_gives_up_and_latency_delays() {
    let sim = sim().await;
    sim.set_faults(vec![
        FaultRule::new(FaultKind::Hang).family(Family::Anthropic),
    ])
    .unwrap();
    let gave_up = tokio::time::timeout(
        Duration::from_secs(600),
        anthropic(sim.addr(), message("claude-haiku-4-5", "hi", 10)),
    )
    .await;
    assert!(gave_up.is_err(), "no answer within 600 s");
    assert_eq!(sim.stats().outcome("fault_hang"), 1);
    // The OpenAI family is untouched; latency adds exactly its delay.
    sim.set_faults(vec![
        FaultRule::new(FaultKind::Hang).family(Family::Anthropic),
        FaultRule::latency(250),
        FaultRule::latency(50).family(Family::Openai),
    ])
    .unwrap();
    let t0 = tokio::time::Instant::now();
    assert_eq!(
        openai(sim.addr(), chat("gpt-4o-mini", "hi")).await.status,
        200
    );
    assert_eq!(t0.elapsed(), Duration::from_millis(300));
    // Shutdown wakes the hanging request and completes.
    let hanging = tokio::spawn({
        let addr = sim.addr();
        async move {
            let body = message("claude-haiku-4-5", "hi", 10).to_string();
            send(addr, "POST", "/v1/messages", &[("x-api-key", "k")], body).await
        }
    });
    // (Paused time: these sleeps are virtual, and let the 250 ms latency pass.)
    while sim.stats().outcome("fault_hang") < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    sim.shutdown().await;
    assert!(hanging.await.unwrap().is_err(), "closed without an answer");
}

#[tokio::test]
async fn openai_stream_faults() {
    let sim = sim().await;
    let req = streaming(chat("gpt-4o-mini", "Tell me a story"));
    let parse = |r: &Reply| -> Vec<Result<Value, String>> {
        r.events()
            .into_iter()
            .map(|(_, d)| serde_json::from_str(&d).map_err(|_| d))
            .collect()
    };
    let content = |evs: &[Result<Value, String>]| {
        evs.iter()
            .filter_map(|e| e.as_ref().ok())
            .filter(|v| {
                v["choices"][0]["delta"]["content"]
                    .as_str()
                    .is_some_and(|c| !c.is_empty())
            })
            .count()
    };

    sim.set_faults(vec![FaultRule::new(FaultKind::ErrorBeforeContent)])
        .unwrap();
    let r = openai(sim.addr(), req.clone()).await;
    assert_eq!(r.status, 200);
    let evs = parse(&r);
    assert_eq!(evs.len(), 2);
    assert_eq!(content(&evs), 0);
    let err = evs[1].as_ref().unwrap();
    assert_eq!(err["error"]["type"], "server_error");
    assert_eq!(err["error"].as_object().unwrap().len(), 4);

    sim.set_faults(vec![FaultRule::new(FaultKind::ErrorAfterContent)])
        .unwrap();
    let evs = parse(&openai(sim.addr(), req.clone()).await);
    assert_eq!(content(&evs), 2);
    assert!(evs.last().unwrap().as_ref().unwrap()["error"].is_object());

    sim.set_faults(vec![FaultRule::new(FaultKind::Truncated)])
        .unwrap();
    let r = openai(sim.addr(), req.clone()).await;
    assert!(!r.text().contains("[DONE]"));
    let evs = parse(&r);
    assert!(content(&evs) >= 2);
    assert!(
        evs.iter()
            .all(|e| e.as_ref().unwrap()["choices"][0]["finish_reason"].is_null())
    );

    sim.set_faults(vec![FaultRule::new(FaultKind::MalformedJson)])
        .unwrap();
    let r = openai(sim.addr(), req.clone()).await;
    let evs = parse(&r);
    assert_eq!(
        evs.iter().filter(|e| e.is_err()).count(),
        2,
        "one bad event and [DONE]"
    );
    let plain = openai(sim.addr(), chat("gpt-4o-mini", "hi")).await;
    assert_eq!(plain.status, 200);
    assert!(
        serde_json::from_slice::<Value>(&plain.body).is_err(),
        "malformed body"
    );

    // Stream-only faults leave plain requests alone (and are not used up by them).
    sim.set_faults(vec![FaultRule::new(FaultKind::Truncated).times(1)])
        .unwrap();
    assert_eq!(
        openai(sim.addr(), chat("gpt-4o-mini", "hi")).await.json()["object"],
        "chat.completion"
    );
    assert!(
        !openai(sim.addr(), req.clone())
            .await
            .text()
            .contains("[DONE]")
    );
    assert!(openai(sim.addr(), req).await.text().contains("[DONE]"));
}

#[tokio::test]
async fn anthropic_stream_faults() {
    let sim = sim().await;
    let req = streaming(message("claude-haiku-4-5", "Tell me a story", 200));
    let names =
        |r: &Reply| -> Vec<String> { r.events().into_iter().map(|(n, _)| n.unwrap()).collect() };

    sim.set_faults(vec![FaultRule::new(FaultKind::ErrorBeforeContent)])
        .unwrap();
    let r = anthropic(sim.addr(), req.clone()).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        names(&r),
        ["message_start", "content_block_start", "ping", "error"]
    );
    let err: Value = serde_json::from_str(&r.events()[3].1).unwrap();
    assert_eq!(
        err,
        json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    );

    sim.set_faults(vec![FaultRule::new(FaultKind::ErrorAfterContent)])
        .unwrap();
    let n = names(&anthropic(sim.addr(), req.clone()).await);
    assert_eq!(
        &n[3..],
        ["content_block_delta", "content_block_delta", "error"]
    );

    sim.set_faults(vec![FaultRule::new(FaultKind::Truncated)])
        .unwrap();
    let n = names(&anthropic(sim.addr(), req.clone()).await);
    assert!(
        n.len() > 4 && n[3..].iter().all(|e| e == "content_block_delta"),
        "{n:?}"
    );

    sim.set_faults(vec![FaultRule::new(FaultKind::MalformedJson)])
        .unwrap();
    let r = anthropic(sim.addr(), req.clone()).await;
    let bad = r
        .events()
        .iter()
        .filter(|(_, d)| serde_json::from_str::<Value>(d).is_err())
        .count();
    assert_eq!(bad, 1);
    assert_eq!(names(&r).last().unwrap(), "message_stop");
}

#[tokio::test]
async fn families_times_and_seeded_probability() {
    let sim = sim().await;
    sim.set_faults(vec![FaultRule::status(500).family(Family::Openai).times(2)])
        .unwrap();
    assert_eq!(
        anthropic(sim.addr(), message("claude-haiku-4-5", "hi", 10))
            .await
            .status,
        200
    );
    for expected in [500, 500, 200] {
        assert_eq!(
            openai(sim.addr(), chat("gpt-4o-mini", "hi")).await.status,
            expected
        );
    }

    async fn pattern(seed: u64) -> Vec<u16> {
        let sim = Simulator::builder()
            .seed(seed)
            .fault(FaultRule::status(503).probability(0.5))
            .start()
            .await
            .unwrap();
        let mut out = Vec::new();
        for _ in 0..40 {
            out.push(openai(sim.addr(), chat("gpt-4o-mini", "hi")).await.status);
        }
        let s = sim.stats();
        assert_eq!(s.status(503) + s.status(200), 40);
        assert_eq!(s.outcome("fault_status_503"), s.status(503));
        out
    }
    let a = pattern(11).await;
    assert_eq!(a, pattern(11).await, "the same seed, the same dice");
    let fails = a.iter().filter(|s| **s == 503).count();
    assert!((8..=32).contains(&fails), "{fails} of 40 at p = 0.5");
}

#[tokio::test(start_paused = true)]
async fn timeline_phases_switch_on_time() {
    let sim = Simulator::builder()
        .timeline(vec![
            Phase::new(10.0, vec![]),
            Phase::new(20.0, vec![FaultRule::status(503).family(Family::Openai)]),
            Phase::new(5.0, vec![FaultRule::new(FaultKind::Overloaded)]),
        ])
        .start()
        .await
        .unwrap();
    let status = || async { openai(sim.addr(), chat("gpt-4o-mini", "hi")).await.status };
    let step = |ms: u64| tokio::time::advance(Duration::from_millis(ms));
    assert_eq!(status().await, 200);
    step(9_999).await;
    assert_eq!(status().await, 200);
    step(1).await; // t = 10 s
    assert_eq!(status().await, 503);
    assert_eq!(
        anthropic(sim.addr(), message("claude-haiku-4-5", "hi", 10))
            .await
            .status,
        200
    );
    step(19_999).await;
    assert_eq!(status().await, 503);
    step(1).await; // t = 30 s: overloaded, both families
    assert_eq!(status().await, 503);
    assert_eq!(
        anthropic(sim.addr(), message("claude-haiku-4-5", "hi", 10))
            .await
            .status,
        529
    );
    step(5_000).await; // t = 35 s: past the last phase, healthy
    assert_eq!(status().await, 200);
    let s = sim.stats();
    assert_eq!(s.outcome("fault_status_503"), 2);
    assert_eq!(s.outcome("fault_overloaded"), 2);
    assert_eq!(s.outcome("ok"), 4);

    // Setting a timeline restarts it now.
    sim.set_timeline(vec![
        Phase::new(1.0, vec![]),
        Phase::forever(vec![FaultRule::status(500)]),
    ])
    .unwrap();
    assert_eq!(status().await, 200);
    step(1000).await;
    assert_eq!(status().await, 500);
    step(1_000_000).await;
    assert_eq!(status().await, 500);
}

#[tokio::test]
async fn control_endpoints() {
    let sim = sim().await;
    let addr = sim.addr();
    let post = |path: &'static str, body: Value| async move {
        send(
            addr,
            "POST",
            path,
            &[("content-type", "application/json")],
            body.to_string(),
        )
        .await
        .unwrap()
    };
    let r = post(
        "/_sim/faults",
        json!({"faults": [{"kind": "status", "status": 502, "times": 1}]}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        openai(sim.addr(), chat("gpt-4o-mini", "hi")).await.status,
        502
    );
    assert_eq!(
        openai(sim.addr(), chat("gpt-4o-mini", "hi")).await.status,
        200
    );

    let stats = send(sim.addr(), "GET", "/_sim/stats", &[], "")
        .await
        .unwrap()
        .json();
    assert_eq!(stats, serde_json::to_value(sim.stats()).unwrap());
    assert_eq!(stats["requests"], 2);
    assert_eq!(stats["by_status"]["502"], 1);
    assert_eq!(stats["by_model"]["gpt-4o-mini"], 2);
    assert_eq!(stats["by_endpoint"]["chat_completions"], 2);

    // Bad plans are refused with the field named, and change nothing.
    let r = post(
        "/_sim/faults",
        json!({"faults": [{"kind": "status", "statuss": 502}]}),
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(
        r.json()["error"].as_str().unwrap().contains("statuss"),
        "{}",
        r.text()
    );
    let r = post(
        "/_sim/faults",
        json!({"faults": [{"kind": "hang", "probability": 2}]}),
    )
    .await;
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("faults[0].probability"),
        "{}",
        r.text()
    );
    let r = post(
        "/_sim/limits",
        json!({"time_scale": 60, "openai": {"rpm": 1, "tpm": 100000}}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        openai(sim.addr(), chat("gpt-4o-mini", "hi")).await.status,
        200
    );
    assert_eq!(
        openai(sim.addr(), chat("gpt-4o-mini", "hi")).await.status,
        429
    );

    // Reset: zero stats, fresh limit windows, and the faults' `times` counters start over.
    assert_eq!(post("/_sim/reset", json!({})).await.status, 200);
    assert_eq!(sim.stats(), portcullis_sim::Stats::default());
    assert_eq!(
        openai(sim.addr(), chat("gpt-4o-mini", "hi")).await.status,
        502
    );
    assert_eq!(
        openai(sim.addr(), chat("gpt-4o-mini", "hi")).await.status,
        200,
        "fresh window"
    );
}

#[tokio::test]
async fn dropping_the_handle_frees_the_port() {
    let sim = sim().await;
    let addr = sim.addr();
    assert_eq!(openai(addr, chat("gpt-4o-mini", "hi")).await.status, 200);
    drop(sim);
    let mut bound = None;
    for _ in 0..1000 {
        tokio::task::yield_now().await;
        if let Ok(l) = tokio::net::TcpListener::bind(addr).await {
            bound = Some(l);
            break;
        }
    }
    assert!(bound.is_some(), "port {addr} still taken after drop");
}
