//! Rate-limit hints parsed from response headers, in one place.
//!
//! - `retry-after-ms` (float milliseconds), then `retry-after` as float seconds, then as an
//!   HTTP date;
//! - `x-should-retry: true|false`;
//! - OpenAI `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`, resets as Go durations
//!   (`6m0s`, `120ms`, `1h2m3s`, `0s`) or, as Azure OpenAI sends them, plain seconds (`55`);
//! - Anthropic `anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{limit,remaining,reset}`,
//!   resets as RFC 3339 times.
//!
//! A malformed value is skipped with a `debug` event, never a panic and never a default.
//!
//! **Azure OpenAI's sentinels.** Azure sends the OpenAI names, but not always with OpenAI's
//! meaning, and a sentinel read as a figure would pause a healthy deployment:
//! - `x-ratelimit-limit-tokens: -1`, `x-ratelimit-remaining-tokens: -1`,
//!   `x-ratelimit-reset-tokens: 0` on deployments that do not report a figure (reported in
//!   <https://github.com/openai/openai-dotnet/issues/838> and on Microsoft Q&A, "Azure OpenAI
//!   Responses API x-ratelimit headers values -1, 0", Nov 2025);
//! - a limit of `0` on deployments that are not metered that way (provisioned throughput);
//! - `x-ratelimit-reset-tokens` as plain seconds, and on a 429 without `retry-after` the
//!   hyphenated `x-rate-limit-reset-tokens: 55`
//!   (<https://github.com/openai/openai-python/issues/937>).
//!
//! So a negative count is unknown, not malformed; a limit that is negative or `0` makes that
//! whole limit unknown (its remaining count and reset too), never "exhausted"; and a plain
//! number of seconds is a reset.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderMap;

/// What the server said about one limit (requests, tokens, input or output tokens).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitHint {
    /// The limit per window.
    pub limit: Option<u64>,
    /// What is left in the current window.
    pub remaining: Option<u64>,
    /// How long until the window is full again, from when the headers were read.
    pub reset: Option<Duration>,
}

impl LimitHint {
    /// Whether any field is known.
    pub fn is_known(&self) -> bool {
        self.limit.is_some() || self.remaining.is_some() || self.reset.is_some()
    }
}

/// Everything a response's headers say about rate limits and retrying.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RateLimitHints {
    /// How long to wait before retrying (`retry-after-ms`, `retry-after`).
    pub retry_after: Option<Duration>,
    /// The server's `x-should-retry` override.
    pub should_retry: Option<bool>,
    /// Requests per minute.
    pub requests: LimitHint,
    /// Tokens per minute (OpenAI; Anthropic's combined figure).
    pub tokens: LimitHint,
    /// Input tokens per minute (Anthropic).
    pub input_tokens: LimitHint,
    /// Output tokens per minute (Anthropic).
    pub output_tokens: LimitHint,
}

impl RateLimitHints {
    /// Parses the headers, taking "now" from the system clock (for HTTP-date and RFC 3339 values).
    pub fn from_headers(headers: &HeaderMap) -> Self {
        Self::from_headers_at(headers, SystemTime::now())
    }

    /// Parses the headers against the given "now".
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// use http::HeaderMap;
    /// use portcullis_core::RateLimitHints;
    ///
    /// let mut h = HeaderMap::new();
    /// h.insert("retry-after", "1.5".parse().unwrap());
    /// h.insert("x-ratelimit-remaining-tokens", "9000".parse().unwrap());
    /// h.insert("x-ratelimit-reset-tokens", "6m0s".parse().unwrap());
    /// h.insert("x-ratelimit-reset-requests", "not a duration".parse().unwrap());
    /// let hints = RateLimitHints::from_headers_at(&h, SystemTime::now());
    /// assert_eq!(hints.retry_after, Some(Duration::from_millis(1500)));
    /// assert_eq!(hints.tokens.remaining, Some(9000));
    /// assert_eq!(hints.tokens.reset, Some(Duration::from_secs(360)));
    /// assert_eq!(hints.requests.reset, None); // malformed: skipped
    /// ```
    pub fn from_headers_at(headers: &HeaderMap, now: SystemTime) -> Self {
        let found = Found::scan(headers);
        let mut h = RateLimitHints {
            retry_after: retry_after(&found, now),
            should_retry: found.should_retry.and_then(|v| match v {
                "true" => Some(true),
                "false" => Some(false),
                other => malformed("x-should-retry", other),
            }),
            ..Default::default()
        };
        for (slot, ([limit, remaining, reset], names)) in
            found.openai.iter().zip(&OPENAI_NAMES).enumerate()
        {
            let hint = LimitHint::stated(
                count(*limit, names[0]),
                count(*remaining, names[1]),
                reset.and_then(|v| {
                    parse_go_duration(v)
                        .or_else(|| plain_secs(v))
                        .or_else(|| malformed(names[2], v))
                }),
            );
            if hint.is_known() {
                *h.slot(slot) = hint;
            }
        }
        for (slot, ([limit, remaining, reset], names)) in
            found.anthropic.iter().zip(&ANTHROPIC_NAMES).enumerate()
        {
            let hint = LimitHint::stated(
                count(*limit, names[0]),
                count(*remaining, names[1]),
                reset.and_then(|v| match parse_rfc3339(v) {
                    Some(at) => Some(at.duration_since(now).unwrap_or(Duration::ZERO)),
                    None => malformed(names[2], v),
                }),
            );
            if hint.is_known() {
                *h.slot(slot) = hint;
            }
        }
        h
    }

