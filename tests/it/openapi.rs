//! The served spec says what the server does (SPEC B14): how the key
//! travels and what the middleware answers on each operation, and history
//! messages typed by the part schemas of A3. (`rest.rs` checks that
//! `openapi.yaml` is the served spec; `.ci/openapi-lint.sh` lints it and
//! generates a client from it.)

use serde_json::{Value, json};

use crate::helpers::{TestApp, spawn_app};

async fn spec(app: &TestApp) -> Value {
    app.get_json("/openapi.json").await
}

/// Every operation of the spec, as (METHOD, path, operation).
fn operations(spec: &Value) -> Vec<(String, String, Value)> {
    let mut all = Vec::new();
    for (path, operations) in spec["paths"].as_object().unwrap() {
        for (method, operation) in operations.as_object().unwrap() {
            all.push((method.to_uppercase(), path.clone(), operation.clone()));
        }
    }
    all
}

#[tokio::test]
async fn every_operation_but_health_needs_the_key_in_either_header_and_declares_the_guards_answers()
{
    let app = spawn_app().await;
    let spec = spec(&app).await;
    let schemes = &spec["components"]["securitySchemes"];
    assert_eq!(schemes["ApiKey"]["type"], "apiKey");
    assert_eq!(schemes["ApiKey"]["in"], "header");
    assert_eq!(schemes["ApiKey"]["name"], "X-API-Key");
    assert_eq!(schemes["Bearer"]["type"], "http");
    assert_eq!(schemes["Bearer"]["scheme"], "bearer");
    let error = json!({"$ref": "#/components/schemas/Error"});
    for (method, path, operation) in operations(&spec) {
        let what = format!("{method} {path}");
        let responses = &operation["responses"];
        let declares = |status: &str| responses.get(status).is_some();
        assert_eq!(
            responses["403"]["content"]["application/json; charset=utf-8"]["schema"], error,
            "{what}: the Host check answers every route"
        );
        if (method.as_str(), path.as_str()) == ("GET", "/api/health") {
            assert_eq!(operation["security"], json!([{}]), "{what}");
            assert!(!declares("401"), "{what}");
            continue;
        }
        let security = operation["security"].as_array().unwrap();
        assert!(
            security.contains(&json!({"ApiKey": []})) && security.contains(&json!({"Bearer": []})),
            "{what}: {security:?}"
        );
        let ticket = security.contains(&json!({"Ticket": []}));
        assert_eq!(
            ticket,
            path.ends_with("/events") || path == "/api/stream",
            "{what}: only the stream URLs take a ticket"
        );
        let unauthorized = &responses["401"];
        assert_eq!(
            unauthorized["content"]["application/json; charset=utf-8"]["schema"], error,
            "{what}"
        );
        assert_eq!(
            unauthorized["headers"]["WWW-Authenticate"]["required"], true,
            "{what}"
        );
        assert_eq!(
            declares("413"),
            method != "GET",
            "{what}: every body the server reads is limited"
        );
    }
}

#[tokio::test]
async fn a_real_401_is_what_the_spec_declares() {
    let app = crate::helpers::spawn_with(crate::helpers::Options {
        api_key: Some("k"),
        ..crate::helpers::Options::default()
    })
    .await;
    let spec = spec(&app).await;
    let res = app.get("/api/sessions").await;
    assert_eq!(res.status(), 401);
    let challenge = res.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_owned();
    let declared = spec["paths"]["/api/sessions"]["get"]["responses"]["401"]["headers"]
        ["WWW-Authenticate"]["description"]
        .as_str()
        .unwrap();
    assert_eq!(declared, format!("`{challenge}`"));
    let body: Value = res.json().await.unwrap();
    let required = &spec["components"]["schemas"]["Error"]["required"];
    assert_eq!(required, &json!(["detail"]));
    assert!(body["detail"].is_string(), "{body}");
}

/// The schema `$ref` points at.
fn resolve<'a>(spec: &'a Value, reference: &Value) -> &'a Value {
    let name = reference["$ref"]
        .as_str()
        .and_then(|r| r.strip_prefix("#/components/schemas/"))
        .unwrap_or_else(|| panic!("not a schema reference: {reference}"));
    &spec["components"]["schemas"][name]
}

/// Checks `value` against the discriminated union `union` of the spec: its
/// tag names a mapped schema, which requires the tag and whose object
/// part's required fields are all present. Returns that object schema.
fn check_variant<'a>(spec: &'a Value, union: &Value, value: &Value) -> &'a Value {
    let tag = union["discriminator"]["propertyName"].as_str().unwrap();
    let kind = value[tag].as_str().unwrap();
    let variant = &union["discriminator"]["mapping"][kind];
    assert!(variant.is_string(), "{tag} {kind:?} is not in the union");
    let variant = resolve(spec, &json!({ "$ref": variant }));
    let (tagged, object) = (&variant["allOf"][0], &variant["allOf"][1]);
    assert_eq!(tagged["properties"][tag]["enum"], json!([kind]));
    let object = resolve(spec, object);
    for field in object["required"].as_array().into_iter().flatten() {
        let field = field.as_str().unwrap();
        assert!(value.get(field).is_some(), "{kind} lacks {field}: {value}");
    }
    let declared = object["properties"].as_object().unwrap();
    for field in value.as_object().unwrap().keys() {
        assert!(
            field == tag || declared.contains_key(field),
            "{kind} sends {field}, which its schema does not declare"
        );
    }
    object
}

#[tokio::test]
async fn history_messages_are_unions_on_kind_and_part_kind_that_fit_what_the_server_sends() {
    let app = spawn_app().await;
    let spec = spec(&app).await;
    let schemas = &spec["components"]["schemas"];
    let messages = &schemas["SessionHistory"]["properties"]["messages"]["items"];
    let message = resolve(&spec, messages);
    let mapping = |union: &Value| {
        let mut kinds: Vec<String> = union["discriminator"]["mapping"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        kinds.sort();
        kinds
    };
    assert_eq!(mapping(message), ["request", "response"]);
    assert_eq!(
        mapping(&schemas["ModelRequestPart"]),
        ["tool-return", "user-prompt"]
    );
    assert_eq!(
        mapping(&schemas["ModelResponsePart"]),
        ["text", "thinking", "tool-call"]
    );

    app.chat(json!({"content": "/think pondering", "session_id": "typed"}))
        .await;
    app.chat(json!({"content": r#"/tool execute {"command":"ls"}"#, "session_id": "typed"}))
        .await;
    let history = app.get_json("/api/sessions/typed/history").await;
    let mut seen = Vec::new();
    for sent in history["messages"].as_array().unwrap() {
        let object = check_variant(&spec, message, sent);
        let parts = resolve(&spec, &object["properties"]["parts"]["items"]);
        for part in sent["parts"].as_array().unwrap() {
            check_variant(&spec, parts, part);
            seen.push(part["part_kind"].as_str().unwrap().to_owned());
        }
    }
    for kind in ["user-prompt", "thinking", "text", "tool-call"] {
        assert!(seen.iter().any(|s| s == kind), "no {kind} part in {seen:?}");
    }
}

#[tokio::test]
async fn the_spec_names_its_license_and_the_server_it_came_from() {
    let app = spawn_app().await;
    let spec = spec(&app).await;
    assert_eq!(spec["info"]["license"]["name"], "MIT");
    assert_eq!(spec["servers"][0]["url"], "/");
}
