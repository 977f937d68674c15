//! A small W3C WebDriver client over reqwest, driving Debian's headless
//! `chromium` through `chromedriver` (packages `chromium` and
//! `chromium-driver`; `.ci/run` installs them). Only what the console's
//! browser test needs: a session, navigation, finding, typing, clicking,
//! reading text and a screenshot.

use std::{net::TcpListener, process::Stdio, time::Duration};

use base64::Engine;
use serde_json::{Value, json};

use super::{WAIT, eventually};

/// The element key of the W3C protocol.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A chromedriver process and one browser session in it.
pub struct Browser {
    driver: tokio::process::Child,
    base: String,
    http: reqwest::Client,
}

impl Browser {
    /// Starts chromedriver on a free port and a headless Chromium of
    /// `width`×`height`.
    pub async fn start(width: u32, height: u32) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let driver = tokio::process::Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver is installed (apt-get install chromium chromium-driver)");
        let root = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        eventually(WAIT, || async {
            match http.get(format!("{root}/status")).send().await {
                Ok(r) if r.status().is_success() => Ok(()),
                other => Err(format!("chromedriver not up: {other:?}")),
            }
        })
        .await;
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", format!("--window-size={width},{height}")]
            }
        }}});
        let session = http
            .post(format!("{root}/session"))
            .json(&capabilities)
            .send()
            .await
            .expect("new session")
            .json::<Value>()
            .await
            .expect("json");
        let id = session["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("a session: {session}"))
            .to_owned();
        Self {
            driver,
            base: format!("{root}/session/{id}"),
            http,
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let answer: Value = request
            .send()
            .await
            .expect("chromedriver answers")
            .json()
            .await
            .expect("json");
        answer["value"].clone()
    }

    /// Opens `url`.
    pub async fn go(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", Some(json!({ "url": url })))
            .await;
    }

    /// The element `css` selects, when there is one now.
    pub async fn find(&self, css: &str) -> Option<String> {
        let found = self
            .call(
                reqwest::Method::POST,
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        found[ELEMENT].as_str().map(str::to_owned)
    }

    /// Waits (up to [`WAIT`]) for `css` to select an element whose text
    /// contains `text`; returns it.
    pub async fn wait_for(&self, css: &str, text: &str) -> String {
        eventually(WAIT, || async {
            let Some(element) = self.find(css).await else {
                return Err(format!("nothing matches {css}"));
            };
            let shown = self.text(&element).await;
            if shown.contains(text) {
                Ok(element)
            } else {
                Err(format!("{css} shows {shown:?}, not {text:?}"))
            }
        })
        .await
    }

    /// The element's visible text.
    pub async fn text(&self, element: &str) -> String {
        self.call(
            reqwest::Method::GET,
            &format!("/element/{element}/text"),
            None,
        )
        .await
        .as_str()
        .unwrap_or_default()
        .to_owned()
    }

    /// Types `keys` into the element.
    pub async fn type_into(&self, element: &str, keys: &str) {
        self.call(
            reqwest::Method::POST,
            &format!("/element/{element}/value"),
            Some(json!({ "text": keys })),
        )
        .await;
    }

    /// Clicks the element.
    pub async fn click(&self, element: &str) {
        self.call(
            reqwest::Method::POST,
            &format!("/element/{element}/click"),
            Some(json!({})),
        )
        .await;
    }

    /// A PNG of the window.
    pub async fn screenshot(&self) -> Vec<u8> {
        let encoded = self.call(reqwest::Method::GET, "/screenshot", None).await;
        base64::engine::general_purpose::STANDARD
            .decode(encoded.as_str().unwrap_or_default())
            .expect("a base64 PNG")
    }

    /// Resizes the window.
    pub async fn resize(&self, width: u32, height: u32) {
        self.call(
            reqwest::Method::POST,
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        )
        .await;
    }

    /// Ends the session and chromedriver.
    pub async fn quit(mut self) {
        let _ =
            tokio::time::timeout(Duration::from_secs(5), self.http.delete(&self.base).send()).await;
        let _ = self.driver.start_kill();
        let _ = self.driver.wait().await;
    }
}
