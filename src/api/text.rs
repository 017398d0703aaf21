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
// not which field, so each string field of a request names itself through
// `#[oai(deserialize_with = "...")]`.

fn wrong_type(field: &str, found: &Value) -> String {
    format!("`{field}` must be a JSON string, found {found}")
}

fn required(field: &str, value: Option<Value>) -> Result<Text, String> {
    match value {
        Some(Value::String(s)) => Ok(Text(s)),
        None | Some(Value::Null) => Err(format!("required field `{field}` is missing")),
        Some(other) => Err(wrong_type(field, &other)),
    }
}

fn optional(field: &str, value: Option<Value>) -> Result<Option<Text>, String> {
    match value {
        None | Some(Value::Null) => Ok(None),
        other => required(field, other).map(Some),
    }
}

fn optional_list(field: &str, value: Option<Value>) -> Result<Option<Vec<Text>>, String> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => items
            .into_iter()
            .enumerate()
            .map(|(i, item)| required(&format!("{field}[{i}]"), Some(item)))
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(other) => Err(format!(
            "`{field}` must be a list of JSON strings, found {other}"
        )),
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
    file_content: required("content") -> Text;
    args: optional_list("args") -> Option<Vec<Text>>;
}

#[cfg(test)]
mod tests {
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
            required("code", Some(Value::from(42))).err().as_deref(),
            Some("`code` must be a JSON string, found 42")
        );
        assert_eq!(
            required("code", None).err().as_deref(),
            Some("required field `code` is missing")
        );
        assert_eq!(optional("stdin", Some(Value::Null)), Ok(None));
        assert_eq!(
            optional_list("args", Some(serde_json::json!(["a", 1])))
                .err()
                .as_deref(),
            Some("`args[1]` must be a JSON string, found 1")
        );
    }
}
