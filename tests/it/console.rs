//! The web console's files (SPEC B13) as HTTP sees them: served from the
//! binary at `/` and `/console/*` without the key, with a `'self'`-only
//! Content-Security-Policy, their content types and revalidation by ETag.
//! (What the page does in a browser is for the browser tests.)

use reqwest::StatusCode;
use reqwest::header::{CONTENT_SECURITY_POLICY, CONTENT_TYPE, ETAG, IF_NONE_MATCH};

use crate::helpers::{Options, spawn_with};

const KEY: &str = "console-key";

#[tokio::test]
async fn the_console_page_and_its_assets_load_without_the_key_and_nothing_else_does() {
    let app = spawn_with(Options {
        api_key: Some(KEY),
        ..Options::default()
    })
    .await;
    let page = app.client.get(app.url("/")).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert_eq!(page.headers()[CONTENT_TYPE], "text/html; charset=utf-8");
    let csp = page.headers()[CONTENT_SECURITY_POLICY]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(csp.contains("default-src 'self'"), "{csp}");
    assert!(
        !csp.contains("unsafe"),
        "no unsafe-inline or unsafe-eval: {csp}"
    );
    let html = page.text().await.unwrap();
    assert!(html.contains(r#"<script type="module" src="/console/app."#));
    assert!(!html.contains("<script>"), "no inline script");

    for (path, kind) in [
        ("/console/app.js", "text/javascript; charset=utf-8"),
        ("/console/style.css", "text/css; charset=utf-8"),
    ] {
        let asset = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(asset.status(), StatusCode::OK, "{path}");
        assert_eq!(asset.headers()[CONTENT_TYPE], kind, "{path}");
    }
    // Everything the page fetches still needs the key.
    let sessions = app
        .client
        .get(app.url("/api/sessions"))
        .send()
        .await
        .unwrap();
    assert_eq!(sessions.status(), StatusCode::UNAUTHORIZED);
    let missing = app
        .client
        .get(app.url("/console/nope.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_console_file_seen_before_is_revalidated_with_its_etag_for_a_304() {
    let app = spawn_with(Options::default()).await;
    let first = app
        .client
        .get(app.url("/console/app.js"))
        .send()
        .await
        .unwrap();
    let etag = first.headers()[ETAG].clone();
    assert!(
        etag.to_str().unwrap().starts_with('"'),
        "a quoted strong tag"
    );
    assert_eq!(first.headers()["cache-control"], "no-cache");
    let again = app
        .client
        .get(app.url("/console/app.js"))
        .header(IF_NONE_MATCH, etag.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
    assert!(again.bytes().await.unwrap().is_empty());
    let other = app
        .client
        .get(app.url("/console/app.js"))
        .header(IF_NONE_MATCH, "\"something else\"")
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), StatusCode::OK);
}

#[tokio::test]
async fn the_console_script_never_writes_server_text_as_html_nor_keeps_the_key_beyond_the_tab() {
    let app = spawn_with(Options::default()).await;
    let script = app
        .client
        .get(app.url("/console/app.js"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for banned in [
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "localStorage",
        "eval(",
    ] {
        assert!(!script.contains(banned), "{banned} in app.js");
    }
    assert!(script.contains("sessionStorage"));
}

/// The name the page refers to `plain` by (`/console/app.<hash>.js`).
fn referenced(html: &str, stem: &str, ext: &str) -> String {
    let start = html
        .find(&format!("/console/{stem}."))
        .unwrap_or_else(|| panic!("no reference to {stem} in {html}"));
    let end = start + html[start..].find('"').unwrap();
    let path = html[start..end].to_owned();
    let hash = path
        .strip_prefix(&format!("/console/{stem}."))
        .and_then(|rest| rest.strip_suffix(&format!(".{ext}")))
        .unwrap_or_else(|| panic!("{path} is not fingerprinted"));
    assert!(
        hash.len() == 12 && hash.chars().all(|c| c.is_ascii_hexdigit()),
        "{path}"
    );
    path
}

#[tokio::test]
async fn the_page_loads_fingerprinted_assets_cached_for_good_and_is_itself_revalidated() {
    let app = spawn_with(Options::default()).await;
    let page = app.client.get(app.url("/")).send().await.unwrap();
    assert_eq!(page.headers()["cache-control"], "no-cache");
    let html = page.text().await.unwrap();
    for (stem, ext, kind) in [
        ("app", "js", "text/javascript; charset=utf-8"),
        ("style", "css", "text/css; charset=utf-8"),
    ] {
        let path = referenced(&html, stem, ext);
        let asset = app.client.get(app.url(&path)).send().await.unwrap();
        assert_eq!(asset.status(), StatusCode::OK, "{path}");
        assert_eq!(asset.headers()[CONTENT_TYPE], kind, "{path}");
        assert_eq!(
            asset.headers()["cache-control"],
            "public, max-age=31536000, immutable",
            "{path}"
        );
        let fingerprinted = asset.bytes().await.unwrap();
        let plain = app
            .client
            .get(app.url(&format!("/console/{stem}.{ext}")))
            .send()
            .await
            .unwrap();
        assert_eq!(plain.headers()["cache-control"], "no-cache");
        assert_eq!(plain.bytes().await.unwrap(), fingerprinted, "the same file");
    }
}
