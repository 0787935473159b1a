//! A cluster's members: who they are, how to reach each, and which certificate each must
//! present.
//!
//! Pins are learned only from what a member said over a channel that was already verified
//! (the registered endpoint under the operator's trust, or a member under its learned pin),
//! never from the server being verified. A connection accepted only because verification is
//! off vouches for nothing, so such a cluster learns no pins and contacts no other member.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::ProxmoxError;
use super::wire::{JoinInfoData, NodeEntry, StatusReport, reported_fingerprint};
use crate::domain::{Cidr, Endpoint};
use crate::tls::Fingerprint;

/// A member as one discovery reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveredMember {
    /// The Proxmox node name.
    pub name: String,
    /// Corosync's node id, when known.
    pub nodeid: Option<u32>,
    /// The address pveproxy uses for the node (`pve_addr`), when known.
    pub address: Option<String>,
    /// The SHA-256 fingerprint of the certificate the node serves on 8006 (`pve_fp`).
    pub fingerprint: Option<Fingerprint>,
}

/// Every member of a cluster, as one discovery saw them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovery {
    /// The members, offline ones included.
    pub members: Vec<DiscoveredMember>,
}

impl Discovery {
    pub(super) fn from_join_info(info: JoinInfoData) -> Self {
        Self {
            members: info
                .nodelist
                .into_iter()
                .map(|node| DiscoveredMember {
                    name: node.name,
                    nodeid: node.nodeid.and_then(|id| u32::try_from(id).ok()),
                    address: node.pve_addr.filter(|a| !a.is_empty()),
                    fingerprint: reported_fingerprint(node.pve_fp.as_deref()),
                })
                .collect(),
        }
    }

    /// A node in no cluster: its only member is the node that answered.
    pub fn standalone(status: &StatusReport) -> Self {
        Self {
            members: status
                .local_node()
                .map(|node| DiscoveredMember {
                    name: node.name.clone(),
                    nodeid: node.nodeid,
                    address: node.ip.clone(),
                    fingerprint: None,
                })
                .into_iter()
                .collect(),
        }
    }

    /// When join information is unavailable: addresses from `/cluster/status`, fingerprints
    /// from `/nodes`.
    pub(super) fn from_status_and_nodes(status: &StatusReport, nodes: &[NodeEntry]) -> Self {
        Self {
            members: status
                .nodes
                .iter()
                .map(|node| DiscoveredMember {
                    name: node.name.clone(),
                    nodeid: node.nodeid,
                    address: node.ip.clone(),
                    fingerprint: nodes
                        .iter()
                        .find(|n| n.node == node.name)
                        .and_then(|n| reported_fingerprint(n.ssl_fingerprint.as_deref())),
                })
                .collect(),
        }
    }

    /// The fingerprint this discovery vouches for on the named member.
    pub fn fingerprint_of(&self, name: &str) -> Option<Fingerprint> {
        self.members
            .iter()
            .find(|m| m.name == name)
            .and_then(|m| m.fingerprint)
    }
}

/// Join information fails on a node in no cluster: 500 on older releases, 424 on newer.
pub(super) fn is_not_in_a_cluster(error: &ProxmoxError) -> bool {
    matches!(error, ProxmoxError::Http { status: 500 | 424, reason }
        if reason.to_ascii_lowercase().contains("not in a cluster"))
}

/// What the registered endpoint's channel proves about what it says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelTrust {
    /// Plain `http://`: no certificates anywhere; members are used without pins.
    Plain,
    /// TLS verified by a pin, a CA file or the system roots: its word is good for pins.
    Verified,
    /// TLS accepted only because `tls.insecure_skip_verify` is on: it vouches for nothing.
    Unverified,
}

impl ChannelTrust {
    /// The trust of a cluster registered at `endpoint` with `pin`.
    pub fn of(endpoint: &Endpoint, pin: Option<Fingerprint>, insecure_skip_verify: bool) -> Self {
        if !endpoint.is_https() {
            Self::Plain
        } else if pin.is_some() || !insecure_skip_verify {
            Self::Verified
        } else {
            Self::Unverified
        }
    }
}

