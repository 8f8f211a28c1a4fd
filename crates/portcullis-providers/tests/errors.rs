//! Error bodies for each documented status map to the right `ErrorKind`; errors inside a 200
//! stream are typed before the commit point and `StreamInterrupted` after it.

mod common;

use std::time::Duration;

use common::{Canned, Server, fixture, request};
use futures_util::StreamExt;
use portcullis_core::{ANTHROPIC, Classify, ErrorKind, LlmError, OPENAI};
use tower::ServiceExt;

async fn openai_err(server: &Server, canned: Canned) -> LlmError {
    server.set(canned.clone());
    let e = server.openai().oneshot(request("m")).await.unwrap_err();
    // The streaming service maps a status the same way.
    let s = server
        .openai()
        .streaming()
        .oneshot(request("m"))
        .await
        .unwrap_err();
    assert_eq!((s.kind(), s.status()), (e.kind(), e.status()));
    assert_eq!(e.provider(), Some(OPENAI));
    e
}

async fn anthropic_err(server: &Server, canned: Canned) -> LlmError {
    server.set(canned);
    let e = server.anthropic().oneshot(request("c")).await.unwrap_err();
    let s = server
        .anthropic()
        .streaming()
        .oneshot(request("c"))
        .await
        .unwrap_err();
    assert_eq!((s.kind(), s.status()), (e.kind(), e.status()));
    assert_eq!(e.provider(), Some(ANTHROPIC));
    e
}

