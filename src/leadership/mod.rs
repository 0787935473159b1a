//! Which instance runs the monitors. With redb there is one instance and it always does; with
//! etcd the instances elect one leader (see `election`) and the others follow its results.

use serde::Serialize;

/// The etcd election: lease, leader key, fence.
#[cfg(feature = "etcd")]
pub mod election;

/// This instance's part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The only instance (redb): runs every monitor.
    Standalone,
    /// The elected instance of several: runs every monitor and writes status.
    Leader,
    /// Serves the API from what the leader writes; writes only what clients ask for.
    Follower,
}

impl Role {
    /// Whether this instance checks Proxmox.
    pub fn runs_monitors(self) -> bool {
        matches!(self, Self::Standalone | Self::Leader)
    }
}

/// The leadership as one instance sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leadership {
    /// This instance's part.
    pub role: Role,
    /// The leading instance's id, when one is known.
    pub leader: Option<String>,
    /// Why the shared store cannot be reached, while it cannot.
    pub storage_error: Option<String>,
}

impl Leadership {
    /// A single instance on redb.
    pub fn standalone() -> Self {
        Self {
            role: Role::Standalone,
            leader: Some(instance_id()),
            storage_error: None,
        }
    }

    /// One of several instances, before the election has said anything.
    pub fn undecided() -> Self {
        Self {
            role: Role::Follower,
            leader: None,
            storage_error: None,
        }
    }
}

/// This process among the instances: host name and process id, so an operator can find it.
pub fn instance_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    format!("{host}:{}", std::process::id())
}
