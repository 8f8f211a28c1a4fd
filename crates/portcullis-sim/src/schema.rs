//! A deterministic example value for a JSON Schema: what the simulator puts in tool call
//! arguments and structured (`json_schema`) output, so that it validates against the schema.
//!
//! The rule, per schema:
//! - `const` → that value; `enum` → its first value;
//! - `$ref` (`#/$defs/…`, `#/definitions/…`) → the referenced schema; `anyOf` / `oneOf` → the
//!   first branch that is not `{"type":"null"}`; `allOf` → its first branch;
//! - `object` → every `required` property (all `properties` when `required` is absent and
//!   `additionalProperties` is `false`, as OpenAI's strict mode demands), each recursively;
//! - `string` → a short word of the simulator's vocabulary chosen by the property's name
//!   (`format` `date-time`, `date`, `time`, `email`, `uri`/`url`, `uuid` get a valid value;
//!   `minLength` / `maxLength` are honoured; `pattern` is not);
//! - `integer` / `number` → 1, moved into `minimum` / `maximum` (exclusive bounds too);
//! - `boolean` → `true`; `null` → `null`;
//! - `array` → `[]`, or `minItems` examples of `items`;
//! - a list of types → its first non-null type; no type → by the keywords present, else `{}`.

use serde_json::{Map, Value, json};

use crate::generate::fingerprint;

/// Words a generated string is drawn from.
const WORDS: &[&str] = &[
    "pelican", "river", "harbor", "stone", "meadow", "lantern", "orchard", "falcon", "comet",
    "willow", "summit", "canyon",
];

/// How deep references and nesting may go before the generator gives up with `null`.
const MAX_DEPTH: usize = 24;
/// How many values one example may hold (a client's `minItems` cannot blow it up) before the
/// generator gives up with `null`.
const MAX_NODES: usize = 2000;

/// An example value that validates against `schema` (see the module documentation).
pub(crate) fn example(schema: &Value) -> Value {
    let mut nodes = 0;
    build(schema, schema, "value", 0, &mut nodes)
}

fn build(schema: &Value, root: &Value, name: &str, depth: usize, nodes: &mut usize) -> Value {
    *nodes += 1;
    if depth > MAX_DEPTH || *nodes > MAX_NODES {
        return Value::Null;
    }
    let Some(s) = schema.as_object() else {
        // `true` / `{}`-like schemas accept anything.
        return json!({});
    };
    if let Some(c) = s.get("const") {
        return c.clone();
    }
    if let Some(first) = s
        .get("enum")
        .and_then(Value::as_array)
        .and_then(|e| e.first())
    {
        return first.clone();
    }
    if let Some(r) = s.get("$ref").and_then(Value::as_str) {
        return match resolve(root, r) {
            Some(target) => build(target, root, name, depth + 1, nodes),
            None => Value::Null,
        };
    }
    for key in ["anyOf", "oneOf"] {
        if let Some(branches) = s.get(key).and_then(Value::as_array) {
            let pick = branches
                .iter()
                .find(|b| b.get("type").and_then(Value::as_str) != Some("null"))
                .or(branches.first());
            if let Some(b) = pick {
                return build(b, root, name, depth + 1, nodes);
            }
        }
    }
    if let Some(b) = s
        .get("allOf")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
    {
        return build(b, root, name, depth + 1, nodes);
    }
    let ty = match s.get("type") {
        Some(Value::String(t)) => t.as_str(),
        Some(Value::Array(ts)) => ts
            .iter()
            .filter_map(Value::as_str)
            .find(|t| *t != "null")
            .unwrap_or("null"),
        _ if s.contains_key("properties") => "object",
        _ if s.contains_key("items") => "array",
        _ => return json!({}),
    };
    match ty {
        "object" => object(s, root, depth, nodes),
        "array" => {
            let n = s
                .get("minItems")
                .and_then(Value::as_u64)
                .unwrap_or(0)
                .min(16);
            let items = s.get("items").unwrap_or(&Value::Null);
            Value::Array(
                (0..n)
                    .map(|_| build(items, root, name, depth + 1, nodes))
                    .collect(),
            )
        }
        "string" => Value::String(string(s, name)),
        "integer" => json!(number(s) as i64),
        "number" => {
            let n = number(s);
            if n.fract() == 0.0 && n.abs() < 1e15 {
                json!(n as i64)
            } else {
                json!(n)
            }
        }
        "boolean" => Value::Bool(true),
        _ => Value::Null,
    }
}

