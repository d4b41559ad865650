//! A steady load of GETs and POSTs through every lb replica a client can see, counting every
//! request and every failure. It behaves like a client that knows all lb replicas (DNS
//! round-robin with retry): a request whose connection to one replica fails is sent to the
//! next; an HTTP error answer is a failure, never retried.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio::task::JoinHandle;

use crate::stack;

const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a request may keep looking for a replica that answers before it counts as lost.
const GIVE_UP_AFTER: Duration = Duration::from_secs(10);
const POST_BODY: &[u8] = &[b'x'; 2048];

#[derive(Default)]
pub struct Stats {
    pub sent: AtomicU64,
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    pub gets: AtomicU64,
    pub posts: AtomicU64,
    /// Attempts that failed at the connection level and went to another replica.
    pub failovers: AtomicU64,
    /// First time each web task (by swarm task name) answered.
    first_seen: Mutex<HashMap<String, SystemTime>>,
    /// Last time each task answered.
    last_seen: Mutex<HashMap<String, Instant>>,
    /// The first failures, for the report.
    failures: Mutex<Vec<String>>,
    /// Every answered request's time from first attempt to answer, in microseconds.
    latencies: Mutex<Vec<u32>>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Counts {
    pub sent: u64,
    pub ok: u64,
    pub failed: u64,
    pub gets: u64,
    pub posts: u64,
    pub failovers: u64,
}

impl std::ops::Sub for Counts {
    type Output = Counts;
    fn sub(self, o: Counts) -> Counts {
        Counts {
            sent: self.sent - o.sent,
            ok: self.ok - o.ok,
            failed: self.failed - o.failed,
            gets: self.gets - o.gets,
            posts: self.posts - o.posts,
            failovers: self.failovers - o.failovers,
        }
    }
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} requests ({} GET, {} POST), {} ok, {} failed, {} failovers to the other lb",
            self.sent, self.gets, self.posts, self.ok, self.failed, self.failovers
        )
    }
}

impl Stats {
    pub fn counts(&self) -> Counts {
        Counts {
            sent: self.sent.load(Relaxed),
            ok: self.ok.load(Relaxed),
            failed: self.failed.load(Relaxed),
            gets: self.gets.load(Relaxed),
            posts: self.posts.load(Relaxed),
            failovers: self.failovers.load(Relaxed),
        }
    }

    pub fn first_seen(&self) -> HashMap<String, SystemTime> {
        self.first_seen.lock().unwrap().clone()
    }

    /// Tasks that answered within the last `window`.
    pub fn answering(&self, window: Duration) -> Vec<String> {
        let now = Instant::now();
        let mut v: Vec<String> = self
            .last_seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, t)| now.duration_since(**t) < window)
            .map(|(k, _)| k.clone())
            .collect();
        v.sort();
        v
    }

    /// The latency at each of `quantiles` (0..=1) of the requests answered so far, and the
    /// slowest; empty when none was.
    pub fn latency(&self, quantiles: &[f64]) -> (Vec<Duration>, Duration) {
        let mut all = self.latencies.lock().unwrap().clone();
        if all.is_empty() {
            return (Vec::new(), Duration::ZERO);
        }
        all.sort_unstable();
        let at = |q: f64| {
            let i = ((all.len() as f64 * q).ceil() as usize).clamp(1, all.len()) - 1;
            Duration::from_micros(all[i] as u64)
        };
        (
            quantiles.iter().map(|q| at(*q)).collect(),
            Duration::from_micros(*all.last().unwrap() as u64),
        )
    }

    /// Answered requests that took longer than `limit`.
    pub fn slower_than(&self, limit: Duration) -> usize {
        let limit = limit.as_micros() as u32;
        self.latencies
            .lock()
            .unwrap()
            .iter()
            .filter(|l| **l > limit)
            .count()
    }

    pub fn failures(&self) -> Vec<String> {
        self.failures.lock().unwrap().clone()
    }

    fn fail(&self, what: String) {
        self.failed.fetch_add(1, Relaxed);
        let mut f = self.failures.lock().unwrap();
        if f.len() < 20 {
            f.push(what);
        }
    }

    fn answered_by(&self, task: &str) {
        self.first_seen
            .lock()
            .unwrap()
            .entry(task.to_string())
            .or_insert_with(SystemTime::now);
        self.last_seen
            .lock()
            .unwrap()
            .insert(task.to_string(), Instant::now());
    }
}

