//! The web console in a real browser (SPEC B13): headless Chromium from
//! Debian's `chromium` and `chromium-driver` packages, driven over WebDriver
//! (`fantoccini`) against the real server on 127.0.0.1. `.ci/run` installs
//! both; without `chromedriver` on the PATH the tests say so and pass.
//! Screenshots of each step are kept under `target/browser-screenshots/`.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

use crate::helpers::{Options, TestApp, echo, spawn_with};

const KEY: &str = "browser-key";
const ENTER: &str = "\u{E007}";

/// A chromedriver process and a headless Chromium session on it.
struct Browser {
    client: Client,
    driver: Child,
    name: &'static str,
    step: usize,
}

impl Browser {
    /// `None` (after saying why) when there is no chromedriver here.
    async fn start(name: &'static str) -> Option<Self> {
        let driver_path = ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())?;
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // Its own process group, which the Chromium it starts joins: one
        // kill ends both, however the test ends.
        let driver = Command::new(driver_path)
            .process_group(0)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({"args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                            "--disable-dev-shm-usage", "--window-size=1280,900"]}),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        let client = loop {
            let plain = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(plain)
                .capabilities(caps.clone())
                .connect(&format!("http://127.0.0.1:{port}"))
                .await
            {
                Ok(client) => break client,
                Err(error) if Instant::now() > deadline => panic!("no WebDriver session: {error}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        Some(Self {
            client,
            driver,
            name,
            step: 0,
        })
    }

    /// Keeps a screenshot of this step.
    async fn shot(&mut self, what: &str) {
        self.step += 1;
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/browser-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        if let Ok(png) = self.client.screenshot().await {
            let file = dir.join(format!("{}-{:02}-{what}.png", self.name, self.step));
            std::fs::write(file, png).unwrap();
        }
    }

    async fn js(&self, script: &str) -> Value {
        self.client.execute(script, vec![]).await.unwrap()
    }

    /// Waits (10 s at most) until `script` returns true.
    async fn until(&self, what: &str, script: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.js(script).await != json!(true) {
            assert!(Instant::now() < deadline, "not within 10 s: {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The button named `name`, once it can be clicked (shown and enabled:
    /// the page builds itself after sign-in).
    async fn button(&self, name: &str) -> fantoccini::elements::Element {
        let xpath = format!("//button[normalize-space()='{name}']");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(button) = self.client.find(Locator::XPath(&xpath)).await
                && button.is_displayed().await.unwrap_or(false)
                && button.is_enabled().await.unwrap_or(false)
            {
                return button;
            }
            assert!(
                Instant::now() < deadline,
                "no button {name} to click within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The entry of session `id` in the session list.
    async fn session(&self, id: &str) -> fantoccini::elements::Element {
        self.client
            .wait()
            .at_most(Duration::from_secs(10))
            .for_element(Locator::XPath(&format!(
                "//ul[@id='session-list']//button[contains(., '{id}')]"
            )))
            .await
            .unwrap_or_else(|e| panic!("no session {id} listed: {e}"))
    }

    /// Signs in with `key` on the console of `app`.
    async fn sign_in(&mut self, app: &TestApp, key: &str) {
        self.client.goto(&app.url("/")).await.unwrap();
        let field = self
            .client
            .wait()
            .at_most(Duration::from_secs(10))
            .for_element(Locator::Css("#key"))
            .await
            .unwrap();
        field.send_keys(key).await.unwrap();
        self.button("Sign in").await.click().await.unwrap();
    }

    /// Text of the conversation's messages, in order.
    async fn messages(&self) -> Vec<String> {
        let texts = self
            .js("return [...document.querySelectorAll('#messages li')].map(li => li.textContent)")
            .await;
        serde_json::from_value(texts).unwrap()
    }

    async fn stop(self) {
        let _ = self.client.clone().close().await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let group = format!("-{}", self.driver.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.driver.wait();
    }
}

async fn app_with_key(delay_ms: u64) -> TestApp {
    spawn_with(Options {
        api_key: Some(KEY),
        runtime: autopoiesis::domain::chat::RuntimeSlot::Ready(echo(delay_ms)),
        ..Options::default()
    })
    .await
}

async fn rest_chat(app: &TestApp, session: &str, content: &str) {
    let res = app
        .client
        .post(app.url("/api/chat"))
        .header("x-api-key", KEY)
        .json(&json!({"content": content, "session_id": session}))
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success(), "{}", res.status());
}

macro_rules! browser_or_skip {
    ($name:expr) => {
        match Browser::start($name).await {
            Some(browser) => browser,
            None => {
                eprintln!("skipped: no chromedriver (apt-get install chromium chromium-driver)");
                return;
            }
        }
    };
}

#[tokio::test]
async fn signing_in_refuses_a_wrong_key_and_opens_the_console_with_the_right_one() {
    let app = app_with_key(0).await;
    let mut browser = browser_or_skip!("sign-in");
    browser.sign_in(&app, "not-the-key").await;
    browser
        .until(
            "the wrong key is refused",
            "return document.querySelector('#signin-error').textContent.includes('refused')",
        )
        .await;
    browser.shot("wrong-key").await;
    browser.sign_in(&app, KEY).await;
    browser.button("New session").await;
    browser.shot("signed-in").await;
    assert_eq!(
        browser.js("return localStorage.length").await,
        json!(0),
        "the key is not kept beyond the tab"
    );
    assert!(
        !browser
            .js("return location.href")
            .await
            .to_string()
            .contains(KEY),
        "the key is never in a URL"
    );
    browser.stop().await;
}

#[tokio::test]
async fn a_session_made_over_rest_shows_its_history_and_a_reply_grows_token_by_token() {
    let app = app_with_key(40).await;
    rest_chat(&app, "from-rest", "hello there").await;
    let mut browser = browser_or_skip!("history-and-stream");
    browser.sign_in(&app, KEY).await;
    browser.session("from-rest").await.click().await.unwrap();
    browser
        .until(
            "the history is shown",
            "return document.querySelectorAll('#messages li').length === 2",
        )
        .await;
    assert_eq!(browser.messages().await, ["hello there", "hello there"]);
    browser.shot("history").await;

    let words: Vec<String> = (0..30).map(|i| format!("w{i}")).collect();
    let field = browser.client.find(Locator::Css("#message")).await.unwrap();
    field.send_keys(&words.join(" ")).await.unwrap();
    field.send_keys(ENTER).await.unwrap();
    // The answer is seen growing: several lengths before the whole of it.
    let mut lengths = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let messages = browser.messages().await;
        let len = messages.get(3).map_or(0, String::len);
        if lengths.last() != Some(&len) {
            lengths.push(len);
        }
        if messages.get(3).is_some_and(|t| t == &words.join(" ")) {
            break;
        }
        assert!(Instant::now() < deadline, "no full answer: {messages:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    browser.shot("streamed").await;
    assert!(
        lengths.len() >= 4,
        "the reply grew token by token: {lengths:?}"
    );
    browser.stop().await;
}

#[tokio::test]
async fn a_turn_sent_from_another_device_appears_without_a_reload() {
    let app = app_with_key(10).await;
    rest_chat(&app, "shared", "first").await;
    let mut browser = browser_or_skip!("other-device");
    browser.sign_in(&app, KEY).await;
    browser.session("shared").await.click().await.unwrap();
    browser
        .until(
            "history",
            "return document.querySelectorAll('#messages li').length === 2",
        )
        .await;
    rest_chat(&app, "shared", "from my phone").await;
    browser
        .until(
            "the other device's turn",
            "return [...document.querySelectorAll('#messages li')].map(l => l.textContent).filter(t => t === 'from my phone').length === 2",
        )
        .await;
    browser.shot("other-device").await;
    browser.stop().await;
}

#[tokio::test]
async fn model_text_with_markup_is_shown_as_text() {
    let app = app_with_key(0).await;
    let mut browser = browser_or_skip!("injection");
    browser.sign_in(&app, KEY).await;
    browser.button("New session").await.click().await.unwrap();
    let attack = "<img src=x onerror=\"window.pwned=1\"> <b>bold</b>";
    let field = browser
        .client
        .wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css("#message:not([disabled])"))
        .await
        .unwrap();
    field.send_keys(attack).await.unwrap();
    browser.button("Send").await.click().await.unwrap();
    browser
        .until(
            "the echoed answer",
            "const a = document.querySelector('#messages li.assistant'); \
             return !!a && a.textContent.length > 10 && document.querySelector('#stop').disabled",
        )
        .await;
    browser.shot("injection").await;
    let messages = browser.messages().await;
    assert!(messages.iter().all(|m| m == attack), "{messages:?}");
    assert_eq!(
        browser
            .js("return document.querySelectorAll('#messages img, #messages b').length")
            .await,
        json!(0)
    );
    assert_eq!(
        browser.js("return window.pwned === undefined").await,
        json!(true)
    );
    browser.stop().await;
}

#[tokio::test]
async fn at_phone_width_the_composer_stays_in_view() {
    let app = app_with_key(0).await;
    for i in 0..6 {
        rest_chat(
            &app,
            "long",
            &format!("message number {i} with some words in it"),
        )
        .await;
    }
    let mut browser = browser_or_skip!("phone");
    browser.client.set_window_size(390, 844).await.unwrap();
    browser.sign_in(&app, KEY).await;
    browser.session("long").await.click().await.unwrap();
    browser
        .until(
            "history",
            "return document.querySelectorAll('#messages li').length === 12",
        )
        .await;
    browser
        .until(
            "the composer in view",
            "const r = document.querySelector('#message').getBoundingClientRect(); \
             return r.top >= 0 && r.bottom <= window.innerHeight && r.width > 200",
        )
        .await;
    browser.shot("phone").await;
    browser.stop().await;
}
