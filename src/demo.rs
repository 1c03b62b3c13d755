//! `outpost demo`: a self-contained showcase, narrated in the terminal.
//!
//! It starts a toy shop API on loopback ([`upstream::ToyUpstream`]), outpost in front of it
//! (in-process, embedded store in a temporary directory), and then tells the story: reads and
//! writes while online; the upstream goes down; reads served stale and writes queued with
//! their idempotency keys; the upstream comes back; the replay with each item's
//! classification (from outpost's own event stream); the final tally.

pub mod upstream;

use std::time::{Duration, Instant};

use http::{Method, Request};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::app::App;
use crate::body::{self, ProxyBody};
use crate::config::Config;
use crate::events::Event;
use crate::shutdown::Shutdown;
use upstream::ToyUpstream;

/// Why the demo stopped.
pub type DemoError = Box<dyn std::error::Error + Send + Sync>;

struct Answer {
    status: u16,
    cache_status: String,
    key: String,
    body: String,
}

struct Narrator {
    client: Client<HttpConnector, ProxyBody>,
    base: String,
}

impl Narrator {
    async fn call(
        &self,
        method: Method,
        path: &str,
        json: Option<&str>,
    ) -> Result<Answer, DemoError> {
        let mut builder = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if json.is_some() {
            builder = builder.header("content-type", "application/json");
        }
        let req = builder.body(match json {
            Some(j) => body::full(j.to_string()),
            None => body::empty(),
        })?;
        let resp = self.client.request(req).await?;
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string()
        };
        let (status, cache_status, key) = (
            resp.status().as_u16(),
            header("cache-status"),
            header("idempotency-key"),
        );
        let body = resp.into_body().collect().await?.to_bytes();
        Ok(Answer {
            status,
            cache_status,
            key,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }
}

fn say(text: &str) {
    println!("{text}");
}

fn step(title: &str) {
    println!("\n== {title}");
}

fn short(s: &str, n: usize) -> String {
    if s.len() <= n {
        s.to_string()
    } else {
        format!(
            "{}…",
            &s[..s.char_indices().nth(n).map(|(i, _)| i).unwrap_or(s.len())]
        )
    }
}

/// Run the demo to completion.
pub async fn run() -> Result<(), DemoError> {
    let toy = ToyUpstream::start().await?;
    let data = tempfile_dir()?;
    let mut config = Config::default();
    config.upstream.url = format!("http://{}", toy.addr());
    config.proxy.listen = "127.0.0.1:0".parse()?;
    config.admin.listen = "127.0.0.1:0".parse()?;
    config.store.data_dir = data.clone();
    config.upstream.probe_interval_max = Duration::from_secs(1);
    config.replay.initial_backoff = Duration::from_millis(200);
    // An autosaving editor's drafts: queued saves of one draft fold into one.
    config.routes.push(crate::config::RouteConfig {
        path: "/drafts/".into(),
        coalesce: true,
        ..Default::default()
    });
    config.validate()?;
    let shutdown = Shutdown::new();
    let app = App::start(config, shutdown.clone()).await?;
    let mut events = app.events().subscribe();
    let narrator = Narrator {
        client: Client::builder(TokioExecutor::new()).build_http(),
        base: format!("http://{}", app.proxy_addr()),
    };

    say("outpost demo: a toy shop API on loopback, outpost in front of it.");
    say(&format!(
        "  upstream http://{}   outpost http://{}   data {}",
        toy.addr(),
        app.proxy_addr(),
        data.display()
    ));

    step("1. The upstream is up: outpost is a transparent proxy");
    let a = narrator.call(Method::GET, "/products", None).await?;
    say(&format!(
        "  GET  /products  -> {}  [{}]",
        a.status, a.cache_status
    ));
    let a = narrator
        .call(Method::POST, "/orders", Some(r#"{"product":1,"qty":2}"#))
        .await?;
    say(&format!(
        "  POST /orders    -> {}  key {}  {}",
        a.status,
        a.key,
        short(&a.body, 60)
    ));

    step("2. The upstream goes down (network cut)");
    toy.stop();
    let a = narrator.call(Method::GET, "/products", None).await?;
    say(&format!(
        "  GET  /products  -> {}  [{}]  served from outpost's cache",
        a.status, a.cache_status
    ));
    let a = narrator.call(Method::GET, "/orders/unknown", None).await?;
    say(&format!(
        "  GET  /orders/unknown -> {}  {}  (never cached)",
        a.status, a.body
    ));
    let writes = [
        (r#"{"product":2,"qty":1}"#, "a good order"),
        (r#"{"product":1,"qty":0}"#, "an invalid order (qty 0)"),
        (
            r#"{"product":9,"qty":1}"#,
            "an order for a sold-out product",
        ),
        (r#"{"product":1,"qty":5}"#, "another good order"),
    ];
    let mut keys = Vec::new();
    for (json, what) in writes {
        let a = narrator.call(Method::POST, "/orders", Some(json)).await?;
        say(&format!(
            "  POST /orders    -> {}  queued durably, key {}  ({what})",
            a.status, a.key
        ));
        keys.push(a.key);
    }
    say("  The app got its answers at once: nothing spins, nothing is lost.");
    say("  Meanwhile an editor autosaves a draft on every keystroke (route coalesce = true):");
    let text = "offline-first";
    let mut drafts = Vec::new();
    for n in 1..=text.len() {
        let patch = format!(r#"{{"text":"{}"}}"#, &text[..n]);
        let a = narrator
            .call(Method::PATCH, "/drafts/1", Some(&patch))
            .await?;
        drafts.push(a.key);
    }
    let first = narrator
        .call(
            Method::GET,
            &format!("/_outpost/mutations/{}", drafts[0]),
            None,
        )
        .await?;
    let first: serde_json::Value = serde_json::from_str(&first.body).unwrap_or_default();
    say(&format!(
        "  PATCH /drafts/1 x{} -> 202 each; the first is now status {} (coalesced_into {}),",
        drafts.len(),
        first["status"],
        first["coalesced_into"]
    ));
    say("  and each save folded into the next: one PATCH with the merged draft stays queued.");

    step("3. The upstream comes back; outpost notices and replays in order");
    toy.restart().await?;
    let started = Instant::now();
    let (mut done, mut succeeded, mut rejected, mut conflict) = (0, 0, 0, 0);
    while done < keys.len() && started.elapsed() < Duration::from_secs(30) {
        let event = match tokio::time::timeout(Duration::from_secs(30), events.recv()).await {
            Ok(Ok(e)) => e,
            _ => break,
        };
        match event {
            Event::Online => say("  upstream seen online"),
            Event::Classified { key, class, status } if keys.contains(&key) => {
                let status = status.map(|s| s.to_string()).unwrap_or_else(|| "-".into());
                let action = match class.as_str() {
                    "success" => {
                        succeeded += 1;
                        done += 1;
                        "applied"
                    }
                    "validation" => {
                        rejected += 1;
                        done += 1;
                        "dead-lettered for the app or an operator"
                    }
                    "conflict" => {
                        conflict += 1;
                        done += 1;
                        "dead-lettered as a conflict"
                    }
                    "retryable" => "will retry with backoff",
                    _ => "",
                };
                say(&format!("  replayed {key}: {class} ({status}) -> {action}"));
            }
            _ => {}
        }
    }
    let a = narrator
        .call(
            Method::GET,
            &format!("/_outpost/mutations/{}", keys[1]),
            None,
        )
        .await?;
    say(&format!(
        "  GET /_outpost/mutations/{} -> {}",
        keys[1],
        short(&a.body, 160)
    ));

    // The draft's one surviving save is replayed in the place of its first one.
    let draft_key = drafts.last().cloned().unwrap_or_default();
    let waited = Instant::now();
    while waited.elapsed() < Duration::from_secs(10) {
        let a = narrator
            .call(
                Method::GET,
                &format!("/_outpost/mutations/{draft_key}"),
                None,
            )
            .await?;
        if a.body.contains("\"succeeded\"") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (draft_writes, draft) = {
        let ledger = toy.ledger();
        (ledger.draft_writes, ledger.draft.to_string())
    };
    say(&format!(
        "  the draft's {} autosaves reached the upstream as {draft_writes} PATCH (key {draft_key}): {draft}",
        drafts.len()
    ));

    step("4. Tally");
    let (applied, duplicates) = {
        let ledger = toy.ledger();
        (ledger.applied.len(), ledger.duplicates_refused)
    };
    say(&format!(
        "  queued {}: {succeeded} applied, {rejected} rejected, {conflict} conflict; the upstream applied {applied} orders in all (1 online + {succeeded} replayed), {duplicates} duplicate deliveries",
        keys.len()
    ));
    say(&format!(
        "  replay took {:.1} s after the upstream came back",
        started.elapsed().as_secs_f64()
    ));
    app.shutdown();
    app.wait().await;
    let _ = std::fs::remove_dir_all(&data);
    if done < keys.len() {
        return Err("not every queued write was replayed within 30 s".into());
    }
    Ok(())
}

fn tempfile_dir() -> std::io::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("outpost-demo-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
