//! What both APIs share about tools and thinking: the tools offered, how the tool choice is
//! decided, the planned calls, and the signatures of thinking blocks.
//!
//! ## The tool choice rule
//!
//! - No tools, or a choice of `none`: no call, a text answer.
//! - A named tool (OpenAI `{"type":"function","function":{"name":…}}`, Anthropic
//!   `{"type":"tool","name":…}`): exactly that tool is called.
//! - `auto`: if the last message is a tool result (OpenAI `role:"tool"`, Anthropic a user turn
//!   of `tool_result` blocks), no call: a text answer that sums it up (which is what ends an
//!   agent loop). Otherwise, the tools whose name occurs in the last user message (whole word or
//!   not, case-insensitively) are called, in the order they occur; with parallel calls off,
//!   only the first of them. No name mentioned: no call.
//! - `required` (OpenAI) / `any` (Anthropic): as `auto`, but always at least one call (the
//!   first tool offered when none is mentioned), even after a tool result.
//!
//! Arguments are [`crate::schema::example`]s of each tool's schema.

use serde_json::Value;

use crate::generate::fingerprint;
use crate::media::b64_encode;
use crate::schema;

/// One tool offered: its name and the JSON Schema of its input.
#[derive(Debug, Clone)]
pub(crate) struct ToolSpec {
    pub name: String,
    pub schema: Value,
}

/// How the request lets the model choose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Choice {
    /// The model decides (the default when tools are offered).
    Auto,
    /// At least one call (OpenAI `required`, Anthropic `any`).
    Required,
    /// No call.
    None,
    /// This tool.
    Named(String),
}

/// The tools of a request and how to choose among them.
#[derive(Debug, Clone)]
pub(crate) struct ToolPlan {
    pub tools: Vec<ToolSpec>,
    pub choice: Choice,
    /// More than one call per turn allowed.
    pub parallel: bool,
}

/// A call the answer makes: the tool's name and its arguments.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PlannedCall {
    pub name: String,
    pub arguments: Value,
}

impl ToolPlan {
    /// The calls to make (see the module documentation for the rule), given the text of the
    /// last user message and whether the last message is a tool result.
    pub(crate) fn decide(&self, last_user: &str, after_tool_result: bool) -> Vec<PlannedCall> {
        let names: Vec<&ToolSpec> = match &self.choice {
            _ if self.tools.is_empty() => Vec::new(),
            Choice::None => Vec::new(),
            Choice::Named(n) => self.tools.iter().filter(|t| &t.name == n).take(1).collect(),
            Choice::Auto if after_tool_result => Vec::new(),
            Choice::Auto | Choice::Required => {
                let text = last_user.to_lowercase();
                let mut found: Vec<(usize, &ToolSpec)> = self
                    .tools
                    .iter()
                    .filter_map(|t| Some((text.find(&t.name.to_lowercase())?, t)))
                    .collect();
                found.sort_by_key(|(at, _)| *at);
                let mut found: Vec<&ToolSpec> = found.into_iter().map(|(_, t)| t).collect();
                if found.is_empty() && self.choice == Choice::Required {
                    found.extend(self.tools.first());
                }
                if !self.parallel {
                    found.truncate(1);
                }
                found
            }
        };
        names
            .into_iter()
            .map(|t| PlannedCall {
                name: t.name.clone(),
                arguments: schema::example(&t.schema),
            })
            .collect()
    }
}

/// Whether a tool name is valid for both APIs: `^[a-zA-Z0-9_-]{1,64}$`.
pub(crate) fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The simulator's secret for thinking signatures. Not a real secret: it only makes a
/// signature something the simulator produced, so a modified thinking block is caught.
const SIGNING_KEY: &[u8] = b"portcullis-sim thinking signature v1";

/// The signature of a thinking block's text: a keyed hash (eight rounds of FNV-1a over the key,
/// the round and the text, 64 bytes), base64.
pub(crate) fn sign(thinking: &str) -> String {
    let mut bytes = Vec::with_capacity(64);
    for round in 0u8..8 {
        let h = fingerprint(0, &[SIGNING_KEY, &[round], thinking.as_bytes()]);
        bytes.extend_from_slice(&h.to_be_bytes());
    }
    b64_encode(&bytes)
}

/// Whether `signature` is the simulator's signature of `thinking`.
pub(crate) fn verify(thinking: &str, signature: &str) -> bool {
    sign(thinking) == signature
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn plan(choice: Choice, parallel: bool) -> ToolPlan {
        let tool = |name: &str| ToolSpec {
            name: name.into(),
            schema: json!({"type": "object", "properties": {"q": {"type": "string"}},
                           "required": ["q"]}),
        };
        ToolPlan {
            tools: vec![tool("get_weather"), tool("get_time")],
            choice,
            parallel,
        }
    }

    fn names(calls: &[PlannedCall]) -> Vec<&str> {
        calls.iter().map(|c| c.name.as_str()).collect()
    }

    #[test]
    fn the_choice_rule() {
        let both = "use get_time and then get_weather";
        assert_eq!(
            names(&plan(Choice::Auto, true).decide(both, false)),
            ["get_time", "get_weather"]
        );
        assert_eq!(
            names(&plan(Choice::Auto, false).decide(both, false)),
            ["get_time"]
        );
        assert!(plan(Choice::Auto, true).decide(both, true).is_empty());
        assert!(plan(Choice::Auto, true).decide("hello", false).is_empty());
        assert!(plan(Choice::None, true).decide(both, false).is_empty());
        assert_eq!(
            names(&plan(Choice::Required, true).decide("hello", true)),
            ["get_weather"]
        );
        let named = plan(Choice::Named("get_time".into()), true).decide("hello", false);
        assert_eq!(names(&named), ["get_time"]);
        assert!(named[0].arguments["q"].is_string());
    }

    #[test]
    fn names_and_signatures() {
        assert!(valid_name("get_weather-2"));
        assert!(!valid_name("get weather") && !valid_name("") && !valid_name(&"a".repeat(65)));
        let s = sign("I think.");
        assert!(verify("I think.", &s));
        assert!(!verify("I think!", &s));
        assert_eq!(s.len(), 88);
    }
}