/// The daemon-wide member settings.
#[derive(Debug, Clone, Default)]
pub struct MemberPolicy {
    /// `monitor.member_discovery`: off keeps to the registered endpoint alone.
    pub discovery: bool,
    /// `proxmox.member_networks`: discovered addresses outside these are never contacted;
    /// empty means any address.
    pub networks: Arc<[Cidr]>,
}

impl MemberPolicy {
    /// Why `member` must not be contacted, or `None` when it may be.
    pub fn refusal(&self, member: &Member, trust: ChannelTrust) -> Option<String> {
        if member.registered {
            return None;
        }
        if !self.discovery || trust == ChannelTrust::Unverified {
            return Some(String::new());
        }
        let endpoint = member.endpoint.as_ref()?;
        if !self.networks.is_empty() {
            let inside = member
                .address
                .as_deref()
                .and_then(|a| a.trim_matches(['[', ']']).parse().ok())
                .is_some_and(|ip| self.networks.iter().any(|net| net.contains(ip)));
            if !inside {
                return Some(format!(
                    "not contacted: {} is outside proxmox.member_networks",
                    member.address.as_deref().unwrap_or("the address")
                ));
            }
        }
        if endpoint.is_https() && member.fingerprint.is_none() {
            return Some("not contacted: no fingerprint was learned for its certificate".into());
        }
        None
    }

    /// Whether `member` may be contacted at all.
    pub fn may_contact(&self, member: &Member, trust: ChannelTrust) -> bool {
        member.endpoint.is_some() && self.refusal(member, trust).is_none()
    }
}

/// A member as the daemon knows it: persisted with the cluster, so failover works after a
/// restart even while the registered node is down.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Member {
    /// The Proxmox node name.
    pub name: String,
    /// Corosync's node id, when known.
    pub nodeid: Option<u32>,
    /// The address Proxmox reported for it (`pve_addr`).
    pub address: Option<String>,
    /// Where the daemon reaches it; for the registered node, the registered endpoint.
    pub endpoint: Option<Endpoint>,
    /// The learned pin: the fingerprint its certificate must have.
    pub fingerprint: Option<Fingerprint>,
    /// Proxmox's view: online in the newest `/cluster/status`.
    pub online: Option<bool>,
    /// The daemon's view: whether the latest attempt of any kind reached it.
    pub reachable: Option<bool>,
    /// Why the latest attempt failed, or why it is not contacted.
    pub last_error: Option<String>,
    /// The node behind the registered endpoint.
    #[serde(default)]
    pub registered: bool,
    /// Discoveries in a row that did not list it; at two it is removed.
    #[serde(default)]
    pub missed_discoveries: u32,
}

/// A member as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct MemberView {
    /// The Proxmox node name.
    pub name: String,
    /// Corosync's node id, when known.
    pub nodeid: Option<u32>,
    /// The endpoint the daemon uses for it; null when its address is unknown.
    pub endpoint: Option<String>,
    /// Proxmox's view of the node.
    pub online: Option<bool>,
    /// The daemon's view: null before any attempt.
    pub reachable: Option<bool>,
    /// The certificate fingerprint it must present, uppercase with colons.
    #[schema(value_type = Option<String>)]
    pub fingerprint: Option<Fingerprint>,
    /// Why the latest attempt failed, or why it is not contacted.
    pub last_error: Option<String>,
}

impl Member {
    /// The registered node before anything else is known of it.
    pub fn registered(name: &str, endpoint: &Endpoint) -> Self {
        Self {
            name: name.to_owned(),
            nodeid: None,
            address: None,
            endpoint: Some(endpoint.clone()),
            fingerprint: None,
            online: None,
            reachable: None,
            last_error: None,
            registered: true,
            missed_discoveries: 0,
        }
    }

    /// The API's view.
    pub fn view(&self) -> MemberView {
        MemberView {
            name: self.name.clone(),
            nodeid: self.nodeid,
            endpoint: self.endpoint.as_ref().map(|e| e.as_str().to_owned()),
            online: self.online,
            reachable: self.reachable,
            fingerprint: self.fingerprint,
            last_error: self.last_error.clone(),
        }
    }
}

