//! The committed spec must match what the code generates.

mod common;

#[test]
fn committed_spec_matches_the_code() {
    let committed = std::fs::read_to_string(common::repo_path("openapi/openapi.json"))
        .expect("openapi/openapi.json exists");
    let generated = mixed_docker_executor::api::spec_json();
    let parse = |s: &str| serde_json::from_str::<serde_json::Value>(s).expect("valid JSON");
    assert!(
        parse(&committed) == parse(&generated),
        "openapi/openapi.json is stale: regenerate it with \
         `cargo run -- openapi > openapi/openapi.json`"
    );
}

#[test]
fn every_operation_has_a_summary_description_and_examples() {
    let spec: serde_json::Value =
        serde_json::from_str(&mixed_docker_executor::api::spec_json()).expect("json");
    let paths = spec["paths"].as_object().expect("paths");
    for (path, ops) in paths {
        for (method, op) in ops.as_object().expect("operations") {
            assert!(op["summary"].is_string(), "{method} {path} lacks a summary");
            assert!(
                op["description"].is_string(),
                "{method} {path} lacks a description"
            );
            if let Some(body) = op.get("requestBody") {
                let schema_ref =
                    body["content"]["application/json; charset=utf-8"]["schema"]["$ref"]
                        .as_str()
                        .or_else(|| body["content"]["application/json"]["schema"]["$ref"].as_str())
                        .expect("request schema ref");
                let name = schema_ref.rsplit('/').next().expect("name");
                assert!(
                    spec["components"]["schemas"][name]["example"].is_object(),
                    "{name} has no example"
                );
            }
        }
    }
    let mut undescribed = Vec::new();
    for (name, schema) in spec["components"]["schemas"].as_object().expect("schemas") {
        if let Some(props) = schema["properties"].as_object() {
            for (field, prop) in props {
                let described = prop["description"].is_string()
                    || prop["allOf"].is_array()
                    || prop["$ref"].is_string();
                if !described {
                    undescribed.push(format!("{name}.{field}"));
                }
            }
        }
    }
    assert!(
        undescribed.is_empty(),
        "fields without a description: {undescribed:?}"
    );
}
