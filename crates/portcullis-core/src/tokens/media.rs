//! What images and documents cost in prompt tokens, by each provider's published rule.
//!
//! # OpenAI
//!
//! Two published rules, by model ("Images and vision", *Calculating costs*):
//!
//! - **tiles** (gpt-4o, gpt-4.1, gpt-4.5, gpt-5, o1, o3 and the rest): `detail: "low"` costs the
//!   base (85 tokens). `high` and `auto` fit the image in 2048 × 2048, scale it down so that its
//!   shortest side is at most 768 px, count the 512 px tiles that cover it, and charge 170 a
//!   tile plus the base 85: 1024 × 1024 → 765, 2048 × 4096 → 1105. Some models bill other
//!   figures (gpt-5 70 / 140, o1 / o3 75 / 150 in the docs); 85 / 170 is at or above all of
//!   them, so they get it. gpt-4o-mini bills 2833 + 5667 a tile (same dollar price as gpt-4o),
//!   and its reported `prompt_tokens` carry them, so it gets those.
//! - **patches** (gpt-4.1-mini, gpt-4.1-nano, o4-mini, gpt-5-mini, gpt-5-nano): the 32 px
//!   patches covering the image, at most 1536 (larger images are scaled down to fit), times a
//!   per-model multiplier (1.62, 2.46, 1.72, 1.62, 2.46 in the docs; measured lower for the
//!   gpt-5 ones). The estimate takes `min(patches, 1536)` before scaling, which is at or above
//!   the scaled count, and the documented multipliers. `detail` does not lower it.
//!
//! # Anthropic
//!
//! `tokens = width × height / 750` ("Vision", *Calculate image costs*), after Claude scales the
//! image so that its long edge is at most 1568 px and its cost about 1600 tokens at most. The
//! largest size the docs list as not resized is 784 × 1568 (1639 tokens), so the estimate scales
//! the long edge to 1568 and caps the result at [`ANTHROPIC_IMAGE_MAX`] = 1639. 1092 × 1092 →
//! 1590; 1000 × 1000 → 1334.
//!
//! # Images whose size is unknown
//!
//! An image at a URL (or whose header cannot be read) costs the most one image can cost under
//! the model's rule: 1445 for 85 / 170 tiles (8 tiles: 2048 × 768 after the resize; the docs'
//! 2048 × 4096 example, 6 tiles, is not the maximum), `1536 × multiplier` for patches,
//! [`ANTHROPIC_IMAGE_MAX`] for Claude. The token bucket then reconciles with the usage the
//! provider reports.
//!
//! # PDF documents
//!
//! Both providers read a PDF as the text of each page plus an image of each page. A page is
//! charged [`PDF_TEXT_PER_PAGE`] (3000, the top of Anthropic's "1500 to 3000 tokens per page"
//! for text) plus one unknown-size image of the model's rule. The pages are counted in the
//! PDF (the page objects, or the page tree's `/Count`); when they cannot be found (page
//! objects packed in compressed object streams) the estimate is one page per
//! [`PDF_BYTES_PER_PAGE`] (16 KiB) of file. A PDF at a URL is charged [`PDF_URL_PAGES`] pages.

use super::image::{self, Base64View, Bytes};
use crate::content::{ImageDetail, MediaSource};

/// The most tokens one image costs on Claude: 784 × 1568 / 750, rounded up, the largest size in
/// Anthropic's table of image sizes that are not resized.
pub const ANTHROPIC_IMAGE_MAX: u64 = 1639;
/// The long edge Claude scales images down to.
pub const ANTHROPIC_MAX_EDGE: u32 = 1568;
/// Text tokens charged per PDF page (the top of Anthropic's published 1500–3000 range).
pub const PDF_TEXT_PER_PAGE: u64 = 3000;
/// When a PDF's pages cannot be counted: one page per this many bytes of file.
pub const PDF_BYTES_PER_PAGE: usize = 16 * 1024;
/// Pages charged for a PDF at a URL (its size unknown).
pub const PDF_URL_PAGES: u64 = 10;

/// How a model bills an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageRule {
    /// OpenAI's tiles: `base` for low detail, `base + tile × tiles` for high and auto.
    Tiles {
        /// Tokens every image costs.
        base: u64,
        /// Tokens per 512 px tile.
        tile: u64,
    },
    /// OpenAI's 32 px patches, at most 1536, times `milli / 1000`.
    Patches {
        /// The multiplier, in thousandths (1620 for 1.62).
        milli: u64,
    },
    /// Anthropic's `width × height / 750`.
    Area,
}

