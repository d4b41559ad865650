//! The lb against a Consul that trusts nobody by default: ACLs in default-deny and the HTTP API
//! on TLS that verifies clients, with certificates and tokens made by the test.

use std::time::Duration;

use testkit::pki::Ca;

use crate::balancing::wait_routed;
use crate::support::{eventually, Backend, Consul, Http, Lb};

/// The lb's minimal policy, as the README documents it.
pub const LB_RULES: &str = r#"
service_prefix "" { policy = "read" }
node_prefix "" { policy = "read" }
key_prefix "switchyard/weights/" { policy = "read" }
"#;

/// Waits for `lb` to count a failed catalog read of `kind`.
async fn counted(lb: &Lb, http: &Http, kind: &str, what: &str) {
    let labels = [("watch", "catalog"), ("kind", kind)];
    eventually(what, Duration::from_secs(20), || async {
        lb.metric(http, "lb_consul_watch_errors_total", &labels)
            .await
            > Some(0.0)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_acls_and_tls_a_minimal_token_routes_and_a_deleted_token_keeps_the_table() {
    let ca = Ca::new("consul-acl");
    let (consul, https) = Consul::start_secured(&ca).await;
    let (accessor, secret) = consul.acl_token("lb", LB_RULES).await;
    // As a swarm secret reads: the token and a newline.
    let token_file = ca.dir.join("lb-token");
    std::fs::write(&token_file, format!("{secret}\n")).unwrap();
    let cert = ca.leaf("lb-client", &["lb"]);
    let (ca_pem, token_file) = (ca.ca_pem(), token_file.display().to_string());
    let (crt, key) = (
        cert.crt.display().to_string(),
        cert.key.display().to_string(),
    );
    let secure = [
        ("LB_CONSUL_ADDR", https.as_str()),
        ("LB_CONSUL_CACERT", ca_pem.to_str().unwrap()),
        ("LB_CONSUL_CLIENT_CERT", crt.as_str()),
        ("LB_CONSUL_CLIENT_KEY", key.as_str()),
        ("LB_CONSUL_TOKEN_FILE", token_file.as_str()),
        // Short waits, so that the token is presented again soon after it is deleted.
        ("LB_CONSUL_WAIT", "2s"),
    ];

    let web = Backend::start("web-0").await;
    consul
        .register("web-0", "web", web.port(), &["lb.route=/"])
        .await;
    let http = Http::new();
    let lb = Lb::start(&consul, &secure).await;
    wait_routed(&lb, &http, "*/", 1).await;
    let reply = http.get(&lb.url("/")).await.unwrap();
    assert_eq!((reply.status.as_u16(), reply.body.as_str()), (200, "web-0"));

    // Without a client certificate the agent refuses the handshake: the lb says so and
    // never becomes ready on an empty table.
    let bare = Lb::spawn(&consul, &secure[..2]);
    counted(
        &bare,
        &http,
        "transport",
        "an lb without a client certificate to count refused connections",
    )
    .await;
    let ready = http.get(&bare.admin_url("/readyz")).await.unwrap();
    assert_eq!(ready.status.as_u16(), 503, "{}", ready.body);
    drop(bare);

    // With no token at all, default-deny filters every list to nothing (200, not 403): the
    // lb takes no table from it, says why, and is not ready.
    let anonymous = Lb::spawn(&consul, &secure[..4]);
    counted(
        &anonymous,
        &http,
        "nothing_visible",
        "an lb without a token to say it sees nothing",
    )
    .await;
    let ready = http.get(&anonymous.admin_url("/readyz")).await.unwrap();
    assert_eq!(ready.status.as_u16(), 503, "{}", ready.body);
    assert!(
        anonymous.log().contains("the lb's token may read nothing"),
        "{}",
        anonymous.log()
    );
    drop(anonymous);

    // The token is deleted: Consul refuses it (403 "ACL not found"). The lb keeps routing
    // what it knew, counts why, and says so in its log.
    consul.acl_token_delete(&accessor).await;
    counted(
        &lb,
        &http,
        "acl_denied",
        "the lb to count its refused token",
    )
    .await;
    for _ in 0..20 {
        let reply = http.get(&lb.url("/")).await.unwrap();
        assert_eq!((reply.status.as_u16(), reply.body.as_str()), (200, "web-0"));
    }
    assert!(
        lb.log().contains("Consul refuses the lb's token"),
        "{}",
        lb.log()
    );
}

/// The stack's way to its node's agent: the HTTP API on a Unix socket, which only the
/// services that mount its volume can open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_agents_unix_socket_it_routes() {
    let socket = std::env::temp_dir().join(format!(
        "switchyard-consul-{}-{}.sock",
        std::process::id(),
        testkit::free_port()
    ));
    let hcl = format!(
        r#"addresses {{ http = "127.0.0.1 unix://{}" }}"#,
        socket.display()
    );
    let consul = Consul::start_with(&hcl, None).await;
    let web = Backend::start("web-0").await;
    consul
        .register("web-0", "web", web.port(), &["lb.route=/"])
        .await;
    let addr = format!("unix://{}", socket.display());
    let http = Http::new();
    let lb = Lb::start(&consul, &[("LB_CONSUL_ADDR", addr.as_str())]).await;
    wait_routed(&lb, &http, "*/", 1).await;
    let reply = http.get(&lb.url("/")).await.unwrap();
    assert_eq!((reply.status.as_u16(), reply.body.as_str()), (200, "web-0"));
    assert!(lb.log().contains(&addr), "{}", lb.log());
    drop(consul);
    let _ = std::fs::remove_file(&socket);
}
