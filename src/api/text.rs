//! `Text`: a request field that must be a JSON string.
//!
//! poem-openapi's `String` also takes numbers and booleans (`{"code": 42}` would run the
//! program `42`). A client that sends the wrong type has a bug it should hear about, so every
//! string a request carries is a `Text`, which accepts JSON strings only and otherwise fails
//! like any other malformed body: a 400 whose message names the field and the value found
//! (see the field parsers below). Its schema is plain `string`.

use std::borrow::Cow;
use std::ops::Deref;

use poem_openapi::registry::MetaSchemaRef;
use poem_openapi::types::{ParseError, ParseFromJSON, ParseResult, ToJSON, Type};
use serde_json::Value;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Text(pub String);

impl Text {
    pub fn into_string(self) -> String {
        self.0
    }
}

impl From<&str> for Text {
    fn from(s: &str) -> Self {
        Text(s.to_owned())
    }
}

impl Deref for Text {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Type for Text {
    const IS_REQUIRED: bool = true;
    type RawValueType = String;
    type RawElementValueType = String;

    fn name() -> Cow<'static, str> {
        String::name()
    }

    fn schema_ref() -> MetaSchemaRef {
        String::schema_ref()
    }

    fn as_raw_value(&self) -> Option<&String> {
        Some(&self.0)
    }

    fn raw_element_iter<'a>(&'a self) -> Box<dyn Iterator<Item = &'a String> + 'a> {
        Box::new(std::iter::once(&self.0))
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl ParseFromJSON for Text {
    fn parse_from_json(value: Option<Value>) -> ParseResult<Self> {
        match value {
            Some(Value::String(s)) => Ok(Text(s)),
            other => Err(ParseError::expected_type(other.unwrap_or_default())),
        }
    }
}

impl ToJSON for Text {
    fn to_json(&self) -> Option<Value> {
        Some(Value::String(self.0.clone()))
    }
}

// ---- Field parsers that name the field. poem-openapi's derive says which object failed but
// not which field, so each string field of a request, and each integer of its `limits`,
// names itself through `#[oai(deserialize_with = "...")]` (`errors.rs` then says which
// object it sits in).

/// A request field that is missing or of the wrong type; the message names the field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum FieldError {
    #[error("required field `{0}` is missing")]
    Missing(String),
    #[error("`{field}` must be a JSON string, found {found}")]
    NotString { field: String, found: Value },
    #[error("`{field}` must be a list of JSON strings, found {found}")]
    NotList { field: String, found: Value },
    #[error("`{field}` must be a non-negative integer, found {found}")]
    NotCount { field: String, found: Value },
}

fn required(field: &str, value: Option<Value>) -> Result<Text, FieldError> {
    match value {
        Some(Value::String(s)) => Ok(Text(s)),
        None | Some(Value::Null) => Err(FieldError::Missing(field.into())),
        Some(found) => Err(FieldError::NotString {
            field: field.into(),
            found,
        }),
    }
}

fn optional(field: &str, value: Option<Value>) -> Result<Option<Text>, FieldError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        other => required(field, other).map(Some),
    }
}

fn optional_list(field: &str, value: Option<Value>) -> Result<Option<Vec<Text>>, FieldError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => items
            .into_iter()
            .enumerate()
            .map(|(i, item)| required(&format!("{field}[{i}]"), Some(item)))
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(found) => Err(FieldError::NotList {
            field: field.into(),
            found,
        }),
    }
}

/// A count or size: a JSON integer from 0 to `u64::MAX`, as poem-openapi's `u64` takes.
fn optional_u64(field: &str, value: Option<Value>) -> Result<Option<u64>, FieldError> {
    let found = match value {
        None | Some(Value::Null) => return Ok(None),
        Some(found) => found,
    };
    match found.as_u64() {
        Some(n) => Ok(Some(n)),
        None => Err(FieldError::NotCount {
            field: field.into(),
            found,
        }),
    }
}

macro_rules! named_parsers {
    ($($name:ident: $parse:ident($field:literal) -> $ty:ty;)*) => {
        $(
            pub(crate) fn $name(value: Option<Value>) -> ParseResult<$ty> {
                $parse($field, value).map_err(ParseError::custom)
            }
        )*
    };
}

named_parsers! {
    code_required: required("code") -> Text;
    code: optional("code") -> Option<Text>;
    runtime: optional("runtime") -> Option<Text>;
    version: optional("version") -> Option<Text>;
    entry: optional("entry") -> Option<Text>;
    stdin: optional("stdin") -> Option<Text>;
    expected_output: optional("expected_output") -> Option<Text>;
    file_name: optional("name") -> Option<Text>;
    test_name: optional("name") -> Option<Text>;
    batch_wall_time_ms: optional_u64("batch_wall_time_ms") -> Option<u64>;
    file_content: required("content") -> Text;
    args: optional_list("args") -> Option<Vec<Text>>;
    wall_time_ms: optional_u64("wall_time_ms") -> Option<u64>;
    cpu_time_ms: optional_u64("cpu_time_ms") -> Option<u64>;
    memory_bytes: optional_u64("memory_bytes") -> Option<u64>;
    processes: optional_u64("processes") -> Option<u64>;
    file_size_bytes: optional_u64("file_size_bytes") -> Option<u64>;
    open_files: optional_u64("open_files") -> Option<u64>;
    output_bytes: optional_u64("output_bytes") -> Option<u64>;
    workdir_bytes: optional_u64("workdir_bytes") -> Option<u64>;
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn only_json_strings_parse() {
        let parse = |v: Value| Text::parse_from_json(Some(v)).ok();
        assert_eq!(parse(Value::from("x")), Some(Text::from("x")));
        assert_eq!(parse(Value::from(42)), None);
        assert_eq!(parse(Value::from(true)), None);
        assert_eq!(parse(Value::Null), None);
        assert!(Text::parse_from_json(None).is_err());
    }

    #[test]
    fn field_parsers_name_the_field() {
        assert_eq!(
            required("code", Some(Value::from(42))).map_err(|e| e.to_string()),
            Err("`code` must be a JSON string, found 42".to_string())
        );
        assert_eq!(
            required("code", None).map_err(|e| e.to_string()),
            Err("required field `code` is missing".to_string())
        );
        assert_eq!(optional("stdin", Some(Value::Null)), Ok(None));
        assert_eq!(optional_u64("processes", Some(Value::from(8))), Ok(Some(8)));
        assert_eq!(optional_u64("processes", None), Ok(None));
        for bad in [json!(-1), json!(1.5), json!("8"), json!(true)] {
            assert_eq!(
                optional_u64("processes", Some(bad.clone()))
                    .err()
                    .map(|e| e.to_string()),
                Some(format!(
                    "`processes` must be a non-negative integer, found {bad}"
                ))
            );
        }
        assert_eq!(
            optional_list("args", Some(serde_json::json!(["a", 1]))).map_err(|e| e.to_string()),
            Err("`args[1]` must be a JSON string, found 1".to_string())
        );
    }
}