impl ImageRule {
    /// OpenAI's standard tiles: 85 + 170 a tile.
    pub const TILES: ImageRule = ImageRule::Tiles {
        base: 85,
        tile: 170,
    };

    /// The rule of an OpenAI model name.
    pub fn openai(model: &str) -> ImageRule {
        let m = super::base_name(model);
        let patches = |milli| ImageRule::Patches { milli };
        if m.starts_with("gpt-4o-mini") {
            ImageRule::Tiles {
                base: 2833,
                tile: 5667,
            }
        } else if m.starts_with("gpt-4.1-mini") || m.starts_with("gpt-5-mini") {
            patches(1620)
        } else if m.starts_with("gpt-4.1-nano") || m.starts_with("gpt-5-nano") {
            patches(2460)
        } else if m.starts_with("o4-mini") || m.starts_with("codex-mini") {
            patches(1720)
        } else {
            ImageRule::TILES
        }
    }

    /// Tokens for an image of this size.
    pub fn tokens(self, width: u32, height: u32, detail: Option<ImageDetail>) -> u64 {
        match self {
            ImageRule::Tiles { base, tile } => {
                if detail == Some(ImageDetail::Low) {
                    return base;
                }
                base + tile * openai_tiles(width, height)
            }
            ImageRule::Patches { milli } => {
                let patches = u64::from(width.div_ceil(32)) * u64::from(height.div_ceil(32));
                (patches.min(1536) * milli).div_ceil(1000)
            }
            ImageRule::Area => anthropic_image_tokens(width, height),
        }
    }

    /// The most one image can cost under this rule (for an image whose size is unknown).
    pub fn max(self, detail: Option<ImageDetail>) -> u64 {
        match self {
            ImageRule::Tiles { base, .. } if detail == Some(ImageDetail::Low) => base,
            ImageRule::Tiles { base, tile } => base + 8 * tile,
            ImageRule::Patches { milli } => (1536 * milli).div_ceil(1000),
            ImageRule::Area => ANTHROPIC_IMAGE_MAX,
        }
    }

    /// Tokens for an image part: from its header when inline, else [`max`](Self::max).
    pub fn image(self, source: &MediaSource, detail: Option<ImageDetail>) -> u64 {
        if let (ImageRule::Tiles { base, .. }, Some(ImageDetail::Low)) = (self, detail) {
            return base; // the size does not matter
        }
        match source.inline() {
            Some((_, data)) => match image::image_size_base64(data) {
                Ok(s) => self.tokens(s.width, s.height, detail),
                Err(_) => self.max(detail),
            },
            None => self.max(detail),
        }
    }

    /// Tokens for a PDF part (see the [module docs](self)).
    pub fn pdf(self, source: &MediaSource) -> u64 {
        let pages = match source.inline() {
            Some((_, data)) => pdf_pages(data),
            None => PDF_URL_PAGES,
        };
        pages.saturating_mul(PDF_TEXT_PER_PAGE + self.max(None))
    }
}

/// OpenAI's tile count for high detail: fit in 2048 × 2048, shortest side down to 768, then
/// 512 px tiles. Sizes round up, so the count is never below the provider's.
pub fn openai_tiles(width: u32, height: u32) -> u64 {
    let (mut w, mut h) = (f64::from(width), f64::from(height));
    let fit = (2048.0 / w.max(h)).min(1.0);
    w *= fit;
    h *= fit;
    let short = (768.0 / w.min(h)).min(1.0);
    w *= short;
    h *= short;
    let tiles = |x: f64| ((x.round() as u64).max(1)).div_ceil(512);
    tiles(w) * tiles(h)
}

/// Anthropic's `width × height / 750` after scaling the long edge to at most 1568 px, capped at
/// [`ANTHROPIC_IMAGE_MAX`].
pub fn anthropic_image_tokens(width: u32, height: u32) -> u64 {
    let (mut w, mut h) = (f64::from(width), f64::from(height));
    let fit = (f64::from(ANTHROPIC_MAX_EDGE) / w.max(h)).min(1.0);
    w = (w * fit).round().max(1.0);
    h = (h * fit).round().max(1.0);
    ((w * h / 750.0).ceil() as u64).min(ANTHROPIC_IMAGE_MAX)
}

