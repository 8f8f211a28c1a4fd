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
                "usage"
            ]
        );
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
fn serve(answer: fn(TcpStream)) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
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
    assert!(took < Duration::from_millis(2000 + 1500), "{took:?}");
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
        assert!(
            took < Duration::from_millis(500 + 1500),
            "{provider}: {took:?}"
        );
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
    assert!(took < Duration::from_millis(2000 + 1500), "{took:?}");
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
