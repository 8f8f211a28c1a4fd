//! [`PerBucket`]: one value for each of a key's four buckets.

use portcullis_core::{RateLimitHints, TokenCost};

use super::config::{KeyLimits, Rate};

/// One value for each bucket a key may have, always in this order: requests (RPM), tokens
/// (input + output, TPM), input tokens (Anthropic's ITPM), output tokens (OTPM).
///
/// The limits ([`PerBucket<Option<Rate>>`](PerBucket::from)), the cost of a call
/// ([`PerBucket<u64>`]), what a server says [`Remaining`] and the [`Levels`](super::Levels)
/// of a key all have this shape.
///
/// ```
/// use portcullis_core::TokenCost;
/// use portcullis_layers::token_bucket::PerBucket;
/// let cost = PerBucket::from(TokenCost { input: 30, output: 70 });
/// assert_eq!(cost, PerBucket { requests: 1, tokens: 100, input: 30, output: 70 });
/// assert_eq!(cost.map(|c| c * 2).tokens, 200);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct PerBucket<T> {
    /// Requests.
    pub requests: T,
    /// Tokens: input plus output.
    pub tokens: T,
    /// Input (prompt) tokens.
    pub input: T,
    /// Output tokens.
    pub output: T,
}

impl<T> PerBucket<T> {
    /// The same value for every bucket.
    pub fn splat(value: T) -> Self
    where
        T: Clone,
    {
        PerBucket::from_array([value.clone(), value.clone(), value.clone(), value])
    }

    /// From the values in bucket order.
    pub fn from_array([requests, tokens, input, output]: [T; 4]) -> Self {
        PerBucket {
            requests,
            tokens,
            input,
            output,
        }
    }

    /// The values in bucket order.
    pub fn into_array(self) -> [T; 4] {
        [self.requests, self.tokens, self.input, self.output]
    }

    /// Applies `f` to every value.
    pub fn map<U>(self, f: impl FnMut(T) -> U) -> PerBucket<U> {
        PerBucket::from_array(self.into_array().map(f))
    }

    /// Pairs the values of two per-bucket sets.
    pub fn zip<U>(self, other: PerBucket<U>) -> PerBucket<(T, U)> {
        let mut other = other.into_array().into_iter();
        // `other` has exactly one value per bucket.
        self.map(|t| (t, other.next().expect("four buckets")))
    }

    /// References to the values.
    pub fn as_ref(&self) -> PerBucket<&T> {
        PerBucket {
            requests: &self.requests,
            tokens: &self.tokens,
            input: &self.input,
            output: &self.output,
        }
    }

    /// Mutable references to the values.
    pub fn as_mut(&mut self) -> PerBucket<&mut T> {
        PerBucket {
            requests: &mut self.requests,
            tokens: &mut self.tokens,
            input: &mut self.input,
            output: &mut self.output,
        }
    }

    /// The values in bucket order.
    pub fn iter(&self) -> std::array::IntoIter<&T, 4> {
        self.as_ref().into_iter()
    }
}

impl<T> IntoIterator for PerBucket<T> {
    type Item = T;
    type IntoIter = std::array::IntoIter<T, 4>;
    fn into_iter(self) -> Self::IntoIter {
        self.into_array().into_iter()
    }
}

/// The cost of one call: one request, and its tokens in the three token buckets.
impl From<TokenCost> for PerBucket<u64> {
    fn from(c: TokenCost) -> Self {
        PerBucket {
            requests: 1,
            tokens: c.total(),
            input: c.input,
            output: c.output,
        }
    }
}

/// The buckets of a key's limits (`None`: not limited).
impl From<KeyLimits> for PerBucket<Option<Rate>> {
    fn from(l: KeyLimits) -> Self {
        PerBucket {
            requests: l.requests,
            tokens: l.tokens,
            input: l.input_tokens,
            output: l.output_tokens,
        }
    }
}

/// What a server said remains in each bucket (`x-ratelimit-remaining-*`,
/// `anthropic-ratelimit-*-remaining`; `None`: not said). A store lowers its levels to these,
/// never raises them.
pub type Remaining = PerBucket<Option<u64>>;

impl Remaining {
    /// From parsed rate-limit headers.
    pub fn from_hints(h: &RateLimitHints) -> Self {
        PerBucket {
            requests: h.requests.remaining,
            tokens: h.tokens.remaining,
            input: h.input_tokens.remaining,
            output: h.output_tokens.remaining,
        }
    }

    /// Whether nothing is known.
    pub fn is_empty(&self) -> bool {
        self.iter().all(|r| r.is_none())
    }
}
