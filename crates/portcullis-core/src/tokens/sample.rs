//! Counting many texts at a cost that does not grow with their size: exact up to a limit,
//! sampled above it.

use super::Encoding;

/// Up to this many bytes of text per call, counts are exact.
pub const EXACT_LIMIT: usize = 32 * 1024;
/// Above [`EXACT_LIMIT`], this many windows are counted exactly…
pub const SAMPLES: usize = 16;
/// …of this many bytes each, spread evenly over the text (16 KiB in all)…
pub const SAMPLE_BYTES: usize = 1024;
/// …and their token density, raised by this factor, is applied to the whole text.
pub const SAMPLE_MARGIN: f64 = 1.1;

/// `Σ scale(tokens of each item's text)`: exact when all the texts together hold at most
/// `exact_limit` bytes; otherwise each text's tokens are its length times the token density of
/// [`SAMPLES`] windows spread evenly over all of them (raised by [`SAMPLE_MARGIN`]), never more
/// than its length in bytes.
pub(crate) fn sum_tokens<'a>(
    texts: impl Iterator<Item = &'a str> + Clone,
    exact_limit: usize,
    encoding: Encoding,
    scale: impl Fn(u64) -> u64,
) -> u64 {
    let total: usize = texts.clone().map(str::len).sum();
    if total <= exact_limit {
        return texts.map(|t| scale(encoding.count_exact(t))).sum();
    }
    let density = sampled_density(texts.clone(), total, encoding);
    texts
        .map(|t| {
            let len = t.len() as u64;
            let est = ((len as f64) * density).ceil() as u64;
            scale(est.min(len))
        })
        .sum()
}

/// Tokens per byte over [`SAMPLES`] windows, one in the middle of each of as many equal
/// stretches of the concatenated texts (`total` bytes), times [`SAMPLE_MARGIN`].
fn sampled_density<'a>(
    texts: impl Iterator<Item = &'a str> + Clone,
    total: usize,
    encoding: Encoding,
) -> f64 {
    let stride = total / SAMPLES;
    let (mut tokens, mut bytes) = (0u64, 0usize);
    let mut texts = texts.peekable();
    let mut base = 0usize; // offset of the current text in the concatenation
    for k in 0..SAMPLES {
        let want = (k * stride + stride / 2).saturating_sub(SAMPLE_BYTES / 2);
        // Move to the text that holds offset `want` (offsets only grow).
        while let Some(t) = texts.peek() {
            if base + t.len() > want {
                break;
            }
            base += t.len();
            texts.next();
        }
        let Some(t) = texts.peek() else { break };
        let start = floor_boundary(t, want - base);
        let end = floor_boundary(t, (start + SAMPLE_BYTES).min(t.len()));
        let window = &t[start..end];
        tokens += encoding.count_exact(window);
        bytes += window.len();
    }
    if bytes == 0 {
        return 1.0; // unreachable for total > 0; one token a byte is the hard bound
    }
    tokens as f64 / bytes as f64 * SAMPLE_MARGIN
}

fn floor_boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    fn est(text: &str) -> u64 {
        sum_tokens(std::iter::once(text), EXACT_LIMIT, Encoding::O200k, |n| n)
    }

    fn repeat(parts: &[&str], bytes: usize) -> String {
        let mut s = String::new();
        let mut i = 0;
        while s.len() < bytes {
            s.push_str(parts[i % parts.len()]);
            i += 1;
        }
        s
    }

    /// Ordinary kinds of long prompts: the estimate is at or above the exact count, and within
    /// 25 % of it.
    #[test]
    fn sampled_estimates_err_high_and_close() {
        let prose = "The pelican is a large water bird with a distinctive pouch under its beak. \
            It hunts by plunge-diving, and a flock can herd fish into shallow water. ";
        let code = "fn describe(p: &Pelican) -> String {\n    format!(\"{} ({} kg)\", p.name, p.mass_kg)\n}\n";
        let json = "{\"id\": 48213, \"lat\": 37.8199, \"lon\": -122.4783, \"ok\": true},\n";
        let cjk = "東京は日本の首都であり、世界最大の都市圏の一つです。";
        let mut numbered = String::new();
        for i in 0..20_000 {
            numbered.push_str(&format!("line {i}: value {}\n", i * 7919 % 10007));
        }
        let half_and_half = format!("{}{}", repeat(&[prose], 100_000), repeat(&[cjk], 100_000));
        for (name, text) in [
            ("prose", repeat(&[prose], 200_000)),
            ("code", repeat(&[code], 200_000)),
            ("json", repeat(&[json], 200_000)),
            ("cjk", repeat(&[cjk], 200_000)),
            ("mixed", repeat(&[prose, code, json], 600_000)),
            ("numbered", numbered),
            ("half prose, half cjk", half_and_half),
        ] {
            let exact = Encoding::O200k.count_exact(&text);
            let e = est(&text);
            assert!(e >= exact, "{name}: estimate {e} under exact {exact}");
            assert!(
                (e as f64) <= exact as f64 * 1.25,
                "{name}: estimate {e} too far above exact {exact}"
            );
            assert!(e <= text.len() as u64);
        }
    }

    /// Many messages: the samples land across them, and each message's share is bounded by
    /// its length.
    #[test]
    fn across_many_texts() {
        let texts: Vec<String> = (0..500)
            .map(|i| format!("message {i}: {}", "some words of text ".repeat(20)))
            .collect();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let exact: u64 = refs.iter().map(|t| Encoding::O200k.count_exact(t)).sum();
        let e = sum_tokens(refs.iter().copied(), EXACT_LIMIT, Encoding::O200k, |n| n);
        assert!(
            e >= exact && (e as f64) <= exact as f64 * 1.25,
            "{e} vs {exact}"
        );
    }

    #[test]
    fn below_the_limit_is_exact() {
        let text = "exact ".repeat(1000);
        assert_eq!(est(&text), Encoding::O200k.count_exact(&text));
    }

    /// A hostile text: the hard bound (its length) holds, and a window never splits a char.
    #[test]
    fn bounded_by_length() {
        let text = "é".repeat(100_000);
        assert!(est(&text) <= text.len() as u64);
        let bytes = "\u{10FFFF}x".repeat(50_000);
        assert!(est(&bytes) <= bytes.len() as u64);
    }
}
