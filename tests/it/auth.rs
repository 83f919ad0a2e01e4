//! Every door locked (SPEC A6, B5): the auth matrix over the router's own
//! route list, tickets, and Origin checks.

use std::time::Duration;

use autopoiesis::adapters::http::auth::OriginPolicy;
use autopoiesis::adapters::http::{HttpSettings, PLAIN_ROUTES, spec_service};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::helpers::{Options, TestApp, spawn_with};

const KEY: &str = "correct-horse";

async fn locked_app(http: HttpSettings) -> TestApp {
    spawn_with(Options {
        api_key: Some(KEY),
        http,
        ..Options::default()
    })
    .await
}

/// Every (method, concrete path) the server routes: the OpenAPI operations
/// plus the plain routes.
fn all_routes(app: &TestApp) -> Vec<(Method, String)> {
    let spec: Value = serde_json::from_str(&spec_service(&app.services).spec()).unwrap();
    let mut routes = Vec::new();
    for (path, operations) in spec["paths"].as_object().unwrap() {
        for method in operations.as_object().unwrap().keys() {
            routes.push((
                method.to_uppercase().parse().unwrap(),
                path.replace("{id}", "matrix"),
            ));
        }
    }
    for (method, path) in PLAIN_ROUTES {
        routes.push((
            method.parse().unwrap(),
            path.replace(":session_id", "matrix"),
        ));
    }
    assert!(
        routes.len() >= 9,
        "the route list looks incomplete: {routes:?}"
    );
    routes
}

fn is_public(method: &Method, path: &str) -> bool {
    method == Method::GET && path == "/api/health"
}

#[tokio::test]
async fn every_route_refuses_missing_and_wrong_keys_with_a_challenge_and_accepts_both_header_forms()
{
    let app = locked_app(HttpSettings::default()).await;
    for (method, path) in all_routes(&app) {
        let url = app.url(&path);
        let send = |auth: Option<(&'static str, String)>| {
            let mut request = app
                .client
                .request(method.clone(), &url)
                .timeout(Duration::from_secs(5));
            if method == Method::POST {
                request = request
                    .header("content-type", "application/json")
                    .body("{}");
            }
            if let Some((name, value)) = auth {
                request = request.header(name, value);
            }
            request.send()
        };
        let none = send(None).await.unwrap();
        let wrong = send(Some(("x-api-key", "nope".into()))).await.unwrap();
        let header = send(Some(("x-api-key", KEY.into())))
            .await
            .unwrap()
            .status();
        let bearer = send(Some(("authorization", format!("Bearer {KEY}"))))
            .await
            .unwrap()
            .status();
        if is_public(&method, &path) {
            assert_eq!(none.status(), StatusCode::OK, "{method} {path}");
        } else {
            for (refused, how) in [(none, "without a key"), (wrong, "with a wrong key")] {
                assert_refused_with_a_challenge(refused, &format!("{method} {path} {how}")).await;
            }
        }
        assert_ne!(
            header,
            StatusCode::UNAUTHORIZED,
            "{method} {path} with X-API-Key"
        );
        assert_ne!(
            bearer,
            StatusCode::UNAUTHORIZED,
            "{method} {path} with Bearer"
        );
    }
}

/// The challenge every 401 carries (RFC 9110), naming both ways to send
/// the key.
const CHALLENGE: &str = "Bearer realm=\"autopoiesis\", error=\"invalid_token\", \
     error_description=\"send the API key in X-API-Key or as a Bearer token\"";

/// A 401 with the challenge, and the body its route's clients parse:
/// OpenAI's error object on `/v1` (the SDKs' `AuthenticationError`), the
/// server's `detail` everywhere else.
async fn assert_refused_with_a_challenge(res: reqwest::Response, what: &str) {
    let on_the_facade = res.url().path().starts_with("/v1/");
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED, "{what}");
    assert_eq!(
        res.headers()
            .get_all("www-authenticate")
            .iter()
            .collect::<Vec<_>>(),
        [CHALLENGE],
        "{what}"
    );
    let body: Value = res.json().await.unwrap();
    let expected = if on_the_facade {
        serde_json::json!({"error": {
            "message": "Invalid or missing API key",
            "type": "invalid_request_error",
            "param": null,
            "code": "invalid_api_key",
        }})
    } else {
        serde_json::json!({"detail": "Invalid or missing API key"})
    };
    assert_eq!(body, expected, "{what}");
}

#[tokio::test]
async fn the_websocket_checks_the_key_before_the_upgrade() {
    let app = locked_app(HttpSettings::default()).await;
    let err = tokio_tungstenite::connect_async(app.ws_url("/api/ws/w"))
        .await
        .unwrap_err();
    let tokio_tungstenite::tungstenite::Error::Http(res) = err else {
        panic!("expected an HTTP refusal");
    };
    assert_eq!(res.status(), 401);
    assert_eq!(res.headers()["www-authenticate"], CHALLENGE);
    let mut request = app.ws_url("/api/ws/w").into_client_request().unwrap();
    request
        .headers_mut()
        .insert("x-api-key", KEY.parse().unwrap());
    assert!(tokio_tungstenite::connect_async(request).await.is_ok());
}

