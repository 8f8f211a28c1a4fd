//! Builder methods both providers share (generated into each builder by a macro, so that each
//! builder is a plain, documented type), and the settings behind them.

use http::HeaderMap;
use portcullis_core::LlmError;

use crate::call::Endpoint;
use crate::key::ApiKey;
use crate::transport::{Transport, TransportConfig};

/// Expands to the shared builder methods; the builder must have a `common: BuilderCommon` field.
macro_rules! common_builder_methods {
    ($env:literal) => {
        /// Sets the base URL (see the type's docs for the default). A key is never sent over
        /// plain `http://` to a host other than loopback: [`build`](Self::build) refuses it.
        pub fn base_url(mut self, url: impl Into<String>) -> Self {
            self.common.base_url = url.into();
            self
        }

        /// Uses this key instead of the
        #[doc = concat!("`", $env, "`")]
        /// environment variable (the default).
        pub fn api_key(mut self, key: $crate::ApiKey) -> Self {
            self.common.key = $crate::builder::KeySource::Key(key);
            self
        }

        /// Sends no key at all (a local server that needs none).
        pub fn without_api_key(mut self) -> Self {
            self.common.key = $crate::builder::KeySource::None;
            self
        }

        /// Shares an existing transport (and its connection pool). It replaces the transport
        /// settings of this builder.
        pub fn transport(mut self, transport: $crate::Transport) -> Self {
            self.common.transport = Some(transport);
            self
        }

        /// Sets the transport settings (validated by [`build`](Self::build)).
        pub fn transport_config(mut self, config: $crate::TransportConfig) -> Self {
            self.common.config = config;
            self
        }

        /// Caps the response body (default 32 MiB); more is
        #[doc = "[`ResponseTooLarge`](portcullis_core::ErrorKind::ResponseTooLarge)."]
        pub fn max_response_bytes(mut self, n: usize) -> Self {
            self.common.config.max_response_bytes = n;
            self
        }

        /// Sets the TCP connect timeout (default 10 s).
        pub fn connect_timeout(mut self, timeout: std::time::Duration) -> Self {
            self.common.config.connect_timeout_ms =
                u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
            self
        }
    };
}

pub(crate) use common_builder_methods;

/// Implements `Service<ChatRequest>` for a provider (complete calls) and its streaming face.
/// Both are always ready: the pooled client queues internally, and a provider never buffers.
macro_rules! provider_services {
    ($complete:ty, $stream:ty) => {
        impl tower_service::Service<portcullis_core::ChatRequest> for $complete {
            type Response = portcullis_core::CompletionResult;
            type Error = portcullis_core::LlmError;
            type Future = $crate::call::ResponseFuture<portcullis_core::CompletionResult>;

            fn poll_ready(
                &mut self,
                _cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<Result<(), portcullis_core::LlmError>> {
                std::task::Poll::Ready(Ok(()))
            }

            fn call(&mut self, req: portcullis_core::ChatRequest) -> Self::Future {
                self.complete(req)
            }
        }

        impl tower_service::Service<portcullis_core::ChatRequest> for $stream {
            type Response = portcullis_core::ChatStream;
            type Error = portcullis_core::LlmError;
            type Future = $crate::call::ResponseFuture<portcullis_core::ChatStream>;

            fn poll_ready(
                &mut self,
                _cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<Result<(), portcullis_core::LlmError>> {
                std::task::Poll::Ready(Ok(()))
            }

            fn call(&mut self, req: portcullis_core::ChatRequest) -> Self::Future {
                self.shared.stream(req)
            }
        }
    };
}

pub(crate) use provider_services;

/// Where a builder takes its key from.
#[derive(Debug, Clone)]
pub(crate) enum KeySource {
    /// The provider's environment variable (the default).
    Env,
    /// A key given explicitly.
    Key(ApiKey),
    /// No key (a local OpenAI-compatible server, the simulator without auth).
    None,
}

/// The settings both provider builders share.
#[derive(Debug, Clone)]
pub(crate) struct BuilderCommon {
    pub(crate) base_url: String,
    pub(crate) key: KeySource,
    pub(crate) config: TransportConfig,
    pub(crate) transport: Option<Transport>,
}

impl BuilderCommon {
    pub(crate) fn new(base_url: &str) -> Self {
        BuilderCommon {
            base_url: base_url.to_owned(),
            key: KeySource::Env,
            config: TransportConfig::default(),
            transport: None,
        }
    }

    /// Resolves the key and the transport, checks the URL, and builds the endpoint; `auth`
    /// turns the key into the provider's headers.
    pub(crate) fn endpoint(
        self,
        env_var: &str,
        path: &str,
        provider: &'static str,
        request_id_header: &'static str,
        auth: impl FnOnce(Option<&ApiKey>, &mut HeaderMap),
    ) -> Result<Endpoint, LlmError> {
        let key = match self.key {
            KeySource::Env => Some(ApiKey::from_env(env_var)?),
            KeySource::Key(k) => Some(k),
            KeySource::None => None,
        };
        let transport = match self.transport {
            Some(t) => t,
            None => Transport::new(self.config)?,
        };
        let mut headers = HeaderMap::new();
        auth(key.as_ref(), &mut headers);
        Endpoint::new(
            transport,
            &self.base_url,
            path,
            key,
            headers,
            provider,
            request_id_header,
        )
    }
}
