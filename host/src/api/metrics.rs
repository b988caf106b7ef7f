//! `GET /metrics`: Prometheus text format, one family per line group.

use std::fmt::Write;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use super::AppState;
use crate::metrics::ProjectionMetrics;
use crate::store::ProjectionStatus;

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses((status = 200, description = "Prometheus text format 0.0.4", content_type = "text/plain")),
)]
pub async fn metrics(State(app): State<AppState>) -> impl IntoResponse {
    let head = *app.source.head().borrow();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP projector_head_position Newest position in the event source."
    );
    let _ = writeln!(out, "# TYPE projector_head_position gauge");
    let _ = writeln!(out, "projector_head_position {head}");
    let _ = writeln!(
        out,
        "# HELP projector_reads_waiting_for_append Reads waiting for a stream version to be appended."
    );
    let _ = writeln!(out, "# TYPE projector_reads_waiting_for_append gauge");
    let _ = writeln!(
        out,
        "projector_reads_waiting_for_append {}",
        app.appends.waiting_reads()
    );
    let held = app.source.watermark().map_or(0.0, |w| w.held_seconds());
    let _ = writeln!(
        out,
        "# HELP projector_watermark_held_seconds How long committed events have waited behind an open transaction that can still write below them (0: not held)."
    );
    let _ = writeln!(out, "# TYPE projector_watermark_held_seconds gauge");
    let _ = writeln!(out, "projector_watermark_held_seconds {held:.3}");
    type Reading = fn(&crate::runner::Projection, u64) -> String;
    let projections = app.projections.projections();
    let families: [(&str, &str, &str, Reading); 15] = [
        (
            "projector_checkpoint_position",
            "gauge",
            "Position the projection has committed.",
            |p, _| p.checkpoint().to_string(),
        ),
        (
            "projector_lag_events",
            "gauge",
            "Head position minus checkpoint.",
            |p, head| head.saturating_sub(p.checkpoint()).to_string(),
        ),
        (
            "projector_projection_up",
            "gauge",
            "1 while the projection runs or stands by for another instance, 0 once it has failed.",
            |p, _| u8::from(p.status() != ProjectionStatus::Failed).to_string(),
        ),
        (
            "projector_batches_total",
            "counter",
            "Batches committed.",
            |p, _| ProjectionMetrics::get(&p.metrics.batches).to_string(),
        ),
        (
            "projector_parked_streams",
            "gauge",
            "Streams parked behind an open dead letter.",
            |p, _| ProjectionMetrics::get(&p.metrics.parked_streams).to_string(),
        ),
        (
            "projector_parked_events",
            "gauge",
            "Events waiting in parked streams.",
            |p, _| ProjectionMetrics::get(&p.metrics.parked_events).to_string(),
        ),
        (
            "projector_isolation_calls_total",
            "counter",
            "Extra plugin calls spent finding the events failed batches failed on.",
            |p, _| ProjectionMetrics::get(&p.metrics.isolation_calls).to_string(),
        ),
        (
            "projector_events_total",
            "counter",
            "Events handed to the plugin.",
            |p, _| ProjectionMetrics::get(&p.metrics.events).to_string(),
        ),
        (
            "projector_documents_written_total",
            "counter",
            "Documents written or deleted.",
            |p, _| ProjectionMetrics::get(&p.metrics.documents).to_string(),
        ),
        (
            "projector_plugin_seconds_total",
            "counter",
            "Time spent inside the plugin.",
            |p, _| seconds(ProjectionMetrics::get(&p.metrics.plugin_micros)),
        ),
        (
            "projector_commit_seconds_total",
            "counter",
            "Time spent committing batches.",
            |p, _| seconds(ProjectionMetrics::get(&p.metrics.commit_micros)),
        ),
        (
            "projector_read_seconds_total",
            "counter",
            "Time reading batches from the source.",
            |p, _| seconds(ProjectionMetrics::get(&p.metrics.read_micros)),
        ),
        (
            "projector_retries_total",
            "counter",
            "Reads or commits retried after a database error.",
            |p, _| ProjectionMetrics::get(&p.metrics.retries).to_string(),
        ),
        (
            "projector_reads_waiting",
            "gauge",
            "Reads waiting for the projection to commit the position they need.",
            |p, _| p.committed().waiting().to_string(),
        ),
        (
            "projector_retrying",
            "gauge",
            "1 while the projection is retrying after a database error.",
            |p, _| u8::from(p.health().retrying.is_some()).to_string(),
        ),
    ];
    for (name, kind, help, read) in families {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for projection in &projections {
            let _ = writeln!(
                out,
                "{name}{{projection=\"{}\"}} {}",
                projection.name(),
                read(projection, head)
            );
        }
    }
    // Apart: a paused or failed projection's lag is looked up in the source.
    let _ = writeln!(
        out,
        "# HELP projector_lag_seconds Age of the oldest event not applied yet, read or not (0: none)."
    );
    let _ = writeln!(out, "# TYPE projector_lag_seconds gauge");
    for projection in &projections {
        let _ = writeln!(
            out,
            "projector_lag_seconds{{projection=\"{}\"}} {:.3}",
            projection.name(),
            projection.lag_seconds_behind(app.source.as_ref()).await
        );
    }
    let _ = writeln!(
        out,
        "# HELP projector_dead_letters_total Events set aside since start, by why: a malformed row, or the plugin failed on it."
    );
    let _ = writeln!(out, "# TYPE projector_dead_letters_total counter");
    for projection in &projections {
        for (reason, counter) in [
            ("malformed", &projection.metrics.dead_letters_malformed),
            ("plugin", &projection.metrics.dead_letters_plugin),
        ] {
            let _ = writeln!(
                out,
                "projector_dead_letters_total{{projection=\"{}\",reason=\"{reason}\"}} {}",
                projection.name(),
                ProjectionMetrics::get(counter)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP projector_plugin_swaps_total Plugin changes applied on this instance, by outcome: swapped (same version, new code), cut_over (a rebuilt version took over), refused (a same-version upload that changed the read model's shape)."
    );
    let _ = writeln!(out, "# TYPE projector_plugin_swaps_total counter");
    for ((projection, outcome), count) in app.deploy.metrics.swaps() {
        let _ = writeln!(
            out,
            "projector_plugin_swaps_total{{projection=\"{projection}\",outcome=\"{outcome}\"}} {count}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP projector_swap_pause_seconds From the last batch on the old code (or the swap, if later) to the first batch on the new code."
    );
    let _ = writeln!(out, "# TYPE projector_swap_pause_seconds histogram");
    for projection in &projections {
        projection.metrics.swap_pause.render(
            &mut out,
            "projector_swap_pause_seconds",
            &format!("projection=\"{}\"", projection.name()),
        );
    }
    let _ = writeln!(
        out,
        "# HELP projector_rebuild_progress How far a version built beside the serving one has come: its checkpoint over the head (1: caught up)."
    );
    let _ = writeln!(out, "# TYPE projector_rebuild_progress gauge");
    for (name, entry) in app.projections.entries() {
        if let Some(building) = entry.building {
            let progress = building.projection.progress_towards(head);
            let _ = writeln!(
                out,
                "projector_rebuild_progress{{projection=\"{name}\",version=\"{}\"}} {progress:.4}",
                building.projection.descriptor().version
            );
        }
    }
    if let Some(kafka) = &app.kafka {
        let (events, duplicates, tombstones, bad) = kafka.counts();
        let _ = writeln!(
            out,
            "# HELP projector_kafka_messages_total Kafka messages taken into the log by this instance, by outcome: event, duplicate (an event id already in the log), tombstone (skipped), bad (dead-lettered)."
        );
        let _ = writeln!(out, "# TYPE projector_kafka_messages_total counter");
        for (outcome, count) in [
            ("event", events),
            ("duplicate", duplicates),
            ("tombstone", tombstones),
            ("bad", bad),
        ] {
            let _ = writeln!(
                out,
                "projector_kafka_messages_total{{outcome=\"{outcome}\"}} {count}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP projector_kafka_ingest_lag_messages A partition's high watermark minus the next offset this instance takes into the log (partitions this instance holds)."
        );
        let _ = writeln!(out, "# TYPE projector_kafka_ingest_lag_messages gauge");
        for p in kafka.partitions() {
            let Some(lag) = p.lag else { continue };
            let _ = writeln!(
                out,
                "projector_kafka_ingest_lag_messages{{topic=\"{}\",partition=\"{}\"}} {lag}",
                p.topic, p.partition
            );
        }
        let _ = writeln!(
            out,
            "# HELP projector_kafka_lag_messages A partition's high watermark minus the next offset the projection (or observer) applies, for the partitions this instance holds."
        );
        let _ = writeln!(out, "# TYPE projector_kafka_lag_messages gauge");
        for projection in &projections {
            let name = projection.name();
            let Ok(partitions) = kafka.applied(projection.checkpoint()).await else {
                continue;
            };
            for p in partitions {
                let Some(lag) = p.lag else { continue };
                let _ = writeln!(
                    out,
                    "projector_kafka_lag_messages{{projection=\"{name}\",topic=\"{}\",partition=\"{}\"}} {lag}",
                    p.topic, p.partition
                );
            }
        }
    }
    observers(&mut out, &projections);
    durations(&mut out, &app, &projections);
    process(&mut out);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}

/// Histograms: each batch's plugin call and commit per projection, reads' waits, requests.
fn durations(out: &mut String, app: &AppState, all: &[std::sync::Arc<crate::runner::Projection>]) {
    for (name, help, pick) in [
        (
            "projector_batch_duration_seconds",
            "One batch's plugin call.",
            (|p: &crate::runner::Projection| &p.metrics.batch_duration)
                as fn(&crate::runner::Projection) -> &crate::metrics::Histogram,
        ),
        (
            "projector_commit_duration_seconds",
            "One batch's commit: its documents and the checkpoint in one transaction.",
            |p| &p.metrics.commit_duration,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        for p in all {
            let labels = format!(
                "projection=\"{}\",version=\"{}\"",
                p.name(),
                p.descriptor().version
            );
            pick(p).render(out, name, &labels);
        }
    }
    let _ = writeln!(out, "# HELP projector_read_wait_seconds How long a read that named a position or a stream version waited for the projection to reach it.");
    let _ = writeln!(out, "# TYPE projector_read_wait_seconds histogram");
    app.http
        .read_wait
        .render(out, "projector_read_wait_seconds", "");
    let _ = writeln!(out, "# HELP projector_http_request_duration_seconds HTTP requests by route template and status.");
    let _ = writeln!(
        out,
        "# TYPE projector_http_request_duration_seconds histogram"
    );
    for ((route, status), histogram) in app.http.requests() {
        let labels = format!("route=\"{}\",status=\"{status}\"", route.replace('"', "'"));
        histogram.render(out, "projector_http_request_duration_seconds", &labels);
    }
}

/// The process's own: memory, CPU, file descriptors (Prometheus's `process_*` names).
fn process(out: &mut String) {
    let p = crate::metrics::ProcessMetrics::read();
    let families: [(&str, &str, &str, Option<String>); 5] = [
        (
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            p.resident_bytes.map(|v| v.to_string()),
        ),
        (
            "process_cpu_seconds_total",
            "counter",
            "User and system CPU time spent, in seconds.",
            p.cpu_seconds.map(|v| format!("{v:.2}")),
        ),
        (
            "process_open_fds",
            "gauge",
            "Open file descriptors.",
            p.open_fds.map(|v| v.to_string()),
        ),
        (
            "process_max_fds",
            "gauge",
            "The open-files limit.",
            p.max_fds.map(|v| v.to_string()),
        ),
        (
            "process_start_time_seconds",
            "gauge",
            "When the process started, in seconds since the epoch.",
            p.start_time_seconds.map(|v| format!("{v:.2}")),
        ),
    ];
    for (name, kind, help, value) in families {
        if let Some(value) = value {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {value}");
        }
    }
}

/// Observers' deliveries: outcomes by kind, attempts, durations, and what waits.
fn observers(out: &mut String, all: &[std::sync::Arc<crate::runner::Projection>]) {
    use crate::metrics::{ACTION_KINDS, DELIVERY_OUTCOMES};
    use std::sync::atomic::Ordering::Relaxed;
    let observers: Vec<_> = all.iter().filter(|p| p.is_observer()).collect();
    let _ = writeln!(out, "# HELP projector_actions_total Observer actions finished on this instance, by kind and outcome: delivered, retried (an attempt failed, another is scheduled), dead.");
    let _ = writeln!(out, "# TYPE projector_actions_total counter");
    for o in &observers {
        for (k, kind) in ACTION_KINDS.iter().enumerate() {
            for (i, outcome) in DELIVERY_OUTCOMES.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "projector_actions_total{{observer=\"{}\",kind=\"{kind}\",outcome=\"{}\"}} {}",
                    o.name(),
                    outcome.as_str(),
                    o.delivery.counted(k, i)
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "# HELP projector_action_attempts_total Delivery attempts made on this instance."
    );
    let _ = writeln!(out, "# TYPE projector_action_attempts_total counter");
    for o in &observers {
        let _ = writeln!(
            out,
            "projector_action_attempts_total{{observer=\"{}\"}} {}",
            o.name(),
            o.delivery.attempts.load(Relaxed)
        );
    }
    let _ = writeln!(
        out,
        "# HELP projector_action_duration_seconds How long one delivery attempt took."
    );
    let _ = writeln!(out, "# TYPE projector_action_duration_seconds histogram");
    for o in &observers {
        o.delivery.duration.render(
            out,
            "projector_action_duration_seconds",
            &format!("observer=\"{}\"", o.name()),
        );
    }
    let _ = writeln!(out, "# HELP projector_actions_pending Actions loaded and waiting for an attempt on this instance.");
    let _ = writeln!(out, "# TYPE projector_actions_pending gauge");
    for o in &observers {
        let _ = writeln!(
            out,
            "projector_actions_pending{{observer=\"{}\"}} {}",
            o.name(),
            o.delivery.queued.load(Relaxed)
        );
    }
    let _ = writeln!(
        out,
        "# HELP projector_actions_in_flight Delivery attempts in flight."
    );
    let _ = writeln!(out, "# TYPE projector_actions_in_flight gauge");
    for o in &observers {
        let _ = writeln!(
            out,
            "projector_actions_in_flight{{observer=\"{}\"}} {}",
            o.name(),
            o.delivery.in_flight.load(Relaxed)
        );
    }
}

fn seconds(micros: u64) -> String {
    format!("{:.6}", micros as f64 / 1e6)
}
