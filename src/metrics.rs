//! Prometheus metrics. Counters and histograms go through the `metrics` facade; per-cluster
//! gauges are rendered from a registry snapshot at scrape time, so a deleted cluster's series
//! disappear with it instead of lingering at their last value.

use std::fmt::Write;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::domain::ClusterStatus;
use crate::registry::ClusterSnapshot;

const STATUSES: [ClusterStatus; 4] = [
    ClusterStatus::Healthy,
    ClusterStatus::Degraded,
    ClusterStatus::Unhealthy,
    ClusterStatus::Unknown,
];
const DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The process-wide recorder's handle.
#[derive(Clone)]
pub struct Metrics(PrometheusHandle);

impl Metrics {
    /// Installs the process-wide recorder. `None` if one is installed already (a second
    /// daemon in one process), in which case counters go to the first.
    pub fn install() -> Option<Self> {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("duration_seconds".into()), DURATION_BUCKETS)
            .ok()?
            .build_recorder();
        let handle = recorder.handle();
        metrics::set_global_recorder(recorder).ok()?;
        describe();
        Some(Self(handle))
    }
}

fn describe() {
    metrics::describe_histogram!(
        "proxmoxer_check_duration_seconds",
        metrics::Unit::Seconds,
        "How long one monitor check of a cluster took"
    );
    metrics::describe_counter!(
        "proxmoxer_check_failures_total",
        "Failed monitor checks by status reason"
    );
    metrics::describe_counter!(
        "proxmoxer_proxmox_logins_total",
        "Ticket logins to Proxmox by outcome (success, rejected, error)"
    );
    metrics::describe_counter!(
        "proxmoxer_monitor_restarts_total",
        "Monitors restarted after a failure"
    );
    metrics::describe_counter!(
        "proxmoxer_http_requests_total",
        "API requests by method, route template and status code"
    );
    metrics::describe_histogram!(
        "proxmoxer_http_request_duration_seconds",
        metrics::Unit::Seconds,
        "API request latency by method and route template"
    );
}

/// The exposition text: the recorder's series, whether this instance runs the monitors, then
/// the per-cluster gauges.
pub fn render(
    metrics: Option<&Metrics>,
    runs_monitors: bool,
    snapshot: &[ClusterSnapshot],
) -> String {
    let mut out = metrics.map(|m| m.0.render()).unwrap_or_default();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    let _ = render_leadership(&mut out, runs_monitors);
    let _ = render_clusters(&mut out, snapshot);
    out
}

/// `sum(proxmoxer_leader)` is 1 wherever the monitors run: 0 means nobody watches.
fn render_leadership(out: &mut String, runs_monitors: bool) -> std::fmt::Result {
    let name = "proxmoxer_leader";
    writeln!(
        out,
        "# HELP {name} 1 on the instance that runs the monitors (the etcd leader, or a standalone instance), 0 on followers"
    )?;
    writeln!(out, "# TYPE {name} gauge")?;
    writeln!(out, "{name} {}", u8::from(runs_monitors))
}

fn render_clusters(out: &mut String, snapshot: &[ClusterSnapshot]) -> std::fmt::Result {
    writeln!(
        out,
        "# HELP proxmoxer_clusters Registered clusters by status"
    )?;
    writeln!(out, "# TYPE proxmoxer_clusters gauge")?;
    for status in STATUSES {
        let count = snapshot.iter().filter(|c| c.view.status == status).count();
        writeln!(out, "proxmoxer_clusters{{status=\"{status}\"}} {count}")?;
    }
    let gauges: [(&str, &str); 3] = [
        (
            "proxmoxer_cluster_status",
            "1 for the cluster's current status, 0 for the others",
        ),
        (
            "proxmoxer_cluster_nodes",
            "Nodes in the cluster, online or not",
        ),
        ("proxmoxer_cluster_nodes_online", "Nodes online"),
    ];
    for (name, help) in gauges {
        writeln!(out, "# HELP {name} {help}")?;
        writeln!(out, "# TYPE {name} gauge")?;
        for cluster in snapshot {
            let labels = cluster_labels(cluster);
            match name {
                "proxmoxer_cluster_status" => {
                    for status in STATUSES {
                        let value = u8::from(cluster.view.status == status);
                        writeln!(out, "{name}{{{labels},status=\"{status}\"}} {value}")?;
                    }
                }
                "proxmoxer_cluster_nodes" => {
                    writeln!(out, "{name}{{{labels}}} {}", cluster.view.node_count)?;
                }
                _ => writeln!(out, "{name}{{{labels}}} {}", cluster.view.nodes_online)?,
            }
        }
    }
    // Its own series rather than a reason label on the status gauge: an alert on lost quorum
    // needs it, and the status gauge's labels stay what existing queries match.
    let name = "proxmoxer_cluster_quorate";
    writeln!(
        out,
        "# HELP {name} 1 when Proxmox last reported the cluster quorate, 0 when not (absent for a standalone node or before any answer)"
    )?;
    writeln!(out, "# TYPE {name} gauge")?;
    for cluster in snapshot {
        if let Some(quorate) = cluster.view.quorate {
            writeln!(
                out,
                "{name}{{{}}} {}",
                cluster_labels(cluster),
                u8::from(quorate)
            )?;
        }
    }
    let name = "proxmoxer_cluster_member_reachable";
    writeln!(
        out,
        "# HELP {name} 1 when the daemon's latest attempt reached the member, 0 when it failed (absent before any attempt)"
    )?;
    writeln!(out, "# TYPE {name} gauge")?;
    for cluster in snapshot {
        for member in &cluster.view.members {
            if let Some(reachable) = member.reachable {
                writeln!(
                    out,
                    "{name}{{id=\"{}\",cluster=\"{}\",member=\"{}\"}} {}",
                    cluster.view.id,
                    escape_label(&cluster.view.name),
                    escape_label(&member.name),
                    u8::from(reachable)
                )?;
            }
        }
    }
    let name = "proxmoxer_cluster_seconds_since_last_success";
    writeln!(
        out,
        "# HELP {name} Seconds since Proxmox last answered a check (absent until one has)"
    )?;
    writeln!(out, "# TYPE {name} gauge")?;
    for cluster in snapshot {
        if let Some(seconds) = cluster.seconds_since_success {
            writeln!(out, "{name}{{{}}} {seconds:.3}", cluster_labels(cluster))?;
        }
    }
    Ok(())
}

fn cluster_labels(cluster: &ClusterSnapshot) -> String {
    format!(
        "id=\"{}\",name=\"{}\"",
        cluster.view.id,
        escape_label(&cluster.view.name)
    )
}

/// Label values escape backslash, double quote and newline.
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label(r#"a"b\c"#), r#"a\"b\\c"#);
    }
}
