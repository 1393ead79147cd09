//! Layers around every `/v1` route: authentication, the audit log,
//! `Idempotency-Key`, and request metrics.

use super::handlers::session_cookie;
use crate::app::{Actor, App, Ctx};
use crate::error::{AppError, ErrorCode};
use crate::metrics::Metrics;
use axum::body::{Body, to_bytes};
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use byteport_store::IdemClaim;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

/// The largest request body the API accepts.
pub const BODY_LIMIT: usize = 1024 * 1024;

fn mutating(m: &Method) -> bool {
    matches!(
        *m,
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    )
}

/// Resolves the caller and puts a [`Ctx`] in the request. Bad credentials
/// are a 401 even on routes that anonymous callers may use.
pub async fn authenticate(State(app): State<App>, mut req: Request, next: Next) -> Response {
    // No name, id or key holds NUL (and PostgreSQL cannot compare text with
    // one): such a path names nothing, such a query is refused.
    let has_nul = |s: &str| s.to_ascii_lowercase().contains("%00");
    if has_nul(req.uri().path()) {
        return AppError::not_found("resource", "named with a NUL character").into_response();
    }
    if req.uri().query().is_some_and(has_nul) {
        return AppError::bad("invalid_text", "text must not hold NUL characters (%00)")
            .into_response();
    }
    let headers = req.headers();
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .map(str::to_owned);
    let cookie = session_cookie(headers);
    if bearer.is_none()
        && cookie.is_some()
        && (mutating(req.method()) || websocket(&req))
        && !same_origin(&req)
    {
        return AppError::Forbidden("cross-origin requests cannot use the session cookie".into())
            .into_response();
    }
    let actor = match app.authenticate(bearer.as_deref(), cookie.as_deref()).await {
        Ok(a) => a,
        // A stale cookie must not block the login form: treat it as absent.
        Err(_) if bearer.is_none() => Actor::Anonymous,
        Err(e) => return e.into_response(),
    };
    if matches!(actor, Actor::Anonymous) && !anonymous_allowed(&req) {
        // Before any lookup: a stranger learns nothing of what exists.
        return AppError::Unauthorized("log in first: this needs a user or a node".into())
            .into_response();
    }
    req.extensions_mut().insert(Ctx::new(actor));
    next.run(req).await
}

/// The routes a caller without credentials may use: logging in (or out,
/// or refreshing with the session cookie), the first admin, a node's join.
pub(crate) const ANONYMOUS: &[&str] = &[
    "/v1/auth/login",
    "/v1/auth/logout",
    "/v1/auth/refresh",
    "/v1/auth/session",
    "/v1/auth/signup",
    "/v1/bootstrap",
    "/v1/nodes/register",
];

fn anonymous_allowed(req: &Request) -> bool {
    req.extensions()
        .get::<axum::extract::MatchedPath>()
        .is_some_and(|p| ANONYMOUS.contains(&p.as_str()))
}

/// A browser sends `Origin` on cross-site requests; when present it must
/// name this host (the `Host` header, or the URI's authority under HTTP/2). SameSite=Strict already keeps the cookie off them.
fn same_origin(req: &Request) -> bool {
    let Some(origin) = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
    else {
        return true;
    };
    // HTTP/2 has no Host header: the authority is in the URI.
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .unwrap_or("");
    origin.split_once("://").is_some_and(|(_, h)| h == host)
}

