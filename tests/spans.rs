//! The spans of a call through the `Stack`: one `gen_ai.chat` span with the GenAI attributes,
//! and a `gen_ai.attempt` child per attempt, read back by a capturing `tracing` layer.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use portcullis::{ChatMessage, ChatRequest, ProviderStack, Stack};
use portcullis_sim::{Family, FaultRule, Simulator};
use tower::ServiceExt;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

/// One span: its name, its parent's name, and every field recorded on it.
#[derive(Debug, Clone, Default)]
struct Seen {
    name: String,
    parent: Option<String>,
    fields: BTreeMap<String, String>,
}

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<(u64, Seen)>>>);

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(
            field.name().to_owned(),
            format!("{value:?}").trim_matches('"').to_owned(),
        );
    }
}

impl<S: tracing::Subscriber + for<'a> LookupSpan<'a>> tracing_subscriber::Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut seen = Seen {
            name: attrs.metadata().name().to_owned(),
            parent: ctx
                .span(id)
                .and_then(|s| s.parent())
                .map(|p| p.name().to_owned()),
            ..Seen::default()
        };
        attrs.record(&mut Fields(&mut seen.fields));
        self.0.lock().unwrap().push((id.into_u64(), seen));
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, _: Context<'_, S>) {
        let mut all = self.0.lock().unwrap();
        if let Some((_, seen)) = all.iter_mut().rev().find(|(i, _)| *i == id.into_u64()) {
            values.record(&mut Fields(&mut seen.fields));
        }
    }
}

#[test]
fn a_failed_over_call_is_one_chat_span_with_an_attempt_per_provider() {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::registry().with(capture.clone());
    tracing::subscriber::with_default(subscriber, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let sim = Simulator::builder()
                .fault(FaultRule::status(503).family(Family::Openai))
                .start()
                .await
                .unwrap();
            let retry = common::fast_retry(3);
            let (openai, anthropic) = (common::openai(&sim), common::anthropic(&sim));
            let stack = Stack::builder()
                .provider(ProviderStack::openai(openai).retry(retry.clone()))
                .provider(
                    ProviderStack::anthropic(anthropic)
                        .model("claude-haiku-4-5")
                        .retry(retry),
                )
                .build()
                .unwrap();
            let req = ChatRequest::new("gpt-4o-mini", vec![ChatMessage::user("Hi")]).max_tokens(20);
            stack.completions().oneshot(req).await.unwrap();
        });
    });
    let spans: Vec<Seen> = capture
        .0
        .lock()
        .unwrap()
        .iter()
        .map(|(_, s)| s.clone())
        .collect();
    let chats: Vec<&Seen> = spans.iter().filter(|s| s.name == "gen_ai.chat").collect();
    assert_eq!(chats.len(), 1, "{spans:#?}");
    let chat = &chats[0].fields;
    assert_eq!(chat["gen_ai.operation.name"], "chat");
    assert_eq!(chat["gen_ai.request.model"], "gpt-4o-mini");
    assert_eq!(chat["gen_ai.provider.name"], "anthropic");
    assert!(chat["gen_ai.response.model"].starts_with("claude-haiku-4-5"));
    assert!(chat["gen_ai.usage.input_tokens"].parse::<u64>().unwrap() > 0);
    assert!(chat["gen_ai.usage.output_tokens"].parse::<u64>().unwrap() > 0);
    assert!(!chat.contains_key("error.type"));

    let attempts: Vec<&Seen> = spans
        .iter()
        .filter(|s| s.name == "gen_ai.attempt")
        .collect();
    assert_eq!(attempts.len(), 2, "{attempts:#?}");
    assert!(
        attempts
            .iter()
            .all(|a| a.parent.as_deref() == Some("gen_ai.chat"))
    );
    assert_eq!(attempts[0].fields["portcullis.attempt"], "1");
    assert_eq!(attempts[0].fields["portcullis.entry"], "openai");
    assert_eq!(attempts[0].fields["error.type"], "unavailable");
    assert_eq!(attempts[0].fields["portcullis.breaker.state"], "closed");
    assert_eq!(attempts[0].fields["portcullis.bucket.wait_ms"], "0");
    assert_eq!(attempts[1].fields["portcullis.attempt"], "2");
    assert_eq!(attempts[1].fields["portcullis.entry"], "anthropic");
    assert_eq!(attempts[1].fields["portcullis.breaker.state"], "closed");
}
