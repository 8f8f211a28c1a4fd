//! [`Builder`]: the settings of a [`Provider`] of any [`Wire`].

use std::sync::Arc;
use std::time::Duration;

use portcullis_core::LlmError;

use crate::Provider;
use crate::call::Endpoint;
use crate::key::ApiKey;
use crate::transport::{Transport, TransportConfig};
use crate::wire::Wire;

/// Builds a [`Provider`]. Defaults: the wire's [base URL](Wire::default_base_url), the key from
/// the wire's [environment variable](Wire::api_key_env) (e.g. `OPENAI_API_KEY`), the default
/// [`TransportConfig`].
///
/// Get one with [`Provider::builder`] (a wire with a [`Default`]) or [`Builder::new`].
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until `build`"]
pub struct Builder<W> {
    pub(crate) wire: W,
    base_url: String,
    key: KeySource,
    config: TransportConfig,
    transport: Option<Transport>,
}

/// Where a builder takes its key from.
#[derive(Debug, Clone)]
enum KeySource {
    /// The wire's environment variable (the default).
    Env,
    /// A key given explicitly.
    Key(ApiKey),
    /// No key (a local OpenAI-compatible server, the simulator without auth).
    None,
}

impl<W: Wire> Builder<W> {
    /// A builder for this wire, with the defaults.
    pub fn new(wire: W) -> Self {
        Builder {
            base_url: wire.default_base_url().to_owned(),
            wire,
            key: KeySource::Env,
            config: TransportConfig::default(),
            transport: None,
        }
    }

    /// Sets the base URL (default: the wire's). A key is never sent over plain `http://` to a
    /// host other than loopback: [`build`](Self::build) refuses it.
    pub fn base_url(mut self, url: impl Into<String>) -> Self {
        self.base_url = url.into();
        self
    }

    /// Uses this key instead of the wire's environment variable (the default).
    pub fn api_key(mut self, key: ApiKey) -> Self {
        self.key = KeySource::Key(key);
        self
    }

    /// Sends no key at all (a local server that needs none).
    pub fn without_api_key(mut self) -> Self {
        self.key = KeySource::None;
        self
    }

    /// Shares an existing transport (and its connection pool). It replaces the transport
    /// settings of this builder.
    pub fn transport(mut self, transport: Transport) -> Self {
        self.transport = Some(transport);
        self
    }

    /// Sets the transport settings (validated by [`build`](Self::build)).
    pub fn transport_config(mut self, config: TransportConfig) -> Self {
        self.config = config;
        self
    }

    /// Caps the response body (default 32 MiB); more is
    /// [`ResponseTooLarge`](portcullis_core::ErrorKind::ResponseTooLarge).
    pub fn max_response_bytes(mut self, n: usize) -> Self {
        self.config.max_response_bytes = n;
        self
    }

    /// Sets the TCP connect timeout (default 10 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.config.connect_timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        self
    }

    /// Replaces the wire, e.g. with one of other settings; the base URL stays as it is.
    pub fn wire(mut self, wire: W) -> Self {
        self.wire = wire;
        self
    }

    /// Builds the provider. Fails with a
    /// [`Configuration`](portcullis_core::ErrorKind::Configuration) error when the key is missing
    /// or invalid, the URL is invalid, a key would go over plain http to a non-loopback host,
    /// or a transport setting is invalid.
    pub fn build(self) -> Result<Provider<W>, LlmError> {
        let key = match self.key {
            KeySource::Env => Some(ApiKey::from_env(self.wire.api_key_env())?),
            KeySource::Key(k) => Some(k),
            KeySource::None => None,
        };
        let transport = match self.transport {
            Some(t) => t,
            None => Transport::new(self.config)?,
        };
        let endpoint = Endpoint::new(self.wire, transport, &self.base_url, key)?;
        Ok(Provider::from_endpoint(Arc::new(endpoint)))
    }
}
