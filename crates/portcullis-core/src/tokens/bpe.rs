//! Exact BPE counts: the pieces (the hand-written ASCII splitter, else the encoding's regex)
//! each counted by `bpe-openai`, with a small per-thread cache of recent pieces.
//!
//! Most pieces of real text are a few hundred common words, numbers and punctuation runs, so a
//! cache hit (one hash of a few bytes) replaces most BPE runs. The cache is bounded: it holds at
//! most [`CACHE_ENTRIES`] pieces of at most [`CACHE_PIECE`] bytes per thread, and starts over
//! when full.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use super::Encoding;
use super::split::ascii_pieces;

/// The BPE of an encoding, built once per process (`bpe-openai` embeds its tables).
pub(crate) fn tokenizer(encoding: Encoding) -> &'static bpe_openai::Tokenizer {
    match encoding {
        Encoding::O200k => bpe_openai::o200k_base(),
        Encoding::Cl100k => bpe_openai::cl100k_base(),
    }
}

/// Pieces cached per thread and encoding.
const CACHE_ENTRIES: usize = 8192;
/// Longer pieces are counted each time (they are rare, and hashing them costs more).
const CACHE_PIECE: usize = 24;

/// FxHash's mixing: the keys are short and not chosen by an attacker who can see the hashes
/// (a collision only costs a BPE run, and the cache is bounded).
#[derive(Default)]
struct FxHasher(u64);

impl Hasher for FxHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(word))
                .wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }
}

type PieceCache = HashMap<Box<[u8]>, u32, BuildHasherDefault<FxHasher>>;

thread_local! {
    static CACHE: RefCell<[PieceCache; 2]> = RefCell::new(Default::default());
}

/// The exact number of tokens of `text` in `encoding`, as tiktoken counts it.
pub(crate) fn count(text: &str, encoding: Encoding) -> u64 {
    let bpe = tokenizer(encoding);
    let slot = encoding as usize;
    CACHE.with(|cache| {
        let Ok(mut caches) = cache.try_borrow_mut() else {
            return uncached(bpe, text, encoding);
        };
        let cache = &mut caches[slot];
        let mut total = 0u64;
        let mut one = |piece: &str| {
            let bytes = piece.as_bytes();
            if bytes.len() > CACHE_PIECE {
                return bpe.bpe.count(bytes) as u64;
            }
            if let Some(&n) = cache.get(bytes) {
                return u64::from(n);
            }
            let n = bpe.bpe.count(bytes);
            if cache.len() >= CACHE_ENTRIES {
                cache.clear();
            }
            cache.insert(bytes.into(), u32::try_from(n).unwrap_or(u32::MAX));
            n as u64
        };
        if text.is_ascii() {
            for piece in ascii_pieces(text, encoding) {
                total += one(piece);
            }
        } else {
            for piece in bpe.split(text) {
                total += one(piece);
            }
        }
        total
    })
}

fn uncached(bpe: &bpe_openai::Tokenizer, text: &str, encoding: Encoding) -> u64 {
    if text.is_ascii() {
        ascii_pieces(text, encoding)
            .map(|p| bpe.bpe.count(p.as_bytes()) as u64)
            .sum()
    } else {
        bpe.count(text) as u64
    }
}

/// The tokens of `text`, for the simulator's cut at `max_tokens`.
pub(crate) fn encode(text: &str, encoding: Encoding) -> Vec<u32> {
    tokenizer(encoding).encode(text)
}

/// The text of `tokens`, if it is valid UTF-8.
pub(crate) fn decode(tokens: &[u32], encoding: Encoding) -> Option<String> {
    tokenizer(encoding).decode(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn reference(text: &str, e: Encoding) -> u64 {
        let t = match e {
            Encoding::O200k => tiktoken_rs::o200k_base_singleton(),
            Encoding::Cl100k => tiktoken_rs::cl100k_base_singleton(),
        };
        t.encode_ordinary(text).len() as u64
    }

    #[test]
    fn same_counts_as_tiktoken() {
        for text in [
            "Hello there",
            "The pelican's pouch; DDT was banned in 1972.\n\n  fn main() {}\n",
            "naïve café — 東京 😀 مرحبا",
            "",
        ] {
            for e in [Encoding::O200k, Encoding::Cl100k] {
                // Twice: once filling the cache, once reading it.
                assert_eq!(count(text, e), reference(text, e), "{e:?} {text:?}");
                assert_eq!(count(text, e), reference(text, e), "{e:?} {text:?}");
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn counts_match_tiktoken(text in "\\PC{0,80}", ascii in "[ -~\t\n]{0,120}") {
            for e in [Encoding::O200k, Encoding::Cl100k] {
                prop_assert_eq!(count(&text, e), reference(&text, e));
                prop_assert_eq!(count(&ascii, e), reference(&ascii, e));
            }
        }
    }
}
