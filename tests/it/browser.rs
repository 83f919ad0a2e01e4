//! The web console in real browsers (SPEC B13): headless Chromium from
//! Debian's `chromium` and `chromium-driver` packages, and Firefox ESR with
//! geckodriver (only with `AUTOPOIESIS_TEST_FIREFOX` set), driven over
//! WebDriver (`fantoccini`) against the real server on 127.0.0.1. `.ci/run`
//! installs them; without a browser's driver its tests say so and pass.
//! Every test ends by checking the browser's console for errors (Chromium's
//! log, Firefox's over WebDriver BiDi). Screenshots of each step are kept
//! under `target/browser-screenshots/`.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

use crate::helpers::{Options, TestApp, echo, spawn_with};

const KEY: &str = "browser-key";
const ENTER: &str = "\u{E007}";

/// Set to run the Firefox tests (see [`Kind::driver_path`]).
const FIREFOX_SWITCH: &str = "AUTOPOIESIS_TEST_FIREFOX";

/// The browsers the console is tested in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Debian's `chromium` with `chromium-driver`.
    Chromium,
    /// Debian's `firefox-esr` with geckodriver (which Debian does not
    /// package: `.ci/run` builds it from crates.io into `target/tools`).
    Firefox,
}

impl Kind {
    fn driver(self) -> &'static str {
        match self {
            Self::Chromium => "chromedriver",
            Self::Firefox => "geckodriver",
        }
    }

    fn install(self) -> &'static str {
        match self {
            Self::Chromium => "apt-get install chromium chromium-driver",
            Self::Firefox => {
                "set AUTOPOIESIS_TEST_FIREFOX=1, with firefox-esr installed and \
                 geckodriver in target/tools/bin (cargo install geckodriver --root target/tools)"
            }
        }
    }

    /// The WebDriver server's path, where this machine has one.
    fn driver_path(self) -> Option<std::path::PathBuf> {
        let tools = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools/bin");
        let candidates: Vec<std::path::PathBuf> = match self {
            Self::Chromium => vec![
                "/usr/bin/chromedriver".into(),
                "/usr/lib/chromium/chromedriver".into(),
            ],
            Self::Firefox => {
                // Firefox takes a core of its own for minutes: beside the
                // rest of `cargo test` on two cores it starves the servers
                // under test. `.ci/run` runs these alone, after the rest.
                if std::env::var_os(FIREFOX_SWITCH).is_none()
                    || !std::path::Path::new("/usr/bin/firefox-esr").exists()
                {
                    return None;
                }
                vec![
                    tools.join("geckodriver"),
                    "/usr/local/bin/geckodriver".into(),
                ]
            }
        };
        candidates.into_iter().find(|p| p.exists())
    }

    /// Headless, 1280×900, and its console kept for [`Browser::finish`]
    /// (Chromium's through `goog:loggingPrefs`, Firefox's over BiDi).
    fn capabilities(self) -> serde_json::Map<String, Value> {
        let mut caps = serde_json::Map::new();
        match self {
            Self::Chromium => {
                caps.insert("goog:loggingPrefs".into(), json!({"browser": "ALL"}));
                caps.insert(
                    "goog:chromeOptions".into(),
                    json!({"args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                                    "--disable-dev-shm-usage", "--window-size=1280,900"]}),
                );
            }
            Self::Firefox => {
                // WebDriver BiDi: geckodriver has no read of the console
                // over classic WebDriver ([`Console`]).
                caps.insert("webSocketUrl".into(), json!(true));
                caps.insert(
                    "moz:firefoxOptions".into(),
                    json!({"binary": "/usr/bin/firefox-esr",
                           "args": ["-headless", "--width=1280", "--height=900"]}),
                );
            }
        }
        caps
    }
}

/// One browser at a time: a browser takes a core of its own, and two of
/// them beside the other tests on a 2-core machine starve the servers under
/// test (a SQLite pool's wait runs out and a chat answers 503).
static ONE_AT_A_TIME: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);

/// A WebDriver server process and a headless browser session on it.
struct Browser {
    client: Client,
    driver: Child,
    _turn: tokio::sync::SemaphorePermit<'static>,
    kind: Kind,
    name: &'static str,
    step: usize,
    /// Firefox's console, read over WebDriver BiDi from the start.
    console: Option<Console>,
}

