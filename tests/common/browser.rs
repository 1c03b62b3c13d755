//! A headless browser for tests: Debian's `chromium` driven by `chromedriver` over the W3C
//! WebDriver protocol (JSON over HTTP on loopback), with the few commands the status-page test
//! needs. A dozen requests do not justify a WebDriver crate and its TLS stack.
//!
//! [`Browser::start`] returns `Err` with the reason when `chromium` or `chromedriver` is missing;
//! the caller decides whether that fails the test (with `CI` set) or skips it.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::free_port;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A chromedriver process and one browser session (both ended on drop).
pub struct Browser {
    driver: tokio::process::Child,
    base: String,
    session: String,
    http: reqwest::Client,
}

impl Browser {
    /// Start chromedriver on a free loopback port and open a headless chromium session.
    pub async fn start() -> Result<Browser, String> {
        for bin in [CHROMIUM, CHROMEDRIVER] {
            if !Path::new(bin).exists() {
                return Err(format!(
                    "{bin} is missing (apt-get install -y chromium chromium-driver)"
                ));
            }
        }
        let port = free_port();
        let mut cmd = tokio::process::Command::new(CHROMEDRIVER);
        cmd.arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group, so that chromium (its child) ends with it.
            .process_group(0)
            .kill_on_drop(true);
        for var in [
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "http_proxy",
            "https_proxy",
            "ALL_PROXY",
        ] {
            cmd.env_remove(var);
        }
        let driver = cmd
            .spawn()
            .map_err(|e| format!("cannot start {CHROMEDRIVER}: {e}"))?;
        let base = format!("http://127.0.0.1:{port}");
        let http = super::client();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(resp) = http.get(format!("{base}/status")).send().await
                && resp.status().is_success()
            {
                break;
            }
            if Instant::now() > deadline {
                return Err("chromedriver did not come up within 20 s".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,1000",
                         "--no-proxy-server"],
            },
        }}});
        let resp: Value = http
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .await
            .map_err(|e| format!("new session: {e}"))?
            .json()
            .await
            .map_err(|e| format!("new session: {e}"))?;
        let session = resp["value"]["sessionId"]
            .as_str()
            .ok_or_else(|| format!("no session: {resp}"))?
            .to_string();
        Ok(Browser {
            driver,
            base,
            session,
            http,
        })
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let mut req = self.http.request(method.clone(), &url);
        if let Some(body) = body {
            req = req.json(&body);
        } else if method == reqwest::Method::POST {
            req = req.json(&json!({}));
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("webdriver {method} {path}: {e}"));
        let status = resp.status();
        let value: Value = resp.json().await.unwrap_or(Value::Null);
        assert!(
            status.is_success(),
            "webdriver {method} {path}: {status} {value}"
        );
        value["value"].clone()
    }

    /// Load `url`.
    pub async fn goto(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", Some(json!({"url": url})))
            .await;
    }

    /// The first element matching the CSS `selector`, if any.
    pub async fn find(&self, selector: &str) -> Option<String> {
        let found = self
            .call(
                reqwest::Method::POST,
                "/elements",
                Some(json!({"using": "css selector", "value": selector})),
            )
            .await;
        found.as_array()?.first()?[ELEMENT_KEY]
            .as_str()
            .map(str::to_owned)
    }

    /// Wait until `selector` matches a displayed element; returns it.
    pub async fn wait_for(&self, selector: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(el) = self.find(selector).await
                && self.displayed(selector).await
            {
                return el;
            }
            if Instant::now() >= deadline {
                let page = self
                    .eval("return document.location.href + ' ' + document.body.innerText")
                    .await;
                let found = self
                    .call(
                        reqwest::Method::POST,
                        "/elements",
                        Some(json!({"using": "css selector", "value": selector})),
                    )
                    .await;
                let shown = self.displayed(selector).await;
                panic!(
                    "no displayed {selector} within {timeout:?} (found {found}, displayed \
                     {shown}); the page: {page}"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether `selector` matches an element that is rendered (not hidden, has a box).
    async fn displayed(&self, selector: &str) -> bool {
        let script = format!(
            "const el = document.querySelector({}); \
             return !!el && !el.closest('[hidden]') && el.getClientRects().length > 0;",
            Value::String(selector.to_string())
        );
        self.eval(&script).await == Value::Bool(true)
    }

    /// The rendered text of `selector` (empty when it is not there).
    pub async fn text(&self, selector: &str) -> String {
        match self.find(selector).await {
            Some(el) => self
                .call(reqwest::Method::GET, &format!("/element/{el}/text"), None)
                .await
                .as_str()
                .unwrap_or_default()
                .to_string(),
            None => String::new(),
        }
    }

    /// Wait until the text of `selector` satisfies `check`.
    pub async fn wait_text(&self, selector: &str, timeout: Duration, check: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.text(selector).await;
            if check(&text) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{selector} still reads {text:?} after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Click the element matching `selector`.
    pub async fn click(&self, selector: &str) {
        let el = self.wait_for(selector, Duration::from_secs(10)).await;
        self.call(reqwest::Method::POST, &format!("/element/{el}/click"), None)
            .await;
    }

    /// Type `text` into the element matching `selector`.
    pub async fn type_into(&self, selector: &str, text: &str) {
        let el = self.wait_for(selector, Duration::from_secs(10)).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{el}/value"),
            Some(json!({"text": text})),
        )
        .await;
    }

    /// Run `script` (a function body) in the page and return its value.
    pub async fn eval(&self, script: &str) -> Value {
        self.call(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
        .await
    }

    /// A PNG screenshot of the window.
    pub async fn screenshot(&self) -> Vec<u8> {
        use base64::Engine as _;
        let b64 = self
            .call(reqwest::Method::GET, "/screenshot", None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_string();
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap_or_default()
    }
}

impl Browser {
    /// End the session (closing chromium) and the driver.
    pub async fn quit(self) {
        let url = format!("{}/session/{}", self.base, self.session);
        let _ = self.http.delete(url).send().await;
        // Drop kills what is left of the process group.
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Best effort (a failing test): the driver's whole process group, chromium included.
        if let Some(pid) = self.driver.id() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .status();
        }
        let _ = self.driver.start_kill();
    }
}
