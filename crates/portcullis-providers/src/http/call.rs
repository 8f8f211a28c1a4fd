//! [`CallInfo`]: what the layers need from a raw request (its wire format, key and token cost),
//! read once from its JSON body.

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request};
use portcullis_core::{ChatMessage, CostOf, Role, TokenCost, estimator_for_model};
use serde::Deserialize;

/// The `max_tokens` charged when a chat request states none: the default of
/// [`CompletionOptions`](portcullis_core::CompletionOptions) (the seed's).
pub const DEFAULT_MAX_TOKENS: u64 = 1000;

/// The tokens charged for each image, audio or document part of a message: what OpenAI bills
/// for one 1024×1024 image in high detail (85 + 4 × 170). The usage the response reports
/// settles the difference.
pub const MEDIA_TOKENS: u64 = 765;

/// Which wire format a request was read as, from its method and path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Format {
    /// `POST …/chat/completions`: OpenAI Chat Completions (and Azure OpenAI's deployments,
    /// and OpenAI-compatible servers).
    OpenAiChat,
    /// `POST …/messages`: Anthropic Messages.
    AnthropicMessages,
    /// Any other endpoint (the Responses API, embeddings, files…).
    Other,
}

impl Format {
    /// The format of a request to `path` with `method`.
    pub fn of(method: &Method, path: &str) -> Format {
        if method != Method::POST {
            return Format::Other;
        }
        if path.ends_with("/chat/completions") {
            Format::OpenAiChat
        } else if path.ends_with("/messages") {
            Format::AnthropicMessages
        } else {
            Format::Other
        }
    }
}

/// What the layers read from one raw HTTP request, once: its [`Format`], the key its breaker
/// and bucket state live under, its model and its token cost.
///
/// | request | key | cost |
/// |---|---|---|
/// | chat (OpenAI or Anthropic) with a `model` | the model | prompt estimate ([`estimator_for_model`]) + [`MEDIA_TOKENS`] per image, audio or document part, + `max_completion_tokens` / `max_tokens` (else [`DEFAULT_MAX_TOKENS`]) |
/// | chat without a `model` (or an empty one, as Azure allows) | the path | as above |
/// | chat whose body is not JSON of that shape | the path | one request, no tokens: the upstream refuses it with a 400, which no layer retries |
/// | any other endpoint (Responses API, embeddings, files…) | the path | one request, no tokens; the usage its response reports is charged after it |
///
/// The prompt estimate counts the text of every message (and Anthropic's `system`): string
/// contents and `text` parts, tool results included. Tool definitions and tool-call arguments
/// are not counted; the usage the response reports settles the difference, as for every
/// estimate. The key is an `Arc<str>`; the layers' name (the provider) comes first in logs, so
/// keys read `openai:gpt-4o-mini`.
///
/// ```
/// use bytes::Bytes;
/// use portcullis_providers::http::{CallInfo, Format};
///
/// let body = r#"{"model":"gpt-4o-mini","max_completion_tokens":100,"stream":true,
///               "messages":[{"role":"user","content":"Hello there"}]}"#;
/// let req = http::Request::post("https://api.openai.com/v1/chat/completions")
///     .body(Bytes::from(body))
///     .unwrap();
/// let info = CallInfo::read(&req);
/// assert_eq!(info.format(), Format::OpenAiChat);
/// assert_eq!(info.key(), "gpt-4o-mini");
/// assert_eq!(info.cost().input, 9); // 3 per message + "user" + "Hello there" + 3 priming
/// assert_eq!(info.cost().output, 100);
/// assert!(info.is_stream());
///
/// // Not JSON: the path is the key, one request the cost. Never a panic.
/// let junk = http::Request::post("http://x/v1/chat/completions").body(Bytes::from("{oops")).unwrap();
/// let info = CallInfo::read(&junk);
/// assert_eq!((info.key(), info.cost().total()), ("/v1/chat/completions", 0));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallInfo {
    format: Format,
    key: Arc<str>,
    model: Option<Arc<str>>,
    cost: TokenCost,
    stream: bool,
}

impl CallInfo {
    /// Reads a request (see the table above).
    pub fn read<B: AsRef<[u8]>>(req: &Request<B>) -> CallInfo {
        let path = req.uri().path();
        let format = Format::of(req.method(), path);
        let mut info = CallInfo {
            format,
            key: Arc::from(path),
            model: None,
            cost: TokenCost::default(),
            stream: false,
        };
        if format == Format::Other {
            return info;
        }
        let Ok(body) = serde_json::from_slice::<ChatBody>(req.body().as_ref()) else {
            return info;
        };
        let model = body.model.filter(|m| !m.is_empty());
        let mut messages = Vec::with_capacity(body.messages.len() + 1);
        let mut media = 0;
        if let Some(system) = &body.system {
            messages.push(ChatMessage::system(system.text(&mut media)));
        }
        for m in &body.messages {
            let role = match m.role.as_deref() {
                Some("system" | "developer") => Role::System,
                Some("assistant") => Role::Assistant,
                _ => Role::User,
            };
            let text = m
                .content
                .as_ref()
                .map_or(String::new(), |c| c.text(&mut media));
            messages.push(ChatMessage::new(role, text));
        }
        let estimator = estimator_for_model(model.as_deref().unwrap_or(""));
        info.cost = TokenCost {
            input: estimator
                .count_messages(&messages)
                .saturating_add(media.saturating_mul(MEDIA_TOKENS)),
            output: body
                .max_completion_tokens
                .or(body.max_tokens)
                .unwrap_or(DEFAULT_MAX_TOKENS),
        };
        info.stream = body.stream.unwrap_or(false);
        if let Some(m) = model {
            info.key = Arc::from(m.as_str());
            info.model = Some(info.key.clone());
        }
        info
    }

