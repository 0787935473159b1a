//! The API's error type. Every failure a client can see is one of these, rendered as the
//! specification's `{"code","message","details"}` JSON. Status, code and message of every
//! variant come from one table, `ApiError::answer`.

use std::fmt;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::domain::ValidationError;
use crate::proxmox::ProxmoxError;
use crate::registry::RegistryError;
use crate::store::StoreError;

#[derive(Debug)]
pub enum ApiError {
    /// Invalid input: a field that fails validation, a malformed or non-object body, a bad
    /// query parameter. The message says which; `details` usually names the field.
    BadRequest { message: String, details: Value },
    /// Proxmox rejected the credentials, or the account needs a second factor.
    Unauthorized { details: Value },
    /// The Proxmox user may log in but lacks the privilege to read cluster status.
    Forbidden { details: Value },
    /// No cluster with this id (also for ids that are not UUIDs).
    ClusterNotFound,
    /// No route matches the path.
    RouteNotFound,
    /// The route exists, but not with this method.
    MethodNotAllowed,
    /// A cluster with this name is already registered.
    Conflict { details: Value },
    /// The body is over [`super::MAX_BODY_BYTES`].
    PayloadTooLarge,
    /// A body that is not declared as `application/json`.
    UnsupportedMediaType,
    /// The client took longer than `server.header_timeout` to send a request's headers, or
    /// `server.request_timeout` to send its body; the connection is closed after this answer.
    RequestTimeout,
    /// The cause is logged, never sent: it may name paths or internals.
    Internal(String),
    /// The registry did not answer, or database writes are failing; `reason` says which.
    Unavailable { reason: String },
    /// The shared store (etcd) cannot be reached: reads go on, writes cannot be committed.
    StorageUnavailable { reason: String },
    /// Proxmox could not be reached or did not answer like Proxmox.
    BadGateway { details: Value },
    /// The API needs a bearer token and the request has none, or an unknown one.
    AuthenticationRequired,
    /// A valid token with the read role asked for a write.
    AdminRoleRequired,
}

/// One row of the error table: what a client sees for one variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Answer<'a> {
    status: StatusCode,
    /// The body's `code`: a PascalCase word clients match on.
    code: &'static str,
    /// The body's `message`.
    message: &'a str,
}

