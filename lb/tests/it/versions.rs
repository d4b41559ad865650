//! Version weights in Consul KV (tag `version`): traffic split between a service's versions
//! at run time, without re-registering anything, and a header or cookie pinning one.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use crate::balancing::wait_routed;
use crate::support::{eventually, spread, Backend, Consul, Http, Lb};

const KEY: &str = "switchyard/weights/web";

fn share(seen: &HashMap<String, usize>, prefix: &str) -> f64 {
    let total: usize = seen.values().sum();
    let mine: usize = seen
        .iter()
        .filter(|(b, _)| b.starts_with(prefix))
        .map(|(_, n)| n)
        .sum();
    mine as f64 / total.max(1) as f64
}

async fn pinned(http: &Http, lb: &Lb, header: (&str, &str)) -> (u16, String) {
    let req = Request::get(lb.url("/"))
        .header(header.0, header.1)
        .body(Full::<Bytes>::default())
        .unwrap();
    let r = http.send(req).await.unwrap();
    let backend = r
        .headers
        .get("x-backend")
        .map_or(String::new(), |v| v.to_str().unwrap().to_string());
    (r.status.as_u16(), backend)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_weights_split_a_service_between_versions_and_a_pin_reaches_a_dark_one() {
    let consul = Consul::start().await;
    let mut backends = Vec::new();
    for (name, version) in [("v1-a", "v1"), ("v1-b", "v1"), ("v2-a", "v2")] {
        let b = Backend::start(name).await;
        let tag = format!("lb.version={version}");
        consul
            .register(name, "web", b.port(), &["lb.route=/", &tag])
            .await;
        backends.push(b);
    }
    // The new version is deployed dark: weight 0 before it is registered.
    let kv = &consul.client;
    kv.kv_put(KEY, br#"{"v1": 100, "v2": 0}"#).await.unwrap();
    let lb = Lb::start(&consul, &[("LB_BALANCE", "weighted")]).await;
    let http = Http::new();
    wait_routed(&lb, &http, "*/", 3).await;
    let url = lb.url("/");
    eventually("v2 to be dark", Duration::from_secs(10), || async {
        share(&spread(&http, &url, 60).await, "v2") == 0.0
    })
    .await;

    // Pinned by header or cookie, a request reaches the dark version, and only it.
    for _ in 0..10 {
        let by_header = pinned(&http, &lb, ("x-switchyard-version", "v2")).await;
        assert_eq!(by_header, (200, "v2-a".to_string()));
        let by_cookie = pinned(&http, &lb, ("cookie", "a=1; sy-version=v1")).await;
        assert!(by_cookie.1.starts_with("v1"), "{by_cookie:?}");
    }
    // A version with no instance: nothing to send it to.
    assert_eq!(
        pinned(&http, &lb, ("x-switchyard-version", "v3")).await.0,
        503
    );
    // An lb that takes pins from nobody (LB_VERSION_PIN=off) keeps the dark version dark.
    let strict = Lb::start(&consul, &[("LB_VERSION_PIN", "off")]).await;
    wait_routed(&strict, &http, "*/", 3).await;
    for _ in 0..10 {
        let (status, backend) = pinned(&http, &strict, ("x-switchyard-version", "v2")).await;
        assert_eq!(status, 200);
        assert!(backend.starts_with("v1"), "{backend}");
    }
    drop(strict);

    // Shifted at run time: 50/50 between versions, whatever their instance counts.
    kv.kv_put(KEY, br#"{"v1": 50, "v2": 50}"#).await.unwrap();
    eventually("an even split", Duration::from_secs(10), || async {
        let s = share(&spread(&http, &url, 400).await, "v2");
        (0.45..=0.55).contains(&s)
    })
    .await;
    kv.kv_put(KEY, br#"{"v1": 0, "v2": 100}"#).await.unwrap();
    eventually("all on v2", Duration::from_secs(10), || async {
        share(&spread(&http, &url, 60).await, "v2") == 1.0
    })
    .await;

    // A malformed value is refused and counted; the service keeps the weights it had.
    kv.kv_put(KEY, b"v2 everything").await.unwrap();
    eventually("the bad value counted", Duration::from_secs(10), || async {
        lb.metric(&http, "lb_version_weights_errors_total", &[])
            .await
            .is_some_and(|n| n >= 1.0)
    })
    .await;
    assert_eq!(share(&spread(&http, &url, 60).await, "v2"), 1.0);
}