/// The pages of a PDF given as base64: the larger of the page objects counted
/// (`/Type /Page`, not `/Pages`) and the largest `/Count` of a page tree node; when neither is
/// found, one page per [`PDF_BYTES_PER_PAGE`]. At least one.
fn pdf_pages(data: &str) -> u64 {
    let view = Base64View::new(data);
    let mut scan = PdfScan::default();
    view.for_each_chunk(|chunk| chunk.iter().for_each(|&b| scan.push(b)));
    scan.finish();
    let found = scan.pages.max(scan.max_count);
    if found > 0 {
        found
    } else {
        (view.len().div_ceil(PDF_BYTES_PER_PAGE) as u64).max(1)
    }
}

/// A byte-at-a-time scan for `/Type /Page` (whitespace optional, not followed by `s`) and
/// `/Count N`: no allocation, no look-back beyond a few bytes of state.
#[derive(Default)]
struct PdfScan {
    /// Bytes of `/Type` matched, then whitespace, then bytes of `/Page` matched.
    state: u8,
    /// Bytes of `/Count` matched, then digits read.
    count_state: u8,
    number: u64,
    pages: u64,
    max_count: u64,
}

const TYPE: &[u8] = b"/Type";
const PAGE: &[u8] = b"/Page";
const COUNT: &[u8] = b"/Count";

impl PdfScan {
    fn push(&mut self, b: u8) {
        self.push_type(b);
        self.push_count(b);
    }

    fn push_type(&mut self, b: u8) {
        let (t, p) = (TYPE.len() as u8, PAGE.len() as u8);
        let s = self.state;
        self.state = if s < t {
            if b == TYPE[s as usize] {
                s + 1
            } else {
                u8::from(b == b'/')
            }
        } else if s == t {
            // After `/Type`: whitespace, or the `/` of `/Page`.
            if b.is_ascii_whitespace() {
                t
            } else if b == b'/' {
                t + 1
            } else {
                0
            }
        } else if s < t + p {
            if b == PAGE[(s - t) as usize] {
                s + 1
            } else {
                u8::from(b == b'/')
            }
        } else {
            // `/Type /Page` matched: a page unless an `s` follows (`/Pages`).
            if b != b's' {
                self.pages += 1;
            }
            u8::from(b == b'/')
        };
    }

    fn push_count(&mut self, b: u8) {
        let c = COUNT.len() as u8;
        let s = self.count_state;
        self.count_state = if s < c {
            if b == COUNT[s as usize] {
                s + 1
            } else {
                u8::from(b == b'/')
            }
        } else if s == c && b.is_ascii_whitespace() {
            self.number = 0;
            c + 1
        } else if s > c && b.is_ascii_digit() {
            self.number = self
                .number
                .saturating_mul(10)
                .saturating_add(u64::from(b - b'0'));
            c + 2
        } else {
            if s == c + 2 {
                self.max_count = self.max_count.max(self.number);
            }
            u8::from(b == b'/')
        };
    }

