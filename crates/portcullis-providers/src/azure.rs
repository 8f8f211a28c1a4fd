//! Azure OpenAI: the OpenAI Chat Completions body and answers, at a deployment's URL, with
//! Azure's auth and request id.
//!
//! - **URL**: `{endpoint}/openai/deployments/{deployment}/chat/completions?api-version={v}`
//!   ([`AzureOpenAi::new`]), or the v1 API, `{endpoint}/openai/v1/chat/completions`, where the
//!   body's `model` names the deployment ([`AzureOpenAi::v1`]).
//! - **Auth**: an `api-key: <key>` header by default, or `Authorization: Bearer <token>` for a
//!   Microsoft Entra ID token ([`AzureOpenAi::bearer`]). The key is read from
//!   `AZURE_OPENAI_API_KEY` unless given.
//! - **Rate limits**: Azure sends OpenAI's `x-ratelimit-remaining-{requests,tokens}` (and on
//!   some deployments the `-limit-` ones) and `retry-after-ms` / `retry-after` on a 429, read by
//!   the one header parser ([`RateLimitHints`](portcullis_core::RateLimitHints)), which takes
//!   the `-1` Azure sends for "no figure" and a limit of `0` as unknown, not as exhausted, and
//!   reads resets in plain seconds (see [`portcullis_core::hints`] for the sources).
//! - **Request id**: `apim-request-id`.
//! - **Answers**: OpenAI's parser, which skips Azure's extras: `prompt_filter_results`, a first
//!   stream chunk with no choices, and the asynchronous filter's annotation chunks, which have
//!   no `delta`. Output stopped by the filter ends with
//!   [`FinishReason::ContentFilter`](portcullis_core::FinishReason::ContentFilter).
//! - **Errors**: the OpenAI error envelope; a `content_filter` refusal (a 400, or the same error
//!   as a stream event) is a non-retryable `InvalidRequest` (the classification table's row for
//!   it), not a reason to fail over; `DeploymentNotFound` is `NotFound`.
//! - **Keys**: never sent over plain `http://` to a host other than loopback (the builder
//!   refuses to build).
//!
//! ```
//! use portcullis_providers::{ApiKey, AzureOpenAi, AzureOpenAiProvider};
//!
//! # fn main() -> Result<(), portcullis_core::LlmError> {
//! let eu = AzureOpenAiProvider::builder_for(AzureOpenAi::new("gpt-4o-eu"))
//!     .base_url("https://my-resource.openai.azure.com")
//!     .api_key(ApiKey::new("azure-key")?)
//!     .build()?;
//! assert_eq!(
//!     eu.url().to_string(),
//!     "https://my-resource.openai.azure.com/openai/deployments/gpt-4o-eu/chat/completions?api-version=2024-10-21"
//! );
//! # Ok(()) }
//! ```

use http::HeaderMap;
use http::header::AUTHORIZATION;
use portcullis_core::{ChatRequest, CompletionResult, LlmError};

use crate::wire::{ErrorBody, Wire};
use crate::{ApiKey, Builder, OpenAi, Provider, StreamingProvider};

/// The `api-version` sent by default: the latest GA data-plane version of the deployment API.
pub const DEFAULT_API_VERSION: &str = "2024-10-21";

/// An Azure OpenAI provider (complete calls).
pub type AzureOpenAiProvider = Provider<AzureOpenAi>;
/// An Azure OpenAI provider (streams).
pub type AzureOpenAiStream = StreamingProvider<AzureOpenAi>;

/// How the key is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Auth {
    /// `api-key: <key>`.
    ApiKey,
    /// `Authorization: Bearer <token>` (Microsoft Entra ID).
    Bearer,
}

/// The Azure OpenAI wire: a deployment, an API version, an auth scheme, and OpenAI's body and
/// parsers. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct AzureOpenAi {
    path: String,
    auth: Auth,
    openai: OpenAi,
}

impl AzureOpenAi {
    /// The deployment named `deployment`, with the [`DEFAULT_API_VERSION`] and `api-key` auth.
    pub fn new(deployment: &str) -> Self {
        AzureOpenAi {
            path: deployment_path(deployment, DEFAULT_API_VERSION),
            auth: Auth::ApiKey,
            openai: OpenAi::default(),
        }
    }

    /// The v1 API (`/openai/v1/chat/completions`): no `api-version`, the request's model names
    /// the deployment.
    pub fn v1() -> Self {
        AzureOpenAi {
            path: "/openai/v1/chat/completions".to_owned(),
            auth: Auth::ApiKey,
            openai: OpenAi::default(),
        }
    }

    /// Sends `api-version={version}` instead of the default (deployment URLs only).
    pub fn api_version(mut self, version: &str) -> Self {
        if let Some(deployment) = self.deployment() {
            self.path = deployment_path(&deployment, version);
        }
        self
    }

    /// Sends the key as `Authorization: Bearer` (an Entra ID token) instead of `api-key`.
    pub fn bearer(mut self) -> Self {
        self.auth = Auth::Bearer;
        self
    }

    /// The deployment of a deployment URL (`None` for the v1 API).
    pub fn deployment(&self) -> Option<String> {
        let rest = self.path.strip_prefix("/openai/deployments/")?;
        let name = rest.split('/').next()?;
        Some(percent_decode(name))
    }
}

