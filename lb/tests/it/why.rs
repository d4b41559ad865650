//! `/why?host=H&path=P`: what happens to such a request, and why, for each broken link the lb
//! can see: a route shadowed by a longer prefix, an instance whose check fails, a backend
//! ejected after failures, an lb cut from Consul.

use std::time::Duration;

use crate::balancing::wait_routed;
use crate::support::{eventually, Backend, Consul, Http, Lb};

async fn why(lb: &Lb, http: &Http, host: &str, path: &str) -> serde_json::Value {
    let url = lb.admin_url(&format!("/why?host={host}&path={path}"));
    let reply = http.get(&url).await.expect("admin answers");
    assert_eq!(reply.status, 200, "{}", reply.body);
    serde_json::from_str(&reply.body).expect("JSON")
}

fn verdict<'v>(view: &'v serde_json::Value, route: &str) -> &'v str {
    view["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["route"] == route)
        .unwrap_or_else(|| panic!("{route} not in {view:#}"))["verdict"]
        .as_str()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn why_names_the_broken_link_the_lb_can_see() {
    let mut consul = Consul::start().await;
    let root = Backend::start("root").await;
    let api = Backend::start("api").await;
    consul
        .register("root", "site", root.port(), &["lb.route=/"])
        .await;
    consul
        .register("api", "api", api.port(), &["lb.route=/api"])
        .await;
    let settings = [("LB_EJECT_FAILURES", "1"), ("LB_ROUTE_LINGER", "0s")];
    let lb = Lb::start(&consul, &settings).await;
    let http = Http::new();
    wait_routed(&lb, &http, "*/api", 1).await;

    // A request for /api/users is the /api route's: the / route is shadowed.
    let v = why(&lb, &http, "Shop.Example:8080", "/api/./users").await;
    assert_eq!(v["host"], "shop.example");
    assert_eq!(v["path"], "/api/users");
    assert_eq!(v["route"], "*/api", "{v:#}");
    assert_eq!(verdict(&v, "*/"), "shadowed: */api matches a longer prefix");
    assert_eq!(v["pickable"], 1);
    assert_eq!(v["backends"][0]["instance"], "api");
    assert_eq!(v["backends"][0]["state"], "ready");

    // Its only instance's check fails: the route answers 503, and why.
    api.set_healthy(false);
    eventually("the api instance out", Duration::from_secs(10), || async {
        why(&lb, &http, "x", "/api/users").await["pickable"] == 0
    })
    .await;
    let v = why(&lb, &http, "x", "/api/users").await;
    assert_eq!(v["answer"], "503 no backend can be picked");
    let i = &v["unrouted"][0];
    assert_eq!(
        (&i["service"], &i["instance"]),
        (&"api".into(), &"api".into())
    );
    assert_eq!(i["why"], "not passing");
    assert_eq!(i["failing_checks"][0]["check"], "api-http");
    assert_eq!(i["failing_checks"][0]["status"], "critical");
    api.set_healthy(true);

    // A backend that stopped accepting: ejected, with its last failure.
    let dead_port = testkit::free_port();
    consul
        .register_with("dead", "gone", dead_port, &["lb.route=/gone"], None)
        .await;
    wait_routed(&lb, &http, "*/gone", 1).await;
    let reply = http.get(&lb.url("/gone")).await.unwrap();
    assert_eq!(reply.status, 502);
    let v = why(&lb, &http, "x", "/gone").await;
    let b = &v["backends"][0];
    assert_eq!(b["state"], "ejected", "{v:#}");
    assert_eq!(b["last_failure"], "connect");
    assert_eq!(
        v["answer"],
        "routed to an ejected backend: all 1 are ejected, and the lb tries them rather than refuse"
    );

    // No route at all, and a route of another host that would take the path.
    consul
        .register("shop", "shop", root.port(), &["lb.route=shop.example/cart"])
        .await;
    wait_routed(&lb, &http, "shop.example/cart", 1).await;
    consul.deregister("root").await;
    eventually("the / route gone", Duration::from_secs(10), || async {
        why(&lb, &http, "shop.exmple", "/cart").await["answer"] == "404 no route"
    })
    .await;
    let v = why(&lb, &http, "shop.exmple", "/cart").await;
    assert_eq!(verdict(&v, "shop.example/cart"), "another host's route");

    // Cut from Consul: the lb says so, and how long it has been.
    assert_eq!(v["consul_up"], true);
    consul.stop();
    eventually("the lb to notice", Duration::from_secs(30), || async {
        let v = why(&lb, &http, "x", "/api").await;
        v["consul_up"] == false && v["table_age_seconds"].as_f64().is_some_and(|a| a > 0.0)
    })
    .await;

    // Bad input is a clear 400.
    // The path as a client sends it, percent-encoded once more for the query: `/a%2Fb`,
    // which the lb refuses (an encoded slash).
    let reply = http.get(&lb.admin_url("/why?path=/a%252Fb")).await.unwrap();
    assert_eq!(reply.status, 400, "{}", reply.body);
    let reply = http.get(&lb.admin_url("/why?path=%zz")).await.unwrap();
    assert_eq!(reply.status, 400, "{}", reply.body);
    let reply = http.get(&lb.admin_url("/why?route=/")).await.unwrap();
    assert_eq!(reply.status, 400, "{}", reply.body);
}
