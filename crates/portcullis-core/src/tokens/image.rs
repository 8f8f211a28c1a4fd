//! Image dimensions from the first bytes of a PNG, GIF, JPEG or WebP file, without decoding
//! it, and from its base64 without decoding the base64 either.
//!
//! Each parser reads only the header fields it needs (PNG `IHDR`, GIF logical screen, the JPEG
//! `SOFn` segment found by walking the markers, WebP `VP8 ` / `VP8L` / `VP8X`). Any input,
//! garbage included, gives a size or an [`ImageError`]: never a panic, never a read out of
//! bounds, and never more steps than the input has bytes.

use std::fmt;

/// An image format the parsers read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageFormat {
    /// PNG.
    Png,
    /// GIF (87a or 89a).
    Gif,
    /// JPEG (JFIF, Exif, any `SOFn`).
    Jpeg,
    /// WebP (lossy, lossless or extended).
    WebP,
}

impl ImageFormat {
    /// The format's media type (`image/png`, `image/gif`, `image/jpeg`, `image/webp`).
    pub fn media_type(self) -> &'static str {
        match self {
            ImageFormat::Png => "image/png",
            ImageFormat::Gif => "image/gif",
            ImageFormat::Jpeg => "image/jpeg",
            ImageFormat::WebP => "image/webp",
        }
    }
}

/// The size of an image, from its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ImageSize {
    /// Its format.
    pub format: ImageFormat,
    /// Width in pixels (never 0).
    pub width: u32,
    /// Height in pixels (never 0).
    pub height: u32,
}

/// Why an image's size could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ImageError {
    /// Not a PNG, GIF, JPEG or WebP signature.
    UnknownFormat,
    /// The data ends before the size.
    Truncated,
    /// The signature is known but the header is not valid (the reason).
    Malformed(&'static str),
    /// The base64 has a character outside the alphabet.
    InvalidBase64,
}

impl fmt::Display for ImageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageError::UnknownFormat => f.write_str("not a PNG, GIF, JPEG or WebP image"),
            ImageError::Truncated => f.write_str("image data ends before its size"),
            ImageError::Malformed(why) => write!(f, "malformed image header: {why}"),
            ImageError::InvalidBase64 => f.write_str("invalid base64 image data"),
        }
    }
}

impl std::error::Error for ImageError {}

/// The size of an image from its bytes.
///
/// ```
/// use portcullis_core::tokens::{image_size, ImageFormat};
///
/// // A GIF header: "GIF89a", width 300, height 200 (little-endian).
/// let gif = b"GIF89a\x2c\x01\xc8\x00\x00\x00\x00";
/// let size = image_size(gif).unwrap();
/// assert_eq!((size.format, size.width, size.height), (ImageFormat::Gif, 300, 200));
/// assert!(image_size(b"not an image").is_err());
/// ```
pub fn image_size(bytes: &[u8]) -> Result<ImageSize, ImageError> {
    parse(&bytes)
}

/// The size of an image from its standard base64 (padding optional; `-` and `_` accepted), read
/// in place: only the bytes the header needs are decoded, and nothing is allocated.
pub fn image_size_base64(data: &str) -> Result<ImageSize, ImageError> {
    let view = Base64View::new(data);
    match parse(&view) {
        Err(_) if view.invalid_before(view.checked_to()) => Err(ImageError::InvalidBase64),
        r => r,
    }
}

/// Random access to bytes.
pub(crate) trait Bytes {
    fn len(&self) -> usize;
    fn at(&self, i: usize) -> Option<u8>;
}

impl Bytes for &[u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }
    fn at(&self, i: usize) -> Option<u8> {
        self.get(i).copied()
    }
}

/// The bytes a base64 text decodes to, decoded on demand.
pub(crate) struct Base64View<'a> {
    text: &'a [u8],
    /// How far [`Bytes::at`] has read (in characters), for [`Base64View::invalid_before`].
    read_to: std::cell::Cell<usize>,
}

impl<'a> Base64View<'a> {
    pub(crate) fn new(data: &'a str) -> Self {
        let text = data.trim_end_matches('=').as_bytes();
        Base64View {
            text,
            read_to: std::cell::Cell::new(0),
        }
    }

    fn checked_to(&self) -> usize {
        self.read_to.get()
    }

