//! Sticky routes (tag `sticky`): a session keeps its backend, through scaling as far as
//! consistent hashing allows, and only the sessions of a backend that leaves move.

use std::collections::HashMap;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use crate::balancing::wait_routed;
use crate::support::{Backend, Consul, Http, Lb};

const SESSIONS: usize = 200;

async fn backend_for(http: &Http, url: &str, header: (&str, &str)) -> String {
    let req = Request::get(url)
        .header(header.0, header.1)
        .body(Full::<Bytes>::default())
        .unwrap();
    let r = http.send(req).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    r.headers["x-backend"].to_str().unwrap().to_string()
}

/// Where each session goes now.
async fn placement(http: &Http, lb: &Lb, sessions: &[String]) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for s in sessions {
        let cookie = format!("sy-affinity={s}");
        let b = backend_for(http, &lb.url("/cart"), ("cookie", &cookie)).await;
        out.insert(s.clone(), b);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_keep_their_backend_and_only_a_share_moves_on_scaling() {
    let consul = Consul::start().await;
    let tags: &[&str] = &["lb.route=/", "lb.sticky=lb-cookie"];
    let mut backends = Vec::new();
    for i in 0..3 {
        let b = Backend::start(&format!("web-{i}")).await;
        consul
            .register(&format!("web-{i}"), "web", b.port(), tags)
            .await;
        backends.push(b);
    }
    let lb = Lb::start(&consul, &[]).await;
    let http = Http::new();
    wait_routed(&lb, &http, "*/", 3).await;

    // A new client gets the lb's cookie, for the route's path, and keeps its backend with it.
    let first = http.get(&lb.url("/cart")).await.unwrap();
    let set = first.headers["set-cookie"].to_str().unwrap().to_string();
    assert!(
        set.starts_with("sy-affinity=") && set.ends_with("; Path=/; HttpOnly; SameSite=Lax"),
        "{set}"
    );
    let cookie = set.split(';').next().unwrap().to_string();
    let home = first.headers["x-backend"].to_str().unwrap().to_string();
    for _ in 0..20 {
        let req = Request::get(lb.url("/cart"))
            .header("cookie", format!("theme=dark; {cookie}"))
            .body(Full::<Bytes>::default())
            .unwrap();
        let r = http.send(req).await.unwrap();
        assert_eq!(r.headers["x-backend"], home.as_str());
        assert!(!r.headers.contains_key("set-cookie"), "issued only once");
    }

    let sessions: Vec<String> = (0..SESSIONS)
        .map(|_| format!("{:016x}", fastrand::u64(..)))
        .collect();
    let before = placement(&http, &lb, &sessions).await;
    let used: std::collections::HashSet<_> = before.values().collect();
    assert_eq!(used.len(), 3, "sessions spread over every backend");

    // 3 -> 4: about a quarter move, every one of them to the new backend.
    let b = Backend::start("web-3").await;
    consul.register("web-3", "web", b.port(), tags).await;
    backends.push(b);
    wait_routed(&lb, &http, "*/", 4).await;
    let after = placement(&http, &lb, &sessions).await;
    let moved: Vec<_> = sessions
        .iter()
        .filter(|s| before[*s] != after[*s])
        .collect();
    assert!(moved.iter().all(|s| after[*s] == "web-3"), "{moved:?}");
    let share = moved.len() as f64 / SESSIONS as f64;
    assert!((0.1..=0.4).contains(&share), "3 -> 4 moved {share}");

    // 4 -> 3 (web-0 leaves): only web-0's sessions move.
    consul.deregister("web-0").await;
    wait_routed(&lb, &http, "*/", 3).await;
    let last = placement(&http, &lb, &sessions).await;
    for s in &sessions {
        if after[s] != "web-0" {
            assert_eq!(last[s], after[s], "a session of a staying backend moved");
        } else {
            assert_ne!(last[s], "web-0");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_keys_the_session_and_requests_without_it_are_balanced() {
    let consul = Consul::start().await;
    let mut backends = Vec::new();
    for i in 0..3 {
        let b = Backend::start(&format!("api-{i}")).await;
        consul
            .register(
                &format!("api-{i}"),
                "api",
                b.port(),
                &["lb.route=/api", "lb.sticky=header:X-User"],
            )
            .await;
        backends.push(b);
    }
    let lb = Lb::start(&consul, &[("LB_BALANCE", "round_robin")]).await;
    let http = Http::new();
    wait_routed(&lb, &http, "*/api", 3).await;
    for user in ["alice", "bob", "carol", "dave"] {
        let home = backend_for(&http, &lb.url("/api/x"), ("x-user", user)).await;
        for _ in 0..10 {
            assert_eq!(
                backend_for(&http, &lb.url("/api/x"), ("x-user", user)).await,
                home
            );
        }
    }
    // No header: round robin, and no cookie is issued.
    let mut seen = std::collections::HashSet::new();
    for _ in 0..6 {
        let r = http.get(&lb.url("/api/x")).await.unwrap();
        assert!(!r.headers.contains_key("set-cookie"));
        seen.insert(r.headers["x-backend"].to_str().unwrap().to_string());
    }
    assert_eq!(seen.len(), 3);
}
