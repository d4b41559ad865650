//! Traffic spreads over every passing instance as the chosen algorithm says.

use std::time::Duration;

use crate::support::{eventually, spread_ok, Backend, Consul, Http, Lb};

pub async fn routed(lb: &Lb, http: &Http, route: &str) -> usize {
    let v = lb.routes(http).await;
    v["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["route"] == route)
        .map_or(0, |r| r["backends"].as_array().unwrap().len())
}

pub async fn wait_routed(lb: &Lb, http: &Http, route: &str, n: usize) {
    eventually(
        &format!("{n} backends on {route}"),
        Duration::from_secs(10),
        || async { routed(lb, http, route).await == n },
    )
    .await;
}

async fn three_backends(consul: &Consul, tags: &[&[&str]]) -> Vec<Backend> {
    let mut out = Vec::new();
    for (i, t) in tags.iter().enumerate() {
        let b = Backend::start(&format!("web-{i}")).await;
        consul
            .register(&format!("web-{i}"), "web", b.port(), t)
            .await;
        out.push(b);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_is_exactly_even() {
    let consul = Consul::start().await;
    let _b = three_backends(
        &consul,
        &[&["lb.route=/"], &["lb.route=/"], &["lb.route=/"]],
    )
    .await;
    let lb = Lb::start(&consul, &[("LB_BALANCE", "round_robin")]).await;
    let http = Http::new();
    wait_routed(&lb, &http, "*/", 3).await;
    let seen = spread_ok(&http, &lb.url("/"), 300).await;
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(seen.values().all(|&n| n == 100), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_uses_every_instance() {
    let consul = Consul::start().await;
    let _b = three_backends(
        &consul,
        &[&["lb.route=/"], &["lb.route=/"], &["lb.route=/"]],
    )
    .await;
    let lb = Lb::start(&consul, &[]).await;
    let http = Http::new();
    wait_routed(&lb, &http, "*/", 3).await;
    let seen = spread_ok(&http, &lb.url("/"), 600).await;
    assert_eq!(seen.len(), 3, "{seen:?}");
    // Sequential requests leave nothing in flight, so p2c is a fair random choice here.
    assert!(seen.values().all(|&n| (120..=280).contains(&n)), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_honours_lb_weight() {
    let consul = Consul::start().await;
    let _b = three_backends(
        &consul,
        &[
            &["lb.route=/", "lb.weight=300"],
            &["lb.route=/", "lb.weight=100"],
            &["lb.route=/", "lb.weight=0"],
        ],
    )
    .await;
    let lb = Lb::start(&consul, &[("LB_BALANCE", "weighted")]).await;
    let http = Http::new();
    wait_routed(&lb, &http, "*/", 2).await;
    let seen = spread_ok(&http, &lb.url("/"), 800).await;
    assert_eq!(seen.get("web-2"), None, "weight 0 drains: {seen:?}");
    let (heavy, light) = (seen["web-0"], seen["web-1"]);
    assert!(
        (590..=610).contains(&heavy) && (190..=210).contains(&light),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_host_and_longest_prefix_win() {
    let consul = Consul::start().await;
    let api = Backend::start("api").await;
    let api_v2 = Backend::start("api-v2").await;
    let site = Backend::start("site").await;
    consul
        .register("api", "api", api.port(), &["lb.route=api.example.com"])
        .await;
    consul
        .register(
            "api-v2",
            "api-v2",
            api_v2.port(),
            &["lb.route=api.example.com/v2"],
        )
        .await;
    consul
        .register(
            "site",
            "site",
            site.port(),
            &["lb.route=/", "lb.route=/static"],
        )
        .await;
    let lb = Lb::start(&consul, &[]).await;
    let http = Http::new();
    for route in ["api.example.com/", "api.example.com/v2", "*/", "*/static"] {
        wait_routed(&lb, &http, route, 1).await;
    }
    let cases = [
        ("api.example.com", "/v2/users", "api-v2"),
        ("API.example.com:8080", "/v2", "api-v2"),
        ("api.example.com", "/v2beta", "api"),
        ("api.example.com", "/static/x", "api"),
        ("www.example.com", "/static/x", "site"),
        ("www.example.com", "/", "site"),
    ];
    for (host, path, want) in cases {
        let r = http.get_host(&lb.url(path), host).await.unwrap();
        assert_eq!(r.headers["x-backend"], want, "{host}{path}");
    }
}

/// Clients that give up while their requests wait on a slow backend must leave no request
/// counted in flight: a leaked count would skew p2c away from that backend for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_requests_leave_nothing_in_flight() {
    use tokio::io::AsyncWriteExt;
    let consul = Consul::start().await;
    let _b = three_backends(&consul, &[&["lb.route=/"], &["lb.route=/"]]).await;
    let lb = Lb::start(&consul, &[("LB_BALANCE", "p2c")]).await;
    let http = Http::new();
    wait_routed(&lb, &http, "*/", 2).await;

    // 50 requests to a slow path, each abandoned (its connection closed) after 0.5 s, while
    // the lb still waits for the response head.
    let mut clients = Vec::new();
    for _ in 0..50 {
        let mut s = tokio::net::TcpStream::connect(lb.proxy).await.unwrap();
        s.write_all(b"GET /slow?ms=3000 HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        clients.push(s);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(clients);

    let in_flight = |v: serde_json::Value| -> u64 {
        v["routes"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r["backends"].as_array().unwrap().iter())
            .map(|b| b["in_flight"].as_u64().unwrap())
            .sum()
    };
    // Well before the backends would have answered (3 s).
    eventually(
        "no request in flight after the clients left",
        Duration::from_secs(2),
        || async {
            in_flight(lb.routes(&http).await) == 0
                && lb.metric(&http, "lb_requests_in_flight", &[]).await == Some(0.0)
        },
    )
    .await;
    let seen = spread_ok(&http, &lb.url("/"), 200).await;
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen.values().all(|&n| n >= 60), "{seen:?}");
}
