//! Rewriting tags: each instance gets the request in the form its tags ask for (path, Host,
//! header fields), its responses' edits apply, and `Location`/`Set-Cookie` paths are mapped
//! back only when asked.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use crate::balancing::wait_routed;
use crate::support::{eventually, Backend, Consul, Http, Lb};

fn get(url: &str, host: &str) -> Request<Full<Bytes>> {
    Request::get(url)
        .header("host", host)
        .header("x-debug", "1")
        .body(Full::default())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_get_requests_as_their_tags_ask_and_their_responses_are_edited() {
    let consul = Consul::start().await;
    let users = Backend::start("users").await;
    let plain = Backend::start("plain").await;
    consul
        .register(
            "users",
            "users",
            users.port(),
            &[
                "lb.route=/api",
                "lb.strip=true",
                "lb.prepend=/v2",
                "lb.host=users.internal",
                "lb.request.set.x-env=prod, eu",
                "lb.request.remove=x-debug",
                "lb.response.set.x-served-by=users",
                "lb.response.remove=x-backend",
                "lb.rewrite.location=true",
                "lb.rewrite.cookie-path=true",
            ],
        )
        .await;
    // Bad rewrite tags are refused one by one; the instance's other tags still apply.
    consul
        .register(
            "plain",
            "plain",
            plain.port(),
            &[
                "lb.route=/plain",
                "lb.strip=maybe",
                "lb.request.set.content-length=0",
            ],
        )
        .await;
    let lb = Lb::start(&consul, &[]).await;
    let http = Http::new();
    wait_routed(&lb, &http, "*/api", 1).await;
    wait_routed(&lb, &http, "*/plain", 1).await;

    let r = http
        .send(get(&lb.url("/api/headers?q=1"), "public.example"))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.headers["x-seen"], "/v2/headers?q=1");
    let lines: Vec<&str> = r.body.lines().collect();
    for want in [
        "host: users.internal",
        "x-env: prod, eu",
        "x-forwarded-host: public.example",
    ] {
        assert!(lines.contains(&want), "{want:?} not in {lines:?}");
    }
    assert!(!r.body.contains("x-debug"), "{}", r.body);
    assert_eq!(r.headers["x-served-by"], "users");
    assert!(!r.headers.contains_key("x-backend"));

    // The root of the route, and a redirect with a cookie, both in the instance's path space.
    let r = http
        .send(get(&lb.url("/api"), "public.example"))
        .await
        .unwrap();
    assert_eq!(r.headers["x-seen"], "/v2/");
    let url = lb.url("/api/redirect?to=/v2/login&cookie=/v2");
    let r = http.send(get(&url, "public.example")).await.unwrap();
    assert_eq!(r.status, 302);
    assert_eq!(r.headers["location"], "/api/login");
    assert_eq!(r.headers["set-cookie"], "sid=1; Path=/api; HttpOnly");
    let url = lb.url("/api/redirect?to=http://users.internal/v2/a&cookie=/elsewhere");
    let r = http.send(get(&url, "public.example")).await.unwrap();
    assert_eq!(r.headers["location"], "http://public.example/api/a");
    assert_eq!(r.headers["set-cookie"], "sid=1; Path=/elsewhere; HttpOnly");

    // Without rewriting tags, nothing changes, redirects included.
    let url = lb.url("/plain/redirect?to=/plain/login&cookie=/");
    let r = http.send(get(&url, "public.example")).await.unwrap();
    assert_eq!(
        r.headers["x-seen"],
        "/plain/redirect?to=/plain/login&cookie=/"
    );
    assert_eq!(r.headers["location"], "/plain/login");
    assert_eq!(r.headers["x-backend"], "plain");
    for reason in ["bad_rewrite", "bad_header"] {
        let n = lb
            .metric(&http, "lb_route_tag_errors_total", &[("reason", reason)])
            .await;
        assert_eq!(n, Some(1.0), "{reason}");
    }
}

/// A rewrite is the instance's: during a rolling update that changes it, old and new
/// instances each get the form they asked for, and a retry starts from the client's request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_mixing_rewritten_and_plain_instances_serves_each_its_own_form() {
    let consul = Consul::start().await;
    let old = Backend::start("old").await;
    let new = Backend::start("new").await;
    consul
        .register("old", "web", old.port(), &["lb.route=/shop"])
        .await;
    consul
        .register(
            "new",
            "web",
            new.port(),
            &["lb.route=/shop", "lb.strip=true"],
        )
        .await;
    let lb = Lb::start(&consul, &[("LB_BALANCE", "round_robin")]).await;
    let http = Http::new();
    wait_routed(&lb, &http, "*/shop", 2).await;
    for _ in 0..20 {
        let r = http.get(&lb.url("/shop/cart")).await.unwrap();
        let want = match r.headers["x-backend"].to_str().unwrap() {
            "old" => "/shop/cart",
            _ => "/cart",
        };
        assert_eq!(r.headers["x-seen"], want);
    }
    // The old instance dies without a word: its requests are retried on the new one, which
    // gets them stripped.
    old.kill();
    for _ in 0..10 {
        let r = http.get(&lb.url("/shop/cart")).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        if r.headers["x-backend"] == "new" {
            assert_eq!(r.headers["x-seen"], "/cart");
        }
    }
}

/// An HTTP/2 backend gets the rewritten path and `:authority`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_instance_gets_the_rewritten_target() {
    let consul = Consul::start().await;
    let port = h2c_target_echo().await;
    consul
        .register_with(
            "grpc",
            "grpc",
            port,
            &[
                "lb.route=/rpc",
                "lb.proto=h2c",
                "lb.strip=true",
                "lb.host=grpc.internal:50051",
            ],
            None,
        )
        .await;
    let lb = Lb::start(&consul, &[]).await;
    let http = Http::new();
    eventually("the h2c route", Duration::from_secs(10), || async {
        http.get(&lb.url("/rpc/x"))
            .await
            .is_ok_and(|r| r.status == 200)
    })
    .await;
    let r = http
        .send(get(&lb.url("/rpc/pkg.Svc/Call"), "public.example"))
        .await
        .unwrap();
    assert_eq!(
        r.body,
        "http://grpc.internal:50051/pkg.Svc/Call x-forwarded-host=public.example"
    );
}

/// An HTTP/2 (prior knowledge) backend that answers with the target it got and the
/// `X-Forwarded-Host` it was told.
async fn h2c_target_echo() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        let xfh = req
                            .headers()
                            .get("x-forwarded-host")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("-")
                            .to_string();
                        let body = format!("{} x-forwarded-host={xfh}", req.uri());
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from(body),
                        )))
                    },
                );
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
            });
        }
    });
    port
}
