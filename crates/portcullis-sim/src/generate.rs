//! Deterministic generated answers: the same request and seed always give the same text, tool
//! calls, structured output and thinking.

use portcullis_core::Encoding;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use crate::cache::CacheUse;
use crate::schema;
use crate::tools::{self, PlannedCall};

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
    /// It calls tools.
    ToolUse,
}

/// A tool call of the answer.
#[derive(Debug, Clone)]
pub(crate) struct ToolCall {
    /// `call_…` / `toolu_01…`, deterministic per request.
    pub id: String,
    pub name: String,
    /// The arguments as compact JSON.
    pub arguments: String,
}

/// A thinking block of the answer (Anthropic), signed by the simulator.
#[derive(Debug, Clone)]
pub(crate) struct Thinking {
    pub text: String,
    pub signature: String,
}

/// A generated answer, already cut by stop sequences and `max_tokens`.
#[derive(Debug, Clone)]
pub(crate) struct Generated {
    /// The visible text (empty when the answer only calls tools).
    pub text: String,
    pub ending: Ending,
    /// All output tokens: text, tool calls, thinking and reasoning.
    pub tokens: u64,
    pub calls: Vec<ToolCall>,
    pub thinking: Option<Thinking>,
    /// OpenAI's hidden reasoning tokens (part of `tokens`).
    pub reasoning_tokens: u64,
    /// What prompt caching did for the request.
    pub cache: CacheUse,
}

/// The shape of a text answer.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) enum Format {
    /// Prose.
    #[default]
    Text,
    /// A JSON object (OpenAI `json_object`): `{"answer": prose}`.
    JsonObject,
    /// An example of this schema (OpenAI `json_schema`).
    JsonSchema(Value),
}

/// What a request asks the answer to be, decided when it is parsed.
#[derive(Debug, Clone, Default)]
pub(crate) struct Plan {
    /// Tool calls to make instead of text.
    pub calls: Vec<PlannedCall>,
    pub format: Format,
    /// A signed thinking block before the content (Anthropic).
    pub thinking: bool,
    /// Hidden reasoning tokens (OpenAI reasoning models).
    pub reasoning_tokens: u64,
    /// The text of the tool result the request ends with, which the answer sums up.
    pub tool_result: Option<String>,
}

impl Generated {
    /// The text in several pieces, one per word (each but the first with its leading space).
    pub(crate) fn pieces(&self) -> Vec<&str> {
        pieces(&self.text)
    }
}

/// A text in several pieces, one per word (each but the first with its leading space).
pub(crate) fn pieces(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, c) in text.char_indices() {
        if (c == ' ' || c == '\n') && i > start {
            out.push(&text[start..i]);
            start = i;
        }
    }
    if start < text.len() {
        out.push(&text[start..]);
    }
    out
}

/// Streamed JSON (tool arguments) in fragments of about eight bytes, as the APIs send them.
pub(crate) fn fragments(json: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, _) in json.char_indices() {
        if i - start >= 8 {
            out.push(&json[start..i]);
            start = i;
        }
    }
    out.push(&json[start..]);
    out
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

/// Generates the answer a [`Plan`] asks for. `call_id` draws a tool call id; the ids come from
/// the request fingerprint, so they are deterministic per request.
pub(crate) fn answer(
    fingerprint: u64,
    encoding: Encoding,
    plan: &Plan,
    max_tokens: Option<u64>,
    stops: &[String],
    words: u32,
    call_id: impl Fn(&mut SmallRng) -> String,
) -> Generated {
    let mut spent = 0;
    let thinking = plan.thinking.then(|| {
        let text = format!(
            "Let me think about this. {}",
            prose(fingerprint ^ 0x7417, 0)
        );
        spent += encoding.count_exact(&text);
        Thinking {
            signature: tools::sign(&text),
            text,
        }
    });
    let reasoning_tokens = plan.reasoning_tokens.min(max_tokens.unwrap_or(u64::MAX));
    spent += reasoning_tokens;
    let budget = max_tokens.map(|m| m.saturating_sub(spent));

    let mut g = if !plan.calls.is_empty() {
        let mut rng = SmallRng::seed_from_u64(fingerprint ^ 0xca11);
        let calls: Vec<ToolCall> = plan
            .calls
            .iter()
            .map(|c| ToolCall {
                id: call_id(&mut rng),
                name: c.name.clone(),
                arguments: c.arguments.to_string(),
            })
            .collect();
        let tokens = calls
            .iter()
            .map(|c| encoding.count_exact(&c.name) + encoding.count_exact(&c.arguments))
            .sum();
        Generated {
            text: String::new(),
            ending: Ending::ToolUse,
            tokens,
            calls,
            thinking: None,
            reasoning_tokens: 0,
            cache: CacheUse::default(),
        }
    } else {
        match &plan.format {
            Format::JsonSchema(s) => cut(schema::example(s).to_string(), encoding, budget, &[]),
            Format::JsonObject => {
                let text = json!({ "answer": prose(fingerprint, 0) }).to_string();
                cut(text, encoding, budget, &[])
            }
            Format::Text => {
                let mut text = prose(fingerprint, words);
                if let Some(result) = &plan.tool_result {
                    let result: String = result.chars().take(80).collect();
                    text = format!("The tool returned: {}. {text}", result.trim());
                }
                cut(text, encoding, budget, stops)
            }
        }
    };
    g.tokens += spent;
    g.thinking = thinking;
    g.reasoning_tokens = reasoning_tokens;
    g
}

/// Generates the prose answer for a request fingerprint, in the encoding the model counts with.
#[cfg(test)]
pub(crate) fn generate(
    fingerprint: u64,
    encoding: Encoding,
    max_tokens: Option<u64>,
    stops: &[String],
) -> Generated {
    cut(prose(fingerprint, 0), encoding, max_tokens, stops)
}

/// A few sentences of the simulator's words, seeded by `fingerprint`.
/// A few sentences of the simulator's words; with `words` > 0, exactly that many words (in
/// sentences of ten).
fn prose(fingerprint: u64, words: u32) -> String {
    let mut rng = SmallRng::seed_from_u64(fingerprint);
    let mut text = String::new();
    let sentences = match words {
        0 => rng.random_range(2..=4),
        w => w.div_ceil(10),
    };
    for s in 0..sentences {
        let n = match words {
            0 => rng.random_range(5..=10),
            w => (w - 10 * s).min(10),
        };
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
    text
}

/// Cuts `text` at the first stop sequence and at `max_tokens`, and counts it.
fn cut(
    mut text: String,
    encoding: Encoding,
    max_tokens: Option<u64>,
    stops: &[String],
) -> Generated {
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
        calls: Vec::new(),
        thinking: None,
        reasoning_tokens: 0,
        cache: CacheUse::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_words_is_exact() {
        for words in [1, 10, 95, 100] {
            let text = prose(3, words);
            assert_eq!(text.split(' ').count(), words as usize, "{text}");
            assert_eq!(pieces(&text).len(), words as usize);
        }
        assert_eq!(prose(3, 0), prose(3, 0));
    }

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