/// Marks the members the daemon does not contact: never reached, with the reason (if one is
/// worth showing) as their error.
pub fn note_refusals(members: &mut [Member], policy: &MemberPolicy, trust: ChannelTrust) {
    for member in members {
        if let Some(refusal) = policy.refusal(member, trust) {
            member.reachable = None;
            member.last_error = Some(refusal).filter(|r| !r.is_empty());
        }
    }
}

/// What a monitor knows of the members after a check or a discovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberReport {
    /// Every known member, ordered by name.
    pub members: Vec<Member>,
    /// The endpoint that answered the newest check; `None` when none did.
    pub active: Option<Endpoint>,
    /// The registered node's operator pin, which follows a vouched-for rotation.
    pub pin: Option<Fingerprint>,
    /// The first discovery of a cluster stored before members were tracked: what it finds
    /// is the starting point, not a wave of joins.
    pub baseline: bool,
}

/// Folds a discovery into the known members: new ones join, known ones take the newest
/// address and pin, and one missing from two discoveries in a row leaves. The registered node
/// keeps its registered endpoint and never leaves. Pins are kept only from a verified channel.
pub fn merge(
    current: &[Member],
    discovery: &Discovery,
    registered: &Endpoint,
    trust: ChannelTrust,
) -> Vec<Member> {
    let registered_name = current
        .iter()
        .find(|m| m.registered)
        .map(|m| m.name.as_str());
    let mut merged: Vec<Member> = Vec::with_capacity(discovery.members.len());
    for found in &discovery.members {
        let is_registered = registered_name == Some(found.name.as_str());
        let known = current.iter().find(|m| m.name == found.name);
        let mut member = known.cloned().unwrap_or_else(|| Member {
            name: found.name.clone(),
            nodeid: None,
            address: None,
            endpoint: None,
            fingerprint: None,
            online: None,
            reachable: None,
            last_error: None,
            registered: false,
            missed_discoveries: 0,
        });
        member.nodeid = found.nodeid.or(member.nodeid);
        member.address = found.address.clone().or(member.address);
        member.endpoint = if is_registered {
            Some(registered.clone())
        } else {
            member
                .address
                .as_deref()
                .and_then(|a| registered.for_member(a))
        };
        member.fingerprint = match trust {
            ChannelTrust::Verified => found.fingerprint.or(member.fingerprint),
            ChannelTrust::Plain | ChannelTrust::Unverified => None,
        };
        member.registered = is_registered;
        member.missed_discoveries = 0;
        merged.push(member);
    }
    for gone in current
        .iter()
        .filter(|m| !discovery.members.iter().any(|d| d.name == m.name))
    {
        let missed = gone.missed_discoveries.saturating_add(1);
        if gone.registered || missed < 2 {
            merged.push(Member {
                missed_discoveries: if gone.registered { 0 } else { missed },
                ..gone.clone()
            });
        }
    }
    merged.sort_by(|a, b| a.name.cmp(&b.name));
    merged
}

/// With discovery off: the members are what `/cluster/status` lists, reachable only through
/// the registered endpoint.
pub fn from_status(
    current: &[Member],
    status: &StatusReport,
    registered: &Endpoint,
) -> Vec<Member> {
    let registered_name = current
        .iter()
        .find(|m| m.registered)
        .map(|m| m.name.clone())
        .or_else(|| status.local_node().map(|n| n.name.clone()));
    let mut members: Vec<Member> = status
        .nodes
        .iter()
        .map(|node| {
            let is_registered = registered_name.as_deref() == Some(node.name.as_str());
            let known = current.iter().find(|m| m.name == node.name);
            Member {
                name: node.name.clone(),
                nodeid: node.nodeid,
                address: node.ip.clone(),
                endpoint: is_registered.then(|| registered.clone()),
                fingerprint: known.and_then(|m| m.fingerprint),
                online: Some(node.online),
                reachable: known.and_then(|m| m.reachable),
                last_error: known.and_then(|m| m.last_error.clone()),
                registered: is_registered,
                missed_discoveries: 0,
            }
        })
        .collect();
    if !members.iter().any(|m| m.registered)
        && let Some(kept) = current.iter().find(|m| m.registered)
    {
        members.push(kept.clone());
    }
    members.sort_by(|a, b| a.name.cmp(&b.name));
    members
}

