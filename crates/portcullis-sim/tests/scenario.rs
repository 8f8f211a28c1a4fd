//! Scenario files: the example loads; bad files are rejected with the field named.

use portcullis_sim::{FaultKind, Scenario, ScenarioError, SimError, Simulator};

fn message(r: Result<Scenario, ScenarioError>) -> String {
    r.expect_err("must be rejected").to_string()
}

#[tokio::test]
async fn the_example_outage_scenario_loads_and_runs() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/scenarios/outage.toml");
    let s = Scenario::from_path(path).unwrap();
    assert_eq!(s.seed, 42);
    assert_eq!(s.limits.time_scale, 60.0);
    assert_eq!(s.timeline.len(), 3);
    assert_eq!(s.timeline[1].faults[1].kind, FaultKind::Overloaded);
    let sim = Simulator::builder()
        .scenario_file(path)
        .unwrap()
        .start()
        .await
        .unwrap();
    sim.shutdown().await;
}

#[test]
fn toml_errors_name_the_field() {
    let m = message(Scenario::from_toml_str(
        "[[faults]]\nkind = \"status\"\nstatuss = 503\n",
    ));
    assert!(m.contains("statuss"), "{m}");
    let m = message(Scenario::from_toml_str("[[faults]]\nstatus = 503\n"));
    assert!(m.contains("missing field `kind`"), "{m}");
    let m = message(Scenario::from_toml_str("[[faults]]\nkind = \"explode\"\n"));
    assert!(m.contains("explode") && m.contains("rate_limit"), "{m}");
    let m = message(Scenario::from_toml_str("[limits]\ntime_scale = \"fast\"\n"));
    assert!(m.contains("time_scale"), "{m}");
    let m = message(Scenario::from_toml_str("[limits.openai]\nrpn = 3\n"));
    assert!(m.contains("rpn"), "{m}");
}

#[test]
fn json_errors_name_the_field() {
    let m = message(Scenario::from_json_str(
        "{\n  \"faults\": [\n    {\"kind\": \"latency\", \"latency_ms\": \"slow\"}\n  ]\n}",
    ));
    assert!(m.contains("latency_ms"), "{m}");
    let m = message(Scenario::from_json_str("{\"seeed\": 1}"));
    assert!(m.contains("seeed"), "{m}");
}

#[test]
fn invalid_values_name_the_path() {
    let cases = [
        ("[[faults]]\nkind = \"status\"\n", "faults[0].status"),
        (
            "[[faults]]\nkind = \"status\"\nstatus = 200\n",
            "faults[0].status",
        ),
        (
            "[[faults]]\nkind = \"hang\"\nprobability = 1.5\n",
            "faults[0].probability",
        ),
        (
            "[[faults]]\nkind = \"hang\"\nlatency_ms = 5\n",
            "faults[0].latency_ms",
        ),
        ("[[faults]]\nkind = \"latency\"\n", "faults[0].latency_ms"),
        (
            "[[faults]]\nkind = \"reset\"\nretry_after_secs = 1\n",
            "faults[0].retry_after_secs",
        ),
        (
            "[[timeline]]\n[[timeline]]\nduration_secs = 1\n",
            "timeline[0].duration_secs",
        ),
        (
            "[[timeline]]\nduration_secs = -1\n",
            "timeline[0].duration_secs",
        ),
        (
            "[[timeline]]\nduration_secs = 1\nfaults = [{ kind = \"status\", status = 99 }]\n",
            "timeline[0].faults[0].status",
        ),
        ("[limits]\ntime_scale = 0\n", "limits.time_scale"),
        (
            "[limits.anthropic]\noutput_tpm = 0\n",
            "limits.anthropic.output_tpm",
        ),
        ("max_body_bytes = 0\n", "max_body_bytes"),
    ];
    for (text, field) in cases {
        match Scenario::from_toml_str(text) {
            Err(ScenarioError::Invalid { field: f, .. }) => assert_eq!(f, field, "{text}"),
            other => panic!("{text}: expected Invalid({field}), got {other:?}"),
        }
    }
}

#[tokio::test]
async fn files_and_start_report_errors() {
    let dir = std::env::temp_dir().join(format!("portcullis-sim-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let yaml = dir.join("s.yaml");
    std::fs::write(&yaml, "seed: 1").unwrap();
    assert!(message(Scenario::from_path(&yaml)).contains(".toml or .json"));
    assert!(matches!(
        Scenario::from_path(dir.join("missing.toml")),
        Err(ScenarioError::Io { .. })
    ));
    let json = dir.join("s.json");
    std::fs::write(
        &json,
        r#"{"seed": 3, "faults": [{"kind": "reset", "family": "openai"}]}"#,
    )
    .unwrap();
    assert_eq!(Scenario::from_path(&json).unwrap().seed, 3);
    std::fs::remove_dir_all(&dir).unwrap();

    // start() validates a scenario built in code too.
    let mut bad = Scenario::default();
    bad.limits.time_scale = f64::NAN;
    let err = Simulator::builder()
        .scenario(bad)
        .start()
        .await
        .unwrap_err();
    assert!(
        matches!(err, SimError::Scenario(ScenarioError::Invalid { .. })),
        "{err}"
    );
}