/// A WebSocket upgrade (the console): it acts for the user as a mutation
/// does, so it gets the same Origin check.
fn websocket(req: &Request) -> bool {
    req.headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// Operation ids by `"METHOD /path/{template}"`, from the OpenAPI document.
pub type Operations = Arc<HashMap<String, String>>;

#[derive(Clone)]
pub struct AuditState {
    pub app: App,
    pub ops: Operations,
}

/// Operations whose successes are not audit events: a node's heartbeat.
const NOT_AUDITED: &[&str] = &["node_heartbeat"];

/// Writes one audit event for every mutating request, success or not
/// (but a node's successful heartbeat).
pub async fn audit(State(st): State<AuditState>, req: Request, next: Next) -> Response {
    if !mutating(req.method()) {
        return next.run(req).await;
    }
    let ctx = req.extensions().get::<Ctx>().cloned();
    let key = format!(
        "{} {}",
        req.method(),
        req.extensions()
            .get::<MatchedPath>()
            .map_or("", |p| p.as_str())
    );
    let resp = next.run(req).await;
    if let Some(ctx) = ctx {
        let action = st.ops.get(&key).cloned().unwrap_or(key);
        // What nodes send every few seconds is not something people did.
        if NOT_AUDITED.contains(&action.as_str()) && resp.status().is_success() {
            return resp;
        }
        let result = resp.extensions().get::<ErrorCode>().map_or("ok", |c| c.0);
        st.app
            .audit_record(&ctx, &action, resp.status().as_u16(), result)
            .await;
    }
    resp
}

/// The creating POSTs, where a retry could make a thing twice: only these
/// honour `Idempotency-Key`. Not the ones whose answer holds a secret
/// (tokens, join tokens, logins), which is never stored, nor the
/// streaming ones (exec, runs), whose answers are never buffered.
pub(crate) const IDEMPOTENT: &[&str] = &[
    "/v1/vms",
    "/v1/images",
    "/v1/projects",
    "/v1/environments",
    "/v1/flavors",
    "/v1/users",
];

/// `Idempotency-Key` on a creating POST: the first response is stored
/// and replayed for a retry with the same body; another body under the
/// same key is a 422. Keys last [`byteport_store::IDEMPOTENCY_TTL`]; a
/// claim whose request never finished (a crash) is taken over after
/// [`byteport_store::IDEMPOTENCY_IN_FLIGHT`].
pub async fn idempotency(State(app): State<App>, req: Request, next: Next) -> Response {
    let creates = req
        .extensions()
        .get::<MatchedPath>()
        .is_some_and(|p| IDEMPOTENT.contains(&p.as_str()));
    if req.method() != Method::POST || !creates {
        return next.run(req).await;
    }
    let Some(key) = req.headers().get("idempotency-key") else {
        return next.run(req).await;
    };
    let key = match key.to_str() {
        Ok(k) if !k.is_empty() && k.len() <= 255 => k.to_owned(),
        _ => {
            return AppError::bad(
                "invalid_idempotency_key",
                "Idempotency-Key must be 1-255 visible ASCII characters",
            )
            .into_response();
        }
    };
    let actor = req
        .extensions()
        .get::<Ctx>()
        .map_or_else(|| "anonymous".into(), |c| c.actor.key());
    let (parts, body) = req.into_parts();
    let bytes = match to_bytes(body, BODY_LIMIT).await {
        Ok(b) => b,
        Err(_) => return AppError::TooLarge(BODY_LIMIT).into_response(),
    };
    let mut h = Sha256::new();
    h.update(parts.method.as_str());
    h.update(b" ");
    h.update(parts.uri.to_string());
    h.update(b"\n");
    h.update(&bytes);
    let hash = hex::encode(h.finalize());
    match app.store.idem_claim(&actor, &key, &hash).await {
        Ok(IdemClaim::New) => {}
        Ok(IdemClaim::Replay {
            status,
            content_type,
            body,
        }) => {
            let mut resp = Response::new(Body::from(body));
            *resp.status_mut() = axum::http::StatusCode::from_u16(status).unwrap_or_default();
            if let Ok(ct) = HeaderValue::from_str(&content_type) {
                resp.headers_mut().insert(header::CONTENT_TYPE, ct);
            }
            resp.headers_mut()
                .insert("idempotent-replayed", HeaderValue::from_static("true"));
            return resp;
        }
        Ok(IdemClaim::Mismatch) => {
            return AppError::Unprocessable(
                "this Idempotency-Key was used with a different request; use a new key".into(),
            )
            .into_response();
        }
        Ok(IdemClaim::InFlight) => {
            return AppError::Conflict(
                "a request with this Idempotency-Key is still being served; retry shortly".into(),
            )
            .into_response();
        }
        Err(e) => return AppError::from(e).into_response(),
    }
    let resp = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    let (rparts, rbody) = resp.into_parts();
    let rbytes = match to_bytes(rbody, usize::MAX).await {
        Ok(b) => b,
        Err(e) => {
            let _ = app.store.idem_release(&actor, &key).await;
            return AppError::internal(e).into_response();
        }
    };
    let stored = if rparts.status.is_server_error() {
        app.store.idem_release(&actor, &key).await
    } else {
        let ct = rparts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        app.store
            .idem_finish(&actor, &key, rparts.status.as_u16(), &ct, &rbytes)
            .await
    };
    if let Err(e) = stored {
        tracing::error!(error = %e, "could not store an idempotent response");
    }
    Response::from_parts(rparts, Body::from(rbytes))
}

/// Counts requests and their latency by route and status.
pub async fn track(State(m): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let resp = next.run(req).await;
    m.observe(
        method.as_str(),
        &route,
        resp.status().as_u16(),
        start.elapsed(),
    );
    resp
}