/// Takes Proxmox's view of who is online from one `/cluster/status`.
pub fn apply_online(members: &mut [Member], status: &StatusReport) {
    for member in members {
        member.online = status
            .nodes
            .iter()
            .find(|n| n.name == member.name)
            .map(|n| n.online);
    }
}

/// Whether `/cluster/status` names a node that is not a known member.
pub fn lists_unknown_node(members: &[Member], status: &StatusReport) -> bool {
    status
        .nodes
        .iter()
        .any(|n| !members.iter().any(|m| m.name == n.name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(byte: u8) -> Fingerprint {
        Fingerprint::parse(&hex::encode([byte; 32])).expect("fingerprint")
    }

    fn found(name: &str, address: &str, fingerprint: u8) -> DiscoveredMember {
        DiscoveredMember {
            name: name.into(),
            nodeid: None,
            address: Some(address.into()),
            fingerprint: Some(fp(fingerprint)),
        }
    }

    fn registered() -> Endpoint {
        Endpoint::parse("https://pve1.example.com:8006").expect("endpoint")
    }

    #[test]
    fn discovery_adds_members_with_pins_and_keeps_the_registered_endpoint() {
        let start = vec![Member::registered("pve1", &registered())];
        let discovery = Discovery {
            members: vec![found("pve2", "127.0.0.3", 2), found("pve1", "127.0.0.2", 1)],
        };
        let merged = merge(&start, &discovery, &registered(), ChannelTrust::Verified);
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[0].endpoint, Some(registered()));
        assert!(merged[0].registered);
        assert_eq!(
            merged[1].endpoint.as_ref().map(Endpoint::as_str),
            Some("https://127.0.0.3:8006")
        );
        assert_eq!(merged[1].fingerprint, Some(fp(2)));
    }

    #[test]
    fn an_unverified_channel_learns_no_pins() {
        let start = vec![Member::registered("pve1", &registered())];
        let discovery = Discovery {
            members: vec![found("pve2", "127.0.0.3", 2)],
        };
        let merged = merge(&start, &discovery, &registered(), ChannelTrust::Unverified);
        assert!(merged.iter().all(|m| m.fingerprint.is_none()));
        let policy = MemberPolicy {
            discovery: true,
            networks: Arc::from([]),
        };
        let pve2 = merged.iter().find(|m| m.name == "pve2").expect("pve2");
        assert!(!policy.may_contact(pve2, ChannelTrust::Unverified));
        assert!(pve2.endpoint.is_some());
    }

    #[test]
    fn a_member_leaves_after_two_discoveries_without_it() {
        let start = vec![Member::registered("pve1", &registered())];
        let both = Discovery {
            members: vec![found("pve1", "127.0.0.2", 1), found("pve2", "127.0.0.3", 2)],
        };
        let only_pve1 = Discovery {
            members: vec![found("pve1", "127.0.0.2", 1)],
        };
        let trust = ChannelTrust::Verified;
        let members = merge(&start, &both, &registered(), trust);
        let once = merge(&members, &only_pve1, &registered(), trust);
        assert_eq!(once.len(), 2, "one miss keeps it");
        let twice = merge(&once, &only_pve1, &registered(), trust);
        assert_eq!(
            twice.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
            vec!["pve1"]
        );
        let back = merge(&once, &both, &registered(), trust);
        assert_eq!(back.iter().map(|m| m.missed_discoveries).max(), Some(0));
    }

    #[test]
    fn member_networks_exclude_addresses_outside_them() {
        let policy = MemberPolicy {
            discovery: true,
            networks: Arc::from([Cidr::parse("127.0.0.0/30").expect("cidr")]),
        };
        let discovery = Discovery {
            members: vec![found("pve2", "127.0.0.3", 2), found("pve3", "127.0.0.4", 3)],
        };
        let start = vec![Member::registered("pve1", &registered())];
        let merged = merge(&start, &discovery, &registered(), ChannelTrust::Verified);
        let allowed: Vec<&str> = merged
            .iter()
            .filter(|m| policy.may_contact(m, ChannelTrust::Verified))
            .map(|m| m.name.as_str())
            .collect();
        assert_eq!(allowed, vec!["pve1", "pve2"]);
    }
}
