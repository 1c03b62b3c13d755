//! Replay without sockets: the in-memory store, a scripted upstream service, and tokio's paused
//! clock, so that backoff schedules, `Retry-After`, pause/resume, waiting after a 401 and lease
//! renewal are checked in virtual time (each test runs in milliseconds of real time).

use std::collections::VecDeque;
use std::sync::Mutex as StdMutex;

use http::{Request, Response};
use tokio::time::Instant as TokioInstant;
use tower::util::BoxCloneSyncService;

use super::*;
use crate::body::ProxyBody;
use crate::store::conformance::record;
use crate::store::memory::MemoryStore;
use crate::store::{Coordination, Queue};

/// One scripted answer of the fake upstream.
#[derive(Clone)]
enum Answer {
    /// A status, with headers.
    Status(u16, Vec<(&'static str, &'static str)>),
    /// A status after a delay.
    Slow(u16, Duration),
    /// No answer in time (ambiguous: may have been applied).
    Timeout,
    /// Connection refused (not sent).
    Refused,
}

/// When a request came, and its `Authorization`.
type Call = (TokioInstant, Option<String>);

/// A fake upstream: answers from a script (the last answer repeats) and records when each
/// request came and with which `Authorization`.
#[derive(Clone, Default)]
struct Fake {
    script: Arc<StdMutex<VecDeque<Answer>>>,
    seen: Arc<StdMutex<Vec<Call>>>,
    /// While set, every request is refused (and not counted as a call).
    down: Arc<std::sync::atomic::AtomicBool>,
}

impl Fake {
    fn new(answers: Vec<Answer>) -> Self {
        Fake {
            script: Arc::new(StdMutex::new(answers.into())),
            ..Fake::default()
        }
    }

    fn is_down(&self) -> bool {
        self.down.load(Ordering::SeqCst)
    }

    fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    fn calls(&self) -> Vec<Call> {
        self.seen.lock().expect("seen").clone()
    }

    fn service(&self) -> UpstreamService {
        let fake = self.clone();
        BoxCloneSyncService::new(tower::service_fn(move |req: Request<ProxyBody>| {
            let fake = fake.clone();
            async move {
                if fake.is_down() {
                    return Err(ForwardError::Connect("refused".into()));
                }
                let auth = req
                    .headers()
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                fake.seen
                    .lock()
                    .expect("seen")
                    .push((TokioInstant::now(), auth));
                let answer = {
                    let mut script = fake.script.lock().expect("script");
                    if script.len() > 1 {
                        script.pop_front()
                    } else {
                        script.front().cloned()
                    }
                };
                let (status, headers) = match answer.unwrap_or(Answer::Status(201, vec![])) {
                    Answer::Status(s, h) => (s, h),
                    Answer::Slow(s, wait) => {
                        tokio::time::sleep(wait).await;
                        (s, vec![])
                    }
                    Answer::Timeout => return Err(ForwardError::Timeout(Duration::from_secs(30))),
                    Answer::Refused => return Err(ForwardError::Connect("refused".into())),
                };
                let mut resp = Response::builder().status(status);
                for (n, v) in headers {
                    resp = resp.header(n, v);
                }
                Ok(resp
                    .body(crate::body::full("{}"))
                    .expect("a valid scripted answer"))
            }
        }))
    }
}

