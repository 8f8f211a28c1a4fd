//! The key never shows (Debug, Display, errors, tracing output), never goes over plain http to a
//! remote host; bodies and events are capped.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use common::{CANARY, Canned, Server, fixture, request};
use futures_util::StreamExt;
use portcullis_core::ErrorKind;
use portcullis_providers::{AnthropicProvider, ApiKey, OpenAiProvider, TransportConfig};
use tower::ServiceExt;

#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);

impl Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn assert_clean(what: &str, text: &str) {
    assert!(!text.contains(CANARY), "the key leaked in {what}: {text}");
    assert!(
        !text.contains("CANARY"),
        "part of the key leaked in {what}: {text}"
    );
}

#[tokio::test]
async fn canary_never_appears() {
    let buf = Buf::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let key = ApiKey::new(CANARY).unwrap();
    assert_clean("ApiKey Debug/Display", &format!("{key} {key:?} {key:#?}"));
    let server = Server::start().await;
    let (openai, anthropic) = (server.openai(), server.anthropic());
    assert_clean(
        "provider Debug",
        &format!("{openai:?} {:?} {anthropic:?}", openai.streaming()),
    );

    // A 401 whose body echoes the key (OpenAI does echo a masked key), and mid-stream errors.
    let echo = format!(
        r#"{{"error":{{"message":"Incorrect API key provided: {CANARY}.","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}}}"#
    );
    let mut texts = Vec::new();
    server.set(Canned::json(401, &echo));
    let e = openai.clone().oneshot(request("m")).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Authentication);
    assert!(e.message().contains("[redacted]"), "{e}");
    texts.push(format!("{e} {e:?}"));
    server.set(Canned::new(401, "text/plain", format!("bad key {CANARY}")));
    let e = anthropic.clone().oneshot(request("c")).await.unwrap_err();
    texts.push(format!("{e} {e:?}"));
    server.set(Canned::new(
        200,
        "text/event-stream",
        format!(
            "data: {{\"error\":{{\"message\":\"key {CANARY}\",\"type\":\"server_error\"}}}}\n\n"
        ),
    ));
    let e = openai.streaming().oneshot(request("m")).await.unwrap_err();
    texts.push(format!("{e} {e:?}"));
    // Successful calls, complete and streaming, are traced too.
    server.set(fixture("openai/ai-gateway_chat_basic.json").canned());
    let r = openai.clone().oneshot(request("m")).await.unwrap();
    texts.push(format!("{r:?}"));
    server.set(fixture("anthropic/llm-anthropic_stream_text.sse").canned());
    let s = anthropic.streaming().oneshot(request("c")).await.unwrap();
    texts.push(format!("{s:?}"));
    let all: Vec<_> = StreamExt::collect::<Vec<_>>(s).await;
    texts.push(format!("{all:?}"));
    // Configuration errors never quote the key.
    let e = OpenAiProvider::builder()
        .base_url("http://example.com/v1")
        .api_key(key.clone())
        .build()
        .unwrap_err();
    texts.push(format!("{e} {e:?}"));
    for t in &texts {
        assert_clean("an error or a result", t);
    }
    let log = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    assert!(
        log.contains("openai") && log.contains("anthropic"),
        "tracing captured: {log}"
    );
    assert_clean("tracing output", &log);
    // It was really sent, as a header.
    assert_eq!(server.last().headers["x-api-key"], CANARY);
}

#[test]
fn plain_http_key_only_to_loopback() {
    let key = || ApiKey::new("sk-test").unwrap();
    for url in [
        "http://api.example.com/v1",
        "http://10.0.0.1:8080/v1",
        "http://localhost.evil.com",
    ] {
        let e = OpenAiProvider::builder()
            .base_url(url)
            .api_key(key())
            .build()
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Configuration, "{url}");
        let e = AnthropicProvider::builder()
            .base_url(url)
            .api_key(key())
            .build()
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Configuration, "{url}");
    }
    for url in [
        "http://127.0.0.1:1/v1",
        "http://localhost:8080",
        "http://[::1]:9/v1",
        "https://api.example.com/v1",
    ] {
        OpenAiProvider::builder()
            .base_url(url)
            .api_key(key())
            .build()
            .unwrap();
        AnthropicProvider::builder()
            .base_url(url)
            .api_key(key())
            .build()
            .unwrap();
    }
    // Without a key, plain http anywhere is allowed.
    OpenAiProvider::builder()
        .base_url("http://api.example.com/v1")
        .without_api_key()
        .build()
        .unwrap();
    for bad in ["ftp://x/v1", "not a url", "http:///v1"] {
        let e = OpenAiProvider::builder()
            .base_url(bad)
            .without_api_key()
            .build()
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Configuration, "{bad}");
    }
}

#[test]
fn keys_and_config_are_validated() {
    for bad in ["", "  ", "sk with space", "sk-\u{e9}"] {
        assert_eq!(
            ApiKey::new(bad).unwrap_err().kind(),
            ErrorKind::Configuration,
            "{bad:?}"
        );
    }
    let e = ApiKey::from_env("PORTCULLIS_TEST_SURELY_UNSET_VAR").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Configuration);
    let e = OpenAiProvider::builder()
        .without_api_key()
        .transport_config({
            let mut c = TransportConfig::default();
            c.connect_timeout_ms = 0;
            c
        })
        .build()
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Configuration);
    let e = AnthropicProvider::builder()
        .without_api_key()
        .max_response_bytes(0)
        .build()
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Configuration);
}

#[tokio::test]
async fn response_body_cap_is_enforced() {
    let server = Server::start().await;
    let capped = |n| {
        OpenAiProvider::builder()
            .base_url(format!("{}/v1", server.base()))
            .without_api_key()
            .max_response_bytes(n)
            .build()
            .unwrap()
    };
    let f = fixture("openai/ai-gateway_chat_basic.json");
    server.set(f.canned());
    let e = capped(100).oneshot(request("m")).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ResponseTooLarge);
    capped(f.body.len()).oneshot(request("m")).await.unwrap();

    // Streams: before the commit point the future fails; after it, the stream is interrupted.
    let f = fixture("openai/openai-python_stream_stop_with_usage_chunk.sse");
    server.set(f.canned());
    let e = capped(200)
        .streaming()
        .oneshot(request("m"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ResponseTooLarge);
    let mut s = capped(1000)
        .streaming()
        .oneshot(request("m"))
        .await
        .unwrap();
    let last = loop {
        match s.next().await.unwrap() {
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    assert_eq!(last.kind(), ErrorKind::StreamInterrupted);

    // An error body over the cap still gives the status's kind.
    server.set(Canned::json(503, &"x".repeat(1000)));
    let e = capped(100).oneshot(request("m")).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Overloaded);

    // One SSE event over its cap is a protocol error.
    let tiny_events = OpenAiProvider::builder()
        .base_url(format!("{}/v1", server.base()))
        .without_api_key()
        .transport_config({
            let mut c = TransportConfig::default();
            c.max_event_bytes = 64;
            c
        })
        .build()
        .unwrap();
    server.set(f.canned());
    let e = tiny_events
        .streaming()
        .oneshot(request("m"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Protocol);
}
