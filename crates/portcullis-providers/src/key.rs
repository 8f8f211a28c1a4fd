//! [`ApiKey`], a secret that never prints, and the rule that keeps it off plain http.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use http::{HeaderValue, Uri};
use portcullis_core::{ErrorKind, LlmError};

/// An API key. Its `Debug` and `Display` print `[redacted]`, it is sent as a sensitive header
/// (hidden from hyper's own logs), and provider error messages are scrubbed of it.
///
/// ```
/// use portcullis_providers::ApiKey;
/// let key = ApiKey::new("sk-canary-123").unwrap();
/// assert_eq!(format!("{key} {key:?}"), "[redacted] ApiKey([redacted])");
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(Arc<str>);

impl ApiKey {
    /// Wraps a key. It must be non-empty visible ASCII (a valid header value), or this returns a
    /// [`Configuration`](ErrorKind::Configuration) error (which never quotes the key).
    pub fn new(key: impl Into<String>) -> Result<Self, LlmError> {
        let key = key.into();
        let key = key.trim();
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(LlmError::new(
                ErrorKind::Configuration,
                "an API key must be non-empty visible ASCII",
            ));
        }
        Ok(ApiKey(Arc::from(key)))
    }

    /// Reads the key from an environment variable (e.g. `OPENAI_API_KEY`). A missing or invalid
    /// variable is a [`Configuration`](ErrorKind::Configuration) error.
    pub fn from_env(var: &str) -> Result<Self, LlmError> {
        match std::env::var(var) {
            Ok(v) => Self::new(v),
            Err(_) => Err(LlmError::new(
                ErrorKind::Configuration,
                format!("environment variable {var} is not set (or not unicode)"),
            )),
        }
    }

    /// The key itself. Handle with care: whatever you do with it is no longer redacted.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The header value `prefix + key` (e.g. `"Bearer "`), marked sensitive so that hyper and
    /// `http` never print it. For [`Wire::headers`](crate::Wire::headers).
    pub fn header(&self, prefix: &str) -> HeaderValue {
        let mut v = HeaderValue::try_from(format!("{prefix}{}", self.0))
            .expect("checked in ApiKey::new: visible ASCII");
        v.set_sensitive(true);
        v
    }

    /// Replaces every occurrence of the key in `text` with `[redacted]`.
    pub(crate) fn scrub<'a>(&self, text: &'a str) -> Cow<'a, str> {
        if text.contains(&*self.0) {
            Cow::Owned(text.replace(&*self.0, "[redacted]"))
        } else {
            Cow::Borrowed(text)
        }
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey([redacted])")
    }
}

impl fmt::Display for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Refuses to send a key over plain `http://` to a host other than loopback (`https://`, and
/// plain http without a key, pass).
pub(crate) fn check_plain_http(
    url: &Uri,
    key: Option<&ApiKey>,
    provider: &'static str,
) -> Result<(), LlmError> {
    let host = url.host().unwrap_or("");
    if url.scheme_str() == Some("http") && key.is_some() && !is_loopback(host) {
        return Err(LlmError::new(
            ErrorKind::Configuration,
            format!(
                "refusing to send an API key over plain http to {host}; use https \
                 (plain http is allowed only to loopback)"
            ),
        )
        .with_provider(provider));
    }
    Ok(())
}

fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for h in ["localhost", "127.0.0.1", "127.1.2.3", "[::1]", "::1"] {
            assert!(is_loopback(h), "{h}");
        }
        for h in ["example.com", "10.0.0.1", "localhost.evil.com", "[::2]"] {
            assert!(!is_loopback(h), "{h}");
        }
    }
}
