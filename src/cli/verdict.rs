//! Which cluster is worse, and what a set of clusters adds up to: the order of the status
//! table and the exit code of `proxmoxer status`.

use std::cmp::Ordering;

use serde_json::Value;

/// The statuses a cluster shows, worst first.
pub const STATUSES_WORST_FIRST: [&str; 4] = ["unhealthy", "unknown", "degraded", "healthy"];

/// The overall state of a set of clusters, as a Nagios plugin reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    /// Every cluster is healthy (or there are none): exit 0.
    Ok,
    /// At least one is degraded, none worse: exit 1.
    Warning,
    /// At least one is unhealthy or unknown: exit 2.
    Critical,
    /// The daemon gave no answer: exit 3.
    Unknown,
}

impl Verdict {
    /// The process exit code of the Nagios plugin convention.
    pub fn exit_code(self) -> u8 {
        match self {
            Self::Ok => 0,
            Self::Warning => 1,
            Self::Critical => 2,
            Self::Unknown => 3,
        }
    }

    /// `OK`, `WARNING`, `CRITICAL` or `UNKNOWN`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Ok => "OK",
            Self::Warning => "WARNING",
            Self::Critical => "CRITICAL",
            Self::Unknown => "UNKNOWN",
        }
    }

    /// The verdict over clusters showing these statuses. A status this version does not know
    /// counts as unknown: better a false alarm than a silent one.
    pub fn of<'a>(statuses: impl IntoIterator<Item = &'a str>) -> Self {
        statuses
            .into_iter()
            .map(|status| match status {
                "healthy" => Self::Ok,
                "degraded" => Self::Warning,
                _ => Self::Critical,
            })
            .max()
            .unwrap_or(Self::Ok)
    }
}

/// 0 for the worst status; an unrecognised status ranks with `unknown`.
pub fn severity_rank(status: &str) -> usize {
    STATUSES_WORST_FIRST
        .iter()
        .position(|known| *known == status)
        .unwrap_or(1)
}

/// Worst status first, then by name, then by id so that equal names keep a stable order.
pub fn worst_first(a: &Value, b: &Value) -> Ordering {
    let status = |c: &Value| severity_rank(c["status"].as_str().unwrap_or_default());
    let text = |c: &Value, field: &str| c[field].as_str().unwrap_or_default().to_owned();
    status(a)
        .cmp(&status(b))
        .then_with(|| text(a, "name").cmp(&text(b, "name")))
        .then_with(|| text(a, "id").cmp(&text(b, "id")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn clusters_sort_unhealthy_unknown_degraded_healthy_then_by_name() {
        let mut clusters = [
            json!({"name": "b", "status": "healthy"}),
            json!({"name": "a", "status": "healthy"}),
            json!({"name": "z", "status": "degraded"}),
            json!({"name": "y", "status": "unknown"}),
            json!({"name": "x", "status": "unhealthy"}),
            json!({"name": "c", "status": "unhealthy"}),
        ];
        clusters.sort_by(worst_first);
        let names: Vec<&str> = clusters.iter().filter_map(|c| c["name"].as_str()).collect();
        assert_eq!(names, ["c", "x", "y", "z", "a", "b"]);
    }

    #[test]
    fn the_verdict_is_the_worst_status() {
        assert_eq!(Verdict::of([]), Verdict::Ok);
        assert_eq!(Verdict::of(["healthy", "healthy"]), Verdict::Ok);
        assert_eq!(Verdict::of(["healthy", "degraded"]), Verdict::Warning);
        assert_eq!(Verdict::of(["degraded", "unknown"]), Verdict::Critical);
        assert_eq!(Verdict::of(["unhealthy", "healthy"]), Verdict::Critical);
        assert_eq!(Verdict::of(["something-new"]), Verdict::Critical);
        let codes: Vec<u8> = [
            Verdict::Ok,
            Verdict::Warning,
            Verdict::Critical,
            Verdict::Unknown,
        ]
        .map(Verdict::exit_code)
        .to_vec();
        assert_eq!(codes, [0, 1, 2, 3]);
    }
}
