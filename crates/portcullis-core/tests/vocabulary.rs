//! Property tests over the vocabulary's parsers: tool arguments, data URLs, base64, image
//! sniffing, tool definitions and the serde forms of messages. Arbitrary input gives a value
//! or a typed error, never a panic; what is written reads back the same.

use portcullis_core::{
    ChatMessage, MediaSource, Part, Role, Tool, ToolCall, base64_decode, image_media_type,
};
use proptest::prelude::*;
use serde_json::json;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn tool_arguments_parse_or_give_a_typed_error(raw in ".{0,64}") {
        let call = ToolCall::new("call_1", "f", raw.clone());
        match call.arguments_json() {
            Ok(v) => prop_assert_eq!(v, if raw.trim().is_empty() { json!({}) } else { serde_json::from_str(&raw).unwrap() }),
            Err(e) => {
                prop_assert_eq!((e.tool(), e.id()), ("f", "call_1"));
                prop_assert!(serde_json::from_str::<serde_json::Value>(&raw).is_err());
            }
        }
        prop_assert_eq!(call.arguments, raw, "the raw string is kept");
    }

    #[test]
    fn base64_reads_back_what_was_written(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let source = MediaSource::base64("image/png", &bytes);
        let (media_type, data) = source.inline().unwrap();
        prop_assert_eq!(media_type, "image/png");
        prop_assert_eq!(base64_decode(data), Some(bytes.clone()));
        prop_assert_eq!(source.decoded_len(), Some(bytes.len()));
        let url = format!("data:image/png;base64,{data}");
        prop_assert_eq!(MediaSource::parse_data_url(&url), Some(("image/png", data)));
    }

    #[test]
    fn arbitrary_text_never_panics_the_media_parsers(text in ".{0,80}", bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let _ = base64_decode(&text);
        let _ = MediaSource::parse_data_url(&text);
        let _ = MediaSource::Url { url: text.clone() }.decoded_len();
        let _ = image_media_type(&bytes);
    }

    #[test]
    fn tool_definitions_are_checked_not_trusted(name in ".{0,70}", kind in prop::sample::select(vec!["object", "string", "array"])) {
        let params = json!({"type": kind});
        let valid_name = !name.is_empty()
            && name.len() <= 64
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        match Tool::new(name.clone(), "d", params) {
            Ok(t) => {
                prop_assert!(valid_name && kind == "object");
                prop_assert!(t.validate().is_ok());
            }
            Err(e) => {
                prop_assert!(!valid_name || kind != "object");
                prop_assert!(!e.to_string().is_empty());
            }
        }
    }

    #[test]
    fn messages_round_trip_through_serde(text in ".{0,40}", call_args in "[a-z{}\":0-9 ]{0,20}", cached in any::<bool>()) {
        let mut first = Part::text(text.clone());
        if cached {
            first = first.cached(portcullis_core::CacheControl::ephemeral());
        }
        for m in [
            ChatMessage::user(text.clone()),
            ChatMessage::user_parts(vec![first, Part::image_url("https://example.com/a.png")]),
            ChatMessage::assistant_parts(vec![
                Part::Thinking { thinking: text.clone(), signature: Some("sig".into()) },
                Part::ToolCall(ToolCall::new("c1", "f", call_args.clone())),
            ]),
            ChatMessage::tool_result("c1", text.clone()),
            ChatMessage::tool_error("c1", text.clone()),
        ] {
            let json = serde_json::to_string(&m).unwrap();
            let back: ChatMessage = serde_json::from_str(&json).unwrap();
            prop_assert_eq!(back, m);
        }
    }
}

#[test]
fn a_plain_message_is_a_string_on_the_wire_and_a_list_reads_too() {
    let m = ChatMessage::user("hi");
    assert_eq!(
        serde_json::to_value(&m).unwrap(),
        json!({"role": "user", "content": "hi"})
    );
    let listed: ChatMessage = serde_json::from_value(
        json!({"role": "tool", "content": [{"type": "tool_result", "call_id": "c", "content": [{"type": "text", "text": "ok"}]}]}),
    )
    .unwrap();
    assert_eq!(listed, ChatMessage::tool_result("c", "ok"));
    assert_eq!(listed.role, Role::Tool);
    // An unknown part type is a typed serde error, not a panic.
    assert!(
        serde_json::from_value::<ChatMessage>(
            json!({"role": "user", "content": [{"type": "hologram"}]})
        )
        .is_err()
    );
}

#[test]
fn image_types_are_read_from_the_header() {
    let png = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR\0\0\0\x01\0\0\0\x01\x08\x02\0\0\0";
    assert_eq!(image_media_type(png), Some("image/png"));
    assert_eq!(
        image_media_type(b"GIF89a\x2c\x01\xc8\x00\x00\x00\x00"),
        Some("image/gif")
    );
    assert_eq!(
        image_media_type(b"\x89PNG\r\n\x1a\n"),
        None,
        "a header cut short"
    );
    assert_eq!(image_media_type(b"BM\0\0"), None);
    assert_eq!(image_media_type(b""), None);
}

#[test]
fn the_output_reservation_includes_the_thinking_budget() {
    use portcullis_core::{ChatCost, ChatRequest, CostOf, Reasoning, ReasoningEffort};
    let plain =
        ChatRequest::new("claude-sonnet-4-5", vec![ChatMessage::user("Hi")]).max_tokens(100);
    assert_eq!(ChatCost.cost(&plain).output, 100);
    let thinking = plain.clone().reasoning(Reasoning::budget(2000));
    assert_eq!(thinking.options.output_limit(), 2100);
    assert_eq!(
        ChatCost.cost(&thinking).output,
        2100,
        "what the wire sends as max_tokens"
    );
    // A budget below Anthropic's minimum is raised to it; an effort alone maps to a budget.
    assert_eq!(
        plain
            .clone()
            .reasoning(Reasoning::budget(10))
            .options
            .output_limit(),
        1124
    );
    let effort = plain.reasoning(Reasoning::effort(ReasoningEffort::High));
    assert_eq!(ChatCost.cost(&effort).output, 100 + 16_384);
}