    fn slot(&mut self, i: usize) -> &mut LimitHint {
        match i {
            0 => &mut self.requests,
            1 => &mut self.tokens,
            2 => &mut self.input_tokens,
            _ => &mut self.output_tokens,
        }
    }

    /// Whether the headers said anything at all.
    pub fn is_empty(&self) -> bool {
        *self == RateLimitHints::default()
    }
}

/// OpenAI's limit, remaining and reset headers: requests, then tokens.
const OPENAI_NAMES: [[&str; 3]; 2] = [
    [
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
    ],
    [
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-tokens",
    ],
];

/// Anthropic's: requests, tokens, input tokens, output tokens.
const ANTHROPIC_NAMES: [[&str; 3]; 4] = [
    [
        "anthropic-ratelimit-requests-limit",
        "anthropic-ratelimit-requests-remaining",
        "anthropic-ratelimit-requests-reset",
    ],
    [
        "anthropic-ratelimit-tokens-limit",
        "anthropic-ratelimit-tokens-remaining",
        "anthropic-ratelimit-tokens-reset",
    ],
    [
        "anthropic-ratelimit-input-tokens-limit",
        "anthropic-ratelimit-input-tokens-remaining",
        "anthropic-ratelimit-input-tokens-reset",
    ],
    [
        "anthropic-ratelimit-output-tokens-limit",
        "anthropic-ratelimit-output-tokens-remaining",
        "anthropic-ratelimit-output-tokens-reset",
    ],
];