    /// Reads `req` and keeps the result in its extensions, where [`CallInfo::of`] (and so the
    /// key and cost functions of the layers) finds it; a request that has one already keeps it.
    pub fn attach(mut req: Request<Bytes>) -> Request<Bytes> {
        if req.extensions().get::<CallInfo>().is_none() {
            let info = CallInfo::read(&req);
            req.extensions_mut().insert(info);
        }
        req
    }

    /// The `CallInfo` [`attach`](CallInfo::attach)ed to a request, if any.
    pub fn of<B>(req: &Request<B>) -> Option<&CallInfo> {
        req.extensions().get::<CallInfo>()
    }

    /// The wire format.
    pub fn format(&self) -> Format {
        self.format
    }

    /// The key of the request's breaker and bucket state.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The key, shared.
    pub fn key_arc(&self) -> &Arc<str> {
        &self.key
    }

    /// The model the body names, if any.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    /// The token cost a bucket reserves before the call.
    pub fn cost(&self) -> TokenCost {
        self.cost
    }

    /// Whether the body asks for a stream.
    pub fn is_stream(&self) -> bool {
        self.stream
    }
}

/// The token bucket's cost of a raw request: its [`CallInfo::cost`] (one request and no tokens
/// for a request without a `CallInfo` attached).
#[derive(Debug, Clone, Copy, Default)]
pub struct CallCost;

impl<B> CostOf<Request<B>> for CallCost {
    fn cost(&self, req: &Request<B>) -> TokenCost {
        CallInfo::of(req).map(CallInfo::cost).unwrap_or_default()
    }
}

/// The fields of a chat body the cost needs; everything else is skipped unread.
#[derive(Deserialize)]
struct ChatBody {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    messages: Vec<Message>,
    #[serde(default)]
    system: Option<Content>,
}

#[derive(Deserialize)]
struct Message {
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    content: Option<Content>,
}

/// A message's content: a string, or parts.
#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
    Other(serde::de::IgnoredAny),
}

#[derive(Deserialize)]
struct Part {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    text: Option<String>,
    /// A tool result's content (Anthropic).
    #[serde(default)]
    content: Option<Box<Content>>,
}

impl Content {
    /// The text of the content, its parts joined by newlines; media parts are counted in `media`.
    fn text(&self, media: &mut u64) -> String {
        match self {
            Content::Text(t) => t.clone(),
            Content::Other(_) => String::new(),
            Content::Parts(parts) => {
                let mut out = String::new();
                for p in parts {
                    let piece = match (&p.text, &p.content) {
                        (Some(t), _) => t.clone(),
                        (None, Some(c)) => c.text(media),
                        (None, None) => {
                            if let Some(
                                "image" | "image_url" | "input_image" | "input_audio" | "audio"
                                | "document" | "file" | "input_file",
                            ) = p.kind.as_deref()
                            {
                                *media += 1;
                            }
                            continue;
                        }
                    };
                    if !out.is_empty() {
                        out.push('\n');
                    }
                    out.push_str(&piece);
                }
                out
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(path: &str, body: &str) -> CallInfo {
        CallInfo::read(
            &Request::post(format!("http://h{path}"))
                .body(Bytes::from(body.to_owned()))
                .unwrap(),
        )
    }

    #[test]
    fn anthropic_bodies_count_system_parts_and_media() {
        let info = read(
            "/v1/messages",
            r#"{"model":"claude-haiku-4-5","max_tokens":50,"system":"Be brief.",
                "messages":[{"role":"user","content":[{"type":"text","text":"Hi"},
                {"type":"image","source":{"type":"base64","data":"AAAA"}},
                {"type":"tool_result","tool_use_id":"t","content":"42"}]}]}"#,
        );
        assert_eq!(info.format(), Format::AnthropicMessages);
        assert_eq!(info.key(), "claude-haiku-4-5");
        assert_eq!(info.cost().output, 50);
        assert!(info.cost().input > MEDIA_TOKENS, "{:?}", info.cost());
    }

    #[test]
    fn odd_bodies_get_the_default_key_and_cost() {
        // No model (Azure): keyed by the deployment's path, still costed.
        let info = read(
            "/openai/deployments/gpt4o/chat/completions",
            r#"{"messages":[{"role":"user","content":"Hi"}]}"#,
        );
        assert_eq!(info.key(), "/openai/deployments/gpt4o/chat/completions");
        assert_eq!(info.cost().output, DEFAULT_MAX_TOKENS);
        // Wrong types anywhere: the default.
        for body in [
            "",
            "null",
            "[1,2]",
            r#"{"model":7}"#,
            r#"{"model":"m","max_tokens":-1}"#,
            r#"{"model":"m","messages":{"a":1}}"#,
        ] {
            let info = read("/v1/chat/completions", body);
            assert_eq!(info.key(), "/v1/chat/completions", "{body}");
            assert_eq!(info.cost(), TokenCost::default(), "{body}");
        }
        // Unknown content shapes count as no text.
        let info = read(
            "/v1/chat/completions",
            r#"{"model":"m","messages":[{"role":"tool","content":{"x":1}},{"content":null}]}"#,
        );
        assert_eq!(info.key(), "m");
        // Other endpoints: the path, one request.
        let info = read("/v1/embeddings", r#"{"model":"text-embedding-3-small"}"#);
        assert_eq!(
            (info.format(), info.key()),
            (Format::Other, "/v1/embeddings")
        );
        assert_eq!(info.cost(), TokenCost::default());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bodies_never_panic(body in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let req = Request::post("http://h/v1/messages").body(Bytes::from(body)).unwrap();
            let _ = CallInfo::read(&req);
        }
    }
}
