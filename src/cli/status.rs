//! `proxmoxer status`: every cluster in one table, worst first, and an exit code a monitoring
//! system can act on (the Nagios plugin convention).

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::client::{ClientError, Daemon};
use super::paint::{Palette, printable};
use super::verdict::{STATUSES_WORST_FIRST, Verdict, severity_rank, worst_first};

/// The whole exchange with the daemon, connection included, must fit in this: a check that
/// hangs is worse for a monitoring system than one that says UNKNOWN.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const COLUMNS: [&str; 6] = ["NAME", "STATUS", "REASON", "NODES", "VERSION", "CHECKED"];

/// Asks the daemon for every cluster and prints the table (or the JSON report); returns the
/// exit code of the verdict, or 3 with the reason on stderr when the daemon gave no answer.
pub fn run(daemon: &Daemon, as_json: bool) -> ExitCode {
    let clusters = match fetch(daemon) {
        Ok(clusters) => clusters,
        Err(e) => return no_answer(&e),
    };
    let verdict = Verdict::of(clusters.iter().map(status_of));
    let text = if as_json {
        format!("{:#}\n", json_report(verdict, clusters))
    } else {
        let palette = Palette::for_stdout();
        let mut text = summary_line(verdict, &clusters, palette);
        text.push('\n');
        if !clusters.is_empty() {
            text.push_str(&table(&clusters, Utc::now(), palette));
        }
        text
    };
    // A closed pipe (`proxmoxer status | head -1`) changes nothing about the verdict.
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
    ExitCode::from(verdict.exit_code())
}

/// Reports on stderr why there is no verdict and returns exit code 3 (UNKNOWN).
pub fn no_answer(error: &ClientError) -> ExitCode {
    // Not eprintln!, which panics when stderr is a closed pipe.
    let _ = writeln!(
        std::io::stderr(),
        "proxmoxer: UNKNOWN: {}",
        printable(&error.to_string())
    );
    no_answer_code()
}

/// Exit code 3 (UNKNOWN), for when there is no verdict.
pub fn no_answer_code() -> ExitCode {
    ExitCode::from(Verdict::Unknown.exit_code())
}

/// Every cluster, worst first.
fn fetch(daemon: &Daemon) -> Result<Vec<Value>, ClientError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ClientError::Runtime)?;
    let body = runtime.block_on(async {
        let client = daemon.client(Some(REQUEST_TIMEOUT), None)?;
        daemon
            .get_json(&client, "/api/v1/clusters", REQUEST_TIMEOUT)
            .await
    })?;
    let Some(clusters) = body.get("clusters").and_then(Value::as_array) else {
        return Err(ClientError::BadBody {
            url: daemon.base().to_owned(),
            cause: "no \"clusters\" list in the answer to GET /api/v1/clusters".to_owned(),
        });
    };
    let mut clusters = clusters.clone();
    clusters.sort_by(worst_first);
    Ok(clusters)
}

fn status_of(cluster: &Value) -> &str {
    cluster["status"].as_str().unwrap_or("unknown")
}

/// The `--json` output: the verdict, how many clusters show each status, and the Cluster
/// objects as the API renders them, worst first.
pub fn json_report(verdict: Verdict, clusters: Vec<Value>) -> Value {
    let mut counts = serde_json::Map::new();
    for status in STATUSES_WORST_FIRST {
        counts.insert(status.to_owned(), json!(0));
    }
    for cluster in &clusters {
        let status = STATUSES_WORST_FIRST[severity_rank(status_of(cluster))];
        if let Some(count) = counts.get_mut(status) {
            *count = json!(count.as_u64().unwrap_or(0) + 1);
        }
    }
    json!({
        "state": verdict.label(),
        "exit_code": verdict.exit_code(),
        "total": clusters.len(),
        "counts": counts,
        "clusters": clusters,
    })
}

/// `CRITICAL - 3 clusters: 1 unhealthy, 1 degraded, 1 healthy`: first, so that a monitoring
/// system showing only the first line shows the gist.
pub fn summary_line(verdict: Verdict, clusters: &[Value], palette: Palette) -> String {
    if clusters.is_empty() {
        return format!("{} - no clusters registered", verdict.label());
    }
    let mut counts = [0usize; STATUSES_WORST_FIRST.len()];
    for cluster in clusters {
        counts[severity_rank(status_of(cluster))] += 1;
    }
    let parts: Vec<String> = STATUSES_WORST_FIRST
        .iter()
        .zip(counts)
        .filter(|(_, count)| *count > 0)
        .map(|(status, count)| palette.status(status, &format!("{count} {status}")))
        .collect();
    let noun = if clusters.len() == 1 {
        "cluster"
    } else {
        "clusters"
    };
    format!(
        "{} - {} {noun}: {}",
        palette.bold(verdict.label()),
        clusters.len(),
        parts.join(", ")
    )
}

/// One row per cluster under a header, columns padded to their widest cell.
pub fn table(clusters: &[Value], now: DateTime<Utc>, palette: Palette) -> String {
    let rows: Vec<[String; 6]> = clusters.iter().map(|c| row(c, now)).collect();
    let mut widths = COLUMNS.map(|heading| heading.chars().count());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header = COLUMNS.map(str::to_owned);
    push_row(&mut out, &header, &widths, |_, cell| palette.bold(cell));
    for (row, cluster) in rows.iter().zip(clusters) {
        push_row(&mut out, row, &widths, |column, cell| match column {
            1 => palette.status(status_of(cluster), cell),
            5 => palette.dim(cell),
            _ => cell.to_owned(),
        });
    }
    out
}

