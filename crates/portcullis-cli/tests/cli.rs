//! The `portcullis` binary: `chat` against the embedded simulator, its JSON shape and its
//! failure line; `sim` with a bad scenario file; the hidden `drill-worker`.

use std::process::Command;

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
        .args(["chat", "--base-url", "http://127.0.0.1:9/v1", "Hi"])
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