/// A replayer over an in-memory store with `extra` config, sending to `fake`; the probe says
/// "online" every 100 ms while the upstream is marked offline.
struct Rig {
    store: Arc<MemoryStore>,
    replayer: Arc<Replayer>,
    parts: Parts,
    shutdown: Shutdown,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Rig {
    fn start(extra: &str, fake: &Fake, store: Option<Arc<MemoryStore>>) -> Rig {
        let schedule = crate::health::ProbeSchedule {
            interval: Duration::from_millis(100),
            max: Duration::from_millis(100),
            check_interval: Duration::ZERO,
        };
        Self::start_probing(extra, fake, store, schedule, false)
    }

    /// [`Self::start`] with the probe `schedule`; with `real`, the probe and the reconnect
    /// check succeed only while `fake` is up (else the probe always says online).
    fn start_probing(
        extra: &str,
        fake: &Fake,
        store: Option<Arc<MemoryStore>>,
        schedule: crate::health::ProbeSchedule,
        real: bool,
    ) -> Rig {
        let text = format!(
            "[replay]\nrate_limit = 0\ninitial_backoff = \"1s\"\nmax_backoff = \"60s\"\n{extra}"
        );
        let config = Arc::new(Config::parse(&text).expect("config"));
        let routes = Arc::new(RouteTable::new(&config).expect("routes"));
        let store =
            store.unwrap_or_else(|| Arc::new(MemoryStore::new(1 << 20, config.store.redis_lease)));
        let upstream = Upstream::new(&config.upstream).expect("upstream client");
        let parts = Parts::new(config, routes, store.clone(), upstream, Events::new());
        let shutdown = Shutdown::new();
        let replayer = Arc::new(Replayer::with_service(
            &parts,
            fake.service(),
            shutdown.clone(),
        ));
        let reachable = move |fake: Fake| async move {
            if real && fake.is_down() {
                Err("refused".to_string())
            } else {
                Ok(())
            }
        };
        let (for_probe, for_check) = (fake.clone(), fake.clone());
        let probe = parts.health.clone().run_probe_with(
            schedule,
            shutdown.clone(),
            move || reachable(for_probe.clone()),
            move || reachable(for_check.clone()),
        );
        let tasks = vec![tokio::spawn(replayer.clone().run()), tokio::spawn(probe)];
        Rig {
            store,
            replayer,
            parts,
            shutdown,
            tasks,
        }
    }

    async fn queue(&self, key: &str, principal: Option<&str>, auth: &str) {
        let mut r = record(key, "p");
        r.principal = principal.map(str::to_string);
        r.request
            .headers
            .push(("authorization".into(), Bytes::from(auth.to_string())));
        self.store.enqueue(r).await.expect("enqueue");
        self.parts.activity.wake();
    }

    async fn mutation(&self, key: &str) -> MutationRecord {
        self.store
            .mutation(key)
            .await
            .expect("read")
            .expect("the record")
    }

    /// Let virtual time pass (every timer due in it fires).
    async fn run_for(&self, d: Duration) {
        tokio::time::sleep(d).await;
    }

    async fn stop(self) {
        self.shutdown.trigger();
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

#[tokio::test(start_paused = true)]
async fn an_ambiguous_failure_waits_out_its_own_backoff_and_is_dead_lettered_after_max_attempts() {
    let fake = Fake::new(vec![Answer::Timeout]);
    let rig = Rig::start("max_attempts = 3", &fake, None);
    rig.queue("poison", None, "Bearer t").await;
    rig.queue("next", None, "Bearer t").await;
    let mut waits = Vec::new();
    for attempt in 1..=2usize {
        while fake.calls().len() < attempt {
            rig.run_for(Duration::from_millis(50)).await;
        }
        let item = rig.mutation("poison").await;
        assert_eq!(item.attempts as usize, attempt);
        assert!(
            item.outcome
                .as_deref()
                .unwrap_or("")
                .contains("maybe applied")
        );
        waits.push(item.next_attempt_at_ms);
    }
    // Timeouts mark the upstream offline and the probe brings it back at once: the item still
    // waited for its own next attempt every time (no tight loop).
    rig.run_for(Duration::from_secs(120)).await;
    let calls = fake.calls();
    let poison: Vec<TokioInstant> = calls.iter().take(3).map(|(t, _)| *t).collect();
    assert_eq!(poison.len(), 3);
    let start = poison[0];
    let first_wall = rig.mutation("next").await.accepted_at_ms;
    for (i, next_at) in waits.iter().enumerate() {
        let due = Duration::from_millis(next_at.saturating_sub(first_wall));
        assert!(
            poison[i + 1] + Duration::from_millis(50)
                >= start + due.saturating_sub(Duration::from_millis(50)),
            "attempt {} came before its backoff",
            i + 2
        );
    }
    let item = rig.mutation("poison").await;
    assert_eq!(item.status, MutationStatus::Rejected);
    assert_eq!(item.attempts, 3);
    assert!(
        item.outcome
            .as_deref()
            .unwrap_or("")
            .starts_with("gave up after 3 attempts"),
        "{:?}",
        item.outcome
    );
    // The partition went on: the next item was sent (and failed the same way, on its own).
    assert!(calls.len() > 3);
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_a_floor_for_the_next_attempt() {
    let fake = Fake::new(vec![
        Answer::Status(503, vec![("retry-after", "30")]),
        Answer::Status(201, vec![]),
    ]);
    let rig = Rig::start("", &fake, None);
    rig.queue("k", None, "Bearer t").await;
    rig.run_for(Duration::from_secs(120)).await;
    let calls = fake.calls();
    let t0 = calls[0].0;
    let offsets: Vec<Duration> = calls.iter().map(|(t, _)| *t - t0).collect();
    assert_eq!(
        calls.len(),
        2,
        "once refused, once applied: {offsets:?} {:?}",
        rig.mutation("k").await
    );
    assert!(calls[1].0 - calls[0].0 >= Duration::from_secs(30));
    assert_eq!(rig.mutation("k").await.status, MutationStatus::Succeeded);
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_refused_connection_is_not_an_attempt_and_the_item_goes_once_the_upstream_is_back() {
    let fake = Fake::new(vec![Answer::Refused, Answer::Status(201, vec![])]);
    let rig = Rig::start("", &fake, None);
    rig.queue("k", None, "Bearer t").await;
    rig.run_for(Duration::from_secs(5)).await;
    let calls = fake.calls();
    assert_eq!(calls.len(), 2);
    // Sent again as soon as the probe saw the upstream (every 100 ms here), not after a backoff.
    assert!(calls[1].0 - calls[0].0 <= Duration::from_millis(1200));
    let item = rig.mutation("k").await;
    assert_eq!(item.status, MutationStatus::Succeeded);
    assert_eq!(
        item.attempts, 1,
        "the refused connection was not an attempt"
    );
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn after_a_long_outage_the_first_replayed_write_goes_within_a_second_of_the_return() {
    let fake = Fake::default();
    fake.set_down(true);
    // The default probe schedule: backoff 250 ms → 10 s, reconnect check every 250 ms.
    let schedule = crate::health::ProbeSchedule::from(&crate::config::UpstreamConfig::default());
    let rig = Rig::start_probing("", &fake, None, schedule, true);
    rig.queue("k", None, "Bearer t").await;
    rig.run_for(Duration::from_millis(10)).await;
    assert!(
        !rig.parts.health.is_online(),
        "the refused send marked it offline"
    );
    // A long outage: the probe's backoff has reached its 10 s cap.
    rig.run_for(Duration::from_secs(90)).await;
    assert!(fake.calls().is_empty());
    fake.set_down(false);
    let back = TokioInstant::now();
    while fake.calls().is_empty() {
        rig.run_for(Duration::from_millis(10)).await;
        assert!(back.elapsed() < Duration::from_secs(20), "never replayed");
    }
    let took = fake.calls()[0].0 - back;
    assert!(
        took < Duration::from_secs(1),
        "first replayed write {took:?} after the upstream came back"
    );
    rig.run_for(Duration::from_millis(100)).await;
    assert_eq!(rig.mutation("k").await.status, MutationStatus::Succeeded);
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn pause_holds_replay_until_resume() {
    let fake = Fake::new(vec![Answer::Status(201, vec![])]);
    let rig = Rig::start("", &fake, None);
    rig.replayer.pause();
    rig.queue("k", None, "Bearer t").await;
    // Twenty supervisor ticks pass: each had the chance to start a drain.
    rig.run_for(Duration::from_secs(10)).await;
    assert!(fake.calls().is_empty(), "nothing is sent while paused");
    rig.replayer.resume();
    rig.run_for(Duration::from_secs(1)).await;
    assert_eq!(fake.calls().len(), 1);
    assert_eq!(rig.mutation("k").await.status, MutationStatus::Succeeded);
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_401_waits_for_fresh_credentials_of_its_own_principal() {
    let fake = Fake::new(vec![
        Answer::Status(401, vec![]),
        Answer::Status(201, vec![]),
    ]);
    let rig = Rig::start("auth_principal = \"header:x-user\"", &fake, None);
    rig.queue("k", Some("alice"), "Bearer alice-old").await;
    rig.run_for(Duration::from_secs(2)).await;
    assert_eq!(rig.mutation("k").await.status, MutationStatus::AuthRequired);
    let offer = |user: &str, token: &str| {
        let mut h = http::HeaderMap::new();
        h.insert("x-user", HeaderValue::from_str(user).expect("value"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(token).expect("value"),
        );
        rig.parts.credentials.offer(&h);
    };
    offer("bob", "Bearer bob");
    rig.run_for(Duration::from_secs(5)).await;
    assert_eq!(
        fake.calls().len(),
        1,
        "bob's credentials do not release alice's write"
    );
    offer("alice", "Bearer alice-new");
    rig.run_for(Duration::from_secs(2)).await;
    let calls = fake.calls();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[1].1.as_deref(), Some("Bearer alice-new"));
    assert_eq!(rig.mutation("k").await.status, MutationStatus::Succeeded);
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_lease_is_renewed_while_a_slow_answer_is_awaited() {
    let fake = Fake::new(vec![Answer::Slow(201, Duration::from_secs(20))]);
    let rig = Rig::start("[store]\nredis_lease = \"3s\"", &fake, None);
    let other = rig.store.another_instance().expect("second instance");
    rig.queue("k", None, "Bearer t").await;
    rig.run_for(Duration::from_millis(500)).await;
    assert_eq!(fake.calls().len(), 1, "in flight");
    // Far beyond the 3 s lease, the other instance still cannot take the partition.
    for _ in 0..5 {
        rig.run_for(Duration::from_secs(3)).await;
        assert!(
            other.acquire("p").await.expect("acquire").is_none(),
            "the lease was renewed while the answer was awaited"
        );
    }
    rig.run_for(Duration::from_secs(10)).await;
    assert_eq!(rig.mutation("k").await.status, MutationStatus::Succeeded);
    assert_eq!(fake.calls().len(), 1, "sent once");
    rig.stop().await;
}

#[test]
fn the_acceptance_time_is_set_in_json_object_bodies_only() {
    let mut r = record("k", "p").request;
    r.body = Bytes::from_static(br#"{"a":{"b":1}}"#);
    let stamped = stamp_body(&r, "/a/at", "2026-11-27T00:00:00.000Z");
    let json: serde_json::Value = serde_json::from_slice(&stamped.body).expect("json");
    assert_eq!(json["a"]["at"], "2026-11-27T00:00:00.000Z");
    assert_eq!(json["a"]["b"], 1);
    // Not JSON, or no object where the pointer points: unchanged.
    r.body = Bytes::from_static(b"plain text");
    assert_eq!(stamp_body(&r, "/at", "t").body, r.body);
    r.body = Bytes::from_static(br#"{"a":[1]}"#);
    assert_eq!(stamp_body(&r, "/a/at", "t").body, r.body);
}

/// A copy queued for a `write_timeout` 202, as the write path stores it before the 202.
fn awaiting_copy(key: &str, due_in: Duration) -> MutationRecord {
    let mut r = record(key, "p");
    r.attempts = 1;
    r.outcome = Some(AWAITING_FORWARD.to_owned());
    r.request
        .headers
        .push((FORWARDED_BEFORE_202.to_owned(), Bytes::from_static(b"1")));
    r.next_attempt_at_ms = now_ms() + due_in.as_millis() as u64;
    r
}

/// With a store other processes may share (here the memory store), a `write_timeout` copy
/// whose forward left nothing is waited for until it is due (another instance may still be
/// running the forward), and then dead-lettered `maybe applied`, never sent: the forward may
/// have reached the upstream. A copy whose forward recorded that it had no effect is sent.
#[tokio::test(start_paused = true)]
async fn a_write_timeout_copy_is_sent_only_when_its_forward_recorded_no_effect() {
    let fake = Fake::new(vec![Answer::Status(201, vec![])]);
    let store = Arc::new(MemoryStore::new(1 << 20, Duration::from_secs(30)));
    // Accepted before this replayer was made, as after a restart.
    store
        .enqueue(awaiting_copy("cut", Duration::from_secs(5)))
        .await
        .expect("enqueue");
    store
        .enqueue(awaiting_copy("unsent", Duration::from_secs(5)))
        .await
        .expect("enqueue");
    let mut marker = record(&answer_key("unsent"), "p");
    marker.status = MutationStatus::Queued;
    marker.outcome = Some("retryable: not sent: refused".into());
    marker.next_attempt_at_ms = now_ms();
    marker.finished_at_ms = Some(now_ms());
    store.record_forwarded(marker).await.expect("marker");
    // A moment passes between the records being stored and the replayer being made.
    tokio::time::sleep(Duration::from_millis(10)).await;
    let rig = Rig::start("", &fake, Some(store));
    rig.parts.activity.wake();
    rig.run_for(Duration::from_secs(3)).await;
    assert!(
        fake.calls().is_empty(),
        "nothing sent before the copy is due"
    );
    assert!(rig.mutation("cut").await.status.is_pending());
    rig.run_for(Duration::from_secs(5)).await;
    let cut = rig.mutation("cut").await;
    assert_eq!(cut.status, MutationStatus::Rejected, "{cut:?}");
    let outcome = cut.outcome.as_deref().unwrap_or_default();
    assert!(
        outcome.contains("maybe applied") && outcome.contains("outpost stopped"),
        "{outcome}"
    );
    let unsent = rig.mutation("unsent").await;
    assert_eq!(unsent.status, MutationStatus::Succeeded, "{unsent:?}");
    assert_eq!(
        fake.calls().len(),
        1,
        "only the copy whose forward had no effect"
    );
    rig.stop().await;
}
