//! OpenAI-compatible servers (vLLM, Ollama, LM Studio) through the OpenAI wire, by base URL,
//! with or without a key: the shapes they send that OpenAI's own answers do not (no `usage`,
//! no `created`, `stop_reason`, usage only in a chunk with no choices, extra fields).

mod common;

use common::{Canned, Server, data_path, request};
use portcullis_core::FinishReason;
use portcullis_providers::OpenAiProvider;
use tower::ServiceExt;

fn body(name: &str) -> Vec<u8> {
    std::fs::read(data_path(&format!("compat/{name}"))).unwrap()
}

/// A keyless provider for a local server, as for Ollama at `http://localhost:11434/v1`.
fn local(server: &Server) -> OpenAiProvider {
    OpenAiProvider::builder()
        .base_url(format!("{}/v1", server.base()))
        .without_api_key()
        .build()
        .unwrap()
}

#[tokio::test]
async fn complete_answers_in_each_servers_shape() {
    let server = Server::start().await;
    let cases = [
        (
            "vllm.json",
            "Tides follow the moon.",
            Some(23),
            FinishReason::Stop,
        ),
        (
            "ollama.json",
            "Owls can rotate their heads 270 degrees.",
            Some(40),
            FinishReason::Stop,
        ),
        (
            "lmstudio_no_usage.json",
            "Bread rises because yeast makes gas.",
            None,
            FinishReason::Length,
        ),
        (
            "minimal.json",
            "Rivers carve canyons.",
            None,
            FinishReason::Stop,
        ),
    ];
    for (file, text, total, finish) in cases {
        server.set(Canned::new(200, "application/json", body(file)));
        let res = local(&server).oneshot(request("m")).await.unwrap();
        assert_eq!(res.content, text, "{file}");
        assert_eq!(res.finish_reason, finish, "{file}");
        match total {
            Some(t) => assert_eq!(res.usage.total_tokens, t, "{file}"),
            None => assert_eq!(res.usage.total_tokens, 0, "{file}: no usage reported"),
        }
    }
    // Without a key, no auth header is sent at all.
    assert!(!server.last().headers.contains_key("authorization"));
}

#[tokio::test]
async fn streams_in_each_servers_shape() {
    let server = Server::start().await;
    let cases = [
        ("ollama_stream.sse", "Glaciers move.", 0, FinishReason::Stop),
        (
            "vllm_stream_usage.sse",
            "Compilers translate code",
            15,
            FinishReason::Length,
        ),
        (
            "lmstudio_stream.sse",
            "Stars are suns.",
            13,
            FinishReason::Stop,
        ),
    ];
    for (file, text, total, finish) in cases {
        server.set(Canned::new(200, "text/event-stream", body(file)));
        let stream = local(&server)
            .streaming()
            .oneshot(request("m"))
            .await
            .unwrap();
        let res = stream.collect().await.unwrap();
        assert_eq!(res.content, text, "{file}");
        assert_eq!(res.finish_reason, finish, "{file}");
        assert_eq!(res.usage.total_tokens, total, "{file}");
    }
}

#[tokio::test]
async fn the_compatible_builder_sends_no_key_and_the_legacy_max_tokens() {
    let server = Server::start().await;
    server.set(Canned::new(200, "application/json", body("ollama.json")));
    let ollama = OpenAiProvider::compatible(format!("{}/v1", server.base()))
        .build()
        .unwrap();
    let res = ollama.oneshot(request("llama3.2")).await.unwrap();
    assert_eq!(res.model, "llama3.2");
    let seen = server.last();
    assert_eq!(seen.path, "/v1/chat/completions");
    assert!(!seen.headers.contains_key("authorization"));
    assert!(seen.body["max_tokens"].is_u64(), "{}", seen.body);
    assert!(seen.body.get("max_completion_tokens").is_none());

    // A server that wants a key gets it as a bearer token.
    let keyed = OpenAiProvider::compatible(format!("{}/v1", server.base()))
        .api_key(portcullis_providers::ApiKey::new("local-key").unwrap())
        .build()
        .unwrap();
    keyed.oneshot(request("llama3.2")).await.unwrap();
    assert_eq!(server.last().headers["authorization"], "Bearer local-key");
}