fn oa(status: u16, kind: &str, code: &str) -> Canned {
    Canned::json(
        status,
        &format!(r#"{{"error":{{"message":"m","type":"{kind}","param":null,"code":"{code}"}}}}"#),
    )
}

fn an(status: u16, kind: &str) -> Canned {
    Canned::json(
        status,
        &format!(
            r#"{{"type":"error","error":{{"type":"{kind}","message":"m"}},"request_id":"req_body_{status}"}}"#
        ),
    )
}

#[tokio::test]
async fn openai_statuses() {
    let server = Server::start().await;
    let quota = openai_err(&server, oa(429, "insufficient_quota", "insufficient_quota")).await;
    assert_eq!(quota.kind(), ErrorKind::QuotaExhausted);
    assert!(!quota.classify().retry);
    assert_eq!(quota.error_type(), Some("insufficient_quota"));

    let limited = openai_err(
        &server,
        oa(429, "tokens", "rate_limit_exceeded")
            .header("retry-after-ms", "1500")
            .header("x-ratelimit-remaining-tokens", "0")
            .header("x-request-id", "req_429"),
    )
    .await;
    assert_eq!(limited.kind(), ErrorKind::RateLimited);
    assert_eq!(limited.code(), Some("rate_limit_exceeded"));
    assert_eq!(limited.retry_after(), Some(Duration::from_millis(1500)));
    assert_eq!(limited.request_id(), Some("req_429"));
    assert_eq!(limited.status(), Some(429));
    assert!(limited.classify().rate_limited);

    let ctx = openai_err(
        &server,
        oa(400, "invalid_request_error", "context_length_exceeded"),
    )
    .await;
    assert_eq!(ctx.kind(), ErrorKind::ContextLengthExceeded);

    for (canned, kind) in [
        (
            oa(401, "invalid_request_error", "invalid_api_key"),
            ErrorKind::Authentication,
        ),
        (
            oa(
                403,
                "invalid_request_error",
                "unsupported_country_region_territory",
            ),
            ErrorKind::PermissionDenied,
        ),
        (oa(500, "server_error", "x"), ErrorKind::Server),
        (oa(503, "server_error", "x"), ErrorKind::Overloaded),
        (
            Canned::new(502, "text/html", "<html>Bad gateway</html>"),
            ErrorKind::Server,
        ),
        (
            Canned::new(429, "text/plain", "slow down"),
            ErrorKind::RateLimited,
        ),
        (Canned::json(404, "{}"), ErrorKind::NotFound),
    ] {
        let status = canned.status;
        let e = openai_err(&server, canned).await;
        assert_eq!(e.kind(), kind, "{status}");
        assert_eq!(e.status(), Some(status));
    }

    // Recorded errors.
    let f = fixture("openai/ai-gateway_error_404_model_not_found.json");
    let e = openai_err(&server, f.canned()).await;
    assert_eq!(
        (e.kind(), e.code()),
        (ErrorKind::NotFound, Some("model_not_found"))
    );
    assert_eq!(e.request_id(), f.request_id.as_deref());
    let f = fixture("openai/ai-gateway_error_400_unsupported_parameter.json");
    let e = openai_err(&server, f.canned()).await;
    assert_eq!(e.kind(), ErrorKind::InvalidRequest);
    assert!(e.message().contains("max_completion_tokens"), "{e}");
    assert!(e.message().contains("param: max_tokens"), "{e}");
}

#[tokio::test]
async fn x_should_retry_overrides() {
    let server = Server::start().await;
    let e = openai_err(
        &server,
        oa(500, "server_error", "x").header("x-should-retry", "false"),
    )
    .await;
    assert_eq!(e.kind(), ErrorKind::Server);
    assert!(!e.classify().retry, "x-should-retry: false wins");
    assert!(e.classify().breaker_failure);
    let e = anthropic_err(
        &server,
        an(409, "invalid_request_error").header("x-should-retry", "true"),
    )
    .await;
    assert!(e.classify().retry, "x-should-retry: true wins");
}

#[tokio::test]
async fn anthropic_statuses() {
    let server = Server::start().await;
    for (status, kind, want) in [
        (529, "overloaded_error", ErrorKind::Overloaded),
        (402, "billing_error", ErrorKind::QuotaExhausted),
        (429, "rate_limit_error", ErrorKind::RateLimited),
        (400, "invalid_request_error", ErrorKind::InvalidRequest),
        (401, "authentication_error", ErrorKind::Authentication),
        (403, "permission_error", ErrorKind::PermissionDenied),
        (404, "not_found_error", ErrorKind::NotFound),
        (413, "request_too_large", ErrorKind::RequestTooLarge),
        (500, "api_error", ErrorKind::Server),
        (504, "timeout_error", ErrorKind::Timeout),
    ] {
        let e = anthropic_err(&server, an(status, kind).header("retry-after", "7")).await;
        assert_eq!(e.kind(), want, "{status} {kind}");
        assert_eq!(e.error_type(), Some(kind));
        assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));
        // No header: the body's request_id.
        assert_eq!(e.request_id(), Some(format!("req_body_{status}").as_str()));
    }
    // The header wins when present.
    let e = anthropic_err(
        &server,
        an(529, "overloaded_error").header("request-id", "req_hdr"),
    )
    .await;
    assert_eq!(e.request_id(), Some("req_hdr"));

    let mut canned = fixture("anthropic/pydantic-ai_error_404_not_found.json").canned();
    canned.headers.retain(|(k, _)| k != "request-id"); // the recording has none
    let e = anthropic_err(&server, canned).await;
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert_eq!(e.request_id(), Some("req_011CVEA3SF7rnb3DuBZytqQa"));
    assert_eq!(e.message(), "model: claude-does-not-exist");
}

const OA_CONTENT: &str = "data: {\"model\":\"m\",\"choices\":[{\"delta\":{\"content\":\"Hi\"},\"finish_reason\":null}]}\n\n";
const OA_ERROR: &str =
    "data: {\"error\":{\"message\":\"boom\",\"type\":\"server_error\",\"code\":null}}\n\n";
const AN_START: &str = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"c\",\"usage\":{\"input_tokens\":3,\"output_tokens\":1}}}\n\n";
const AN_CONTENT: &str = "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n";
const AN_ERROR: &str = "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n";

fn sse(body: String) -> Canned {
    Canned::new(200, "text/event-stream", body)
        .header("x-request-id", "req_s")
        .header("request-id", "req_s")
}

