//! Run-code's endpoints: thin handlers over `app::runs`.

use super::extract::{ApiJson, ApiQuery};
use crate::app::{App, Ctx};
use crate::error::{AppError, AppResult};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use byteport_types::api::{ErrorBody, Page, Run, RunCreate, RunCreateQuery, RunLine, RunListQuery};

/// Run a program in a fresh VM of its own. The answer streams
/// (`application/x-ndjson`): one [`RunLine`] per line, `run` first, then
/// the output chunks in order (each with its stream and offset), then
/// `end` with the exit code or the limit that ended it and the timings.
/// With `stream=false` the answer is the ended [`Run`] alone, as JSON.
#[utoipa::path(post, path = "/v1/runs", tag = "runs", params(RunCreateQuery), request_body = RunCreate,
    responses((status = 200, content_type = "application/x-ndjson", body = RunLine),
        (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn run_create(
    State(app): State<App>,
    ctx: Ctx,
    ApiQuery(q): ApiQuery<RunCreateQuery>,
    ApiJson(req): ApiJson<RunCreate>,
) -> AppResult<Response> {
    let mut rx = app.run_create(&ctx, req).await?;
    if q.stream == Some(false) {
        while let Some(line) = rx.recv().await {
            if let RunLine::End(run) = line {
                return Ok(Json(*run).into_response());
            }
        }
        return Err(AppError::Unavailable("the run's stream ended early".into()));
    }
    Ok(super::streams::ndjson(rx))
}

/// List runs the caller may see, newest first, a page at a time.
#[utoipa::path(get, path = "/v1/runs", tag = "runs", params(RunListQuery),
    responses((status = 200, body = Page<Run>), (status = 400, body = ErrorBody)))]
pub async fn run_list(
    State(app): State<App>,
    ctx: Ctx,
    ApiQuery(q): ApiQuery<RunListQuery>,
) -> AppResult<Json<Page<Run>>> {
    Ok(Json(app.run_list(&ctx, q).await?))
}

/// Show a run: its state, exit code, timings and kept output.
#[utoipa::path(get, path = "/v1/runs/{id}", tag = "runs", params(("id" = String, Path)),
    responses((status = 200, body = Run), (status = 404, body = ErrorBody)))]
pub async fn run_show(
    State(app): State<App>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> AppResult<Json<Run>> {
    Ok(Json(app.run_show(&ctx, &id).await?))
}

/// Cancel a running run: its VM is destroyed and it ends `cancelled`.
#[utoipa::path(delete, path = "/v1/runs/{id}", tag = "runs", params(("id" = String, Path)),
    responses((status = 202, body = Run), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn run_cancel(
    State(app): State<App>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> AppResult<(StatusCode, Json<Run>)> {
    Ok((StatusCode::ACCEPTED, Json(app.run_cancel(&ctx, &id).await?)))
}