pub struct Load {
    pub stats: Arc<Stats>,
    pub lbs: Arc<RwLock<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Load {
    /// `workers` loops, each sending `per_worker` requests per second, alternating GET and
    /// POST; the replica list is refreshed every 500 ms.
    pub fn start(workers: usize, per_worker: u32) -> Load {
        Self::start_with(workers, per_worker, None, true)
    }

    /// As `start`, to the fixed replicas `edges` when given (a client configured with every
    /// edge node), else to those `scripts/lb-addrs` finds; GETs only unless `posts`.
    pub fn start_with(
        workers: usize,
        per_worker: u32,
        edges: Option<Vec<SocketAddr>>,
        posts: bool,
    ) -> Load {
        let stats = Arc::new(Stats::default());
        let fixed = edges.is_some();
        let lbs = Arc::new(RwLock::new(edges.unwrap_or_default()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        tasks.extend((!fixed).then(|| {
            tokio::spawn({
                let (lbs, stop) = (lbs.clone(), stop.clone());
                async move {
                    while !stop.load(Relaxed) {
                        let now = stack::lb_addrs().await;
                        if !now.is_empty() {
                            *lbs.write().unwrap() = now;
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            })
        }));
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(1)));
        connector.set_nodelay(true);
        let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(20))
            .build(connector);
        let period = Duration::from_secs(1) / per_worker;
        for w in 0..workers {
            let (client, stats, lbs, stop) =
                (client.clone(), stats.clone(), lbs.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut n = w;
                while !stop.load(Relaxed) {
                    tick.tick().await;
                    n += 1;
                    one_request(&client, &stats, &lbs, n, posts).await;
                }
            }));
        }
        Load {
            stats,
            lbs,
            stop,
            tasks,
        }
    }

    pub async fn stop(self) -> Counts {
        self.stop.store(true, Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        self.stats.counts()
    }
}

struct Done<'a> {
    stats: &'a Stats,
    post: bool,
}

impl Drop for Done<'_> {
    fn drop(&mut self) {
        self.stats.sent.fetch_add(1, Relaxed);
        if self.post {
            self.stats.posts.fetch_add(1, Relaxed);
        } else {
            self.stats.gets.fetch_add(1, Relaxed);
        }
    }
}

async fn one_request(
    client: &Client<HttpConnector, Full<Bytes>>,
    stats: &Stats,
    lbs: &RwLock<Vec<SocketAddr>>,
    n: usize,
    posts: bool,
) {
    let post = posts && n % 2 == 1;
    // Counted when done, so a phase's counts always add up (sent = ok + failed).
    let _done = Done { stats, post };
    let started = Instant::now();
    let mut attempt = 0usize;
    let mut last_error = String::from("no lb replica known");
    while started.elapsed() < GIVE_UP_AFTER {
        let addrs = lbs.read().unwrap().clone();
        if addrs.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let lb = addrs[(n + attempt) % addrs.len()];
        attempt += 1;
        let path = if post { "/orders" } else { "/" };
        let req = Request::builder()
            .method(if post { Method::POST } else { Method::GET })
            .uri(format!("http://{lb}{path}"))
            .body(if post {
                Full::new(Bytes::from_static(POST_BODY))
            } else {
                Full::default()
            })
            .expect("valid request");
        let sent = tokio::time::timeout(ATTEMPT_TIMEOUT, async {
            let resp = client.request(req).await.map_err(|e| format!("{e:?}"))?;
            let (parts, body) = resp.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| format!("body: {e}"))?
                .to_bytes();
            Ok::<_, String>((parts, body))
        })
        .await;
        match sent {
            Ok(Ok((parts, body))) => {
                if parts.status != StatusCode::OK {
                    let why = parts
                        .headers
                        .get("x-switchyard-error")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    stats.fail(format!(
                        "{} via {lb}: status {} {why} {}",
                        if post { "POST" } else { "GET" },
                        parts.status,
                        String::from_utf8_lossy(&body).trim()
                    ));
                    return;
                }
                let v: serde_json::Value = match serde_json::from_slice(&body) {
                    Ok(v) => v,
                    Err(e) => return stats.fail(format!("via {lb}: not JSON: {e}")),
                };
                let want = if post { POST_BODY.len() } else { 0 };
                if v.get("body_bytes").and_then(|b| b.as_u64()) != Some(want as u64) {
                    return stats.fail(format!("via {lb}: body lost or altered: {v}"));
                }
                if let Some(task) = v.get("task").and_then(|t| t.as_str()) {
                    stats.answered_by(task);
                }
                let took = started.elapsed().as_micros().min(u32::MAX as u128) as u32;
                stats.latencies.lock().unwrap().push(took);
                stats.ok.fetch_add(1, Relaxed);
                return;
            }
            Ok(Err(e)) => last_error = format!("via {lb}: {e}"),
            Err(_) => last_error = format!("via {lb}: no answer within {ATTEMPT_TIMEOUT:?}"),
        }
        stats.failovers.fetch_add(1, Relaxed);
        if attempt % addrs.len() == 0 {
            // Every known replica failed: give the address refresher a moment.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    stats.fail(format!(
        "{} lost after {attempt} attempts: {last_error}",
        if post { "POST" } else { "GET" }
    ));
}
