//! Extractors whose rejections speak the API's error format.

use crate::app::Ctx;
use crate::error::AppError;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

/// JSON body; malformed JSON is 400, a well-formed body of the wrong shape
/// (not an object, unknown or missing fields, wrong types, bad names) is
/// 422, a body over the limit is 413, a missing content type is 415, and a
/// string holding NUL (U+0000, which no name, text or key may hold and
/// PostgreSQL cannot store) is 400 — each with the reason.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = JsonError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let v = match axum::Json::<serde_json::Value>::from_request(req, state).await {
            Ok(axum::Json(v)) => v,
            Err(e) => return Err(JsonError::Rejected(e)),
        };
        if !v.is_object() {
            return Err(JsonError::Shape("the body must be a JSON object".into()));
        }
        if holds_nul(&v) {
            return Err(JsonError::Nul);
        }
        // With the path of the field at fault, as in `vcpus: invalid value`.
        serde_path_to_error::deserialize(v)
            .map(ApiJson)
            .map_err(|e| JsonError::Shape(format!("{}: {}", e.path(), e.inner())))
    }
}

/// Whether a string anywhere in `v` (or a key) holds U+0000.
fn holds_nul(v: &serde_json::Value) -> bool {
    use serde_json::Value;
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(a) => a.iter().any(holds_nul),
        Value::Object(o) => o.iter().any(|(k, v)| k.contains('\0') || holds_nul(v)),
        _ => false,
    }
}

pub enum JsonError {
    Rejected(JsonRejection),
    /// Well-formed JSON of the wrong shape (422).
    Shape(String),
    Nul,
}

impl axum::response::IntoResponse for JsonError {
    fn into_response(self) -> axum::response::Response {
        use axum::http::StatusCode;
        let rejection = match self {
            JsonError::Rejected(r) => r,
            JsonError::Shape(text) => {
                let mut resp = AppError::bad("invalid_body", text).into_response();
                *resp.status_mut() = StatusCode::UNPROCESSABLE_ENTITY;
                return resp;
            }
            JsonError::Nul => {
                return AppError::bad("invalid_text", "text must not hold NUL characters (U+0000)")
                    .into_response();
            }
        };
        let status = rejection.status();
        let text = rejection.body_text();
        let text = text
            .strip_prefix("Failed to deserialize the JSON body into the target type: ")
            .or_else(|| text.strip_prefix("Failed to parse the request body as JSON: "))
            .unwrap_or(&text)
            .to_owned();
        let (code, message) = match status {
            StatusCode::PAYLOAD_TOO_LARGE => (
                "body_too_large",
                "the body is larger than the limit".to_owned(),
            ),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => (
                "unsupported_media_type",
                "send the body as JSON with Content-Type: application/json".to_owned(),
            ),
            StatusCode::UNPROCESSABLE_ENTITY => ("invalid_body", text),
            _ => ("invalid_json", text),
        };
        let mut resp = AppError::bad(code, message).into_response();
        *resp.status_mut() = status;
        resp
    }
}

/// Query string; a bad one is 400 with the reason.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(ApiQuery(v)),
            Err(e @ QueryRejection::FailedToDeserializeQueryString(_)) => {
                Err(AppError::bad("invalid_query", e.body_text()))
            }
            Err(e) => Err(AppError::bad("invalid_query", e.body_text())),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Ctx {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Ctx>()
            .cloned()
            .ok_or_else(|| AppError::internal("no request context"))
    }
}