    /// Whether a character before `end` is outside the alphabet.
    fn invalid_before(&self, end: usize) -> bool {
        self.text[..end.min(self.text.len())]
            .iter()
            .any(|&c| sextet(c).is_none())
    }

    /// Calls `f` with the decoded bytes, in order, a few at a time (no allocation).
    pub(crate) fn for_each_chunk(&self, mut f: impl FnMut(&[u8])) {
        let mut buf = [0u8; 3 * 256];
        for block in self.text.chunks(4 * 256) {
            let mut n = 0;
            for quad in block.chunks(4) {
                let Some(bytes) = decode_quad(quad) else {
                    f(&buf[..n]);
                    return;
                };
                let k = quad.len() - 1;
                buf[n..n + k].copy_from_slice(&bytes[..k]);
                n += k;
            }
            f(&buf[..n]);
        }
    }
}

fn sextet(c: u8) -> Option<u32> {
    Some(match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' | b'-' => 62,
        b'/' | b'_' => 63,
        _ => return None,
    } as u32)
}

/// The (up to) three bytes of one group of (up to) four characters; `None` on a bad character
/// or a lone trailing character.
pub(crate) fn decode_quad(quad: &[u8]) -> Option<[u8; 3]> {
    if quad.len() < 2 {
        return None;
    }
    let mut n = 0u32;
    for (i, &c) in quad.iter().enumerate() {
        n |= sextet(c)? << (18 - 6 * i);
    }
    Some([(n >> 16) as u8, (n >> 8) as u8, n as u8])
}

impl Bytes for Base64View<'_> {
    fn len(&self) -> usize {
        let full = self.text.len() / 4 * 3;
        match self.text.len() % 4 {
            2 => full + 1,
            3 => full + 2,
            _ => full,
        }
    }

    fn at(&self, i: usize) -> Option<u8> {
        if i >= self.len() {
            return None;
        }
        let start = i / 3 * 4;
        let end = (start + 4).min(self.text.len());
        if end > self.read_to.get() {
            self.read_to.set(end);
        }
        decode_quad(&self.text[start..end]).map(|b| b[i % 3])
    }
}

fn be16(b: &impl Bytes, i: usize) -> Option<u32> {
    Some(u32::from(b.at(i)?) << 8 | u32::from(b.at(i + 1)?))
}

fn le16(b: &impl Bytes, i: usize) -> Option<u32> {
    Some(u32::from(b.at(i)?) | u32::from(b.at(i + 1)?) << 8)
}

fn le24(b: &impl Bytes, i: usize) -> Option<u32> {
    Some(le16(b, i)? | u32::from(b.at(i + 2)?) << 16)
}

fn be32(b: &impl Bytes, i: usize) -> Option<u32> {
    Some(be16(b, i)? << 16 | be16(b, i + 2)?)
}

fn starts_with(b: &impl Bytes, at: usize, sig: &[u8]) -> Option<bool> {
    for (k, &s) in sig.iter().enumerate() {
        if b.at(at + k)? != s {
            return Some(false);
        }
    }
    Some(true)
}

fn size(format: ImageFormat, width: u32, height: u32) -> Result<ImageSize, ImageError> {
    if width == 0 || height == 0 {
        return Err(ImageError::Malformed("zero width or height"));
    }
    Ok(ImageSize {
        format,
        width,
        height,
    })
}

pub(crate) fn parse(b: &impl Bytes) -> Result<ImageSize, ImageError> {
    const T: ImageError = ImageError::Truncated;
    let is = |at, sig| starts_with(b, at, sig).unwrap_or(false);
    if is(0, b"\x89PNG\r\n\x1a\n") {
        if !starts_with(b, 12, b"IHDR").ok_or(T)? {
            return Err(ImageError::Malformed("PNG without IHDR first"));
        }
        let (w, h) = (be32(b, 16).ok_or(T)?, be32(b, 20).ok_or(T)?);
        if w > i32::MAX as u32 || h > i32::MAX as u32 {
            return Err(ImageError::Malformed("PNG size above 2^31 - 1"));
        }
        return size(ImageFormat::Png, w, h);
    }
    if is(0, b"GIF87a") || is(0, b"GIF89a") {
        return size(ImageFormat::Gif, le16(b, 6).ok_or(T)?, le16(b, 8).ok_or(T)?);
    }
    if is(0, b"\xff\xd8") {
        return jpeg(b);
    }
    if is(0, b"RIFF") && is(8, b"WEBP") {
        return webp(b);
    }
    if b.len() < 12 {
        // Too short to tell a WebP (12 bytes) or a truncated PNG signature from garbage.
        return Err(T);
    }
    Err(ImageError::UnknownFormat)
}

