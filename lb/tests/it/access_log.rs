//! The access log: one line per sampled request, with what became of it, JSON or text.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use crate::balancing::wait_routed;
use crate::support::{eventually, Backend, Consul, Http, Lb};

/// The access log's JSON lines: standard output holds them and nothing else (the lb's own
/// log goes to standard error).
pub(crate) fn json_lines(lb: &Lb) -> Vec<serde_json::Value> {
    let out = lb.stdout();
    out.lines()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?} on stdout"));
            assert!(v.get("request_id").is_some(), "{l} on stdout");
            v
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_gets_a_json_line_saying_what_became_of_it() {
    let consul = Consul::start().await;
    let web = Backend::start("web").await;
    let routes = ["lb.route=/hello", "lb.route=/upload", "lb.route=/gone"];
    consul.register("web", "web", web.port(), &routes).await;
    let lb = Lb::start(&consul, &[("LB_ACCESS_LOG", "json")]).await;
    let http = Http::new();
    wait_routed(&lb, &http, "*/gone", 1).await;

    let ok = http.get(&lb.url("/hello?x=1")).await.unwrap();
    let id = ok.headers["x-request-id"].to_str().unwrap().to_string();
    let post = Request::post(lb.url("/upload"))
        .body(Full::new(Bytes::from_static(b"hello")))
        .unwrap();
    http.send(post).await.unwrap();
    web.kill();
    consul.deregister("web").await;
    eventually("the route to empty", Duration::from_secs(10), || async {
        http.get(&lb.url("/gone"))
            .await
            .is_ok_and(|r| r.status == 503)
    })
    .await;
    let unrouted = http
        .get_host(&lb.url("/x"), "nowhere.example")
        .await
        .unwrap();
    assert_eq!(unrouted.status, 404);

    eventually(
        "the lines to be written",
        Duration::from_secs(5),
        || async {
            json_lines(&lb)
                .iter()
                .any(|l| l["host"] == "nowhere.example")
        },
    )
    .await;
    let lines = json_lines(&lb);
    // The last line for a path (`/gone` was asked until the route emptied).
    let find = |path: &str| {
        lines
            .iter()
            .rev()
            .find(|l| l["path"] == path)
            .unwrap_or_else(|| panic!("no line for {path} in {lines:?}"))
    };
    let l = find("/hello?x=1");
    assert_eq!(l["request_id"], id.as_str());
    assert_eq!(l["method"], "GET");
    assert_eq!(l["protocol"], "HTTP/1.1");
    assert_eq!(l["status"], 200);
    assert_eq!(l["bytes_in"], 0);
    assert_eq!(l["bytes_out"], ok.body.len());
    assert_eq!(l["route"], "*/hello");
    assert_eq!(l["backend"], web.addr.to_string().as_str());
    assert_eq!(l["attempts"], 1);
    assert!(l["ttfb_ms"].as_f64().unwrap() <= l["duration_ms"].as_f64().unwrap());
    assert!(l["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(l["time"].as_str().unwrap().ends_with('Z'));
    assert_eq!(l["error"], serde_json::Value::Null);
    assert_eq!(find("/upload")["bytes_in"], 5);
    let gone = find("/gone");
    assert_eq!(gone["status"], 503);
    assert_eq!(gone["error"], "no_backend");
    assert_eq!(gone["route"], "*/gone");
    assert_eq!(gone["backend"], serde_json::Value::Null);
    assert_eq!(gone["ttfb_ms"], serde_json::Value::Null);
    let l = find("/x");
    assert_eq!(
        (l["status"].clone(), l["error"].clone()),
        (404.into(), "no_route".into())
    );
    let written = lb.metric(&http, "lb_access_log_lines_total", &[]).await;
    assert_eq!(written, Some(lines.len() as f64));
    assert_eq!(
        lb.metric(&http, "lb_access_log_dropped_total", &[]).await,
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sample_logs_its_share_in_text() {
    let consul = Consul::start().await;
    let web = Backend::start("web").await;
    consul
        .register("web", "web", web.port(), &["lb.route=/"])
        .await;
    let env = [("LB_ACCESS_LOG", "text"), ("LB_ACCESS_LOG_SAMPLE", "0.25")];
    let lb = Lb::start(&consul, &env).await;
    let http = Http::new();
    wait_routed(&lb, &http, "*/", 1).await;
    for _ in 0..400 {
        assert_eq!(http.get(&lb.url("/sampled")).await.unwrap().status, 200);
    }
    // The writer flushes whenever its queue is empty: the lines are out once the count is.
    let mut log = String::new();
    for _ in 0..100 {
        let n = lb.metric(&http, "lb_access_log_lines_total", &[]).await;
        log = lb.log();
        let written = log.lines().filter(|l| l.contains(" attempts=")).count();
        if n.is_some_and(|n| n > 0.0 && n as usize == written) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("\"GET /sampled HTTP/1.1\" 200 "))
        .collect();
    // 100 expected; the bounds are 8 standard deviations wide.
    assert!((30..=170).contains(&lines.len()), "{} lines", lines.len());
    assert!(
        lines[0].contains(" route=*/ backend=127.0.0.1:"),
        "{}",
        lines[0]
    );
    assert!(lines[0].ends_with("attempts=1 error=-"), "{}", lines[0]);
}
