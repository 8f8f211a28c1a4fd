//! Deterministic generated text: the same request and seed always give the same answer.

use portcullis_core::Encoding;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const WORDS: &[&str] = &[
    "the", "pelican", "river", "quiet", "bright", "model", "answer", "gate", "stone", "keeps",
    "watch", "over", "a", "small", "harbor", "where", "boats", "rest", "at", "night", "and",
    "light", "falls", "softly", "on", "old", "walls", "every", "morning", "brings", "new", "tide",
    "with", "patient", "birds", "that", "sing", "of", "distant", "hills", "calm", "wind",
    "carries", "salt", "across", "fields", "green", "under", "clear", "sky",
];

/// Why the text ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ending {
    /// It ended by itself.
    Natural,
    /// `max_tokens` cut it.
    Length,
    /// A stop sequence cut it (the sequence is not in the text).
    Stop(String),
}

/// A generated answer, already cut by stop sequences and `max_tokens`.
#[derive(Debug, Clone)]
pub(crate) struct Generated {
    pub text: String,
    pub ending: Ending,
    /// Tokens of `text` (the completion / output tokens).
    pub tokens: u64,
}

impl Generated {
    /// The text in several pieces, one per word (each but the first with its leading space).
    pub(crate) fn pieces(&self) -> Vec<&str> {
        let mut out = Vec::new();
        let mut start = 0;
        for (i, c) in self.text.char_indices() {
            if (c == ' ' || c == '\n') && i > start {
                out.push(&self.text[start..i]);
                start = i;
            }
        }
        if start < self.text.len() {
            out.push(&self.text[start..]);
        }
        out
    }
}

/// FNV-1a, stable across runs and platforms.
pub(crate) fn fingerprint(seed: u64, parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for part in parts {
        for b in part.iter().chain(&[0xff]) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// Generates the answer for a request fingerprint, in the encoding the model counts with.
pub(crate) fn generate(
    fingerprint: u64,
    encoding: Encoding,
    max_tokens: Option<u64>,
    stops: &[String],
) -> Generated {
    let mut rng = SmallRng::seed_from_u64(fingerprint);
    let mut text = String::new();
    for _ in 0..rng.random_range(2..=4) {
        let n = rng.random_range(5..=10);
        for w in 0..n {
            let word = WORDS[rng.random_range(0..WORDS.len())];
            if !text.is_empty() {
                text.push(' ');
            }
            if w == 0 {
                let mut c = word.chars();
                text.extend(c.next().map(|f| f.to_ascii_uppercase()));
                text.push_str(c.as_str());
            } else {
                text.push_str(word);
            }
        }
        text.push('.');
    }

    let mut ending = Ending::Natural;
    let first_stop = stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()).map(|i| (i, s)))
        .min_by_key(|(i, _)| *i);
    if let Some((i, s)) = first_stop {
        text.truncate(i);
        ending = Ending::Stop(s.clone());
    }

    if let Some(max) = max_tokens {
        let ids = encoding.encode(&text);
        if ids.len() as u64 > max {
            let keep = usize::try_from(max).unwrap_or(usize::MAX);
            // ASCII text: any token prefix decodes.
            text = encoding.decode(&ids[..keep]).unwrap_or_default();
            // Re-encoding a cut can merge differently; never report more than max_tokens.
            while encoding.count_exact(&text) > max {
                text.pop();
            }
            ending = Ending::Length;
        }
    }
    let tokens = encoding.count_exact(&text);
    Generated {
        text,
        ending,
        tokens,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_cut() {
        let a = generate(7, Encoding::O200k, None, &[]);
        let b = generate(7, Encoding::O200k, None, &[]);
        assert_eq!(a.text, b.text);
        assert_eq!(a.ending, Ending::Natural);
        assert!(a.pieces().len() >= 10);
        assert_eq!(a.pieces().concat(), a.text);
        assert_ne!(a.text, generate(8, Encoding::O200k, None, &[]).text);

        let cut = generate(7, Encoding::O200k, Some(3), &[]);
        assert_eq!(cut.ending, Ending::Length);
        assert_eq!(cut.tokens, 3);
        assert!(a.text.starts_with(&cut.text));

        let stop = generate(7, Encoding::O200k, None, &[".".into()]);
        assert_eq!(stop.ending, Ending::Stop(".".into()));
        assert!(!stop.text.contains('.'));
    }
}