/// Walks the markers from after SOI to the first `SOFn` (start of frame), which holds the
/// size. Each step moves forward at least one byte, so the walk ends.
fn jpeg(b: &impl Bytes) -> Result<ImageSize, ImageError> {
    const T: ImageError = ImageError::Truncated;
    let mut i = 2;
    loop {
        // A marker: 0xFF, optional 0xFF fill bytes, then the marker code.
        if b.at(i).ok_or(T)? != 0xFF {
            return Err(ImageError::Malformed(
                "JPEG segment not followed by a marker",
            ));
        }
        while b.at(i).ok_or(T)? == 0xFF {
            i += 1;
        }
        let marker = b.at(i).ok_or(T)?;
        i += 1;
        match marker {
            // Standalone markers: no length.
            0x01 | 0xD0..=0xD7 => continue,
            0xD8 => return Err(ImageError::Malformed("JPEG SOI inside the image")),
            0xD9 => return Err(ImageError::Malformed("JPEG ends before a frame header")),
            0xDA => return Err(ImageError::Malformed("JPEG scan before a frame header")),
            0x00 => return Err(ImageError::Malformed("JPEG stuffed byte outside a scan")),
            // SOF0..SOF15, except DHT (C4), JPG (C8) and DAC (CC).
            0xC0..=0xCF if !matches!(marker, 0xC4 | 0xC8 | 0xCC) => {
                // length (2), precision (1), height (2), width (2).
                let len = be16(b, i).ok_or(T)?;
                if len < 7 {
                    return Err(ImageError::Malformed("JPEG frame header too short"));
                }
                let h = be16(b, i + 3).ok_or(T)?;
                let w = be16(b, i + 5).ok_or(T)?;
                return size(ImageFormat::Jpeg, w, h);
            }
            _ => {
                let len = be16(b, i).ok_or(T)? as usize;
                if len < 2 {
                    return Err(ImageError::Malformed("JPEG segment length below 2"));
                }
                i += len;
            }
        }
    }
}