    fn finish(&mut self) {
        self.push(b' ');
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::content::Part;

    /// The worked examples of OpenAI's vision guide.
    #[test]
    fn openai_published_examples() {
        let t = ImageRule::TILES;
        assert_eq!(t.tokens(1024, 1024, Some(ImageDetail::High)), 765);
        assert_eq!(t.tokens(2048, 4096, Some(ImageDetail::High)), 1105);
        assert_eq!(t.tokens(4096, 8192, Some(ImageDetail::Low)), 85);
        assert_eq!(t.tokens(1024, 1024, None), 765); // auto counts as high
        assert_eq!(t.tokens(512, 512, Some(ImageDetail::Auto)), 255);
        assert_eq!(t.tokens(513, 513, None), 85 + 4 * 170);
        assert_eq!(t.tokens(1, 1, None), 255);
        // The largest: 8 tiles (2048 × 768 after the resize).
        assert_eq!(t.tokens(2048, 768, None), 1445);
        assert_eq!(t.max(None), 1445);
        for (w, h) in [
            (1, 100_000),
            (100_000, 1),
            (4000, 1500),
            (300, 2048),
            (7, 7),
        ] {
            assert!(t.tokens(w, h, None) <= t.max(None), "{w}x{h}");
        }
        // Patches: the docs' 1024 × 1024 = 1024 patches; 1800 × 2400 is scaled to 1452
        // patches by the docs, capped at 1536 here (at or above).
        let p = ImageRule::Patches { milli: 1000 };
        assert_eq!(p.tokens(1024, 1024, None), 1024);
        assert_eq!(p.tokens(1800, 2400, None), 1536);
        assert_eq!(
            ImageRule::openai("gpt-4.1-mini").tokens(1024, 1024, None),
            1659
        );
        assert_eq!(ImageRule::openai("gpt-4o").max(None), 1445);
        assert_eq!(
            ImageRule::openai("gpt-4o-mini").tokens(10, 10, None),
            2833 + 5667
        );
    }

    /// Anthropic's examples: 1092 × 1092 ≈ 1590, 1000 × 1000 ≈ 1334, 200 × 200 ≈ 54.
    #[test]
    fn anthropic_published_examples() {
        assert_eq!(anthropic_image_tokens(1092, 1092), 1590);
        assert_eq!(anthropic_image_tokens(1000, 1000), 1334);
        assert_eq!(anthropic_image_tokens(200, 200), 54);
        assert_eq!(anthropic_image_tokens(784, 1568), 1639);
        assert_eq!(anthropic_image_tokens(4000, 3000), ANTHROPIC_IMAGE_MAX);
        assert_eq!(anthropic_image_tokens(1, 100_000), 3); // 1 × 1568 / 750
    }

    #[test]
    fn image_parts_read_their_header_or_cost_the_most() {
        let png = crate::tokens::image::tests::png(1024, 1024);
        let Part::Image { source, .. } = Part::image_bytes("image/png", &png) else {
            unreachable!()
        };
        assert_eq!(ImageRule::TILES.image(&source, None), 765);
        assert_eq!(ImageRule::Area.image(&source, None), 1399);
        let url = MediaSource::Url {
            url: "https://example.com/cat.png".into(),
        };
        assert_eq!(ImageRule::TILES.image(&url, None), 1445);
        assert_eq!(ImageRule::TILES.image(&url, Some(ImageDetail::Low)), 85);
        assert_eq!(ImageRule::Area.image(&url, None), ANTHROPIC_IMAGE_MAX);
        let garbage = MediaSource::base64("image/png", b"not a png at all");
        assert_eq!(ImageRule::Area.image(&garbage, None), ANTHROPIC_IMAGE_MAX);
    }

    #[test]
    fn pdf_pages_are_counted() {
        let pdf = b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n\
            2 0 obj << /Type /Pages /Kids [3 0 R 4 0 R 5 0 R] /Count 3 >> endobj\n\
            3 0 obj << /Type /Page /Parent 2 0 R >> endobj\n\
            4 0 obj <</Type/Page/Parent 2 0 R>> endobj\n\
            5 0 obj << /Type\n/Page >> endobj\n%%EOF";
        let src = MediaSource::base64("application/pdf", pdf);
        let (_, data) = src.inline().unwrap();
        assert_eq!(pdf_pages(data), 3);
        assert_eq!(
            ImageRule::Area.pdf(&src),
            3 * (PDF_TEXT_PER_PAGE + ANTHROPIC_IMAGE_MAX)
        );
        // Only a page tree count (page objects compressed away).
        let tree = MediaSource::base64("application/pdf", b"<< /Type /Pages /Count 42 >>");
        assert_eq!(pdf_pages(tree.inline().unwrap().1), 42);
        // Nothing found: by size.
        let opaque = MediaSource::base64("application/pdf", &vec![0u8; 40 * 1024]);
        assert_eq!(pdf_pages(opaque.inline().unwrap().1), 3);
        let url = MediaSource::Url {
            url: "https://example.com/a.pdf".into(),
        };
        assert_eq!(
            ImageRule::TILES.pdf(&url),
            PDF_URL_PAGES * (PDF_TEXT_PER_PAGE + 1445)
        );
    }

    proptest::proptest! {
        /// Every size: the tile count is at least the provider's (computed the docs' way with
        /// exact arithmetic) and at most 8; patches and area stay under their maxima.
        #[test]
        fn rules_stay_within_their_maxima(w in 1u32..20_000, h in 1u32..20_000) {
            let t = openai_tiles(w, h);
            proptest::prop_assert!((1..=8).contains(&t));
            for rule in [ImageRule::TILES, ImageRule::Patches { milli: 2460 }, ImageRule::Area] {
                proptest::prop_assert!(rule.tokens(w, h, None) <= rule.max(None));
            }
        }
    }
}
