//! The HTTP level: what the layers need to run over raw `http::Request<Bytes>` →
//! `http::Response<B>` calls of the OpenAI Chat Completions and Anthropic Messages wire formats,
//! with no [`ChatRequest`](portcullis_core::ChatRequest) in between. Every byte passes
//! untouched; no JSON is rebuilt.
//!
//! | piece | what it does |
//! |---|---|
//! | [`CallInfo`] | reads a request's format, key (its model) and token cost from the JSON body, once ([`CallInfo::attach`] keeps it in the request's extensions); [`CallCost`] is the bucket's cost function |
//! | [`Meter`] ([`MeterLayer`]) | the innermost service: classifies a 4xx / 5xx by the one table from its status, headers and bounded error body; wraps the body in a [`MeteredBody`] |
//! | [`Metered`] | the response as the layers see it ([`OnFinish`](portcullis_core::OnFinish)): the failure it stands for, its rate-limit headers, the usage its body reports when it is over |
//! | [`MeteredBody`] | passes the body through, reading its usage (JSON or SSE) and its end; dropped mid-stream, it tells the layers so, once |
//!
//! The facade composes these with the layers (`portcullis::http`); this module is also what a
//! pass-through gateway puts under them, over the [`Transport`](crate::Transport) (a tower
//! service of raw HTTP).
//!
//! It reuses the providers' one SSE decoder ([`SseDecoder`](crate::SseDecoder)) and error-body
//! parser ([`ErrorBody`](crate::ErrorBody)), and the one classification table
//! ([`ErrorKind::from_wire`](portcullis_core::ErrorKind::from_wire)).

mod body;
mod call;
mod meter;

pub use body::MeteredBody;
pub use call::{CallCost, CallInfo, DEFAULT_MAX_TOKENS, Format, MEDIA_TOKENS};
pub use meter::{DEFAULT_MAX_ERROR_BODY, Meter, MeterFuture, MeterLayer, Metered};

/// `now + d`, saturating: a duration too large for the clock is the far future, never a panic.
pub(crate) fn after(d: std::time::Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(d.min(portcullis_core::config::MAX_DURATION))
        .unwrap_or(now)
}
