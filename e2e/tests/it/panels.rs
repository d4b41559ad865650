//! Every Grafana panel's query, run through the real Prometheus of the stack: a dashboard
//! whose panel shows "No data" against the real stack fails the test.

use std::path::Path;

use testkit::Http;

/// One query of one panel, with the dashboard's variables replaced the way Grafana would
/// for "All" and a 1-minute rate window.
pub struct PanelQuery {
    pub dashboard: String,
    pub panel: String,
    pub expr: String,
}

pub fn queries(dir: &Path) -> Vec<PanelQuery> {
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no dashboard in {}", dir.display());
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read dashboard");
        let dash: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not JSON: {e}", file.display()));
        let title = dash["title"].as_str().unwrap_or("?").to_string();
        collect(&dash["panels"], &title, &mut out);
    }
    out
}

fn collect(panels: &serde_json::Value, dashboard: &str, out: &mut Vec<PanelQuery>) {
    for p in panels.as_array().into_iter().flatten() {
        collect(&p["panels"], dashboard, out);
        let targets = p["targets"].as_array();
        if p["type"] != "row" {
            assert!(
                targets.is_some_and(|t| !t.is_empty()),
                "panel {:?} of {dashboard} has no query",
                p["title"]
            );
        }
        for t in targets.into_iter().flatten() {
            let expr = t["expr"].as_str().expect("every target has an expr");
            out.push(PanelQuery {
                dashboard: dashboard.to_string(),
                panel: format!(
                    "{} [{}]",
                    p["title"].as_str().unwrap_or("?"),
                    t["refId"].as_str().unwrap_or("?")
                ),
                expr: substitute(expr),
            });
        }
    }
}

fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "15s")
        .replace("$__range", "5m")
        .replace("$route", ".*")
}

fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Runs one query; `Ok(samples)` or the reason it cannot be run.
pub async fn run(http: &Http, prometheus: &str, expr: &str) -> Result<usize, String> {
    let reply = http
        .get(&format!("{prometheus}/api/v1/query?query={}", encode(expr)))
        .await?;
    let v: serde_json::Value =
        serde_json::from_str(&reply.body).map_err(|e| format!("not JSON: {e}"))?;
    if v["status"] != "success" {
        return Err(format!("{}: {}", v["errorType"], v["error"]));
    }
    Ok(v["data"]["result"].as_array().map_or(0, Vec::len))
}