impl Browser {
    /// `None` (after saying why) when this machine lacks the browser or its
    /// WebDriver server.
    async fn start(kind: Kind, name: &'static str) -> Option<Self> {
        let driver_path = kind.driver_path()?;
        let turn = ONE_AT_A_TIME.acquire().await.unwrap();
        let port = free_port();
        // Its own process group, which the Chromium it starts joins: one
        // kill ends both, however the test ends.
        let mut driver = Command::new(driver_path);
        driver.process_group(0).arg(format!("--port={port}"));
        if kind == Kind::Firefox {
            // BiDi's port (geckodriver's default is a fixed 9222).
            driver.arg(format!("--websocket-port={}", free_port()));
        }
        let driver = driver
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let caps = kind.capabilities();
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
        let console = match kind {
            Kind::Chromium => None,
            Kind::Firefox => {
                let url = client
                    .capabilities()
                    .and_then(|caps| caps.get("webSocketUrl"))
                    .and_then(Value::as_str)
                    .expect("geckodriver gave no BiDi URL")
                    .to_owned();
                Some(Console::listen(&url).await)
            }
        };
        Some(Self {
            client,
            driver,
            _turn: turn,
            kind,
            name,
            step: 0,
            console,
        })
    }

    /// Keeps a screenshot of this step.
    async fn shot(&mut self, what: &str) {
        self.step += 1;
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/browser-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        if let Ok(png) = self.client.screenshot().await {
            let kind = format!("{:?}", self.kind).to_lowercase();
            let file = dir.join(format!("{kind}-{}-{:02}-{what}.png", self.name, self.step));
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
            if Instant::now() > deadline {
                // What the page showed, for whoever reads the failure.
                let page = self.js("return document.body.innerText").await;
                panic!(
                    "not within 10 s: {what}; the page said:\n{}",
                    page.as_str().unwrap_or_default()
                );
            }
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

    /// Opens session `id` from the list and waits until its history shows
    /// `messages` messages.
    /// Opens session `id` from the list and waits for its `messages` and
    /// for its stream to be live (`#stream-state` is empty once the socket
    /// is open): a REST call made sooner would race the console's connect.
    async fn open_session(&self, id: &str, messages: usize) {
        self.session(id).await.click().await.unwrap();
        self.until(
            &format!("the history of {id}, live"),
            &format!(
                "return document.querySelectorAll('#messages li').length === {messages} \
                   && document.querySelector('#stream-state').textContent === ''"
            ),
        )
        .await;
    }

    /// Signs in with `key` on the console at `page`.
    async fn sign_in(&mut self, page: &str, key: &str) {
        self.client.goto(page).await.unwrap();
        self.key_field().await.send_keys(key).await.unwrap();
        self.button("Sign in").await.click().await.unwrap();
    }

    /// The key field, once the page shows it (it decides after loading).
    async fn key_field(&self) -> fantoccini::elements::Element {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(field) = self.client.find(Locator::Css("#key")).await
                && field.is_displayed().await.unwrap_or(false)
            {
                return field;
            }
            assert!(Instant::now() < deadline, "no key field within 10 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Text of the conversation's messages, in order.
    async fn messages(&self) -> Vec<String> {
        let texts = self
            .js("return [...document.querySelectorAll('#messages li')].map(li => li.textContent)")
            .await;
        serde_json::from_value(texts).unwrap()
    }

    /// Ends the test's browser after checking that the page asked no other
    /// origin for anything, and its console: no error (a script error, a
    /// failed load) but those whose text holds one of `expected` (a refused
    /// key, a server that is down).
    ///
    /// The errors are those of [`Self::console_errors`].
    async fn finish(mut self, expected: &[&str]) {
        let foreign = self
            .js(
                "return performance.getEntriesByType('resource').map(e => e.name) \
                   .filter(n => !n.startsWith(location.origin + '/'))",
            )
            .await;
        assert_eq!(foreign, json!([]), "requests to another origin");
        let seen = self
            .js("return performance.getEntriesByType('resource').length")
            .await;
        assert!(
            seen.as_u64() > Some(2),
            "the page's own requests are seen: {seen}"
        );
        let errors = self.console_errors().await;
        let _ = self.client.clone().close().await;
        let unexpected: Vec<&String> = errors
            .iter()
            .filter(|message| !expected.iter().any(|e| message.contains(e)))
            .collect();
        assert!(
            unexpected.is_empty(),
            "the browser console has errors: {unexpected:#?}"
        );
    }
}

impl Browser {
    /// The errors the browser's console has shown since the last call, a
    /// line each. Chromium's are its `SEVERE` entries. Firefox's are what
    /// BiDi tells ([`Console`]): script errors, `console.error`, and the
    /// requests that failed or were answered with an error status.
    async fn console_errors(&mut self) -> Vec<String> {
        if let Some(console) = &self.console {
            return console.take_errors().await;
        }
        let entries = self.client.issue_cmd(BrowserLog).await.unwrap();
        entries
            .as_array()
            .into_iter()
            .flatten()
            .filter(|entry| entry["level"] == "SEVERE")
            .filter_map(|entry| entry["message"].as_str().map(str::to_owned))
            .collect()
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A browser's console over WebDriver BiDi (`webSocketUrl`), read from
/// before the first page loads: geckodriver implements no read of it over
/// classic WebDriver. (Firefox puts a WebSocket that cannot connect in no
/// BiDi event; Chromium's log has it.) Keeps, as one line each, the `log.entryAdded` entries
/// of level `error` (script errors and `console.error`), the requests that
/// failed (`network.fetchError`) and those answered with a status of 400
/// or more (`network.responseCompleted`), like Chromium's `SEVERE` entries.
struct Console {
    reader: tokio::task::JoinHandle<()>,
    errors: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Drop for Console {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Console {
    async fn listen(url: &str) -> Self {
        use futures::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;

        let (mut socket, _) = tokio_tungstenite::connect_async(url)
            .await
            .unwrap_or_else(|e| panic!("no BiDi connection at {url}: {e}"));
        let subscribe = json!({
            "id": 1,
            "method": "session.subscribe",
            "params": {"events": ["log.entryAdded", "network.fetchError",
                                  "network.responseCompleted"]},
        });
        socket
            .send(Message::text(subscribe.to_string()))
            .await
            .unwrap();
        // The subscription holds once it is answered: nothing the first
        // page does comes before it.
        loop {
            let message = tokio::time::timeout(Duration::from_secs(10), socket.next())
                .await
                .expect("BiDi did not answer the subscription within 10 s")
                .expect("BiDi closed before answering the subscription")
                .unwrap();
            let Message::Text(text) = message else {
                continue;
            };
            let answer: Value = serde_json::from_str(&text).unwrap();
            if answer["id"] == 1 {
                assert_eq!(answer["type"], "success", "BiDi subscription: {answer}");
                break;
            }
        }
        let errors = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = std::sync::Arc::clone(&errors);
        let reader = tokio::spawn(async move {
            while let Some(Ok(message)) = socket.next().await {
                let Message::Text(text) = message else {
                    continue;
                };
                let Ok(event) = serde_json::from_str::<Value>(&text) else {
                    continue;
                };
                if let Some(error) = Self::error_of(&event) {
                    kept.lock().unwrap().push(error);
                }
            }
        });
        Self { reader, errors }
    }

    /// The event's line, where it tells of an error.
    fn error_of(event: &Value) -> Option<String> {
        let params = &event["params"];
        let url = params["request"]["url"].as_str().unwrap_or_default();
        match event["method"].as_str()? {
            "log.entryAdded" if params["level"] == "error" => Some(format!(
                "{} ({}): {}",
                params["type"].as_str().unwrap_or_default(),
                params["source"]["context"].as_str().unwrap_or_default(),
                params["text"].as_str().unwrap_or_default()
            )),
            "network.fetchError" => Some(format!(
                "{url} - {}",
                params["errorText"].as_str().unwrap_or_default()
            )),
            "network.responseCompleted" => {
                let status = params["response"]["status"].as_u64()?;
                (status >= 400).then(|| {
                    format!(
                        "{url} - the server responded with a status of {status} ({})",
                        params["response"]["statusText"]
                            .as_str()
                            .unwrap_or_default()
                    )
                })
            }
            _ => None,
        }
    }

    /// What it has seen since the last call, once what the browser has
    /// sent by now has had a moment to be read.
    async fn take_errors(&self) -> Vec<String> {
        tokio::time::sleep(Duration::from_millis(200)).await;
        std::mem::take(&mut *self.errors.lock().unwrap())
    }
}

/// chromedriver's read of the browser's console log (`goog:loggingPrefs`).
#[derive(Debug)]
struct BrowserLog;

impl fantoccini::wd::WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!(
            "session/{}/se/log",
            session_id.unwrap_or_default()
        ))
    }

    fn method_and_body(&self, _: &url::Url) -> (poem::http::Method, Option<String>) {
        (
            poem::http::Method::POST,
            Some(json!({"type": "browser"}).to_string()),
        )
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

/// A server with the key on and approvals unlocked: deferred tool calls
/// are recorded for the queue.
async fn app_with_approvals() -> TestApp {
    spawn_with(Options {
        api_key: Some(KEY),
        approval_key: true,
        runtime: autopoiesis::domain::chat::RuntimeSlot::Ready(echo(0)),
        ..Options::default()
    })
    .await
}

async fn rest_chat(app: &TestApp, session: &str, content: &str) {
    let status = post_chat(app, session, content).await;
    assert!(status.is_success(), "{status}");
}

macro_rules! browser_or_skip {
    ($kind:expr, $name:expr) => {
        match Browser::start($kind, $name).await {
            Some(browser) => browser,
            None => {
                eprintln!("skipped: no {} ({})", $kind.driver(), $kind.install());
                return;
            }
        }
    };
}

/// Each test below, once per browser: `browser::chromium::NAME` and
/// `browser::firefox::NAME`.
macro_rules! in_both_browsers {
    ($($name:ident),* $(,)?) => {
        mod chromium {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Kind::Chromium).await;
            })*
        }
        mod firefox {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Kind::Firefox).await;
            })*
        }
    };
}

in_both_browsers!(
    signing_in_refuses_a_wrong_key_and_opens_the_console_with_the_right_one,
    a_session_made_over_rest_shows_its_history_and_a_reply_grows_token_by_token,
    a_turn_sent_from_another_device_appears_without_a_reload,
    model_text_with_markup_is_shown_as_text,
    at_phone_width_the_composer_stays_in_view,
    a_turn_from_another_device_shows_its_prompt_as_it_streams_and_stop_cancels_it,
    a_pending_approval_shows_with_its_call_and_approve_empties_the_queue,
    a_server_restart_shows_reconnecting_and_then_the_console_works_again,
    the_console_works_from_the_keyboard_alone,
    a_session_is_deleted_from_the_console_and_one_deleted_elsewhere_closes,
    the_console_check_sees_a_script_error_and_a_refused_request,
    a_session_opened_mid_turn_shows_that_turn_from_its_prompt_and_first_token,
    the_session_list_keeps_keyboard_focus_while_it_refreshes,
    a_reason_being_typed_survives_another_approval_arriving,
);

/// The queue changes under a person deciding: approvals that arrive or
/// are decided elsewhere while they type a reason for another (one before
/// it in the queue, one after it) leave their text and their focus where
/// they were.
async fn a_reason_being_typed_survives_another_approval_arriving(kind: Kind) {
    let app = app_with_approvals().await;
    let mut browser = browser_or_skip!(kind, "approval-typing");
    browser.sign_in(&app.url("/"), KEY).await;
    browser.button("New session").await;
    let defer = |session: &'static str, command: &'static str| {
        let app = &app;
        async move {
            let call = format!(r#"/tool execute {{"command":"{command}"}}"#);
            let status = post_chat(app, session, &call).await;
            assert_eq!(status, reqwest::StatusCode::CONFLICT);
        }
    };
    let queue_holds = |count: usize| {
        format!("return document.querySelectorAll('#approval-list li').length === {count}")
    };
    defer("ops1", "pwd").await;
    defer("ops2", "ls -la").await;
    browser.until("two approvals", &queue_holds(2)).await;
    let reason = browser
        .client
        .find(Locator::XPath(
            "//ul[@id='approval-list']/li[contains(., 'ls -la')]//input",
        ))
        .await
        .unwrap();
    reason.click().await.unwrap();
    reason.send_keys("half a th").await.unwrap();
    let typing = "const li = [...document.querySelectorAll('#approval-list li')] \
                    .find(li => li.textContent.includes('ls -la')); \
                  const input = li.querySelector('input'); \
                  return [input.value, document.activeElement === input]";
    defer("ops3", "whoami").await;
    browser.until("a third approval", &queue_holds(3)).await;
    browser.shot("third-arrived").await;
    assert_eq!(
        browser.js(typing).await,
        json!(["half a th", true]),
        "after one came"
    );
    // The queue is oldest first: `pwd` is before the field, `whoami` after
    // it. Each is decided on another device.
    for (command, left) in [("pwd", 2), ("whoami", 1)] {
        let pending = get_json(&app, "/api/approvals").await;
        let item = pending["data"]["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|item| item["requests"].to_string().contains(command))
            .unwrap_or_else(|| panic!("no approval of {command}: {pending}"))
            .clone();
        let res = app
            .client
            .post(app.url("/api/actions"))
            .header("x-api-key", KEY)
            .json(&json!({"action": "reject", "approval_id": item["id"]}))
            .send()
            .await
            .unwrap();
        assert!(res.status().is_success(), "{}", res.status());
        browser
            .until(&format!("{command} decided"), &queue_holds(left))
            .await;
        assert_eq!(
            browser.js(typing).await,
            json!(["half a th", true]),
            "after {command} went"
        );
    }
    browser.shot("others-decided").await;
    browser.finish(&[]).await;
}

/// The list is polled every 3 s; a refresh, with or without a new session
/// in it, leaves the keyboard on the session it was on.
async fn the_session_list_keeps_keyboard_focus_while_it_refreshes(kind: Kind) {
    let app = app_with_key(0).await;
    rest_chat(&app, "first", "one").await;
    rest_chat(&app, "second", "two").await;
    let mut browser = browser_or_skip!(kind, "list-focus");
    browser.sign_in(&app.url("/"), KEY).await;
    browser.session("second").await;
    browser
        .js("[...document.querySelectorAll('#session-list button')] \
               .find(b => b.textContent.includes('second')).focus(); return true")
        .await;
    let focused = "const a = document.activeElement; \
                   return a.tagName === 'BUTTON' && a.textContent.includes('second')";
    assert_eq!(browser.js(focused).await, json!(true), "focus is on it");
    // A refresh with nothing new, then one with a session more.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(browser.js(focused).await, json!(true), "after a refresh");
    rest_chat(&app, "third", "three").await;
    browser.session("third").await;
    browser.shot("focus-kept").await;
    assert_eq!(
        browser.js(focused).await,
        json!(true),
        "after a refresh that added a session"
    );
    browser.finish(&[]).await;
}

/// The session's stream head, as the session list tells it.
async fn last_seq(app: &TestApp, session: &str) -> u64 {
    let list = get_json(app, "/api/sessions").await;
    list.as_array()
        .into_iter()
        .flatten()
        .find(|item| item["id"] == session)
        .and_then(|item| item["last_seq"].as_u64())
        .unwrap_or(0)
}

/// A turn started on another device before the console opened the
/// session shows whole while it still streams: its prompt, and its answer
/// from the first token (not from whatever token came next), with the
/// history's earlier turn shown once; the answer is `aria-busy` while it
/// streams, so a screen reader reads it once, whole.
async fn a_session_opened_mid_turn_shows_that_turn_from_its_prompt_and_first_token(kind: Kind) {
    let app = app_with_key(150).await;
    rest_chat(&app, "midturn", "earlier").await;
    let before = last_seq(&app, "midturn").await;
    let mut browser = browser_or_skip!(kind, "mid-turn");
    browser.sign_in(&app.url("/"), KEY).await;
    let (prompt, phone) = long_turn_elsewhere(&app, "midturn");
    // Some of the answer has streamed before the console opens it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while last_seq(&app, "midturn").await < before + 4 {
        assert!(Instant::now() < deadline, "the turn did not stream");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    browser.session("midturn").await.click().await.unwrap();
    browser
        .until(
            "the running turn, from its prompt and first token, while it streams",
            &format!(
                "const li = [...document.querySelectorAll('#messages li')]; \
                 return li.length === 4 && li[0].textContent === 'earlier' \
                   && li[2].textContent === '{prompt}' \
                   && li[3].textContent.startsWith('word0 word1') \
                   && li[3].getAttribute('aria-busy') === 'true' \
                   && !document.querySelector('#stop').disabled"
            ),
        )
        .await;
    browser.shot("mid-turn").await;
    let status = tokio::time::timeout(Duration::from_secs(30), phone)
        .await
        .expect("the turn ends")
        .unwrap();
    assert!(status.is_success(), "{status}");
    browser
        .until(
            "the whole answer, once, no longer busy",
            &format!(
                "const li = [...document.querySelectorAll('#messages li')]; \
                 return li.length === 4 && li[3].textContent === '{prompt}' \
                   && document.querySelectorAll('#messages [aria-busy]').length === 0 \
                   && document.querySelector('#stop').disabled"
            ),
        )
        .await;
    // Screen readers hear the messages (a log) and not the status line's
    // uptime every 30 s.
    assert_eq!(
        browser
            .js("const status = document.querySelector('#status'); \
                 return [document.querySelector('#messages').getAttribute('role'), \
                         status.getAttribute('role'), status.getAttribute('aria-live')]")
            .await,
        json!(["log", null, null])
    );
    browser.finish(&[]).await;
}

/// The check every test ends with can fail: a script error and a 404 the
/// page did not expect are both seen, in each browser.
async fn the_console_check_sees_a_script_error_and_a_refused_request(kind: Kind) {
    let app = app_with_key(0).await;
    let mut browser = browser_or_skip!(kind, "console-check");
    browser.sign_in(&app.url("/"), KEY).await;
    browser.button("New session").await;
    browser
        .js(
            "setTimeout(() => { throw new Error('planted script error'); }, 0); \
             fetch('/console/planted-missing.js'); return true",
        )
        .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut errors = Vec::new();
    let errors = loop {
        // Each read empties the console: keep them all.
        tokio::time::sleep(Duration::from_millis(300)).await;
        errors.extend(browser.console_errors().await);
        let found = |what: &str| errors.iter().any(|e| e.contains(what));
        if (found("planted script error") && found("planted-missing.js"))
            || Instant::now() > deadline
        {
            break errors;
        }
    };
    assert!(
        errors.iter().any(|e| e.contains("planted script error")),
        "the script error is seen: {errors:#?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.contains("planted-missing.js") && e.contains("404")),
        "the 404 is seen: {errors:#?}"
    );
    let _ = browser.client.clone().close().await;
}

async fn signing_in_refuses_a_wrong_key_and_opens_the_console_with_the_right_one(kind: Kind) {
    let app = app_with_key(0).await;
    let mut browser = browser_or_skip!(kind, "sign-in");
    browser.sign_in(&app.url("/"), "not-the-key").await;
    browser
        .until(
            "the wrong key is refused",
            "return document.querySelector('#signin-error').textContent.includes('refused')",
        )
        .await;
    browser.shot("wrong-key").await;
    browser.sign_in(&app.url("/"), KEY).await;
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
    // The one call that fails: checking the wrong key.
    browser.finish(&["401 (Unauthorized)"]).await;
}

async fn a_session_made_over_rest_shows_its_history_and_a_reply_grows_token_by_token(kind: Kind) {
    let app = app_with_key(40).await;
    rest_chat(&app, "from-rest", "hello there").await;
    let mut browser = browser_or_skip!(kind, "history-and-stream");
    browser.sign_in(&app.url("/"), KEY).await;
    browser.open_session("from-rest", 2).await;
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
    browser.finish(&[]).await;
}

async fn a_turn_sent_from_another_device_appears_without_a_reload(kind: Kind) {
    let app = app_with_key(10).await;
    rest_chat(&app, "shared", "first").await;
    let mut browser = browser_or_skip!(kind, "other-device");
    browser.sign_in(&app.url("/"), KEY).await;
    browser.open_session("shared", 2).await;
    rest_chat(&app, "shared", "from my phone").await;
    browser
        .until(
            "the other device's turn",
            "return [...document.querySelectorAll('#messages li')].map(l => l.textContent).filter(t => t === 'from my phone').length === 2",
        )
        .await;
    browser.shot("other-device").await;
    browser.finish(&[]).await;
}

async fn model_text_with_markup_is_shown_as_text(kind: Kind) {
    let app = app_with_key(0).await;
    let mut browser = browser_or_skip!(kind, "injection");
    browser.sign_in(&app.url("/"), KEY).await;
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
    browser.finish(&[]).await;
}

async fn at_phone_width_the_composer_stays_in_view(kind: Kind) {
    let app = app_with_key(0).await;
    for i in 0..6 {
        rest_chat(
            &app,
            "long",
            &format!("message number {i} with some words in it"),
        )
        .await;
    }
    let mut browser = browser_or_skip!(kind, "phone");
    browser.client.set_window_size(390, 844).await.unwrap();
    browser.sign_in(&app.url("/"), KEY).await;
    browser.open_session("long", 12).await;
    browser
        .until(
            "the composer in view",
            "const r = document.querySelector('#message').getBoundingClientRect(); \
             return r.top >= 0 && r.bottom <= window.innerHeight && r.width > 200",
        )
        .await;
    browser.shot("phone").await;
    browser.finish(&[]).await;
}

/// A 60-word turn sent over REST from another device, in a task of its
/// own (150 ms a token makes it stream for about 9 s): its prompt, which
/// the echo agent answers word for word, and its status once it ends.
fn long_turn_elsewhere(
    app: &TestApp,
    session: &str,
) -> (String, tokio::task::JoinHandle<reqwest::StatusCode>) {
    let words: Vec<String> = (0..60).map(|i| format!("word{i}")).collect();
    let prompt = words.join(" ");
    let request = app
        .client
        .post(app.url("/api/chat"))
        .header("x-api-key", KEY)
        .json(&json!({"content": prompt, "session_id": session}));
    let phone = tokio::spawn(async move { request.send().await.unwrap().status() });
    (prompt, phone)
}

/// Posts a chat turn and answers its status, whatever it is.
async fn post_chat(app: &TestApp, session: &str, content: &str) -> reqwest::StatusCode {
    app.client
        .post(app.url("/api/chat"))
        .header("x-api-key", KEY)
        .json(&json!({"content": content, "session_id": session}))
        .send()
        .await
        .unwrap()
        .status()
}

async fn a_turn_from_another_device_shows_its_prompt_as_it_streams_and_stop_cancels_it(kind: Kind) {
    let app = app_with_key(150).await;
    rest_chat(&app, "stoppable", "hello").await;
    let mut browser = browser_or_skip!(kind, "stop");
    browser.sign_in(&app.url("/"), KEY).await;
    browser.open_session("stoppable", 2).await;
    let (prompt, phone) = long_turn_elsewhere(&app, "stoppable");
    // The prompt shows while the turn still streams (its `prompt` event,
    // not the history read at its end).
    browser
        .until(
            "the other device's prompt, with its answer growing",
            &format!(
                "const li = [...document.querySelectorAll('#messages li')]; \
                 return li.length === 4 && li[2].textContent === '{prompt}' \
                   && li[3].textContent.length > 0 && !document.querySelector('#stop').disabled"
            ),
        )
        .await;
    browser.shot("streaming").await;
    browser.button("Stop").await.click().await.unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), phone)
        .await
        .expect("the turn ends once stopped")
        .unwrap();
    assert_eq!(status, reqwest::StatusCode::CONFLICT, "turn_cancelled");
    browser
        .until(
            "the turn shown stopped",
            "return document.querySelector('#stop').disabled",
        )
        .await;
    browser.shot("stopped").await;
    let history: Value = get_json(&app, "/api/sessions/stoppable/history").await;
    let partial = history["messages"][3]["parts"][0]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        partial.len() < prompt.len(),
        "cut short: {partial} of {prompt}"
    );
    browser
        .until(
            "the partial answer as the history has it",
            &format!(
                "const li = [...document.querySelectorAll('#messages li')]; \
                 return li.length === 4 && li[3].textContent === '{partial}'"
            ),
        )
        .await;
    browser.finish(&[]).await;
}

