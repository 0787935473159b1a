//! Proxmox's JSON shapes, read the way Perl writes them: booleans as 0/1 (or strings), numbers
//! that came out of corosync.conf as strings, unknown fields and entry types ignored.

use serde::Deserialize;
use serde::de::{self, Deserializer};

use crate::tls::Fingerprint;

#[derive(Deserialize)]
pub(super) struct LoginData {
    pub ticket: String,
    #[serde(rename = "CSRFPreventionToken")]
    pub csrf_token: String,
    #[serde(rename = "NeedTFA", default, deserialize_with = "perl_bool")]
    pub need_tfa: Option<bool>,
}

#[derive(Deserialize)]
pub(super) struct VersionData {
    pub version: String,
}

/// One entry of `/cluster/status`.
#[derive(Debug, Deserialize)]
pub(super) struct StatusEntry {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default, deserialize_with = "perl_u64")]
    nodeid: Option<u64>,
    #[serde(default)]
    ip: Option<String>,
    #[serde(default, deserialize_with = "perl_bool")]
    local: Option<bool>,
    #[serde(default, deserialize_with = "perl_bool")]
    quorate: Option<bool>,
    #[serde(default, deserialize_with = "perl_bool")]
    online: Option<bool>,
    /// On the `cluster` entry: the corosync config version, which changes with membership.
    #[serde(default, deserialize_with = "perl_u64")]
    version: Option<u64>,
}

/// The parts of `/cluster/status` the status rules need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterHealth {
    /// `None` for a standalone node, which has no quorum to speak of.
    pub quorate: Option<bool>,
    /// Nodes in the cluster, online or not.
    pub node_count: u32,
    /// Nodes Proxmox sees online.
    pub nodes_online: u32,
}

/// One node as `/cluster/status` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusNode {
    /// The Proxmox node name.
    pub name: String,
    /// Corosync's node id; 0 or absent on a standalone node.
    pub nodeid: Option<u32>,
    /// The address pveproxy uses to reach the node; may be missing for a long-offline node.
    pub ip: Option<String>,
    /// Whether this is the node that answered.
    pub local: bool,
    /// Proxmox's view of the node.
    pub online: bool,
}

/// `/cluster/status` as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusReport {
    /// What the status rules judge.
    pub health: ClusterHealth,
    /// Every node, in Proxmox's (unordered) order.
    pub nodes: Vec<StatusNode>,
    /// The corosync config version; `None` on a standalone node.
    pub config_version: Option<u64>,
}

impl StatusReport {
    pub(super) fn from_entries(entries: &[StatusEntry]) -> Self {
        // Entry order is Perl hash order: never assume the cluster entry comes first.
        let cluster = entries.iter().find(|e| e.kind == "cluster");
        let nodes: Vec<StatusNode> = entries
            .iter()
            .filter(|e| e.kind == "node")
            .filter_map(|e| {
                Some(StatusNode {
                    name: e.name.clone()?,
                    nodeid: e
                        .nodeid
                        .and_then(|id| u32::try_from(id).ok())
                        .filter(|id| *id > 0),
                    ip: e.ip.clone().filter(|ip| !ip.is_empty()),
                    local: e.local.unwrap_or(false),
                    online: e.online.unwrap_or(false),
                })
            })
            .collect();
        let node_count = entries.iter().filter(|e| e.kind == "node").count();
        let nodes_online = entries
            .iter()
            .filter(|e| e.kind == "node" && e.online.unwrap_or(false))
            .count();
        Self {
            health: ClusterHealth {
                quorate: cluster.map(|e| e.quorate.unwrap_or(false)),
                node_count: u32::try_from(node_count).unwrap_or(u32::MAX),
                nodes_online: u32::try_from(nodes_online).unwrap_or(u32::MAX),
            },
            nodes,
            config_version: cluster.and_then(|e| e.version),
        }
    }

    /// The node that answered (`local: 1`).
    pub fn local_node(&self) -> Option<&StatusNode> {
        self.nodes.iter().find(|n| n.local)
    }
}

/// `GET /cluster/config/join`: every member as the cluster filesystem knows it.
#[derive(Debug, Deserialize)]
pub(super) struct JoinInfoData {
    #[serde(default)]
    pub nodelist: Vec<JoinNodeEntry>,
}

#[derive(Debug, Deserialize)]
pub(super) struct JoinNodeEntry {
    pub name: String,
    #[serde(default, deserialize_with = "perl_u64")]
    pub nodeid: Option<u64>,
    #[serde(default)]
    pub pve_addr: Option<String>,
    #[serde(default)]
    pub pve_fp: Option<String>,
}

