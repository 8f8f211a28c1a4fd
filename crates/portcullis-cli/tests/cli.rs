//! The `portcullis` binary: `chat` against the embedded simulator, its JSON shape and its
//! failure line, and against hostile loopback servers (silent, pings only, a trickle); `sim`
//! with a bad scenario file; the hidden `drill-worker`.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

fn portcullis() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_portcullis"));
    c.env_remove("OPENAI_API_KEY")
        .env_remove("ANTHROPIC_API_KEY")
        .env("RUST_LOG", "error");
    c
}

#[test]
fn chat_without_a_key_uses_the_embedded_simulator() {
    let out = portcullis().args(["chat", "Say hello"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("embedded simulator"), "{stderr}");
    assert!(!String::from_utf8_lossy(&out.stdout).trim().is_empty());
}

#[test]
fn chat_json_has_exactly_the_documented_keys() {
    for args in [
        vec!["chat", "--json", "--max-tokens", "5", "Tell me a story"],
        vec![
            "chat",
            "--json",
            "--stream",
            "--provider",
            "anthropic",
            "--system",
            "Be brief",
            "Hi",
        ],
    ] {
        let out = portcullis().args(&args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "content",
                "finish_reason",
                "latency_ms",
                "model",
                "provider",
                "request_id",
                "tool_calls",
                "usage"
            ]
        );
        assert_eq!(v["tool_calls"], serde_json::json!([]), "always present");
        let mut usage: Vec<&str> = v["usage"]
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        usage.sort();
        assert_eq!(usage, ["input_tokens", "output_tokens", "total_tokens"]);
        assert!(v["usage"]["total_tokens"].as_u64().unwrap() > 0);
        assert!(v["request_id"].is_string());
    }
    let out = portcullis()
        .args(["chat", "--json", "--max-tokens", "5", "Tell me a story"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["finish_reason"], "length");
    assert_eq!(v["provider"], "openai");
}

#[test]
fn chat_failure_is_one_line_with_kind_status_and_message() {
    // Nothing listens on port 9 of loopback: a connect error, no HTTP status.
    let out = portcullis()
        .args([
            "chat",
            "--base-url",
            "http://127.0.0.1:9/v1",
            "--retries",
            "0",
            "Hi",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: connect"), "{stderr}");
    // The whole cause chain, on that one line.
    assert!(stderr.contains("onnection refused"), "{stderr}");

    // No key sent to the simulator: its own 401, with the status and the provider's message.
    let sim = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["sim", "--port", "0"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut sim = KillOnDrop(sim);
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(sim.0.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    let base = line.trim().rsplit(' ').next().unwrap().to_string();
    let out = portcullis()
        .args(["chat", "--base-url", &format!("{base}/v1"), "Hi"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("error: authentication HTTP 401: "),
        "{stderr}"
    );
}

#[test]
fn sim_rejects_a_bad_scenario_naming_the_field() {
    let dir = std::env::temp_dir().join(format!("portcullis-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.toml");
    std::fs::write(&path, "[[faults]]\nkind = \"status\"\nstatus = 200\n").unwrap();
    let out = portcullis()
        .args(["sim", "--scenario"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("faults[0].status"), "{stderr}");
}

#[test]
fn the_fleet_worker_is_a_hidden_subcommand_not_drill_flags() {
    let help = |args: &[&str]| {
        let out = portcullis().args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(!help(&["--help"]).contains("drill-worker"));
    let drill = help(&["drill", "--help"]);
    assert!(
        !drill.contains("--worker") && !drill.contains("--sim-url"),
        "{drill}"
    );
    assert!(help(&["drill-worker", "--help"]).contains("--sim-url"));
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback HTTP server that reads each request's head and body, then hands the connection
/// to `answer` (on a thread per connection). Returns its base URL for `chat --base-url`.
fn serve(answer: impl Fn(TcpStream) + Clone + Send + 'static) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let answer = answer.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut length = 0;
                let mut line = String::new();
                while reader.read_line(&mut line).unwrap_or(0) > 2 {
                    let lower = line.to_ascii_lowercase();
                    if let Some(v) = lower.strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                    line.clear();
                }
                let mut body = vec![0; length];
                let _ = std::io::Read::read_exact(&mut reader, &mut body);
                answer(conn);
            });
        }
    });
    url
}

/// Starts an SSE response with no length (the body ends when the connection closes).
fn sse_head(conn: &mut TcpStream) {
    let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";
    conn.write_all(head.as_bytes()).unwrap();
}

/// Runs `chat` with `args` against `url`; returns its stderr and how long it took.
fn chat_against(url: &str, args: &[&str]) -> (String, Duration) {
    let t0 = Instant::now();
    let out = portcullis()
        .args(["chat", "--base-url", url])
        .args(args)
        .arg("Hi")
        .output()
        .unwrap();
    let took = t0.elapsed();
    assert_eq!(out.status.code(), Some(1));
    (String::from_utf8_lossy(&out.stderr).into_owned(), took)
}

#[test]
fn chat_gives_up_on_a_server_that_never_answers() {
    let url = serve(|conn| {
        std::thread::sleep(Duration::from_secs(60));
        drop(conn);
    });
    // Two attempts of 0.5 s and one backoff of at most 1 s: at most 2 s.
    let (stderr, took) = chat_against(&url, &["--timeout", "0.5", "--retries", "1"]);
    assert!(stderr.starts_with("error: timeout"), "{stderr}");
    assert!(took >= Duration::from_millis(1000), "{took:?}");
    // The upper bound is the 60 s hang it must not wait for (a loaded machine adds seconds).
    assert!(took < Duration::from_secs(10), "{took:?}");
}

/// Writes `keepalive` every 100 ms for a minute, and nothing else.
fn keepalive_only(mut conn: TcpStream, keepalive: &str) {
    sse_head(&mut conn);
    for _ in 0..600 {
        if conn.write_all(keepalive.as_bytes()).is_err() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn chat_stream_of_only_pings_times_out() {
    // OpenAI's keep-alive is an SSE comment; Anthropic's a `ping` event.
    let openai = serve(|conn| keepalive_only(conn, ": ping\n\n"));
    let anthropic = serve(|conn| {
        keepalive_only(conn, "event: ping\ndata: {\"type\": \"ping\"}\n\n");
    });
    for (url, provider) in [(openai, "openai"), (anthropic, "anthropic")] {
        // Pings are not first content: the attempt timeout ends it.
        let args = [
            "--provider",
            provider,
            "--stream",
            "--timeout",
            "0.5",
            "--retries",
            "0",
        ];
        let (stderr, took) = chat_against(&url, &args);
        assert!(stderr.starts_with("error: timeout"), "{provider}: {stderr}");
        // Bounded by the 0.5 s timeout, not by the 30 s default idle limit. The margin is wide
        // because a loaded machine (this binary runs drills in parallel) took over 2 s to
        // start the process and connect.
        assert!(took < Duration::from_secs(10), "{provider}: {took:?}");
    }
}

#[test]
fn chat_stream_that_trickles_is_bounded_by_the_deadline() {
    let url = serve(|mut conn| {
        sse_head(&mut conn);
        for i in 0..600 {
            let chunk = format!(
                "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"gpt-4o-mini\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{i} \"}},\"finish_reason\":null}}]}}\n\n"
            );
            if conn.write_all(chunk.as_bytes()).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    // A chunk every 200 ms never trips the 1 s idle limit; the deadline (2 s: one attempt of
    // 1 s, no retry, 1 s of slack) bounds the whole stream.
    let (stderr, took) = chat_against(&url, &["--stream", "--timeout", "1", "--retries", "0"]);
    assert!(stderr.starts_with("error: timeout"), "{stderr}");
    assert!(took >= Duration::from_millis(1900), "{took:?}");
    // The upper bound is the never-ending stream it must not wait for.
    assert!(took < Duration::from_secs(12), "{took:?}");
}

#[test]
fn chat_fails_over_to_the_fallback() {
    // The primary refuses every connection; the fallback is the embedded simulator.
    let out = portcullis()
        .args([
            "chat",
            "--base-url",
            "http://127.0.0.1:9/v1",
            "--retries",
            "0",
        ])
        .args(["--fallback", "anthropic", "--json", "Hi"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["provider"], "anthropic");
}

#[test]
fn a_short_soak_leaks_nothing() {
    let out = portcullis()
        .args([
            "drill",
            "soak",
            "--duration",
            "3s",
            "--concurrency",
            "8",
            "--json",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let r = &v["result"];
    assert_eq!(r["passed"], true, "{r}");
    assert_eq!(r["breaker_in_flight"], 0);
    assert_eq!(r["bucket_reservations"], 0);
    assert_eq!(r["panics"], 0);
    assert!(
        r["breaker_keys"].as_u64().unwrap() <= r["key_cap"].as_u64().unwrap(),
        "{r}"
    );
    assert!(
        r["bucket_keys"].as_u64().unwrap() <= r["key_cap"].as_u64().unwrap(),
        "{r}"
    );
    assert!(r["calls"].as_u64().unwrap() > 100, "{r}");
    assert!(r["cancelled"].as_u64().unwrap() > 0, "{r}");
}

#[test]
fn the_failover_drill_meets_its_targets_with_the_default_stack() {
    let out = portcullis()
        .args(["drill", "failover", "--json"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = v["stacks"].as_array().unwrap();
    assert_eq!(rows.len(), 6 * 3, "six faults, three stacks");
    for row in rows {
        let first = row["first_call_ms"].as_f64().unwrap();
        match (
            row["name"].as_str().unwrap(),
            row["fault"].as_str().unwrap(),
        ) {
            ("failover_first", fault) => {
                let targets = row["targets"].as_object().unwrap();
                assert!(targets.values().all(|t| t == true), "{row}");
                let attempt = if fault == "hang" { 30_000.0 } else { 0.0 };
                assert!(first <= attempt + 50.0, "{row}");
            }
            // The old order waits out the primary's backoff before its first failover.
            ("retry_each", "status503" | "status529") => assert!(first >= 100.0, "{row}"),
            _ => assert!(row["targets"].is_null(), "{row}"),
        }
    }
}

/// Runs `drill <which> --json --metrics`: the report, and each metric line's series (name and
/// labels, as printed) with its value (a histogram's count).
fn drill_with_metrics(which: &str) -> (serde_json::Value, Vec<(String, f64)>) {
    let out = portcullis()
        .args(["drill", which, "--json", "--metrics"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}");
    let (json, metrics) = stdout
        .split_once("\n== metrics recorded")
        .expect("a metrics section");
    let series = metrics
        .lines()
        .skip(1)
        .map(|l| {
            let (series, value) = l.rsplit_once("} ").expect("series {labels} value");
            let value = value.strip_prefix("count ").unwrap_or(value);
            let value = value.split(' ').next().unwrap().parse().unwrap();
            (format!("{series}}}"), value)
        })
        .collect();
    (serde_json::from_str(json).unwrap(), series)
}

/// The sum over the series named `name` whose labels include every one of `labels` (and none
/// of those written `!label`).
fn metric(series: &[(String, f64)], name: &str, labels: &[&str]) -> f64 {
    let has = |s: &str, l: &str| match l.strip_prefix('!') {
        Some(l) => !s.contains(l),
        None => s.contains(l),
    };
    series
        .iter()
        .filter(|(s, _)| s.starts_with(&format!("{name}{{")) && labels.iter().all(|l| has(s, l)))
        .map(|(_, v)| v)
        .sum()
}

/// The rows of `stacks` whose name is one of `names`, summed on `field`.
fn rows(report: &serde_json::Value, names: &[&str], field: &str) -> f64 {
    report["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| names.contains(&r["name"].as_str().unwrap()))
        .map(|r| r[field].as_f64().unwrap())
        .sum()
}

#[test]
fn the_rate_limit_drill_table_agrees_with_its_metrics() {
    // Two rows run through the layers (`portcullis` and `learned`, both under the provider
    // name `openai`); the others are hand-written loops that record nothing.
    let (report, m) = drill_with_metrics("rate-limit");
    let layered = ["portcullis", "learned"];
    let duration = "gen_ai.client.operation.duration";
    assert_eq!(
        rows(&report, &layered, "requests"),
        metric(&m, duration, &[]),
        "every call is one duration sample:\n{report}\n{m:?}"
    );
    assert_eq!(
        rows(&report, &layered, "succeeded"),
        metric(
            &m,
            duration,
            &["gen_ai.provider.name=openai", "!error.type"]
        ),
        "{m:?}"
    );
    let refused = rows(&report, &layered, "rejected_locally");
    assert!(refused > 0.0, "{report}");
    assert_eq!(refused, metric(&m, duration, &["error.type=throttled"]));
    // A refusal the retry layer retried (and that then got through) is a refusal but not a
    // refused call: each refused call had at least one.
    let refusals = metric(
        &m,
        "portcullis.bucket.refusals",
        &["portcullis.refusal=throttled"],
    );
    assert!(refusals >= refused, "{refusals} {refused}");
    assert_eq!(rows(&report, &layered, "upstream_429s"), 0.0, "{report}");
    // Each successful call was admitted by the bucket (a retried one more than once).
    assert!(metric(&m, "portcullis.bucket.wait", &[]) >= rows(&report, &layered, "succeeded"));
}

#[test]
fn the_storm_drill_table_agrees_with_its_metrics() {
    let (report, m) = drill_with_metrics("storm");
    let upstream = rows(&report, &["portcullis"], "upstream_calls");
    assert!(upstream > 0.0, "{report}");
    // Each upstream call was admitted by the bucket and failed with a 503.
    assert_eq!(upstream, metric(&m, "portcullis.bucket.wait", &[]), "{m:?}");
    // Each 503 was retried unless it was a call's last allowed attempt.
    let retries = metric(&m, "portcullis.retry.attempts", &["reason=unavailable"]);
    assert!(retries > 0.0 && retries <= upstream, "{retries} {upstream}");
    assert_eq!(
        rows(&report, &["portcullis"], "requests"),
        metric(&m, "gen_ai.client.operation.duration", &[])
    );
    assert_eq!(
        metric(
            &m,
            "portcullis.breaker.transitions",
            &["from=closed", "to=open"]
        ),
        1.0
    );
}

/// A recording of `../portcullis-providers/tests/data`, served whole to every request.
fn serve_recording(name: &str) -> String {
    let path = format!(
        "{}/../portcullis-providers/tests/data/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    let body = std::fs::read(&path).unwrap();
    let kind = if name.ends_with(".sse") {
        "text/event-stream"
    } else {
        "application/json"
    };
    serve(move |mut conn| {
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: {kind}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        let _ = conn.write_all(head.as_bytes());
        let _ = conn.write_all(&body);
    })
}

#[test]
fn every_tool_call_and_thinking_recording_replays_through_chat_json() {
    use serde_json::json;
    let weather = |id: &str, args| json!({"id": id, "name": "GetWeatherArgs", "arguments": args});
    let cases = [
        (
            "openai/openai-python_stream_tool_call.sse",
            "openai",
            json!([weather(
                "call_c91SqDXlYFuETYv8mUHzz6pp",
                json!({"city": "Edinburgh", "country": "UK", "units": "c"})
            )]),
        ),
        (
            "openai/openai-python_stream_parallel_tool_calls.sse",
            "openai",
            json!([
                weather("call_JMW1whyEaYG438VE1OIflxA2", json!({"city": "Edinburgh", "country": "GB", "units": "c"})),
                {"id": "call_DNYTawLBoN8fj3KN6qU9N1Ou", "name": "get_stock_price", "arguments": {"ticker": "AAPL", "exchange": "NASDAQ"}},
            ]),
        ),
        (
            "openai/ai-gateway_tool_calls.json",
            "openai",
            json!([{"id": "call_Xc4Aiih37EUJvqjoZlu4Vdoi", "name": "get_current_weather", "arguments": {"location": "San Francisco, CA"}}]),
        ),
        (
            "anthropic/anthropic-sdk-python_tool_use_response.sse",
            "anthropic",
            json!([{"id": "toolu_01NRLabsLyVHZPKxbKvkfSMn", "name": "get_weather", "arguments": {"location": "Paris"}}]),
        ),
        (
            "anthropic/llm-anthropic_stream_tool_use.sse",
            "anthropic",
            json!([
                {"id": "toolu_01LtHJmixrs9NcWQkK8hu8hj", "name": "pelican_name_generator", "arguments": {}},
                {"id": "toolu_01N8a4jWyf116qKTMqKKmjyt", "name": "pelican_name_generator", "arguments": {}},
            ]),
        ),
        (
            "anthropic/synthetic_thinking_tool_use.sse",
            "anthropic",
            json!([{"id": "toolu_9", "name": "get_weather", "arguments": {"city": "Paris"}}]),
        ),
    ];
    for (name, provider, calls) in cases {
        let url = serve_recording(name);
        let url = if provider == "anthropic" {
            url.trim_end_matches("/v1").to_owned()
        } else {
            url
        };
        // An SSE recording is read by the streaming path; a JSON one by the complete path.
        let stream = name.ends_with(".sse");
        let mut args = vec!["chat", "--json", "--retries", "0", "--provider", provider];
        args.extend(["--base-url", &url]);
        if stream {
            args.push("--stream");
        }
        let out = portcullis().args(&args).arg("Hi").output().unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["tool_calls"], calls, "{name}");
        assert_eq!(v["finish_reason"], "tool_calls", "{name}");
    }
}

#[test]
fn chat_sends_tools_images_and_a_schema_and_refuses_bad_files() {
    let dir = std::env::temp_dir().join(format!("portcullis-cli-vocab-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let tools = dir.join("tools.json");
    std::fs::write(
        &tools,
        r#"[{"type":"function","function":{"name":"get_weather","description":"Weather in a city","parameters":{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}}}]"#,
    )
    .unwrap();
    // The simulator calls a tool that the last message names.
    for provider in ["openai", "anthropic"] {
        let out = portcullis()
            .args(["chat", "--json", "--provider", provider, "--tools"])
            .arg(&tools)
            .arg("Use get_weather for Paris")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{provider}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["finish_reason"], "tool_calls", "{provider}: {v}");
        assert_eq!(v["tool_calls"][0]["name"], "get_weather", "{provider}");
        assert!(
            v["tool_calls"][0]["arguments"]["city"].is_string(),
            "{provider}: {v}"
        );
    }
    // A schema the answer follows.
    let schema = dir.join("schema.json");
    std::fs::write(
        &schema,
        r#"{"name":"city","schema":{"type":"object","properties":{"name":{"type":"string"},"population":{"type":"integer"}},"required":["name","population"],"additionalProperties":false},"strict":true}"#,
    )
    .unwrap();
    // OpenAI's response_format, Anthropic's output_config.format.
    for provider in ["openai", "anthropic"] {
        let out = portcullis()
            .args(["chat", "--json", "--provider", provider, "--json-schema"])
            .arg(&schema)
            .arg("A city")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{provider}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let answer: serde_json::Value =
            serde_json::from_str(v["content"].as_str().unwrap()).unwrap();
        assert!(
            answer["name"].is_string() && answer["population"].is_i64(),
            "{provider}: {answer}"
        );
    }
    // An image by path.
    let png = dir.join("dot.png");
    std::fs::write(
        &png,
        [
            0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48,
            0x44, 0x52, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x02, 0x00, 0x00,
            0x00, 0x90, 0x77, 0x53, 0xde, 0x00, 0x00, 0x00, 0x0c, 0x49, 0x44, 0x41, 0x54, 0x78,
            0x9c, 0x63, 0xf8, 0xcf, 0xc0, 0x00, 0x00, 0x03, 0x01, 0x01, 0x00, 0xc9, 0xfe, 0x92,
            0xef, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45, 0x4e, 0x44, 0xae, 0x42, 0x60, 0x82,
        ],
    )
    .unwrap();
    for provider in ["openai", "anthropic"] {
        let out = portcullis()
            .args(["chat", "--provider", provider, "--image"])
            .arg(&png)
            .arg("What is this?")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{provider}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Bad files: one line naming the option, exit 1.
    let not_json = dir.join("bad.json");
    std::fs::write(&not_json, "{").unwrap();
    let bad_tool = dir.join("bad_tool.json");
    std::fs::write(
        &bad_tool,
        r#"[{"name":"bad name!","parameters":{"type":"object"}}]"#,
    )
    .unwrap();
    for (option, file) in [
        ("--tools", &not_json),
        ("--tools", &bad_tool),
        ("--json-schema", &not_json),
        ("--image", &not_json),
    ] {
        let out = portcullis()
            .args(["chat", option])
            .arg(file)
            .arg("Hi")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{option}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(option), "{option}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