async fn a_pending_approval_shows_with_its_call_and_approve_empties_the_queue(kind: Kind) {
    let app = app_with_approvals().await;
    let mut browser = browser_or_skip!(kind, "approval");
    browser.sign_in(&app.url("/"), KEY).await;
    browser.button("New session").await;
    browser
        .until(
            "an empty queue",
            "return !document.querySelector('#approvals-empty').hidden",
        )
        .await;
    let status = post_chat(&app, "ops", r#"/tool execute {"command":"ls -la"}"#).await;
    assert_eq!(status, reqwest::StatusCode::CONFLICT);
    browser
        .until(
            "the pending approval, with its call",
            "const li = document.querySelectorAll('#approval-list li'); \
             return li.length === 1 && li[0].textContent.includes('execute') \
               && li[0].textContent.includes('ls -la') \
               && document.querySelector('#approvals-empty').hidden",
        )
        .await;
    browser.shot("pending").await;
    let reason = browser
        .client
        .find(Locator::XPath(
            "//ul[@id='approval-list']//input[@id=//ul[@id='approval-list']//label[normalize-space()='Reason']/@for]",
        ))
        .await
        .unwrap();
    reason.send_keys("looked at it").await.unwrap();
    browser.button("Approve").await.click().await.unwrap();
    browser
        .until(
            "the queue empty again",
            "return document.querySelectorAll('#approval-list li').length === 0 \
               && !document.querySelector('#approvals-empty').hidden",
        )
        .await;
    browser.shot("approved").await;
    let pending: Value = get_json(&app, "/api/approvals").await;
    assert_eq!(pending["data"]["count"], 0, "{pending}");
    browser.finish(&[]).await;
}

/// `autopoiesis serve` as its own process on `port` (0: any), with the key,
/// keeping its data in `data`.
fn serve_process(data: &std::path::Path, port: u16) -> (Child, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_autopoiesis"));
    command
        .args(["serve", "--port", &port.to_string(), "--data-dir"])
        .arg(data)
        .env("AUTOPOIESIS_API_KEY", KEY)
        .env_remove("AUTOPOIESIS_DATABASE_URL");
    crate::helpers::spawn_serve(command)
}

async fn a_server_restart_shows_reconnecting_and_then_the_console_works_again(kind: Kind) {
    let data = tempfile::tempdir().unwrap();
    let (mut server, address) = serve_process(data.path(), 0);
    let base = format!("http://{address}");
    let client = reqwest::Client::new();
    let chat = |content: &'static str| {
        client
            .post(format!("{base}/api/chat"))
            .header("x-api-key", KEY)
            .json(&json!({"content": content, "session_id": "lasting"}))
            .send()
    };
    assert!(
        chat("before the restart")
            .await
            .unwrap()
            .status()
            .is_success()
    );
    let mut browser = browser_or_skip!(kind, "restart");
    browser.sign_in(&format!("{base}/"), KEY).await;
    browser.open_session("lasting", 2).await;

    let _ = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status();
    server.wait().unwrap();
    browser
        .until(
            "the reconnecting state",
            "return document.querySelector('#stream-state').textContent.includes('reconnecting')",
        )
        .await;
    browser.shot("reconnecting").await;

    let port: u16 = address.rsplit(':').next().unwrap().parse().unwrap();
    let (mut server, _) = serve_process(data.path(), port);
    // Reconnecting backs off up to 16 s between tries.
    let deadline = Instant::now() + Duration::from_secs(30);
    while browser
        .js("return document.querySelector('#stream-state').textContent")
        .await
        != json!("")
    {
        assert!(Instant::now() < deadline, "not live again within 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let field = browser.client.find(Locator::Css("#message")).await.unwrap();
    field.send_keys("after the restart").await.unwrap();
    field.send_keys(ENTER).await.unwrap();
    browser
        .until(
            "the answer after the restart",
            "const li = [...document.querySelectorAll('#messages li')].map(l => l.textContent); \
             return li.length === 4 && li[3] === 'after the restart' \
               && document.querySelector('#stop').disabled",
        )
        .await;
    browser.shot("live-again").await;
    let _ = server.kill();
    let _ = server.wait();
    // What the browser says while the server is down.
    browser
        .finish(&["ERR_CONNECTION_REFUSED", "WebSocket connection to"])
        .await;
}

async fn the_console_works_from_the_keyboard_alone(kind: Kind) {
    const TAB: &str = "\u{E004}";
    const SHIFT: &str = "\u{E008}";
    let app = app_with_key(0).await;
    let mut browser = browser_or_skip!(kind, "keyboard");
    browser.client.goto(&app.url("/")).await.unwrap();
    browser
        .key_field()
        .await
        .send_keys(&format!("{KEY}{ENTER}"))
        .await
        .unwrap();
    browser.button("New session").await;
    // Tab reaches "New session" first; Enter makes a session and puts the
    // caret in the message field.
    browser
        .client
        .active_element()
        .await
        .unwrap()
        .send_keys(TAB)
        .await
        .unwrap();
    assert_eq!(
        browser
            .js("return document.activeElement.textContent")
            .await,
        json!("New session")
    );
    browser
        .client
        .active_element()
        .await
        .unwrap()
        .send_keys(ENTER)
        .await
        .unwrap();
    browser
        .until(
            "the message field focused in a new session",
            "return document.activeElement.id === 'message' && !document.activeElement.disabled",
        )
        .await;
    // Shift+Enter is a new line; Enter sends. (Two calls: each ends with
    // its modifiers released, which geckodriver does not do mid-call.)
    let field = browser.client.active_element().await.unwrap();
    field
        .send_keys(&format!("first line{SHIFT}{ENTER}"))
        .await
        .unwrap();
    field
        .send_keys(&format!("second line{ENTER}"))
        .await
        .unwrap();
    browser
        .until(
            "the two-line message and its answer",
            "const li = [...document.querySelectorAll('#messages li')].map(l => l.textContent); \
             return li.length === 2 && li[0] === 'first line\\nsecond line' \
               && li[1] === li[0] && document.querySelector('#stop').disabled",
        )
        .await;
    browser.shot("keyboard").await;
    browser.finish(&[]).await;
}

async fn a_session_is_deleted_from_the_console_and_one_deleted_elsewhere_closes(kind: Kind) {
    let app = app_with_key(0).await;
    rest_chat(&app, "doomed", "bye").await;
    rest_chat(&app, "elsewhere", "bye too").await;
    let mut browser = browser_or_skip!(kind, "delete");
    browser.sign_in(&app.url("/"), KEY).await;
    browser.open_session("doomed", 2).await;
    browser
        .button("Delete session")
        .await
        .click()
        .await
        .unwrap();
    // The first click only asks to confirm.
    browser
        .button("Confirm delete")
        .await
        .click()
        .await
        .unwrap();
    browser
        .until(
            "the session gone from the view and the list",
            "return document.querySelector('#session-title').textContent === 'No session open' \
               && ![...document.querySelectorAll('#session-list button')].some(b => b.textContent.includes('doomed'))",
        )
        .await;
    let gone = app
        .client
        .get(app.url("/api/sessions/doomed/history"))
        .header("x-api-key", KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), reqwest::StatusCode::NOT_FOUND);

    browser.open_session("elsewhere", 2).await;
    let deleted = app
        .client
        .delete(app.url("/api/sessions/elsewhere"))
        .header("x-api-key", KEY)
        .send()
        .await
        .unwrap();
    assert!(deleted.status().is_success());
    browser
        .until(
            "the view closed, not reconnected",
            "return document.querySelector('#session-title').textContent === 'No session open'",
        )
        .await;
    browser.shot("deleted").await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let again = app
        .client
        .get(app.url("/api/sessions/elsewhere/history"))
        .header("x-api-key", KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(
        again.status(),
        reqwest::StatusCode::NOT_FOUND,
        "no reconnect made it again"
    );
    browser.finish(&[]).await;
}

/// `GET path` with the key, as JSON.
async fn get_json(app: &TestApp, path: &str) -> Value {
    app.client
        .get(app.url(path))
        .header("x-api-key", KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}
