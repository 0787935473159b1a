//! The open-files limit: raised at start, then shared between API connections and the
//! connections the monitors open to Proxmox.
//!
//! Every API connection holds one descriptor for as long as it is open; every cluster holds
//! one while its check runs (a check talks to one node at a time), and checks of different
//! clusters overlap. [`RESERVED_FILES`] covers the rest: the database, the listener, the
//! runtime's own descriptors, stdio and registrations being verified. API connections get at
//! most half of what is left after the reserve, so that clients alone can never take the
//! descriptors the monitors need.

use std::io;

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Descriptors kept for everything but API connections and checks.
pub const RESERVED_FILES: u64 = 128;
/// Linux's default ceiling (`fs.nr_open`), used when the hard limit is unlimited: a soft
/// limit cannot be unlimited.
const UNLIMITED_FALLBACK: u64 = 1 << 20;

/// Raises the soft open-files limit (`RLIMIT_NOFILE`) to the hard limit, and returns the soft
/// limit in force afterwards. Under systemd the soft limit is 1024 unless the unit says
/// otherwise, which a few hundred clients would exhaust.
pub fn raise_open_files_limit() -> u64 {
    let Rlimit { current, maximum } = getrlimit(Resource::Nofile);
    let current = current.unwrap_or(UNLIMITED_FALLBACK);
    let target = maximum.unwrap_or(UNLIMITED_FALLBACK);
    if current >= target {
        return current;
    }
    match set_soft_limit(target, maximum) {
        Ok(()) => {
            tracing::debug!(from = current, to = target, "raised the open-files limit");
            target
        }
        Err(error) => {
            tracing::warn!(
                %error,
                limit = current,
                "cannot raise the open-files limit to the hard limit {target}"
            );
            current
        }
    }
}

fn set_soft_limit(soft: u64, hard: Option<u64>) -> io::Result<()> {
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(soft),
            maximum: hard,
        },
    )
    .map_err(io::Error::from)
}

/// How an open-files limit is shared out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileBudget {
    /// The open-files limit in force.
    pub limit: u64,
    /// API connections served at once.
    pub api_connections: usize,
    /// Clusters the rest allows, one descriptor each while its check runs.
    pub clusters: u64,
    /// Whether `api_connections` is below the configured `server.max_connections`.
    pub lowered: bool,
}

impl FileBudget {
    /// Shares `limit` descriptors: `max_connections` for the API when that is at most half of
    /// what the reserve leaves, else that half (and at least one).
    pub fn new(limit: u64, max_connections: usize) -> Self {
        let usable = limit.saturating_sub(RESERVED_FILES);
        let api_share = usable / 2;
        let wanted = u64::try_from(max_connections).unwrap_or(u64::MAX);
        let (api, lowered) = if wanted <= api_share {
            (wanted, false)
        } else {
            (api_share.max(1), true)
        };
        Self {
            limit,
            api_connections: usize::try_from(api).unwrap_or(max_connections),
            clusters: usable.saturating_sub(api),
            lowered,
        }
    }

    /// Says at start what the open-files limit allows, and warns when it is too low for the
    /// configuration or for the clusters already registered.
    pub fn log(&self, max_connections: usize, registered: usize) {
        tracing::info!(
            open_files = self.limit,
            api_connections = self.api_connections,
            clusters = self.clusters,
            "open-files limit {}: up to {} API connections and about {} clusters ({} descriptors \
             reserved, one per API connection, one per cluster while its check runs)",
            self.limit,
            self.api_connections,
            self.clusters,
            RESERVED_FILES,
        );
        if self.lowered {
            tracing::warn!(
                open_files = self.limit,
                max_connections,
                api_connections = self.api_connections,
                "the open-files limit {} cannot hold server.max_connections = {max_connections} and \
                 leave room for the connections to Proxmox: serving at most {} API connections; \
                 raise the limit (LimitNOFILE= in the unit, ulimit -n) or lower server.max_connections",
                self.limit,
                self.api_connections,
            );
        }
        if u64::try_from(registered).unwrap_or(u64::MAX) > self.clusters {
            tracing::warn!(
                open_files = self.limit,
                registered,
                "{registered} clusters are registered but the open-files limit {} leaves room for \
                 about {}: checks may fail for want of file descriptors; raise the limit or lower \
                 server.max_connections",
                self.limit,
                self.clusters,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn systemds_limit_gives_the_default_connections_and_leaves_the_rest_to_clusters() {
        let budget = FileBudget::new(65_536, 2048);
        assert_eq!(
            budget,
            FileBudget {
                limit: 65_536,
                api_connections: 2048,
                clusters: 65_536 - 128 - 2048,
                lowered: false,
            }
        );
    }

    #[test]
    fn a_low_limit_lowers_the_connections_to_half_of_what_the_reserve_leaves() {
        let budget = FileBudget::new(1024, 2048);
        assert_eq!(budget.api_connections, 448);
        assert_eq!(budget.clusters, 448);
        assert!(budget.lowered);
    }

    #[test]
    fn connections_up_to_half_fit_and_one_more_does_not() {
        assert!(!FileBudget::new(1024, 448).lowered);
        assert!(FileBudget::new(1024, 449).lowered);
    }

    #[test]
    fn a_limit_below_the_reserve_still_serves_one_connection() {
        let budget = FileBudget::new(64, 2048);
        assert_eq!((budget.api_connections, budget.clusters), (1, 0));
        assert!(budget.lowered);
    }

    #[test]
    fn the_soft_limit_ends_at_the_hard_limit() {
        let raised = raise_open_files_limit();
        let Rlimit { current, maximum } = getrlimit(Resource::Nofile);
        assert_eq!(Some(raised), current);
        assert_eq!(current, maximum.or(current));
    }
}
