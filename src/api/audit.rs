//! The audit trail: one line at info, target `audit`, for every write the API is asked for,
//! refused ones included. It names who (token name or `anonymous`), from where, what (method,
//! path, cluster) and the answer's status; never a secret, a header value or a body.

use std::net::SocketAddr;

use axum::http::Method;
use axum::response::{IntoResponse, Response};

use ractor::{ActorRef, call_t};

use crate::cluster::ClusterView;
use crate::domain::ClusterId;
use crate::registry::RegistryMsg;

/// How long a write waits for the registry to name its cluster before logging without a name.
const LOOKUP_TIMEOUT_MS: u64 = 1_000;

/// The cluster a write was about, for its audit line. Handlers that know it attach it to
/// their response with [`AuditSubject::tag`], whatever the outcome.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditSubject {
    /// The cluster's id, once known.
    pub id: Option<ClusterId>,
    /// The cluster's name, once known.
    pub name: Option<String>,
}

impl AuditSubject {
    /// The subject of a write about `view`.
    pub fn of(view: &ClusterView) -> Self {
        Self {
            id: Some(view.id),
            name: Some(view.name.clone()),
        }
    }

    /// The subject of a write about the cluster `id`, named as the registry knows it now; a
    /// cluster the registry does not know, or a registry that does not answer, leaves the name
    /// out (the write's own answer will say what went wrong).
    pub async fn lookup(registry: &ActorRef<RegistryMsg>, id: ClusterId) -> Self {
        let name = call_t!(registry, RegistryMsg::Get, LOOKUP_TIMEOUT_MS, id)
            .ok()
            .flatten()
            .map(|view| view.name);
        Self { id: Some(id), name }
    }

    /// Attaches this subject to `response` for the audit line, and returns it.
    pub fn tag(self, response: impl IntoResponse) -> Response {
        let mut response = response.into_response();
        response.extensions_mut().insert(self);
        response
    }
}

/// The audit line of one write request.
pub(super) struct AuditRecord<'a> {
    pub caller: &'a str,
    pub client: Option<SocketAddr>,
    pub method: &'a Method,
    pub path: &'a str,
    pub subject: Option<&'a AuditSubject>,
    pub status: u16,
}

impl AuditRecord<'_> {
    pub(super) fn log(&self) {
        let client = super::auth::client_label(self.client);
        // Unknown ones are left out of the line rather than shown empty.
        let id = self.subject.and_then(|s| s.id).map(|id| id.to_string());
        let name = self.subject.and_then(|s| s.name.as_deref());
        tracing::info!(
            target: "audit",
            token = self.caller,
            client,
            method = %self.method,
            path = self.path,
            cluster_id = id,
            cluster_name = name,
            status = self.status,
            "api write"
        );
    }
}