fn webp(b: &impl Bytes) -> Result<ImageSize, ImageError> {
    const T: ImageError = ImageError::Truncated;
    let chunk = |sig| starts_with(b, 12, sig).ok_or(T);
    if chunk(b"VP8 ")? {
        // Frame tag (3 bytes at 20), start code 9D 01 2A, then 14-bit width and height.
        if !starts_with(b, 23, b"\x9d\x01\x2a").ok_or(T)? {
            return Err(ImageError::Malformed("WebP VP8 without its start code"));
        }
        let w = le16(b, 26).ok_or(T)? & 0x3FFF;
        let h = le16(b, 28).ok_or(T)? & 0x3FFF;
        return size(ImageFormat::WebP, w, h);
    }
    if chunk(b"VP8L")? {
        // Signature 0x2F, then 14 bits width - 1 and 14 bits height - 1, little-endian.
        if b.at(20).ok_or(T)? != 0x2F {
            return Err(ImageError::Malformed("WebP VP8L without its signature"));
        }
        let bits = u32::from(b.at(21).ok_or(T)?)
            | u32::from(b.at(22).ok_or(T)?) << 8
            | u32::from(b.at(23).ok_or(T)?) << 16
            | u32::from(b.at(24).ok_or(T)?) << 24;
        return size(
            ImageFormat::WebP,
            (bits & 0x3FFF) + 1,
            ((bits >> 14) & 0x3FFF) + 1,
        );
    }
    if chunk(b"VP8X")? {
        // Flags (1) and reserved (3) at 20, then 24-bit canvas width - 1 and height - 1.
        let w = le24(b, 24).ok_or(T)? + 1;
        let h = le24(b, 27).ok_or(T)? + 1;
        return size(ImageFormat::WebP, w, h);
    }
    Err(ImageError::Malformed(
        "WebP without a VP8, VP8L or VP8X chunk",
    ))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::content::base64_encode;

    pub(crate) fn png(w: u32, h: u32) -> Vec<u8> {
        let mut v = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR".to_vec();
        v.extend_from_slice(&w.to_be_bytes());
        v.extend_from_slice(&h.to_be_bytes());
        v.extend_from_slice(&[8, 6, 0, 0, 0, 0, 0, 0, 0]); // depth, colour, …, CRC (unchecked)
        v
    }

    fn gif(w: u16, h: u16) -> Vec<u8> {
        let mut v = b"GIF87a".to_vec();
        v.extend_from_slice(&w.to_le_bytes());
        v.extend_from_slice(&h.to_le_bytes());
        v.extend_from_slice(&[0, 0, 0]);
        v
    }

    /// SOI, an APP0 (JFIF) segment, a big APP1 (as Exif data would be), a DQT, then SOF.
    pub(crate) fn jpeg(w: u16, h: u16, sof: u8) -> Vec<u8> {
        let mut v = vec![0xFF, 0xD8];
        v.extend_from_slice(&[0xFF, 0xE0, 0x00, 0x10]);
        v.extend_from_slice(b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00");
        v.extend_from_slice(&[0xFF, 0xE1, 0x40, 0x02]); // APP1 of 16 384 bytes
        v.extend(std::iter::repeat_n(0xAB, 0x4000));
        v.extend_from_slice(&[0xFF, 0xFF, 0xDB, 0x00, 0x04, 0x00, 0x00]); // fill byte + DQT
        v.extend_from_slice(&[0xFF, sof, 0x00, 0x11, 0x08]);
        v.extend_from_slice(&h.to_be_bytes());
        v.extend_from_slice(&w.to_be_bytes());
        v.extend_from_slice(&[3, 1, 0x22, 0, 2, 0x11, 1, 3, 0x11, 1]);
        v.extend_from_slice(&[0xFF, 0xD9]);
        v
    }

    fn riff(chunk: &[u8], payload: &[u8]) -> Vec<u8> {
        let mut v = b"RIFF".to_vec();
        v.extend_from_slice(&((payload.len() + 12) as u32).to_le_bytes());
        v.extend_from_slice(b"WEBP");
        v.extend_from_slice(chunk);
        v.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        v.extend_from_slice(payload);
        v
    }

    fn webp_lossy(w: u16, h: u16) -> Vec<u8> {
        let mut p = vec![0x30, 0x01, 0x00, 0x9D, 0x01, 0x2A];
        p.extend_from_slice(&w.to_le_bytes());
        p.extend_from_slice(&h.to_le_bytes());
        riff(b"VP8 ", &p)
    }

    fn webp_lossless(w: u32, h: u32) -> Vec<u8> {
        let bits = (w - 1) | (h - 1) << 14;
        let mut p = vec![0x2F];
        p.extend_from_slice(&bits.to_le_bytes());
        riff(b"VP8L", &p)
    }

    fn webp_extended(w: u32, h: u32) -> Vec<u8> {
        let mut p = vec![0x10, 0, 0, 0];
        p.extend_from_slice(&(w - 1).to_le_bytes()[..3]);
        p.extend_from_slice(&(h - 1).to_le_bytes()[..3]);
        riff(b"VP8X", &p)
    }

    fn both(bytes: &[u8]) -> Result<ImageSize, ImageError> {
        let direct = image_size(bytes);
        let b64 = image_size_base64(&base64_encode(bytes));
        assert_eq!(direct, b64, "bytes and base64 disagree");
        direct
    }

    fn dims(bytes: &[u8]) -> (ImageFormat, u32, u32) {
        let s = both(bytes).unwrap();
        (s.format, s.width, s.height)
    }

    #[test]
    fn reads_each_format() {
        use ImageFormat::*;
        assert_eq!(dims(&png(1024, 768)), (Png, 1024, 768));
        assert_eq!(dims(&png(1, 70_000)), (Png, 1, 70_000));
        assert_eq!(dims(&gif(300, 200)), (Gif, 300, 200));
        assert_eq!(dims(&jpeg(4032, 3024, 0xC0)), (Jpeg, 4032, 3024));
        assert_eq!(dims(&jpeg(640, 480, 0xC2)), (Jpeg, 640, 480)); // progressive
        assert_eq!(dims(&webp_lossy(800, 600)), (WebP, 800, 600));
        assert_eq!(dims(&webp_lossless(16_384, 3)), (WebP, 16_384, 3));
        assert_eq!(dims(&webp_extended(10_000, 7_000)), (WebP, 10_000, 7_000));
    }

    #[test]
    fn refuses_garbage_and_truncation() {
        assert_eq!(both(b""), Err(ImageError::Truncated));
        assert_eq!(both(b"hello, world!"), Err(ImageError::UnknownFormat));
        let p = png(10, 10);
        for cut in 0..24 {
            assert!(both(&p[..cut]).is_err(), "png cut at {cut}");
        }
        let j = jpeg(10, 10, 0xC0);
        for cut in [2, 3, 4, 10, 30, 5000, j.len() - 20] {
            assert_eq!(
                both(&j[..cut]),
                Err(ImageError::Truncated),
                "jpeg cut at {cut}"
            );
        }
        assert!(matches!(both(&png(0, 10)), Err(ImageError::Malformed(_))));
        // A JPEG whose only frame header is missing: EOI first.
        assert!(matches!(
            both(&[0xFF, 0xD8, 0xFF, 0xD9]),
            Err(ImageError::Malformed(_))
        ));
        // DHT (C4) is not a frame header.
        let mut dht = vec![0xFF, 0xD8, 0xFF, 0xC4, 0x00, 0x02];
        dht.extend_from_slice(&jpeg(5, 6, 0xC1)[2..]);
        assert_eq!(dims(&dht), (ImageFormat::Jpeg, 5, 6));
        assert!(matches!(
            both(&riff(b"ALPH", &[0; 16])),
            Err(ImageError::Malformed(_))
        ));
        assert_eq!(
            image_size_base64("iVBO!!!!"),
            Err(ImageError::InvalidBase64)
        );
    }

    #[test]
    fn base64_view_decodes_like_the_decoder() {
        for n in 0..50usize {
            let bytes: Vec<u8> = (0..n).map(|i| (i * 97 + 5) as u8).collect();
            let enc = base64_encode(&bytes);
            let view = Base64View::new(&enc);
            assert_eq!(view.len(), n);
            let got: Vec<u8> = (0..n).map(|i| view.at(i).unwrap()).collect();
            assert_eq!(got, bytes);
            assert_eq!(view.at(n), None);
            let mut streamed = Vec::new();
            view.for_each_chunk(|c| streamed.extend_from_slice(c));
            assert_eq!(streamed, bytes);
        }
    }

    proptest::proptest! {
        /// Any bytes: a size or an error, never a panic; and the base64 path agrees.
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = both(&bytes);
        }

        /// Any bytes after a real signature (the parsers get past the first check).
        #[test]
        fn never_panics_after_a_signature(
            sig in 0usize..5,
            tail in proptest::collection::vec(proptest::num::u8::ANY, 0..256),
        ) {
            let head: &[u8] = match sig {
                0 => b"\x89PNG\r\n\x1a\n",
                1 => b"GIF89a",
                2 => b"\xff\xd8\xff",
                3 => b"RIFF\x00\x00\x00\x00WEBPVP8 ",
                _ => b"RIFF\x00\x00\x00\x00WEBPVP8L",
            };
            let mut v = head.to_vec();
            v.extend_from_slice(&tail);
            if let Ok(s) = both(&v) {
                proptest::prop_assert!(s.width > 0 && s.height > 0);
            }
        }

        /// Any text as base64: never a panic.
        #[test]
        fn base64_never_panics(text in ".{0,200}") {
            let _ = image_size_base64(&text);
        }

        /// Real headers of any size read back exactly.
        #[test]
        fn round_trips(w in 1u32..=16_383, h in 1u32..=16_383) {
            proptest::prop_assert_eq!(dims(&png(w, h)), (ImageFormat::Png, w, h));
            proptest::prop_assert_eq!(dims(&gif(w as u16, h as u16)), (ImageFormat::Gif, w, h));
            proptest::prop_assert_eq!(
                dims(&jpeg(w as u16, h as u16, 0xC0)),
                (ImageFormat::Jpeg, w, h)
            );
            proptest::prop_assert_eq!(dims(&webp_lossless(w, h)), (ImageFormat::WebP, w, h));
            proptest::prop_assert_eq!(dims(&webp_extended(w, h)), (ImageFormat::WebP, w, h));
            proptest::prop_assert_eq!(
                dims(&webp_lossy(w as u16, h as u16)),
                (ImageFormat::WebP, w, h)
            );
        }
    }
}
