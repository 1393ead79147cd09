//! The one domain error of the control plane and its one HTTP mapping.
//! Internal detail is logged, never sent.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use byteport_store::StoreError;
use byteport_types::InvalidTransition;
use byteport_types::api::{ErrorBody, ErrorDetail};

/// Everything an API operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Malformed input: bad JSON, unknown fields, bad names or sizes.
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    /// Not logged in, or the credentials are wrong or expired.
    #[error("{0}")]
    Unauthorized(String),
    /// Logged in but not allowed (only for resources the caller may know of).
    #[error("{0}")]
    Forbidden(String),
    /// Absent, or hidden from the caller: the two are indistinguishable.
    #[error("{kind} {id} not found")]
    NotFound { kind: &'static str, id: String },
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    InvalidTransition(#[from] InvalidTransition),
    #[error("quota {quota} exceeded: this needs {requested}, the project uses {used} of {limit}")]
    QuotaExceeded {
        quota: &'static str,
        limit: u64,
        used: u64,
        requested: u64,
    },
    /// The same `Idempotency-Key` was sent with another body.
    #[error("{0}")]
    Unprocessable(String),
    #[error("the body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("{0}")]
    Timeout(String),
    /// Too many requests in a short time; try again after the seconds
    /// given (`Retry-After`).
    #[error("{0}")]
    RateLimited(String, u64),
    /// A part the request needs (a node, a guest agent) cannot be reached.
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error")]
    Internal(String),
}

impl AppError {
    pub fn bad(code: &'static str, message: impl Into<String>) -> Self {
        AppError::BadRequest {
            code,
            message: message.into(),
        }
    }

    pub fn not_found(kind: &'static str, id: impl std::fmt::Display) -> Self {
        AppError::NotFound {
            kind,
            id: id.to_string(),
        }
    }

    pub fn internal(e: impl std::fmt::Display) -> Self {
        AppError::Internal(e.to_string())
    }

    pub fn status(&self) -> StatusCode {
        match self {
            AppError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            AppError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            AppError::Forbidden(_) | AppError::QuotaExceeded { .. } => StatusCode::FORBIDDEN,
            AppError::NotFound { .. } => StatusCode::NOT_FOUND,
            AppError::Conflict(_) | AppError::InvalidTransition(_) => StatusCode::CONFLICT,
            AppError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            AppError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            // Not 408, which tells clients to send the request again.
            AppError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            AppError::RateLimited(..) => StatusCode::TOO_MANY_REQUESTS,
            AppError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            AppError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            AppError::BadRequest { code, .. } => code,
            AppError::Unauthorized(_) => "unauthorized",
            AppError::Forbidden(_) => "forbidden",
            AppError::NotFound { .. } => "not_found",
            AppError::Conflict(_) => "conflict",
            AppError::InvalidTransition(_) => "invalid_transition",
            AppError::QuotaExceeded { .. } => "quota_exceeded",
            AppError::Unprocessable(_) => "idempotency_mismatch",
            AppError::TooLarge(_) => "body_too_large",
            AppError::Timeout(_) => "timeout",
            AppError::RateLimited(..) => "rate_limited",
            AppError::Unavailable(_) => "unavailable",
            AppError::Internal(_) => "internal",
        }
    }
}

impl From<StoreError> for AppError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => AppError::not_found("resource", "requested"),
            StoreError::Conflict(m) => AppError::Conflict(m),
            StoreError::QuotaExceeded {
                quota,
                limit,
                used,
                requested,
            } => AppError::QuotaExceeded {
                quota,
                limit,
                used,
                requested,
            },
            StoreError::Schema(m) => AppError::Internal(m),
            StoreError::Db(e) => AppError::Internal(format!("database: {e}")),
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        if let AppError::Internal(detail) = &self {
            tracing::error!(%detail, "internal error");
        }
        let status = self.status();
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code().into(),
                message: self.to_string(),
            },
        };
        let mut resp = (status, axum::Json(body)).into_response();
        if let AppError::RateLimited(_, secs) = &self
            && let Ok(v) = axum::http::HeaderValue::from_str(&secs.to_string())
        {
            resp.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, v);
        }
        resp.extensions_mut().insert(ErrorCode(self.code()));
        resp
    }
}

/// Left on an error response so the audit log can record the code.
#[derive(Clone, Copy, Debug)]
pub struct ErrorCode(pub &'static str);

pub type AppResult<T> = Result<T, AppError>;