#[tokio::test]
async fn openai_mid_stream_errors() {
    let server = Server::start().await;
    // Before content: typed by its type, the future fails (retry and fallback can act).
    server.set(sse(OA_ERROR.to_owned()));
    let e = server
        .openai()
        .streaming()
        .oneshot(request("m"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Server);
    assert_eq!(e.status(), None);
    assert_eq!(e.request_id(), Some("req_s"));
    server.set(sse(OA_ERROR.replace("server_error", "insufficient_quota")));
    let e = server
        .openai()
        .streaming()
        .oneshot(request("m"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::QuotaExhausted);

    // After content: the future succeeds; the stream then yields StreamInterrupted.
    server.set(sse(format!("{OA_CONTENT}{OA_ERROR}")));
    let mut s = server
        .openai()
        .streaming()
        .oneshot(request("m"))
        .await
        .unwrap();
    assert_eq!(s.next().await.unwrap().unwrap().delta, "Hi");
    let e = s.next().await.unwrap().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::StreamInterrupted);
    assert_eq!(e.error_type(), Some("server_error"));
    assert!(!e.classify().retry && e.classify().breaker_failure);
    assert!(s.next().await.is_none());

    // Truncated: no [DONE].
    server.set(sse(String::new()));
    let e = server
        .openai()
        .streaming()
        .oneshot(request("m"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Protocol);
    server.set(sse(OA_CONTENT.to_owned()));
    let mut s = server
        .openai()
        .streaming()
        .oneshot(request("m"))
        .await
        .unwrap();
    s.next().await.unwrap().unwrap();
    assert_eq!(
        s.next().await.unwrap().unwrap_err().kind(),
        ErrorKind::StreamInterrupted
    );
    // [DONE] without a finish_reason is a protocol error, not a default.
    server.set(sse("data: [DONE]\n\n".to_owned()));
    let e = server
        .openai()
        .streaming()
        .oneshot(request("m"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Protocol);
}

#[tokio::test]
async fn anthropic_mid_stream_errors() {
    let server = Server::start().await;
    server.set(sse(format!(
        "{AN_START}event: ping\ndata: {{\"type\":\"ping\"}}\n\n{AN_ERROR}"
    )));
    let e = server
        .anthropic()
        .streaming()
        .oneshot(request("c"))
        .await
        .unwrap_err();
    assert_eq!(
        e.kind(),
        ErrorKind::Overloaded,
        "overloaded after a 200 is Overloaded"
    );
    assert!(e.classify().retry);
    assert_eq!(e.request_id(), Some("req_s"));

    server.set(sse(format!(
        "{AN_START}{AN_CONTENT}event: brand_new\ndata: not json\n\n{AN_ERROR}"
    )));
    let mut s = server
        .anthropic()
        .streaming()
        .oneshot(request("c"))
        .await
        .unwrap();
    assert_eq!(s.meta().model, "c");
    assert_eq!(s.next().await.unwrap().unwrap().delta, "Hi");
    let e = s.next().await.unwrap().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::StreamInterrupted);
    assert_eq!(e.error_type(), Some("overloaded_error"));

    // Truncated before / after content; message_stop without stop_reason.
    server.set(sse(AN_START.to_owned()));
    let e = server
        .anthropic()
        .streaming()
        .oneshot(request("c"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Protocol);
    server.set(sse(format!("{AN_START}{AN_CONTENT}")));
    let mut s = server
        .anthropic()
        .streaming()
        .oneshot(request("c"))
        .await
        .unwrap();
    s.next().await.unwrap().unwrap();
    assert_eq!(
        s.next().await.unwrap().unwrap_err().kind(),
        ErrorKind::StreamInterrupted
    );
    server.set(sse(format!(
        "{AN_START}event: message_stop\ndata: {{\"type\":\"message_stop\"}}\n\n"
    )));
    let e = server
        .anthropic()
        .streaming()
        .oneshot(request("c"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Protocol);
}

#[tokio::test]
async fn streaming_future_resolves_at_the_first_content_chunk() {
    let server = Server::start().await;
    // The body never ends: the future must still resolve once content arrived.
    server.set(sse(OA_CONTENT.to_owned()).hang());
    let s = tokio::time::timeout(
        Duration::from_secs(10),
        server.openai().streaming().oneshot(request("m")),
    )
    .await
    .expect("resolved before the body ended")
    .unwrap();
    assert_eq!(s.meta().request_id.as_deref(), Some("req_s"));
    server.set(sse(format!("{AN_START}{AN_CONTENT}")).hang());
    let mut s = tokio::time::timeout(
        Duration::from_secs(10),
        server.anthropic().streaming().oneshot(request("c")),
    )
    .await
    .expect("resolved before the body ended")
    .unwrap();
    assert_eq!(s.next().await.unwrap().unwrap().delta, "Hi");
}

#[tokio::test]
async fn connect_errors_are_typed() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let p = portcullis_providers::OpenAiProvider::builder()
        .base_url(format!("http://{addr}/v1"))
        .without_api_key()
        .build()
        .unwrap();
    let e = p.clone().oneshot(request("m")).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Connect);
    assert_eq!(e.provider(), Some(OPENAI));
    let e = p.streaming().oneshot(request("m")).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Connect);
}

/// A raw TCP server that answers every connection with `answer` (then closes it).
async fn raw_server(answer: Vec<u8>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let _ = sock.read(&mut buf).await;
                let _ = sock.write_all(&answer).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    format!("http://{addr}/v1")
}

async fn raw_err(answer: Vec<u8>) -> LlmError {
    let p = portcullis_providers::OpenAiProvider::builder()
        .base_url(raw_server(answer).await)
        .without_api_key()
        .build()
        .unwrap();
    p.oneshot(request("m")).await.unwrap_err()
}

/// A response head that is too large, or not HTTP, is a protocol error that names its cause;
/// a connection closed with no answer says so. None of them is "sending the request failed".
#[tokio::test]
async fn bad_response_heads_name_their_cause() {
    let huge = format!(
        "HTTP/1.1 200 OK\r\nx-big: {}\r\ncontent-length: 0\r\n\r\n",
        "a".repeat(1 << 20)
    );
    let e = raw_err(huge.into_bytes()).await;
    assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
    assert!(e.message().contains("too large"), "{e}");

    let mut many = String::from("HTTP/1.1 200 OK\r\n");
    for i in 0..20_000 {
        many.push_str(&format!("x-h{i}: v\r\n"));
    }
    many.push_str("content-length: 0\r\n\r\n");
    let e = raw_err(many.into_bytes()).await;
    assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");

    let e = raw_err(b"NOT HTTP AT ALL\r\n\r\n".to_vec()).await;
    assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
    assert!(e.message().contains("could not be parsed"), "{e}");

    let e = raw_err(Vec::new()).await;
    assert_eq!(e.kind(), ErrorKind::Connect, "{e}");
    assert!(e.message().contains("closed before a response"), "{e}");
}

/// A 200 whose body is the provider's error envelope is that error, with the upstream's own
/// type and message, classified by the table.
#[tokio::test]
async fn an_error_envelope_in_a_200_is_the_error_it_names() {
    let server = Server::start().await;
    server.set(Canned::json(
        200,
        r#"{"error":{"message":"The server had an error while processing your request.","type":"server_error","param":null,"code":null}}"#,
    ));
    let e = server.openai().oneshot(request("m")).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Server, "{e}");
    assert_eq!(e.error_type(), Some("server_error"));
    assert!(e.message().contains("server had an error"), "{e}");
    assert!(e.classify().retry && e.classify().breaker_failure);
    server.set(Canned::json(
        200,
        r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
    ));
    let e = server.anthropic().oneshot(request("c")).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Overloaded, "{e}");
}
