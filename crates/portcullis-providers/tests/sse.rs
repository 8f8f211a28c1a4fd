//! The SSE decoder over every recording: any split, down to single bytes, and any line ending
//! gives the same events; arbitrary bytes never panic.

mod common;

use portcullis_providers::{SseDecoder, SseEvent};
use proptest::prelude::*;

/// Decodes `input` fed in the given pieces.
fn decode(pieces: &[&[u8]]) -> Result<Vec<SseEvent>, portcullis_core::LlmError> {
    let mut d = SseDecoder::new();
    let mut out = Vec::new();
    for p in pieces {
        d.push(p);
        while let Some(e) = d.next_event()? {
            out.push(e);
        }
    }
    while let Some(e) = d.finish()? {
        out.push(e);
    }
    Ok(out)
}

#[test]
fn recordings_split_at_every_byte_boundary() {
    let recordings = common::sse_recordings();
    std::thread::scope(|scope| {
        for (name, body) in &recordings {
            scope.spawn(move || {
                let whole = decode(&[body]).unwrap();
                assert!(whole.len() >= 5, "{name}");
                // `head` has been fed body[..i] and drained of its `k` events (each checked
                // against `whole` as it came): the state a split at i leaves.
                let mut head = SseDecoder::new();
                let mut k = 0;
                for i in 0..=body.len() {
                    let mut d = head.clone();
                    let mut n = k;
                    d.push(&body[i..]);
                    while let Some(e) = d.next_event().unwrap().or_else(|| d.finish().unwrap()) {
                        assert_eq!(Some(&e), whole.get(n), "{name} split at {i}");
                        n += 1;
                    }
                    assert_eq!(n, whole.len(), "{name} split at {i}");
                    if i < body.len() {
                        head.push(&body[i..i + 1]);
                        while let Some(e) = head.next_event().unwrap() {
                            assert_eq!(Some(&e), whole.get(k), "{name} prefix {i}");
                            k += 1;
                        }
                    }
                }
                let bytes: Vec<&[u8]> = body.chunks(1).collect();
                assert_eq!(decode(&bytes).unwrap(), whole, "{name} byte by byte");
            });
        }
    });
}

#[test]
fn recordings_with_every_line_ending() {
    for (name, body) in common::sse_recordings() {
        let text = String::from_utf8(body.to_vec()).unwrap();
        let whole = decode(&[text.as_bytes()]).unwrap();
        for eol in ["\r\n", "\r"] {
            let converted = text.replace('\n', eol);
            let b = converted.as_bytes();
            assert_eq!(decode(&[b]).unwrap(), whole, "{name} {eol:?}");
            let bytes: Vec<&[u8]> = b.chunks(1).collect();
            assert_eq!(
                decode(&bytes).unwrap(),
                whole,
                "{name} {eol:?} byte by byte"
            );
        }
    }
}

#[test]
fn last_event_without_trailing_blank_line_is_dispatched() {
    let body = std::fs::read(common::data_path(
        "anthropic/anthropic-sdk-python_basic_response.sse",
    ))
    .unwrap();
    assert!(!body.ends_with(b"\n"), "the recording ends mid-line");
    let events = decode(&[&body]).unwrap();
    let last = events.last().unwrap();
    assert_eq!(last.event, "message_stop");
    assert_eq!(last.data, r#"{"type":"message_stop"}"#);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048), cut in any::<prop::sample::Index>()) {
        let i = cut.index(bytes.len() + 1);
        let whole = decode(&[&bytes]);
        let split = decode(&[&bytes[..i], &bytes[i..]]);
        // Same result, however it was split.
        prop_assert_eq!(whole.map_err(|e| e.kind()), split.map_err(|e| e.kind()));
    }

    #[test]
    fn sse_like_text_splits_consistently(
        lines in proptest::collection::vec(
            prop_oneof!["data:[ -~]{0,12}", "event: [a-z_]{0,8}", ":[ -~]{0,5}", Just(String::new()), "id: [0-9]{1,3}"],
            0..40,
        ),
        eol in prop_oneof![Just("\n"), Just("\r\n"), Just("\r")],
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
    ) {
        let text = lines.join(eol);
        let b = text.as_bytes();
        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(b.len() + 1)).collect();
        points.sort_unstable();
        let mut pieces = Vec::new();
        let mut last = 0;
        for p in points {
            pieces.push(&b[last..p]);
            last = p;
        }
        pieces.push(&b[last..]);
        prop_assert_eq!(decode(&pieces).unwrap(), decode(&[b]).unwrap());
    }
}