/// One entry of `GET /nodes`.
#[derive(Debug, Deserialize)]
pub(super) struct NodeEntry {
    pub node: String,
    #[serde(default)]
    pub ssl_fingerprint: Option<String>,
}

/// A fingerprint as Proxmox reports it, or `None` when it is missing or malformed.
pub(super) fn reported_fingerprint(raw: Option<&str>) -> Option<Fingerprint> {
    raw.and_then(|raw| Fingerprint::parse(raw).ok())
}

/// Perl hands booleans through as 0/1, and occasionally as strings; accept them all, as
/// Proxmox's own `proxmox_serde::perl` does.
fn perl_bool<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<bool>, D::Error> {
    let value = Option::<serde_json::Value>::deserialize(deserializer)?;
    Ok(match value {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::Bool(b)) => Some(b),
        Some(serde_json::Value::Number(n)) => Some(n.as_f64().is_some_and(|n| n != 0.0)),
        Some(serde_json::Value::String(s)) => match s.to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Some(true),
            "0" | "false" | "no" | "off" | "" => Some(false),
            other => return Err(de::Error::custom(format!("not a boolean: {other}"))),
        },
        Some(other) => return Err(de::Error::custom(format!("not a boolean: {other}"))),
    })
}

/// Values read from corosync.conf (`nodeid`, `quorum_votes`, `config_version`) arrive as
/// strings or integers depending on the code path; anything else reads as absent rather than
/// failing the whole answer.
fn perl_u64<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    let value = Option::<serde_json::Value>::deserialize(deserializer)?;
    Ok(match value {
        Some(serde_json::Value::Number(n)) => n.as_u64(),
        Some(serde_json::Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(json: &str) -> StatusReport {
        let entries: Vec<StatusEntry> = serde_json::from_str(json).expect("valid status json");
        StatusReport::from_entries(&entries)
    }

    #[test]
    fn clustered_status_counts_offline_nodes_whatever_the_order() {
        let report = report(
            r#"[
            {"type":"node","id":"node/pve3","name":"pve3","nodeid":3,"local":0,"online":0,"level":"c"},
            {"type":"cluster","id":"cluster","name":"prod","nodes":3,"quorate":1,"version":"7"},
            {"type":"node","id":"node/pve1","name":"pve1","nodeid":1,"ip":"127.0.0.2","local":1,"online":1,"level":""},
            {"type":"node","id":"node/pve2","name":"pve2","nodeid":"2","local":0,"online":"1","level":""}]"#,
        );
        assert_eq!(
            report.health,
            ClusterHealth {
                quorate: Some(true),
                node_count: 3,
                nodes_online: 2
            }
        );
        assert_eq!(report.config_version, Some(7));
        let local = report.local_node().expect("a local node");
        assert_eq!(
            (local.name.as_str(), local.nodeid, local.ip.as_deref()),
            ("pve1", Some(1), Some("127.0.0.2"))
        );
        let pve2 = report
            .nodes
            .iter()
            .find(|n| n.name == "pve2")
            .expect("pve2");
        assert_eq!(pve2.nodeid, Some(2));
    }

    #[test]
    fn standalone_node_has_no_quorum_entry() {
        let report = report(
            r#"[{"type":"node","id":"node/pve","name":"pve","nodeid":0,"ip":"127.0.0.1","local":1,"online":1,"level":""}]"#,
        );
        assert_eq!(
            report.health,
            ClusterHealth {
                quorate: None,
                node_count: 1,
                nodes_online: 1
            }
        );
        assert_eq!(report.config_version, None);
        assert_eq!(report.nodes[0].nodeid, None);
    }

    #[test]
    fn lost_quorum_reads_as_not_quorate() {
        let report = report(
            r#"[{"type":"cluster","quorate":0},{"type":"node","name":"a","online":1},{"type":"node","name":"b","online":0}]"#,
        );
        assert_eq!(report.health.quorate, Some(false));
    }

    #[test]
    fn join_info_takes_node_ids_as_strings_or_integers() {
        let info: JoinInfoData = serde_json::from_str(
            r#"{"preferred_node":"pve1","config_digest":"abc","totem":{},"nodelist":[
              {"name":"pve1","nodeid":"1","pve_addr":"127.0.0.2","pve_fp":"aa","quorum_votes":"1"},
              {"name":"pve2","nodeid":2,"pve_addr":"::1","quorum_votes":1,"ring0_addr":"127.0.2.2"},
              {"name":"pve3"}]}"#,
        )
        .expect("join info parses");
        let ids: Vec<Option<u64>> = info.nodelist.iter().map(|n| n.nodeid).collect();
        assert_eq!(ids, vec![Some(1), Some(2), None]);
        assert_eq!(reported_fingerprint(Some("aa")), None);
    }
}