/// Pads before colouring, so escape codes do not count towards a column's width.
fn push_row(
    out: &mut String,
    cells: &[String; 6],
    widths: &[usize; 6],
    paint: impl Fn(usize, &str) -> String,
) {
    let mut line = String::new();
    for (column, (cell, width)) in cells.iter().zip(widths).enumerate() {
        let last = column == cells.len() - 1;
        let padded = if last {
            cell.clone()
        } else {
            format!("{cell:<width$}  ")
        };
        let trimmed = padded.trim_end();
        line.push_str(&paint(column, trimmed));
        line.push_str(&padded[trimmed.len()..]);
    }
    out.push_str(line.trim_end());
    out.push('\n');
}

fn row(cluster: &Value, now: DateTime<Utc>) -> [String; 6] {
    let text = |field: &str| printable(cluster[field].as_str().unwrap_or("-"));
    let reason = match cluster["last_error"].as_str() {
        Some(error) => format!("{}: {}", text("status_reason"), printable(error)),
        None => text("status_reason"),
    };
    let nodes = match (
        cluster["nodes_online"].as_u64(),
        cluster["node_count"].as_u64(),
    ) {
        (Some(online), Some(total)) => format!("{online}/{total}"),
        _ => "-".to_owned(),
    };
    let checked = cluster["last_checked_at"]
        .as_str()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map_or_else(|| "never".to_owned(), |t| ago(t.with_timezone(&Utc), now));
    [
        text("name"),
        printable(status_of(cluster)),
        reason,
        nodes,
        text("proxmox_version"),
        checked,
    ]
}

/// `4s ago`, `12m ago`, `3h ago`, `2d ago`: the largest whole unit.
pub fn ago(then: DateTime<Utc>, now: DateTime<Utc>) -> String {
    // A clock a little behind the daemon's must not show a check in the future.
    let seconds = (now - then).num_seconds().max(0);
    match seconds {
        0..60 => format!("{seconds}s ago"),
        60..3600 => format!("{}m ago", seconds / 60),
        3600..86_400 => format!("{}h ago", seconds / 3600),
        _ => format!("{}d ago", seconds / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .expect("RFC 3339")
            .with_timezone(&Utc)
    }

    fn clusters() -> Vec<Value> {
        let mut clusters = vec![
            json!({"id": "1", "name": "lab", "status": "healthy", "status_reason": "ok",
                   "last_error": null, "nodes_online": 1, "node_count": 1,
                   "proxmox_version": "8.4.1", "last_checked_at": "2026-11-30T10:00:00Z"}),
            json!({"id": "2", "name": "prod", "status": "unhealthy",
                   "status_reason": "unreachable", "last_error": "connection refused",
                   "nodes_online": 3, "node_count": 3, "proxmox_version": "8.4.1",
                   "last_checked_at": "2026-11-30T09:58:00Z"}),
            json!({"id": "3", "name": "new", "status": "unknown", "status_reason": "not_checked",
                   "last_error": null, "nodes_online": null, "node_count": null,
                   "proxmox_version": null, "last_checked_at": null}),
        ];
        clusters.sort_by(worst_first);
        clusters
    }

    #[test]
    fn the_table_is_aligned_worst_first_and_plain_without_colour() {
        let table = table(&clusters(), at("2026-11-30T10:00:04Z"), Palette::new(false));
        assert_eq!(
            table,
            "NAME  STATUS     REASON                           NODES  VERSION  CHECKED\n\
             prod  unhealthy  unreachable: connection refused  3/3    8.4.1    2m ago\n\
             new   unknown    not_checked                      -      -        never\n\
             lab   healthy    ok                               1/1    8.4.1    4s ago\n"
        );
    }

    #[test]
    fn colour_does_not_shift_the_columns() {
        let now = at("2026-11-30T10:00:04Z");
        let plain = table(&clusters(), now, Palette::new(false));
        let coloured = table(&clusters(), now, Palette::new(true));
        assert!(coloured.contains("\x1b["));
        let mut stripped = String::new();
        let mut in_escape = false;
        for c in coloured.chars() {
            match (in_escape, c) {
                (false, '\x1b') => in_escape = true,
                (true, 'm') => in_escape = false,
                (false, c) => stripped.push(c),
                (true, _) => {}
            }
        }
        assert_eq!(stripped, plain);
    }

    #[test]
    fn the_summary_counts_what_is_there_worst_first() {
        let clusters = clusters();
        let verdict = Verdict::of(clusters.iter().map(status_of));
        assert_eq!(
            summary_line(verdict, &clusters, Palette::new(false)),
            "CRITICAL - 3 clusters: 1 unhealthy, 1 unknown, 1 healthy"
        );
        assert_eq!(
            summary_line(Verdict::Ok, &[], Palette::new(false)),
            "OK - no clusters registered"
        );
        let report = json_report(verdict, clusters);
        assert_eq!(report["exit_code"], 2);
        assert_eq!(report["state"], "CRITICAL");
        assert_eq!(
            report["counts"],
            json!({"unhealthy": 1, "unknown": 1, "degraded": 0, "healthy": 1})
        );
        assert_eq!(report["clusters"][0]["name"], "prod");
    }

    #[test]
    fn ago_uses_the_largest_whole_unit() {
        let now = at("2026-11-30T10:00:00Z");
        assert_eq!(ago(at("2026-11-30T09:59:59Z"), now), "1s ago");
        assert_eq!(ago(at("2026-11-30T10:00:05Z"), now), "0s ago");
        assert_eq!(ago(at("2026-11-30T09:58:30Z"), now), "1m ago");
        assert_eq!(ago(at("2026-11-30T07:00:00Z"), now), "3h ago");
        assert_eq!(ago(at("2026-11-28T10:00:00Z"), now), "2d ago");
    }
}