async fn ticket(app: &TestApp) -> String {
    let res = app
        .client
        .post(app.url("/api/auth/ticket"))
        .header("x-api-key", KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["expires_in"], 30);
    body["ticket"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_ticket_opens_one_websocket_once() {
    let app = locked_app(HttpSettings::default()).await;
    let res = app.post_empty("/api/auth/ticket").await;
    assert_eq!(
        res.status(),
        StatusCode::UNAUTHORIZED,
        "tickets need the key"
    );
    let ticket = ticket(&app).await;
    let url = app.ws_url(&format!("/api/ws/t?ticket={ticket}"));
    assert!(tokio_tungstenite::connect_async(&url).await.is_ok());
    let err = tokio_tungstenite::connect_async(&url).await.unwrap_err();
    assert!(matches!(err, tokio_tungstenite::tungstenite::Error::Http(res) if res.status() == 401));
}

#[tokio::test]
async fn a_ticket_opens_sse_but_not_rest_routes() {
    let app = locked_app(HttpSettings::default()).await;
    let ticket = ticket(&app).await;
    let res = app.get(&format!("/api/sessions?ticket={ticket}")).await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    let res = app
        .get(&format!("/api/sessions/t/events?ticket={ticket}"))
        .await;
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test]
async fn an_expired_ticket_is_refused() {
    let app = locked_app(HttpSettings {
        ticket_ttl: Duration::ZERO,
        ..HttpSettings::default()
    })
    .await;
    let res = app
        .client
        .post(app.url("/api/auth/ticket"))
        .header("x-api-key", KEY)
        .send()
        .await
        .unwrap();
    let ticket = res.json::<Value>().await.unwrap()["ticket"]
        .as_str()
        .unwrap()
        .to_owned();
    let err = tokio_tungstenite::connect_async(app.ws_url(&format!("/api/ws/t?ticket={ticket}")))
        .await
        .unwrap_err();
    assert!(matches!(err, tokio_tungstenite::tungstenite::Error::Http(res) if res.status() == 401));
}

async fn ws_status_with_origin(app: &TestApp, origin: &str) -> u16 {
    let mut request = app.ws_url("/api/ws/o").into_client_request().unwrap();
    request
        .headers_mut()
        .insert("origin", origin.parse().unwrap());
    match tokio_tungstenite::connect_async(request).await {
        Ok((_, res)) => res.status().as_u16(),
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => res.status().as_u16(),
        Err(other) => panic!("{other}"),
    }
}

#[tokio::test]
async fn websockets_refuse_foreign_origins_unless_allowed() {
    let app = spawn_with(Options {
        http: HttpSettings {
            origins: OriginPolicy {
                allowed: vec!["https://app.example".into()],
            },
            ..HttpSettings::default()
        },
        ..Options::default()
    })
    .await;
    assert_eq!(
        ws_status_with_origin(&app, "https://evil.example").await,
        403
    );
    assert_eq!(
        ws_status_with_origin(&app, "https://app.example").await,
        101
    );
    assert_eq!(
        ws_status_with_origin(&app, &format!("http://{}", app.address)).await,
        101
    );
}

#[tokio::test]
async fn a_rebound_host_name_is_refused_on_every_route() {
    let app = spawn_with(Options::default()).await;
    for (method, path) in all_routes(&app) {
        let status = app
            .client
            .request(method.clone(), app.url(&path))
            .header(
                "host",
                format!("rebind.attacker.example:{}", app.address.port()),
            )
            .header("content-type", "application/json")
            .body("{}")
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}");
    }
    let res = app
        .client
        .get(app.url("/api/sessions"))
        .header("host", format!("localhost:{}", app.address.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK, "loopback names pass");
}

#[tokio::test]
async fn a_foreign_origin_cannot_change_state_even_with_auth_off() {
    let app = spawn_with(Options::default()).await;
    let own = format!("http://{}", app.address);
    let post = |path: &'static str, origin: String, body: &'static str| {
        app.client
            .post(app.url(path))
            .header("origin", origin)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    for (path, body) in [
        ("/api/chat", r#"{"content":"hi","session_id":"csrf"}"#),
        ("/api/actions", r#"{"action":"approve","approval_id":"x"}"#),
        ("/api/sessions", ""),
    ] {
        let res = post(path, "https://evil.example".into(), body)
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::FORBIDDEN, "{path}");
        // Same host, other scheme: another origin too.
        let res = post(path, format!("https://{}", app.address), body)
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::FORBIDDEN, "{path} over https");
    }
    assert_eq!(app.get("/api/sessions/csrf/history").await.status(), 404);
    let res = post("/api/chat", own, r#"{"content":"hi","session_id":"csrf"}"#)
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK, "the server's own page may");
    assert_eq!(
        ws_status_with_origin(&app, &format!("https://{}", app.address)).await,
        403
    );
}

#[tokio::test]
async fn head_health_lowercase_bearer_and_duplicate_keys() {
    let app = locked_app(HttpSettings::default()).await;
    let res = app
        .client
        .head(app.url("/api/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK, "HEAD /api/health is public");
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let res = app
            .client
            .get(app.url("/api/sessions"))
            .header("authorization", format!("{scheme} {KEY}"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{scheme}");
    }
    let res = app
        .client
        .post(app.url("/api/chat"))
        .header("x-api-key", KEY)
        .header("content-type", "application/json")
        .body(r#"{"content":"a","content":"b","session_id":"dup"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    let body: Value = res.json().await.unwrap();
    assert!(
        body["detail"].as_str().unwrap().contains("appears twice"),
        "{body}"
    );
}

#[tokio::test]
async fn a_ticket_opens_the_dashboard_stream_once() {
    let app = locked_app(HttpSettings::default()).await;
    let ticket = ticket(&app).await;
    let res = app.get(&format!("/api/stream?ticket={ticket}")).await;
    assert_eq!(
        res.status(),
        StatusCode::OK,
        "an EventSource URL takes a ticket"
    );
    drop(res);
    let res = app.get(&format!("/api/stream?ticket={ticket}")).await;
    assert_eq!(
        res.status(),
        StatusCode::UNAUTHORIZED,
        "tickets are single-use"
    );
}
