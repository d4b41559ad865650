//! Routing-table scale: what the lb does when Consul reports a change, at 1,000 services with
//! 10,000 instances in all (10 per service, each service its own host route).
//!
//! - `full rebuild`: every instance's tags parsed into a spec, and a table built from it with
//!   nothing cached (what the first table after start costs).
//! - `one instance changed`: one instance flips between passing and critical, and the lb does
//!   what it does on every change: that service's instances parsed again, the routes it uses
//!   recomputed, and a table that rebuilds only the changed route and reuses the others.
//! - `lookup`: the request path's route lookup in that table, against a 10-instance table.
//!
//! `cargo bench -p lb --bench table` (targets, from the performance issue: < 50 ms and < 1 ms).

use std::collections::HashMap;
use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use lb::discovery::{table_spec, DesiredTable};
use lb::metrics::Metrics;
use lb::routing::{BuildCache, RoutingTable};
use switchyard_consul::ServiceEntry;

const SERVICES: usize = 1_000;
const PER_SERVICE: usize = 10;

/// Instances as Consul's `/v1/health/service/<name>` returns them.
fn catalog(services: usize, per_service: usize) -> HashMap<String, Vec<ServiceEntry>> {
    (0..services)
        .map(|s| {
            let name = format!("svc{s}");
            let entries = (0..per_service)
                .map(|i| {
                    let json = format!(
                        r#"{{"Node":{{"Node":"node{i}","Address":"10.0.{i}.1"}},
                        "Service":{{"ID":"{name}-{i}","Service":"{name}","Tags":["lb.route={name}.example.com/","lb.weight=100","version=1"],
                        "Address":"10.1.{}.{}","Port":{},"Meta":{{"switchyard-node":"node{i}"}}}},
                        "Checks":[{{"CheckID":"serfHealth","Status":"passing"}},
                                  {{"CheckID":"{name}-{i}:check","Status":"passing","ServiceName":"{name}"}}]}}"#,
                        s % 250,
                        i,
                        8000 + s / 250
                    );
                    serde_json::from_str(&json).expect("valid entry")
                })
                .collect();
            (name, entries)
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut services = catalog(SERVICES, PER_SERVICE);
    let mut g = c.benchmark_group("table 1,000 services x 10 instances");
    g.sample_size(20).measurement_time(Duration::from_secs(5));

    g.bench_function("full rebuild", |b| {
        b.iter_batched(
            || (Metrics::new(), BuildCache::default()),
            |(metrics, mut cache)| {
                let spec = table_spec(&services, "lb", |_, _, _| {});
                RoutingTable::build::<()>(&spec, None, 1, &mut cache, &metrics, 64)
            },
            BatchSize::LargeInput,
        )
    });

    let metrics = Metrics::new();
    let mut cache = BuildCache::default();
    let mut parts = DesiredTable::default();
    for (name, entries) in &services {
        parts.set(name, entries, "lb", |_, _, _| {});
    }
    let first = parts.take_changed();
    let mut table = RoutingTable::build(parts.spec(), Some(&first), 1, &mut cache, &metrics, 64);
    let mut generation = 1;
    g.bench_function("one instance changed", |b| {
        b.iter(|| {
            let entries = services.get_mut("svc500").expect("svc500");
            let check = &mut entries[3].checks[1].status;
            *check = if check == "passing" {
                "critical".into()
            } else {
                "passing".into()
            };
            // What the lb does when one service's watch reports: re-parse that service only,
            // assemble the spec, compare, and rebuild the routes that changed.
            parts.set("svc500", entries, "lb", |_, _, _| {});
            let changed = parts.take_changed();
            if !changed.is_empty() {
                generation += 1;
                table = RoutingTable::build(
                    parts.spec(),
                    Some(&changed),
                    generation,
                    &mut cache,
                    &metrics,
                    64,
                );
            }
        })
    });
    g.bench_function("lookup", |b| {
        b.iter(|| black_box(table.lookup(black_box("svc777.example.com"), black_box("/a/b"))))
    });
    g.finish();

    let small = catalog(1, PER_SERVICE);
    let small_table = RoutingTable::build::<()>(
        &table_spec(&small, "lb", |_, _, _| {}),
        None,
        1,
        &mut BuildCache::default(),
        &Metrics::new(),
        64,
    );
    c.bench_function("lookup in a 10-instance table", |b| {
        b.iter(|| black_box(small_table.lookup(black_box("svc0.example.com"), black_box("/a/b"))))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