/// The values of every header read here, found in one pass over the map (a response has a
/// dozen headers; looking each of these eighteen names up would hash every one of them). A
/// repeated header counts once, its first value; a value that is not ASCII is skipped (and
/// logged).
#[derive(Default)]
struct Found<'a> {
    /// [`OPENAI_NAMES`]' values.
    openai: [[Option<&'a str>; 3]; 2],
    /// [`ANTHROPIC_NAMES`]' values.
    anthropic: [[Option<&'a str>; 3]; 4],
    retry_after_ms: Option<&'a str>,
    retry_after: Option<&'a str>,
    should_retry: Option<&'a str>,
    /// Azure OpenAI's `x-rate-limit-reset-tokens` (plain seconds, on a 429).
    azure_reset_tokens: Option<&'a str>,
}

impl<'a> Found<'a> {
    fn scan(headers: &'a HeaderMap) -> Self {
        let mut f = Found::default();
        for (name, value) in headers {
            let n = name.as_str();
            let slot = if let Some(rest) = n.strip_prefix("x-ratelimit-") {
                let Some((kind, field)) = rest.split_once('-') else {
                    continue;
                };
                let (Some(k), Some(i)) = (
                    kind_index(kind),
                    ["requests", "tokens"].iter().position(|x| *x == field),
                ) else {
                    continue;
                };
                &mut f.openai[i][k]
            } else if let Some(rest) = n.strip_prefix("anthropic-ratelimit-") {
                let Some((field, kind)) = rest.rsplit_once('-') else {
                    continue;
                };
                let fields = ["requests", "tokens", "input-tokens", "output-tokens"];
                let (Some(k), Some(i)) =
                    (kind_index(kind), fields.iter().position(|x| *x == field))
                else {
                    continue;
                };
                &mut f.anthropic[i][k]
            } else {
                match n {
                    "retry-after-ms" => &mut f.retry_after_ms,
                    "retry-after" => &mut f.retry_after,
                    "x-should-retry" => &mut f.should_retry,
                    "x-rate-limit-reset-tokens" => &mut f.azure_reset_tokens,
                    _ => continue,
                }
            };
            if slot.is_none() {
                *slot = match value.to_str() {
                    Ok(v) => Some(v.trim()),
                    Err(_) => malformed(n, "<non-ascii>"),
                };
            }
        }
        f
    }
}

/// `limit`, `remaining`, `reset` (OpenAI writes it first, Anthropic last).
fn kind_index(kind: &str) -> Option<usize> {
    match kind {
        "limit" => Some(0),
        "remaining" => Some(1),
        "reset" => Some(2),
        _ => None,
    }
}

/// A count header (a limit or a remaining count) as the server stated it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Count {
    /// Absent or malformed.
    Absent,
    /// Negative: Azure OpenAI's "no figure" (`-1`).
    Sentinel,
    /// A figure.
    Is(u64),
}

fn count(value: Option<&str>, name: &str) -> Count {
    let Some(v) = value else {
        return Count::Absent;
    };
    match v.parse::<u64>() {
        Ok(n) => Count::Is(n),
        Err(_) if v.parse::<i64>().is_ok_and(|n| n < 0) => Count::Sentinel,
        Err(_) => {
            malformed::<()>(name, v);
            Count::Absent
        }
    }
}

impl LimitHint {
    /// One limit from its three headers. A limit that is a sentinel (negative) or `0` says the
    /// server has no figure for this limit (Azure OpenAI; see the module docs): then nothing
    /// of it is known, its remaining count and reset included, so nothing is learned or
    /// paused by it. A negative remaining count alone is unknown too.
    fn stated(limit: Count, remaining: Count, reset: Option<Duration>) -> Self {
        match limit {
            Count::Sentinel | Count::Is(0) => LimitHint::default(),
            _ => {
                let known = |c| match c {
                    Count::Is(n) => Some(n),
                    _ => None,
                };
                LimitHint {
                    limit: known(limit),
                    remaining: known(remaining),
                    reset,
                }
            }
        }
    }
}

/// Plain non-negative seconds (`55`, `1.5`), as Azure OpenAI sends some resets.
fn plain_secs(v: &str) -> Option<Duration> {
    match v.parse::<f64>() {
        Ok(s) if s.is_finite() && s >= 0.0 => Some(secs_f64(s)),
        _ => None,
    }
}

fn malformed<T>(name: &str, value: &str) -> Option<T> {
    tracing::debug!(
        header = name,
        value,
        "ignoring a malformed rate-limit header"
    );
    None
}

fn retry_after(found: &Found<'_>, now: SystemTime) -> Option<Duration> {
    if let Some(v) = found.retry_after_ms {
        match v.parse::<f64>() {
            Ok(ms) if ms.is_finite() && ms >= 0.0 => return Some(secs_f64(ms / 1000.0)),
            _ => {
                malformed::<()>("retry-after-ms", v);
            }
        }
    }
    let Some(v) = found.retry_after else {
        // Azure OpenAI's 429 without `retry-after` (openai-python#937): plain seconds.
        let v = found.azure_reset_tokens?;
        return plain_secs(v).or_else(|| malformed("x-rate-limit-reset-tokens", v));
    };
    if let Ok(s) = v.parse::<f64>() {
        if s.is_finite() && s >= 0.0 {
            return Some(secs_f64(s));
        }
        return malformed("retry-after", v);
    }
    match httpdate::parse_http_date(v) {
        // A date far ahead (year 9999) is a huge wait, capped like a number: never ignored.
        Ok(at) => Some(
            at.duration_since(now)
                .unwrap_or(Duration::ZERO)
                .min(crate::config::MAX_DURATION),
        ),
        Err(_) => malformed("retry-after", v),
    }
}

/// Seconds to a duration, saturating at about a year (a header cannot ask for more).
fn secs_f64(s: f64) -> Duration {
    Duration::from_secs_f64(s.min(365.0 * 24.0 * 3600.0))
}

/// Parses a Go duration string (`6m0s`, `120ms`, `1h2m3s`, `1.5s`, `0s`, `0`).
///
/// ```
/// use std::time::Duration;
/// use portcullis_core::hints::parse_go_duration;
/// assert_eq!(parse_go_duration("1h2m3s"), Some(Duration::from_secs(3723)));
/// assert_eq!(parse_go_duration("120ms"), Some(Duration::from_millis(120)));
/// assert_eq!(parse_go_duration("6m0s"), Some(Duration::from_secs(360)));
/// assert_eq!(parse_go_duration("1.5s"), Some(Duration::from_millis(1500)));
/// assert_eq!(parse_go_duration("soon"), None);
/// ```
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = s;
    let mut total = 0f64;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return None;
        }
        let n: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" | "μs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += n * scale;
    }
    if !total.is_finite() || total > 365.0 * 24.0 * 3600.0 {
        return None;
    }
    Some(Duration::from_secs_f64(total))
}

