//! A hand-written pretokenizer for ASCII text: the same pieces as the o200k and cl100k split
//! regexes, at a fraction of their cost. Text with any non-ASCII byte goes to the regexes.
//!
//! The rules below restate the regexes (leftmost-first alternation), for ASCII only, where
//! `L` is a letter, `N` a digit and `\s` is space, `\t`, `\n`, `\x0B`, `\x0C` or `\r`:
//!
//! - o200k: `[^\r\nLN]?[A-Z]*[a-z]+C? | [^\r\nLN]?[A-Z]+[a-z]*C? | N{1,3} | ␠?[^\sLN]+[\r\n/]*
//!   | \s*[\r\n]+ | \s+(?!\S) | \s+`, with `C` the contractions `'s 't 're 've 'm 'll 'd`
//!   in any case;
//! - cl100k: `C | [^\r\nLN]?L+ | N{1,3} | ␠?[^\sLN]+[\r\n]* | \s*[\r\n]+ | \s+(?!\S) | \s+`.
//!
//! A test checks every piece against the regexes on arbitrary ASCII strings.

use super::Encoding;

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0B | 0x0C | b'\r')
}

fn is_newline(b: u8) -> bool {
    b == b'\r' || b == b'\n'
}

/// Neither whitespace, letter nor digit.
fn is_punct(b: u8) -> bool {
    !is_space(b) && !b.is_ascii_alphanumeric()
}

/// May precede a word: anything but `\r`, `\n`, a letter or a digit.
fn is_word_prefix(b: u8) -> bool {
    !is_newline(b) && !b.is_ascii_alphanumeric()
}

/// The end of a contraction (`'s`, `'re`, …, any case) starting at `i`, if there is one.
fn contraction(s: &[u8], i: usize) -> Option<usize> {
    if s.get(i) != Some(&b'\'') {
        return None;
    }
    let lower = |k: usize| s.get(k).map(u8::to_ascii_lowercase);
    match lower(i + 1)? {
        b's' | b't' | b'm' | b'd' => Some(i + 2),
        b'r' | b'v' if lower(i + 2) == Some(b'e') => Some(i + 3),
        b'l' if lower(i + 2) == Some(b'l') => Some(i + 3),
        _ => None,
    }
}

fn run(s: &[u8], mut i: usize, f: impl Fn(u8) -> bool) -> usize {
    while i < s.len() && f(s[i]) {
        i += 1;
    }
    i
}

/// The end of the piece that starts at `i` (`i < s.len()`, `s` ASCII).
fn piece_end(s: &[u8], i: usize, encoding: Encoding) -> usize {
    let c = s[i];
    let o200k = encoding == Encoding::O200k;
    if !o200k {
        if let Some(end) = contraction(s, i) {
            return end;
        }
    }
    // A word, with at most one prefix character.
    let word = if c.is_ascii_alphabetic() {
        Some(i)
    } else if is_word_prefix(c) && s.get(i + 1).is_some_and(u8::is_ascii_alphabetic) {
        Some(i + 1)
    } else {
        None
    };
    if let Some(start) = word {
        if !o200k {
            return run(s, start, |b| b.is_ascii_alphabetic());
        }
        // `[A-Z]*[a-z]+`, else `[A-Z]+[a-z]*`: both are the upper run then the lower run.
        let upper = run(s, start, |b| b.is_ascii_uppercase());
        let end = run(s, upper, |b| b.is_ascii_lowercase());
        return contraction(s, end).unwrap_or(end);
    }
    if c.is_ascii_digit() {
        return run(s, i, |b| b.is_ascii_digit()).min(i + 3);
    }
    // Punctuation, with at most one leading space.
    let p = if c == b' ' { i + 1 } else { i };
    if s.get(p).is_some_and(|&b| is_punct(b)) {
        let end = run(s, p, is_punct);
        return if o200k {
            run(s, end, |b| is_newline(b) || b == b'/')
        } else {
            run(s, end, is_newline)
        };
    }
    // Whitespace: up to its last newline; else all of it at the end of the text; else all but
    // its last character (which goes with what follows); else the one character.
    let end = run(s, i, is_space);
    if let Some(last_newline) = s[i..end].iter().rposition(|&b| is_newline(b)) {
        return i + last_newline + 1;
    }
    if end == s.len() || end - i == 1 {
        end
    } else {
        end - 1
    }
}

/// The pieces of ASCII text `s`, as the encoding's split regex cuts them.
pub(crate) fn ascii_pieces(s: &str, encoding: Encoding) -> impl Iterator<Item = &str> {
    debug_assert!(s.is_ascii());
    let mut i = 0;
    std::iter::from_fn(move || {
        if i >= s.len() {
            return None;
        }
        let end = piece_end(s.as_bytes(), i, encoding);
        // Every boundary of ASCII text is a char boundary.
        let piece = s.get(i..end);
        i = end;
        piece
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn regex_pieces(s: &str, e: Encoding) -> Vec<&str> {
        super::super::bpe::tokenizer(e).split(s).collect()
    }

    fn check(s: &str) {
        for e in [Encoding::O200k, Encoding::Cl100k] {
            let ours: Vec<&str> = ascii_pieces(s, e).collect();
            assert_eq!(ours, regex_pieces(s, e), "{e:?} on {s:?}");
        }
    }

    #[test]
    fn known_cases() {
        for s in [
            "",
            "Hello there",
            "  leading and trailing  ",
            "DDT was BANNED. I'm sure they'll SAY'LL don't",
            "tabs\tand\r\nnewlines \n\n  x\n",
            "1234567 12.5e-3 x=1/2//3\n/",
            "  !!  ?? --> ' 's 'S 'x",
            "fn f(p: &P) -> String {\n    format!(\"{} ({:.1})\", p.a)\n}\n",
            "\x0B\x0C \x0B",
            "a'",
            "'",
            "'re",
            "'Ve",
        ] {
            check(s);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn same_pieces_as_the_regexes(s in "[ -~\t\n\r\x0B\x0C]{0,64}") {
            check(&s);
        }
        #[test]
        fn same_pieces_on_a_small_alphabet(s in "[aAbZ1 '\n\r/.,sStTlLrReE\t]{0,48}") {
            check(&s);
        }
    }
}
