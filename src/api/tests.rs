//! Tests of the error vocabulary against the request types of every operation (here, not in
//! `errors.rs`, which the operations import: a test there would import them back).

use poem_openapi::types::{ParseFromJSON, Type};
use serde_json::{Value, json};

use super::errors::*;
use crate::api::submit::SubmitCodeRequest;
use crate::api::v1::{Encoding, ExecuteRequest, FileInput, RequestLimits};
use poem::http::StatusCode;

#[test]
fn the_spec_publishes_exactly_the_codes() {
    let spec: Value = serde_json::from_str(&crate::api::spec_json()).unwrap_or_default();
    let published: Vec<&str> = spec["components"]["schemas"]["ErrorCode"]["enum"]
        .as_array()
        .map(|items| items.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let ours: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
    assert_eq!(published, ours);
    for code in ErrorCode::ALL {
        let json = poem_openapi::types::ToJSON::to_json(&code);
        assert_eq!(json, Some(Value::from(code.as_str())));
    }
}

#[test]
fn an_error_response_carries_its_code() {
    let resp = json_error(ErrorCode::Unauthorized, "no");
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        resp.extensions().get::<ErrorCode>(),
        Some(&ErrorCode::Unauthorized)
    );
    let resp = json_error_with_status(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Busy, "x");
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.extensions().get::<ErrorCode>(), Some(&ErrorCode::Busy));
}

#[test]
fn the_request_types_are_named_as_poem_openapi_names_them() {
    let names = [
        ExecuteRequest::name(),
        SubmitCodeRequest::name(),
        RequestLimits::name(),
        super::v1::CompileLimits::name(),
        FileInput::name(),
        <Vec<FileInput>>::name(),
        super::v1::batch::TestInput::name(),
        <Vec<super::v1::batch::TestInput>>::name(),
        Encoding::name(),
    ];
    let table: Vec<&str> = REQUEST_TYPES.iter().map(|(n, _, _)| *n).collect();
    assert_eq!(names.map(|n| n.into_owned()).to_vec(), table);
}

fn v1(body: Value) -> String {
    let reason = ExecuteRequest::parse_from_json(Some(body))
        .err()
        .map(|e| e.into_message())
        .unwrap_or_default();
    describe_parse_failure(&reason)
}

fn submit(body: Value) -> String {
    let reason = SubmitCodeRequest::parse_from_json(Some(body))
        .err()
        .map(|e| e.into_message())
        .unwrap_or_default();
    describe_parse_failure(&reason)
}

#[test]
fn parse_failures_name_the_field_without_parser_types() {
    let cases = [
        (
            v1(json!({"code": "x", "limits": {"memory": 1}})),
            "unknown field `memory` in `limits`",
        ),
        (v1(json!({"code": "x", "cod": "x"})), "unknown field `cod`"),
        (
            v1(json!({"code": "x", "args": [1]})),
            "`args[0]` must be a JSON string, found 1",
        ),
        (
            v1(json!({"files": [{"name": "a.py", "content": 1}]})),
            "`content` must be a JSON string, found 1 in an item of `files`",
        ),
        (
            v1(json!({"files": [{"name": "a.py"}]})),
            "required field `content` is missing in an item of `files`",
        ),
        (
            v1(json!({"files": [{"name": "a.py", "contents": "x"}]})),
            "required field `content` is missing in an item of `files`",
        ),
        (
            v1(json!({"files": [{"content": "x", "encoding": "hex"}]})),
            "`encoding` must be `utf8` or `base64`, found \"hex\" in an item of `files`",
        ),
        (
            v1(json!({"files": {"name": "a.py"}})),
            "`files` must be a list of file objects, found {\"name\":\"a.py\"}",
        ),
        (
            v1(json!({"files": [null]})),
            "an item of `files` must be a JSON object, found null",
        ),
        (
            v1(json!({"code": "x", "limits": 5})),
            "`limits` must be a JSON object, found 5",
        ),
        (
            v1(json!({"code": "x", "limits": {"wall_time_ms": "x"}})),
            "`wall_time_ms` must be a non-negative integer, found \"x\" in `limits`",
        ),
        (
            v1(json!({"code": "x", "limits": {"memory_bytes": -1}})),
            "`memory_bytes` must be a non-negative integer, found -1 in `limits`",
        ),
        (v1(json!([])), "the body must be a JSON object, found []"),
        (
            v1(Value::Null),
            "the body must be a JSON object, found null",
        ),
        (
            submit(json!({"runtime": "python3"})),
            "required field `code` is missing",
        ),
        (
            submit(json!({"code": "x", "runtime": 3})),
            "`runtime` must be a JSON string, found 3",
        ),
        (
            describe_parse_failure("key must be a string at line 1 column 2"),
            "invalid JSON: key must be a string at line 1 column 2",
        ),
    ];
    for (got, want) in cases {
        assert_eq!(got, want);
    }
}

#[test]
fn a_value_that_looks_like_the_chain_is_not_taken_for_it() {
    let got = v1(json!({"code": "x", "limits": {"m (occurred while parsing \"X\")": 1}}));
    assert_eq!(
        got,
        "unknown field `m (occurred while parsing \"X\")` in `limits`"
    );
    let got =
        v1(json!({"code": "x", "limits": {"wall_time_ms": "(occurred while parsing \"X\")"}}));
    assert!(
        got.contains("`wall_time_ms`") && got.ends_with("in `limits`"),
        "{got}"
    );
}