impl ApiError {
    /// The table of proxmoxer's errors: the one place that gives each variant its status, code
    /// and message. The codes are part of the v1 contract, which clients match on, so they are
    /// spelled out here rather than taken from the HTTP library's reason phrases: those follow
    /// the RFCs (413 is "Content Too Large" since RFC 9110) and would change our answers with a
    /// dependency upgrade.
    fn answer(&self) -> Answer<'_> {
        let (status, code, message) = match self {
            Self::BadRequest { message, .. } => {
                (StatusCode::BAD_REQUEST, "BadRequest", message.as_str())
            }
            Self::Unauthorized { .. } => (
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
                "Authentication failed",
            ),
            Self::Forbidden { .. } => (
                StatusCode::FORBIDDEN,
                "Forbidden",
                "Insufficient privileges on Proxmox",
            ),
            Self::ClusterNotFound => (StatusCode::NOT_FOUND, "NotFound", "Cluster not found"),
            Self::RouteNotFound => (StatusCode::NOT_FOUND, "NotFound", "Route not found"),
            Self::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "Method not allowed",
            ),
            Self::Conflict { .. } => (StatusCode::CONFLICT, "Conflict", "Cluster already exists"),
            Self::PayloadTooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "PayloadTooLarge",
                "Request body is too large",
            ),
            Self::UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UnsupportedMediaType",
                "Content-Type must be application/json",
            ),
            Self::RequestTimeout => (
                StatusCode::REQUEST_TIMEOUT,
                "RequestTimeout",
                "Request took too long to arrive",
            ),
            Self::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalServerError",
                "Internal server error",
            ),
            Self::Unavailable { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                "Service unavailable",
            ),
            Self::StorageUnavailable { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                "Storage unavailable",
            ),
            Self::BadGateway { .. } => (
                StatusCode::BAD_GATEWAY,
                "BadGateway",
                "Failed to connect to Proxmox",
            ),
            Self::AuthenticationRequired => (
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
                "Authentication required",
            ),
            Self::AdminRoleRequired => (
                StatusCode::FORBIDDEN,
                "Forbidden",
                "Token lacks the admin role",
            ),
        };
        Answer {
            status,
            code,
            message,
        }
    }

    pub fn status(&self) -> StatusCode {
        self.answer().status
    }

    fn details(&self) -> Value {
        match self {
            Self::BadRequest { details, .. }
            | Self::Unauthorized { details }
            | Self::Forbidden { details }
            | Self::Conflict { details }
            | Self::BadGateway { details } => details.clone(),
            Self::Unavailable { reason } | Self::StorageUnavailable { reason } => {
                json!({ "reason": reason })
            }
            Self::AuthenticationRequired | Self::AdminRoleRequired | Self::RequestTimeout => {
                json!({})
            }
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

/// The client-facing message, so logs and responses say the same thing.
impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.answer().message)
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Self::Internal(cause) = &self {
            tracing::error!(error = %cause, "internal error");
        }
        let Answer {
            status,
            code,
            message,
        } = self.answer();
        let body = json!({
            "code": code,
            "message": message,
            "details": self.details(),
        });
        let mut response = (status, Json(body)).into_response();
        if matches!(self, Self::AuthenticationRequired) {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(r#"Bearer realm="proxmoxer""#),
            );
        }
        response
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
            RegistryError::Invalid(e) => e.into(),
            RegistryError::Proxmox(e) => e.into(),
            RegistryError::Store(StoreError::Gone) => Self::ClusterNotFound,
            RegistryError::Store(StoreError::NameTaken) => Self::Conflict {
                details: Value::Null,
            },
            RegistryError::Store(e @ StoreError::Unavailable(_)) => Self::StorageUnavailable {
                reason: e.to_string(),
            },
            RegistryError::Store(e) => Self::Internal(e.to_string()),
            RegistryError::Secrets(e) => Self::Internal(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Which variant an error is. Adding a variant breaks this match, which leads to
    /// [`one_of_each`], so the table test cannot silently skip a new variant.
    fn variant(e: &ApiError) -> usize {
        match e {
            ApiError::BadRequest { .. } => 0,
            ApiError::Unauthorized { .. } => 1,
            ApiError::Forbidden { .. } => 2,
            ApiError::ClusterNotFound => 3,
            ApiError::RouteNotFound => 4,
            ApiError::MethodNotAllowed => 5,
            ApiError::Conflict { .. } => 6,
            ApiError::PayloadTooLarge => 7,
            ApiError::UnsupportedMediaType => 8,
            ApiError::Internal(_) => 9,
            ApiError::Unavailable { .. } => 10,
            ApiError::BadGateway { .. } => 11,
            ApiError::AuthenticationRequired => 12,
            ApiError::AdminRoleRequired => 13,
            ApiError::RequestTimeout => 14,
            ApiError::StorageUnavailable { .. } => 15,
        }
    }
    const VARIANTS: usize = 16;

    /// One error of every variant, with the status and code the v1 contract gives it (the
    /// specification and the README's error table).
    fn one_of_each() -> Vec<(ApiError, StatusCode, &'static str)> {
        vec![
            (
                ApiError::bad_request("Cluster name is required", Value::Null),
                StatusCode::BAD_REQUEST,
                "BadRequest",
            ),
            (
                ApiError::Unauthorized {
                    details: Value::Null,
                },
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
            ),
            (
                ApiError::Forbidden {
                    details: Value::Null,
                },
                StatusCode::FORBIDDEN,
                "Forbidden",
            ),
            (ApiError::ClusterNotFound, StatusCode::NOT_FOUND, "NotFound"),
            (ApiError::RouteNotFound, StatusCode::NOT_FOUND, "NotFound"),
            (
                ApiError::MethodNotAllowed,
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
            ),
            (
                ApiError::Conflict {
                    details: Value::Null,
                },
                StatusCode::CONFLICT,
                "Conflict",
            ),
            (
                ApiError::PayloadTooLarge,
                StatusCode::PAYLOAD_TOO_LARGE,
                "PayloadTooLarge",
            ),
            (
                ApiError::UnsupportedMediaType,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UnsupportedMediaType",
            ),
            (
                ApiError::Internal("disk full".to_owned()),
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalServerError",
            ),
            (
                ApiError::Unavailable {
                    reason: "the registry did not answer in time".to_owned(),
                },
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
            ),
            (
                ApiError::BadGateway {
                    details: Value::Null,
                },
                StatusCode::BAD_GATEWAY,
                "BadGateway",
            ),
            (
                ApiError::AuthenticationRequired,
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
            ),
            (
                ApiError::AdminRoleRequired,
                StatusCode::FORBIDDEN,
                "Forbidden",
            ),
            (
                ApiError::RequestTimeout,
                StatusCode::REQUEST_TIMEOUT,
                "RequestTimeout",
            ),
            (
                ApiError::StorageUnavailable {
                    reason: "storage unavailable: etcd is unreachable".to_owned(),
                },
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
            ),
        ]
    }

    fn is_pascal_case_word(code: &str) -> bool {
        code.starts_with(|c: char| c.is_ascii_uppercase())
            && code.chars().all(|c| c.is_ascii_alphanumeric())
    }

    #[test]
    fn every_variant_has_its_contract_status_and_a_pascal_case_code() {
        let all = one_of_each();
        let mut seen: Vec<usize> = all.iter().map(|(e, _, _)| variant(e)).collect();
        seen.sort_unstable();
        assert_eq!(
            seen,
            (0..VARIANTS).collect::<Vec<_>>(),
            "one error of every variant"
        );
        for (error, status, code) in &all {
            let answer = error.answer();
            assert!(
                is_pascal_case_word(answer.code),
                "{error:?}: code {:?}",
                answer.code
            );
            assert_eq!((answer.status, answer.code), (*status, *code), "{error:?}");
            assert_eq!(error.status(), *status, "{error:?}");
            assert!(!answer.message.is_empty(), "{error:?}");
            assert_eq!(error.to_string(), answer.message, "{error:?}");
        }
    }

    #[tokio::test]
    async fn the_response_body_carries_the_table_row_and_hides_internal_causes() {
        let response =
            ApiError::Internal("/var/lib/proxmoxer/db: disk full".to_owned()).into_response();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("read the error body");
        let body: Value = serde_json::from_slice(&bytes).expect("the error body is JSON");
        assert_eq!(
            body,
            json!({
                "code": "InternalServerError",
                "message": "Internal server error",
                "details": null,
            })
        );
    }
}