/// Parses an RFC 3339 timestamp (`2026-02-17T23:44:11Z`, with optional fraction and offset).
///
/// ```
/// use std::time::{Duration, UNIX_EPOCH};
/// use portcullis_core::hints::parse_rfc3339;
/// let t = parse_rfc3339("1970-01-02T00:00:01.5Z").unwrap();
/// assert_eq!(t.duration_since(UNIX_EPOCH).unwrap(), Duration::from_millis(86_401_500));
/// assert_eq!(parse_rfc3339("2026-02-17T23:44:11+01:00"), parse_rfc3339("2026-02-17T22:44:11Z"));
/// assert!(parse_rfc3339("yesterday").is_none());
/// ```
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        if !t.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        t.parse().ok()
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, min, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || min > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut nanos = 0u64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let frac = &s[start..i];
        if frac.is_empty() {
            return None;
        }
        let digits = &frac[..frac.len().min(9)];
        nanos = digits.parse::<u64>().ok()? * 10u64.pow(9 - digits.len() as u32);
    }
    let offset_secs = match s.get(i..)? {
        "Z" | "z" => 0,
        tz if tz.len() == 6 && (tz.starts_with('+') || tz.starts_with('-')) && &tz[3..4] == ":" => {
            let h = num(i + 1..i + 3)?;
            let m = num(i + 4..i + 6)?;
            let o = h * 3600 + m * 60;
            if tz.starts_with('-') { -o } else { o }
        }
        _ => return None,
    };
    // Days from civil (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3600 + min * 60 + sec - offset_secs;
    if secs < 0 {
        return None;
    }
    Some(UNIX_EPOCH + Duration::from_secs(secs as u64) + Duration::from_nanos(nanos))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn a_far_retry_after_date_is_a_capped_wait() {
        let mut h = HeaderMap::new();
        h.insert(
            "retry-after",
            "Fri, 31 Dec 9999 23:59:59 GMT".parse().unwrap(),
        );
        assert_eq!(
            RateLimitHints::from_headers_at(&h, SystemTime::UNIX_EPOCH).retry_after,
            Some(crate::config::MAX_DURATION)
        );
        let mut h = HeaderMap::new();
        h.insert("retry-after-ms", "1e15".parse().unwrap());
        assert_eq!(
            RateLimitHints::from_headers_at(&h, SystemTime::UNIX_EPOCH).retry_after,
            Some(crate::config::MAX_DURATION)
        );
    }

    #[test]
    fn one_pass_takes_the_first_of_a_repeated_header_and_skips_lookalikes() {
        let mut h = HeaderMap::new();
        h.append("x-ratelimit-remaining-tokens", "900".parse().unwrap());
        h.append("x-ratelimit-remaining-tokens", "5".parse().unwrap());
        h.insert("x-ratelimit-limit-tokens", "1000".parse().unwrap());
        h.insert("x-ratelimit-remaining-widgets", "1".parse().unwrap());
        h.insert("x-ratelimit-bogus", "1".parse().unwrap());
        h.insert("anthropic-ratelimit-tokens", "1".parse().unwrap());
        h.insert("anthropic-ratelimit-widgets-limit", "1".parse().unwrap());
        let hints = RateLimitHints::from_headers(&h);
        assert_eq!(hints.tokens.limit, Some(1000));
        assert_eq!(hints.tokens.remaining, Some(900));
        assert_eq!(hints.requests, LimitHint::default());
        assert_eq!(hints.input_tokens, LimitHint::default());
    }

    #[test]
    fn retry_after_precedence() {
        let now = SystemTime::now();
        let h = headers(&[("retry-after-ms", "250"), ("retry-after", "3")]);
        assert_eq!(
            RateLimitHints::from_headers_at(&h, now).retry_after,
            Some(Duration::from_millis(250))
        );
        let h = headers(&[("retry-after-ms", "garbage"), ("retry-after", "3")]);
        assert_eq!(
            RateLimitHints::from_headers_at(&h, now).retry_after,
            Some(Duration::from_secs(3))
        );
        let at = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let h = headers(&[(
            "retry-after",
            &httpdate::fmt_http_date(at + Duration::from_secs(7)),
        )]);
        assert_eq!(
            RateLimitHints::from_headers_at(&h, at).retry_after,
            Some(Duration::from_secs(7))
        );
        let h = headers(&[("retry-after", "-1")]);
        assert_eq!(RateLimitHints::from_headers_at(&h, now).retry_after, None);
        let h = headers(&[("retry-after", "NaN")]);
        assert_eq!(RateLimitHints::from_headers_at(&h, now).retry_after, None);
    }

    #[test]
    fn should_retry() {
        let now = SystemTime::now();
        assert_eq!(
            RateLimitHints::from_headers_at(&headers(&[("x-should-retry", "false")]), now)
                .should_retry,
            Some(false)
        );
        assert_eq!(
            RateLimitHints::from_headers_at(&headers(&[("x-should-retry", "true")]), now)
                .should_retry,
            Some(true)
        );
        assert_eq!(
            RateLimitHints::from_headers_at(&headers(&[("x-should-retry", "maybe")]), now)
                .should_retry,
            None
        );
    }

    #[test]
    fn openai_headers() {
        let h = headers(&[
            ("x-ratelimit-limit-requests", "500"),
            ("x-ratelimit-remaining-requests", "499"),
            ("x-ratelimit-reset-requests", "120ms"),
            ("x-ratelimit-limit-tokens", "200000"),
            ("x-ratelimit-remaining-tokens", "199000"),
            ("x-ratelimit-reset-tokens", "1h2m3s"),
        ]);
        let r = RateLimitHints::from_headers_at(&h, SystemTime::now());
        assert_eq!(
            r.requests,
            LimitHint {
                limit: Some(500),
                remaining: Some(499),
                reset: Some(Duration::from_millis(120))
            }
        );
        assert_eq!(r.tokens.reset, Some(Duration::from_secs(3723)));
    }

    #[test]
    fn anthropic_headers_from_fixture() {
        let now = parse_rfc3339("2026-02-17T23:44:10Z").unwrap();
        let h = headers(&[
            ("anthropic-ratelimit-input-tokens-limit", "2000000"),
            ("anthropic-ratelimit-input-tokens-remaining", "2000000"),
            (
                "anthropic-ratelimit-input-tokens-reset",
                "2026-02-17T23:44:11Z",
            ),
            ("anthropic-ratelimit-requests-remaining", "19999"),
            (
                "anthropic-ratelimit-output-tokens-reset",
                "2026-02-17T23:44:09Z",
            ),
        ]);
        let r = RateLimitHints::from_headers_at(&h, now);
        assert_eq!(r.input_tokens.reset, Some(Duration::from_secs(1)));
        assert_eq!(r.input_tokens.limit, Some(2_000_000));
        assert_eq!(r.requests.remaining, Some(19_999));
        assert_eq!(
            r.output_tokens.reset,
            Some(Duration::ZERO),
            "past resets clamp to zero"
        );
    }

    #[test]
    fn azure_sentinels_are_unknown_not_exhausted() {
        let h = headers(&[
            ("x-ratelimit-remaining-requests", "-1"),
            ("x-ratelimit-remaining-tokens", "-1"),
        ]);
        let r = RateLimitHints::from_headers(&h);
        assert!(r.is_empty(), "{r:?}");
        let h = headers(&[
            ("x-ratelimit-limit-tokens", "0"),
            ("x-ratelimit-remaining-tokens", "0"),
            ("x-ratelimit-limit-requests", "60"),
            ("x-ratelimit-remaining-requests", "0"),
        ]);
        let r = RateLimitHints::from_headers(&h);
        assert_eq!(r.tokens, LimitHint::default());
        // A real limit with nothing left is exhausted.
        assert_eq!(r.requests.limit, Some(60));
        assert_eq!(r.requests.remaining, Some(0));
        // Azure's 429: `retry-after-ms` wins.
        let h = headers(&[("retry-after-ms", "1500"), ("retry-after", "2")]);
        let r = RateLimitHints::from_headers(&h);
        assert_eq!(r.retry_after, Some(Duration::from_millis(1500)));
    }

    #[test]
    fn azure_no_figure_triplet_says_nothing() {
        // openai-dotnet#838: what some Azure deployments send on every answer.
        let h = headers(&[
            ("x-ratelimit-limit-tokens", "-1"),
            ("x-ratelimit-remaining-tokens", "-1"),
            ("x-ratelimit-reset-tokens", "0"),
            ("x-ratelimit-remaining-requests", "79"),
        ]);
        let r = RateLimitHints::from_headers(&h);
        assert_eq!(r.tokens, LimitHint::default(), "not exhausted, not reset");
        assert_eq!(r.requests.remaining, Some(79));
        // A limit of 0 drops its reset too; a negative remaining count under a real limit
        // keeps the limit.
        let h = headers(&[
            ("x-ratelimit-limit-requests", "0"),
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "1m0s"),
            ("x-ratelimit-limit-tokens", "30000"),
            ("x-ratelimit-remaining-tokens", "-1"),
        ]);
        let r = RateLimitHints::from_headers(&h);
        assert!(!r.requests.is_known(), "{:?}", r.requests);
        assert_eq!(r.tokens.limit, Some(30_000));
        assert_eq!(r.tokens.remaining, None);
        // Anthropic's names go through the same rule.
        let h = headers(&[("anthropic-ratelimit-tokens-remaining", "-5")]);
        assert!(RateLimitHints::from_headers(&h).is_empty());
    }

    #[test]
    fn azure_plain_second_resets_and_its_429_without_retry_after() {
        let h = headers(&[
            ("x-ratelimit-remaining-tokens", "0"),
            ("x-ratelimit-reset-tokens", "55"),
        ]);
        let r = RateLimitHints::from_headers(&h);
        assert_eq!(r.tokens.remaining, Some(0), "a real zero is exhausted");
        assert_eq!(r.tokens.reset, Some(Duration::from_secs(55)));
        assert_eq!(r.retry_after, None);
        // openai-python#937: Azure's 429 with only the hyphenated reset.
        let h = headers(&[
            ("x-rate-limit-reset-tokens", "55"),
            ("x-ratelimit-remaining-requests", "3"),
        ]);
        let r = RateLimitHints::from_headers(&h);
        assert_eq!(r.retry_after, Some(Duration::from_secs(55)));
        // `retry-after` wins over it; garbage and negatives are skipped.
        let h = headers(&[("retry-after", "2"), ("x-rate-limit-reset-tokens", "55")]);
        assert_eq!(
            RateLimitHints::from_headers(&h).retry_after,
            Some(Duration::from_secs(2))
        );
        for bad in ["-3", "soon", "NaN"] {
            let h = headers(&[
                ("x-rate-limit-reset-tokens", bad),
                ("x-ratelimit-reset-tokens", bad),
            ]);
            assert!(RateLimitHints::from_headers(&h).is_empty(), "{bad}");
        }
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("0s"), Some(Duration::ZERO));
        assert_eq!(
            parse_go_duration("2m30.5s"),
            Some(Duration::from_millis(150_500))
        );
        for bad in ["", "s", "5", "1x", "1.2.3s", "-1s", "9999999999999h"] {
            assert_eq!(parse_go_duration(bad), None, "{bad}");
        }
    }

    proptest! {
        #[test]
        fn parsers_never_panic(s in "\\PC*") {
            let _ = parse_go_duration(&s);
            let _ = parse_rfc3339(&s);
        }

        #[test]
        fn header_values_never_panic(v in "[ -~]{0,40}") {
            if let Ok(val) = http::HeaderValue::from_str(&v) {
                let mut h = HeaderMap::new();
                for name in ["retry-after", "retry-after-ms", "x-ratelimit-reset-tokens", "x-rate-limit-reset-tokens", "x-ratelimit-limit-tokens", "anthropic-ratelimit-tokens-reset", "x-ratelimit-remaining-requests"] {
                    h.insert(name, val.clone());
                }
                let _ = RateLimitHints::from_headers(&h);
            }
        }
    }
}
