//! `/metrics` as Prometheus reads it: parsed by a text-format parser, every family with its
//! HELP and TYPE, the histograms with their buckets.

use std::collections::HashMap;

use serde_json::json;

use crate::support::{plugin_set, Backend, Server};

#[tokio::test]
async fn metrics_parse_as_prometheus_text_with_histograms_and_process_figures() {
    let server = Server::on(&Backend::Sqlite, &plugin_set(&["account-balance"], &[]));
    let api = server.api();
    api.open_account("acct-1", "ann").await;
    let (status, _) = api
        .post("/events", &json!({"stream": "acct-1", "stream_type": "Account", "type": "Deposited", "payload": {"amount": 5}}))
        .await;
    assert_eq!(status, 201);
    let (status, body) = api
        .get("/projections/account-balance/accounts/acct-1?wait_for=acct-1@2")
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, text) = api.get_text("/metrics").await;
    assert_eq!(status, 200);
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text format");
    // Every family says what it is.
    let families: std::collections::BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for family in &families {
        assert!(scrape.docs.contains_key(*family), "{family} has no HELP");
    }
    let histogram = |name: &str, labels: &[(&str, &str)]| {
        let found = scrape
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)));
        match found.map(|s| &s.value) {
            Some(prometheus_parse::Value::Histogram(buckets)) => buckets.clone(),
            other => panic!("{name} {labels:?}: {other:?} in\n{text}"),
        }
    };
    let count = |buckets: &[prometheus_parse::HistogramCount]| {
        buckets.iter().map(|b| b.count).fold(0.0, f64::max)
    };
    for name in [
        "projector_batch_duration_seconds",
        "projector_commit_duration_seconds",
    ] {
        let buckets = histogram(name, &[("projection", "account-balance")]);
        assert!(buckets.len() > 5, "{name}: {buckets:?}");
        assert!(count(&buckets) >= 1.0, "{name} counted no batch");
    }
    assert!(count(&histogram("projector_read_wait_seconds", &[])) >= 1.0);
    let read = histogram(
        "projector_http_request_duration_seconds",
        &[
            ("route", "/projections/:name/:collection/:key"),
            ("status", "200"),
        ],
    );
    assert!(count(&read) >= 1.0);
    let gauges: HashMap<&str, f64> = scrape
        .samples
        .iter()
        .filter_map(|s| match s.value {
            prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Counter(v) => {
                Some((s.metric.as_str(), v))
            }
            _ => None,
        })
        .collect();
    for name in [
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_cpu_seconds_total",
    ] {
        assert!(
            gauges.get(name).is_some_and(|v| *v > 0.0),
            "{name}: {:?}",
            gauges.get(name)
        );
    }
}

/// `PROJECTOR_LOG_FORMAT=json`: one JSON object per line; a runner's lines name their
/// projection, a request's lines its request id (the caller's `x-request-id`, echoed back).
#[tokio::test]
async fn json_logs_carry_the_projection_and_the_request_id() {
    let data = crate::support::tempdir("json-logs");
    let server = Server::start_with(
        &plugin_set(&["account-balance"], &[]),
        &data,
        &[
            ("PROJECTOR_LOG_FORMAT", "json"),
            ("PROJECTOR_ADMIN__TOKEN", "t"),
        ],
    );
    let api = server.api();
    api.open_account("acct-1", "ann").await;
    let variant =
        crate::support::plugins_dir().join("variants/account-balance-same/account-balance.wasm");
    let response = api
        .http
        .put(format!("{}/admin/plugins/account-balance", api.base))
        .bearer_auth("t")
        .header("content-type", "application/wasm")
        .header("x-request-id", "req-42")
        .body(std::fs::read(variant).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(response.headers()["x-request-id"], "req-42");
    let log = std::fs::read_to_string(data.join("server.log")).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let find = |message: &str, origin: Option<&str>| {
        lines
            .iter()
            .find(|l| {
                l["fields"]["message"] == message
                    && origin.is_none_or(|o| l["fields"]["origin"] == o)
            })
            .unwrap_or_else(|| panic!("no line {message:?} in\n{log}"))
    };
    assert_eq!(
        find("runner started", None)["span"]["projection"],
        "account-balance"
    );
    assert_eq!(
        find("plugin deployed", Some("upload"))["span"]["request_id"],
        "req-42"
    );
}

/// The sample Grafana dashboard asks only for metrics the host exposes.
#[tokio::test]
async fn the_grafana_dashboard_queries_metrics_that_exist() {
    let server = Server::on(&Backend::Sqlite, &plugin_set(&["account-balance"], &[]));
    let api = server.api();
    api.open_account("acct-1", "ann").await;
    let (_, text) = api.get_text("/metrics").await;
    let families: std::collections::BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    let file = crate::support::repo_root().join("deploy/grafana-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    let mut asked = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            // Metric names: identifiers starting `projector_` or `process_`.
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if !(word.starts_with("projector_") || word.starts_with("process_")) {
                    continue;
                }
                // Exposed with the Kafka source only; `kafka::a_projections_lag_per_partition…`
                // reads the one the dashboard asks for.
                if word.starts_with("projector_kafka_") {
                    assert_eq!(word, "projector_kafka_lag_messages", "in {expr:?}");
                    continue;
                }
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| word.strip_suffix(s))
                    .unwrap_or(word);
                assert!(
                    families.contains(family),
                    "{word} (in {expr:?}) is not exposed"
                );
                asked += 1;
            }
        }
    }
    assert!(asked > 10, "{asked}");
}
