//! The API's error type. Every failure a client can see is one of these, rendered as the
//! specification's `{"code","message","details"}` JSON with `code` the reason phrase.

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::domain::ValidationError;
use crate::proxmox::ProxmoxError;
use crate::registry::RegistryError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    BadRequest { message: String, details: Value },
    #[error("Authentication failed")]
    Unauthorized { details: Value },
    #[error("Insufficient privileges on Proxmox")]
    Forbidden { details: Value },
    #[error("Cluster not found")]
    ClusterNotFound,
    #[error("Route not found")]
    RouteNotFound,
    #[error("Method not allowed")]
    MethodNotAllowed,
    #[error("Cluster already exists")]
    Conflict { details: Value },
    #[error("Request body is too large")]
    PayloadTooLarge,
    #[error("Content-Type must be application/json")]
    UnsupportedMediaType,
    /// The cause is logged, never sent: it may name paths or internals.
    #[error("Internal server error")]
    Internal(String),
    #[error("Service unavailable")]
    Unavailable { reason: String },
    #[error("Failed to connect to Proxmox")]
    BadGateway { details: Value },
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            Self::Forbidden { .. } => StatusCode::FORBIDDEN,
            Self::ClusterNotFound | Self::RouteNotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Conflict { .. } => StatusCode::CONFLICT,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::BadGateway { .. } => StatusCode::BAD_GATEWAY,
        }
    }

    fn details(&self) -> Value {
        match self {
            Self::BadRequest { details, .. }
            | Self::Unauthorized { details }
            | Self::Forbidden { details }
            | Self::Conflict { details }
            | Self::BadGateway { details } => details.clone(),
            Self::Unavailable { reason } => json!({ "reason": reason }),
            _ => Value::Null,
        }
    }

    pub fn bad_request(message: impl Into<String>, details: Value) -> Self {
        Self::BadRequest {
            message: message.into(),
            details,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if let Self::Internal(cause) = &self {
            tracing::error!(error = %cause, "internal error");
        }
        let code: String = status
            .canonical_reason()
            .unwrap_or("Error")
            .split_whitespace()
            .collect();
        let body = json!({
            "code": code,
            "message": self.to_string(),
            "details": self.details(),
        });
        (status, Json(body)).into_response()
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        Self::bad_request(e.message, json!({ "field": e.field, "reason": e.reason }))
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        match rejection.status() {
            StatusCode::PAYLOAD_TOO_LARGE => Self::PayloadTooLarge,
            StatusCode::UNSUPPORTED_MEDIA_TYPE => Self::UnsupportedMediaType,
            _ => Self::bad_request(
                "Request body is not valid JSON",
                json!({ "reason": rejection.body_text() }),
            ),
        }
    }
}

impl From<ProxmoxError> for ApiError {
    fn from(e: ProxmoxError) -> Self {
        match e {
            ProxmoxError::AuthenticationFailed => Self::Unauthorized {
                details: json!({ "reason": "Proxmox rejected the credentials (user, password or token)" }),
            },
            ProxmoxError::TwoFactorRequired => Self::Unauthorized {
                details: json!({
                    "reason": "two-factor authentication is enabled for this user; \
                               register the cluster with an API token instead"
                }),
            },
            ProxmoxError::Forbidden(reason) => Self::Forbidden {
                details: json!({
                    "privilege": "Sys.Audit",
                    "path": "/",
                    "reason": format!(
                        "the user needs Sys.Audit on / (for example the PVEAuditor role) \
                         to read cluster status; Proxmox said: {reason}"
                    ),
                }),
            },
            // Show what the server presented, so the operator can compare it with the GUI and
            // register again with it pinned; never trust it on our own.
            ProxmoxError::CertificateNotTrusted { presented, detail } => Self::BadGateway {
                details: json!({
                    "reason": "certificate not trusted",
                    "fingerprint": presented.to_string(),
                    "error": detail,
                }),
            },
            ProxmoxError::CertificateMismatch { presented, pinned } => Self::BadGateway {
                details: json!({
                    "reason": "certificate not trusted",
                    "fingerprint": presented.to_string(),
                    "error": format!("the certificate does not match the pinned fingerprint {pinned}"),
                }),
            },
            other => Self::BadGateway {
                details: json!({ "reason": other.to_string() }),
            },
        }
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Conflict => Self::Conflict {
                details: Value::Null,
            },
            RegistryError::NotFound => Self::ClusterNotFound,
            RegistryError::Proxmox(e) => e.into(),
            RegistryError::Store(e) => Self::Internal(e.to_string()),
            RegistryError::Secrets(e) => Self::Internal(e.to_string()),
            RegistryError::Task(e) => Self::Internal(e),
        }
    }
}