fn object(s: &Map<String, Value>, root: &Value, depth: usize, nodes: &mut usize) -> Value {
    let empty = Map::new();
    let props = s
        .get("properties")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let required: Vec<&str> = match s.get("required").and_then(Value::as_array) {
        Some(r) => r.iter().filter_map(Value::as_str).collect(),
        None if s.get("additionalProperties") == Some(&Value::Bool(false)) => {
            props.keys().map(String::as_str).collect()
        }
        None => Vec::new(),
    };
    let mut out = Map::new();
    for key in required {
        let sub = props.get(key).unwrap_or(&Value::Bool(true));
        out.insert(key.to_owned(), build(sub, root, key, depth + 1, nodes));
    }
    Value::Object(out)
}

/// `#/a/b` inside the root schema.
fn resolve<'a>(root: &'a Value, r: &str) -> Option<&'a Value> {
    let pointer = r.strip_prefix('#')?;
    root.pointer(pointer)
}

fn string(s: &Map<String, Value>, name: &str) -> String {
    let word = WORDS[(fingerprint(0, &[name.as_bytes()]) % WORDS.len() as u64) as usize];
    let mut out = match s.get("format").and_then(Value::as_str) {
        Some("date-time") => "2025-01-01T00:00:00Z".to_owned(),
        Some("date") => "2025-01-01".to_owned(),
        Some("time") => "00:00:00Z".to_owned(),
        Some("email") => format!("{word}@example.com"),
        Some("uri" | "url") => format!("https://example.com/{word}"),
        Some("uuid") => "00000000-0000-4000-8000-000000000000".to_owned(),
        _ => word.to_owned(),
    };
    let min = s
        .get("minLength")
        .and_then(Value::as_u64)
        .unwrap_or(0)
        .min(1024) as usize;
    while out.chars().count() < min {
        out.push('a');
    }
    if let Some(max) = s.get("maxLength").and_then(Value::as_u64) {
        out = out.chars().take(max as usize).collect();
    }
    out
}

fn number(s: &Map<String, Value>) -> f64 {
    let get = |k: &str| s.get(k).and_then(Value::as_f64);
    let mut n: f64 = 1.0;
    if let Some(min) = get("minimum") {
        n = n.max(min);
    }
    if let Some(min) = get("exclusiveMinimum") {
        if n <= min {
            n = min.floor() + 1.0;
        }
    }
    if let Some(max) = get("maximum") {
        n = n.min(max);
    }
    if let Some(max) = get("exclusiveMaximum") {
        if n >= max {
            n = max.ceil() - 1.0;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn examples_follow_the_rules() {
        let schema = json!({
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 3},
                "ratio": {"type": "number", "exclusiveMaximum": 0},
                "ok": {"type": "boolean"},
                "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2},
                "when": {"type": "string", "format": "date"},
                "opt": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/Inner"}]},
                "skipped": {"type": "string"}
            },
            "required": ["city", "unit", "days", "ratio", "ok", "tags", "when", "opt"],
            "$defs": {"Inner": {"type": "object", "properties": {"x": {"type": "integer"}},
                                "required": ["x"], "additionalProperties": false}}
        });
        let v = example(&schema);
        assert_eq!(v["unit"], "celsius");
        assert_eq!(v["days"], 3);
        assert_eq!(v["ratio"], -1);
        assert_eq!(v["ok"], true);
        assert_eq!(v["tags"].as_array().unwrap().len(), 2);
        assert_eq!(v["when"], "2025-01-01");
        assert_eq!(v["opt"], json!({"x": 1}));
        assert!(v["city"].as_str().is_some_and(|c| !c.is_empty()));
        assert!(v.get("skipped").is_none());
        assert_eq!(example(&schema), v, "deterministic");
        // A self-referencing schema ends.
        let looped = json!({"$ref": "#"});
        assert_eq!(example(&looped), Value::Null);
        // Nested minItems cannot blow the example up.
        let mut wide = json!({"type": "integer"});
        for _ in 0..20 {
            wide = json!({"type": "array", "items": wide, "minItems": 16});
        }
        assert!(example(&wide).to_string().len() < 100_000);
    }
}