impl AzureOpenAiProvider {
    /// A builder for `wire` (Azure has no default deployment, so no `builder()`).
    pub fn builder_for(wire: AzureOpenAi) -> Builder<AzureOpenAi> {
        Builder::new(wire)
    }
}

fn deployment_path(deployment: &str, version: &str) -> String {
    format!(
        "/openai/deployments/{}/chat/completions?api-version={}",
        percent_encode(deployment),
        percent_encode(version)
    )
}

/// Encodes everything but unreserved characters (a deployment name is user input).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Wire for AzureOpenAi {
    type Parser = <OpenAi as Wire>::Parser;

    fn name(&self) -> &'static str {
        "azure-openai"
    }

    /// A placeholder: every Azure resource has its own endpoint, so set
    /// [`Builder::base_url`].
    fn default_base_url(&self) -> &str {
        "https://YOUR-RESOURCE.openai.azure.com"
    }

    fn api_key_env(&self) -> &str {
        "AZURE_OPENAI_API_KEY"
    }

    fn path(&self) -> &str {
        &self.path
    }

    fn request_id_header(&self) -> &'static str {
        "apim-request-id"
    }

    fn headers(&self, key: Option<&ApiKey>, headers: &mut HeaderMap) {
        let Some(key) = key else { return };
        match self.auth {
            Auth::ApiKey => headers.insert("api-key", key.header("")),
            Auth::Bearer => headers.insert(AUTHORIZATION, key.header("Bearer ")),
        };
    }

    fn request_body(&self, req: &ChatRequest, stream: bool) -> Result<Vec<u8>, LlmError> {
        self.openai.request_body(req, stream)
    }

    fn parse_response(&self, req: &ChatRequest, body: &[u8]) -> Result<CompletionResult, LlmError> {
        self.openai.parse_response(req, body)
    }

    fn event_parser(&self, req: &ChatRequest) -> Self::Parser {
        self.openai.event_parser(req)
    }

    fn parse_error(&self, status: u16, body: &[u8]) -> Option<ErrorBody> {
        self.openai.parse_error(status, body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_versions_and_names() {
        let w = AzureOpenAi::new("gpt 4o/eu");
        assert_eq!(
            w.path(),
            "/openai/deployments/gpt%204o%2Feu/chat/completions?api-version=2024-10-21"
        );
        assert_eq!(w.deployment().as_deref(), Some("gpt 4o/eu"));
        let w = w.api_version("2025-04-01-preview");
        assert!(w.path().ends_with("?api-version=2025-04-01-preview"));
        assert_eq!(w.deployment().as_deref(), Some("gpt 4o/eu"));
        let v1 = AzureOpenAi::v1().api_version("ignored");
        assert_eq!(v1.path(), "/openai/v1/chat/completions");
        assert_eq!(v1.deployment(), None);
    }

    #[test]
    fn azure_errors_classify_by_the_one_table() {
        use portcullis_core::ErrorKind;
        let filtered = br#"{"error":{"code":"content_filter","message":"The response was filtered","param":"prompt","status":400}}"#;
        let e = AzureOpenAi::new("d").parse_error(400, filtered).unwrap();
        let kind = ErrorKind::from_wire(Some(400), e.error_type.as_deref(), e.code.as_deref());
        assert_eq!(kind, ErrorKind::InvalidRequest);
        let class = kind.classification();
        assert!(!class.retry && !class.breaker_failure);
        let missing = br#"{"error":{"code":"DeploymentNotFound","message":"The API deployment for this resource does not exist."}}"#;
        let e = AzureOpenAi::new("d").parse_error(404, missing).unwrap();
        let kind = ErrorKind::from_wire(Some(404), e.error_type.as_deref(), e.code.as_deref());
        assert_eq!(kind, ErrorKind::NotFound);
    }

    #[test]
    fn auth_headers() {
        let key = ApiKey::new("k-123").unwrap();
        let mut h = HeaderMap::new();
        AzureOpenAi::new("d").headers(Some(&key), &mut h);
        assert_eq!(h["api-key"], "k-123");
        assert!(h["api-key"].is_sensitive());
        assert!(!h.contains_key(AUTHORIZATION));
        let mut h = HeaderMap::new();
        AzureOpenAi::new("d").bearer().headers(Some(&key), &mut h);
        assert_eq!(h[AUTHORIZATION], "Bearer k-123");
        let mut h = HeaderMap::new();
        AzureOpenAi::new("d").headers(None, &mut h);
        assert!(h.is_empty());
    }

    #[test]
    fn a_key_never_goes_over_plain_http_to_another_host() {
        let key = ApiKey::new("k").unwrap();
        let plain = AzureOpenAiProvider::builder_for(AzureOpenAi::new("d"))
            .base_url("http://my-resource.openai.azure.com")
            .api_key(key.clone())
            .build();
        assert!(plain.is_err());
        let local = AzureOpenAiProvider::builder_for(AzureOpenAi::new("d"))
            .base_url("http://127.0.0.1:9")
            .api_key(key)
            .build();
        assert!(local.is_ok());
    }
}
