//! The OpenAPI 3 document, generated from the handlers' annotations and these body types.

use axum::Json;
use serde::Serialize;
use serde_json::Value;
use utoipa::{OpenApi, ToSchema};

use crate::cluster::{ClusterView, Transition};
use crate::domain::{AuthMethod, ClusterStatus, StatusReason};
use crate::proxmox::members::MemberView;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "proxmoxer",
        description = "Registry and health monitor for Proxmox VE clusters.",
    ),
    paths(
        super::clusters::clusters_list,
        super::clusters::clusters_create,
        super::clusters::clusters_get,
        super::clusters::clusters_delete,
        super::clusters::clusters_history,
        super::events::events,
        openapi_json,
        super::health,
        super::metrics,
    ),
    components(schemas(
        ClusterView,
        MemberView,
        ClusterList,
        RegisterRequest,
        ErrorBody,
        HistoryList,
        Transition,
        Health,
        ClusterStatus,
        StatusReason,
        AuthMethod,
    ))
)]
pub struct ApiDoc;

/// `{"clusters": [...], "total": N}`, newest first; a page (`limit`) adds `next_cursor`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ClusterList {
    /// The clusters the filter keeps, or one page of them.
    pub clusters: Vec<ClusterView>,
    /// How many clusters the filter keeps in all, the same on every page.
    pub total: usize,
    /// Only with `limit`: pass it as `cursor` for the next page; null on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// `{"transitions": [...], "total": N}`, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct HistoryList {
    pub transitions: Vec<Transition>,
    pub total: usize,
}

/// Every error: `code` is a PascalCase word from proxmoxer's error table, e.g. `BadRequest`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
    /// Specifics, e.g. `{"field": "name", "reason": "..."}` (for a query parameter, `field`
    /// is its name), or null.
    pub details: Option<Value>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    pub status: String,
    /// How many clusters are registered.
    pub clusters: usize,
}

/// A registration: a password, or `token_id` with `token_secret`.
#[derive(Debug, Serialize, ToSchema)]
pub struct RegisterRequest {
    /// Unique, 1 to 255 characters, no control characters.
    pub name: String,
    /// An http or https URL with a host, e.g. `https://pve.example.com:8006`.
    pub api_endpoint: String,
    /// `user@realm`, e.g. `root@pam`; for a token, the token's user.
    pub username: String,
    pub password: Option<String>,
    /// The token's name, e.g. `monitoring` (or `user@realm!monitoring`).
    pub token_id: Option<String>,
    pub token_secret: Option<String>,
    /// SHA-256 fingerprint of the node's certificate, any case, colons optional.
    pub fingerprint: Option<String>,
}

/// This document.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI 3 document", body = Object)))]
pub(super) async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
