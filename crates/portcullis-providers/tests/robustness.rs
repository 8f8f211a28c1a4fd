//! proptest: arbitrary bodies, and every recording truncated at any offset, never panic and give
//! a typed error (or the complete result when nothing that matters was cut).

mod common;

use std::sync::OnceLock;

use bytes::Bytes;
use common::{Canned, Server, request};
use futures_util::StreamExt;
use portcullis_core::{CompletionResult, ErrorKind, LlmError};
use proptest::prelude::*;
use tower::ServiceExt;

struct Env {
    rt: tokio::runtime::Runtime,
    server: Server,
}

/// One runtime and server per test (`slot`): tests run in parallel and a server replays one
/// canned body at a time.
fn env(slot: usize) -> &'static Env {
    static ENV: [OnceLock<Env>; 3] = [const { OnceLock::new() }; 3];
    ENV[slot].get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let server = rt.block_on(Server::start());
        Env { rt, server }
    })
}

/// Streams `body` through the provider the recording belongs to and collects it.
async fn stream(server: &Server, name: &str, body: Bytes) -> Result<CompletionResult, LlmError> {
    server.set(Canned::new(200, "text/event-stream", body).chunk(13));
    let mut s = if name.starts_with("openai/") {
        server.openai().streaming().oneshot(request("m")).await?
    } else {
        server.anthropic().streaming().oneshot(request("c")).await?
    };
    // Read by hand (not `collect`) to check that an error is the last item.
    let mut out = String::new();
    let mut finish = None;
    let mut usage = None;
    let mut message = None;
    while let Some(item) = s.next().await {
        match item {
            Ok(c) => {
                out.push_str(&c.delta);
                finish = c.finish_reason.or(finish);
                usage = c.usage.or(usage);
                message = c.message.or(message);
            }
            Err(e) => {
                assert_eq!(
                    e.kind(),
                    ErrorKind::StreamInterrupted,
                    "after the commit point"
                );
                assert!(s.next().await.is_none(), "an error ends the stream");
                return Err(e);
            }
        }
    }
    let mut r = CompletionResult::new("x", s.meta().model.clone(), out);
    r.finish_reason = finish.expect("a complete stream has a finish reason");
    r.usage = usage.unwrap_or_default();
    // Tool calls, reasoning and raw blocks from the assembled message; its text must agree.
    let m = message.expect("the final chunk carries the assembled message");
    assert_eq!(m.content, r.content);
    r.tool_calls = m.tool_calls;
    r.reasoning = m.reasoning;
    r.other = m.other;
    Ok(r)
}

async fn complete(server: &Server, name: &str, body: Bytes) -> Result<CompletionResult, LlmError> {
    server.set(Canned::new(200, "application/json", body));
    if name.starts_with("openai/") {
        server.openai().oneshot(request("m")).await
    } else {
        server.anthropic().oneshot(request("c")).await
    }
}

fn recordings() -> &'static Vec<(String, Bytes)> {
    static R: OnceLock<Vec<(String, Bytes)>> = OnceLock::new();
    R.get_or_init(|| {
        let mut all = common::sse_recordings();
        for name in [
            "openai/ai-gateway_chat_basic.json",
            "openai/ai-gateway_tool_calls.json",
            "anthropic/pydantic-ai_message_nonstream.json",
        ] {
            all.push((name.to_owned(), common::fixture(name).body));
        }
        all
    })
}

async fn run(server: &Server, name: &str, body: Bytes) -> Result<CompletionResult, LlmError> {
    if name.ends_with(".sse") {
        stream(server, name, body).await
    } else {
        complete(server, name, body).await
    }
}

fn same(a: &CompletionResult, b: &CompletionResult) -> bool {
    (&a.content, &a.finish_reason, a.usage, &a.model)
        == (&b.content, &b.finish_reason, b.usage, &b.model)
        && (&a.tool_calls, &a.reasoning, &a.other) == (&b.tool_calls, &b.reasoning, &b.other)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(192))]

    #[test]
    fn truncated_recordings_give_a_typed_error_or_the_whole_result(
        which in any::<prop::sample::Index>(),
        cut in any::<prop::sample::Index>(),
    ) {
        let env = env(0);
        let (name, body) = &recordings()[which.index(recordings().len())];
        let at = cut.index(body.len() + 1);
        let full = env.rt.block_on(run(&env.server, name, body.clone())).expect("the whole recording");
        match env.rt.block_on(run(&env.server, name, body.slice(..at))) {
            Ok(r) => prop_assert!(same(&r, &full), "{name} cut at {at}: a partial result passed as complete"),
            Err(e) => prop_assert!(
                matches!(e.kind(), ErrorKind::Protocol | ErrorKind::StreamInterrupted),
                "{name} cut at {at}: {e:?}"
            ),
        }
    }

    #[test]
    fn arbitrary_bodies_give_a_typed_error(
        bytes in proptest::collection::vec(any::<u8>(), 0..512),
        which in any::<prop::sample::Index>(),
    ) {
        let env = env(1);
        let (name, _) = &recordings()[which.index(recordings().len())];
        for n in [name.as_str(), if name.starts_with("openai/") { "openai/x.json" } else { "anthropic/x.json" }] {
            let r = env.rt.block_on(run(&env.server, n, Bytes::from(bytes.clone())));
            if let Err(e) = r {
                prop_assert!(matches!(e.kind(), ErrorKind::Protocol | ErrorKind::StreamInterrupted), "{e:?}");
            }
        }
    }
}

#[test]
fn every_recording_whole_succeeds_and_an_empty_body_fails() {
    let env = env(2);
    for (name, body) in recordings() {
        env.rt
            .block_on(run(&env.server, name, body.clone()))
            .unwrap();
        let e = env
            .rt
            .block_on(run(&env.server, name, Bytes::new()))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Protocol, "{name}");
    }
}
