//! The HTTP surface: `/v1` (JSON API), `/v1/openapi.json`, `/docs`,
//! `/healthz` and `/metrics`. The OpenAPI document is generated from the
//! handlers' annotations.

mod contract;
pub mod extract;
pub mod handlers;
pub mod middleware;
pub mod runs;
pub mod streams;
pub mod web;

use crate::app::App;
use crate::metrics::Metrics;
use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use handlers as h;
use std::collections::HashMap;
use std::sync::Arc;
use streams as st;
use utoipa::OpenApi;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

#[derive(OpenApi)]
#[openapi(
    info(title = "BytePort API", description = "A private cloud: projects, VMs, images, nodes. \
        No text the API takes (a body's strings, a query, a path) may hold NUL (U+0000): such a \
        request is refused with 400 `invalid_text` (a path with one names nothing: 404)."),
    modifiers(&Security),
    security(("bearer" = []), ("cookie" = [])),
    tags(
        (name = "auth", description = "Logging in, tokens and sessions"),
        (name = "users"), (name = "tokens"), (name = "projects"),
        (name = "catalog", description = "Flavors and images"),
        (name = "vms", description = "Virtual machines and their lifecycle"),
        (name = "environments", description = "Groups of VMs made, run on and removed together"),
        (name = "nodes", description = "Hosts that run VMs"),
        (name = "audit"),
        (name = "events", description = "Live changes for the web console"),
    )
)]
struct ApiDoc;

struct Security;

impl utoipa::Modify for Security {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        let c = api.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A JWT from /v1/auth/login, or a personal API token (bpt_...)",
                    ))
                    .build(),
            ),
        );
        c.add_security_scheme(
            "cookie",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::new(
                crate::app::auth::SESSION_COOKIE,
            ))),
        );
    }
}

fn api_router() -> OpenApiRouter<App> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(h::auth_login))
        .routes(routes!(h::auth_refresh))
        .routes(routes!(h::auth_logout))
        .routes(routes!(h::auth_whoami))
        .routes(routes!(h::auth_session))
        .routes(routes!(h::bootstrap))
        .routes(routes!(h::signup_info, h::signup))
        .routes(routes!(h::invite_create, h::invite_list))
        .routes(routes!(h::invite_delete))
        .routes(routes!(h::settings_show, h::settings_update))
        .routes(routes!(h::user_create, h::user_list))
        .routes(routes!(h::user_show, h::user_delete))
        .routes(routes!(h::token_create, h::token_list))
        .routes(routes!(h::token_revoke))
        .routes(routes!(h::project_create, h::project_list))
        .routes(routes!(h::project_show, h::project_delete))
        .routes(routes!(h::project_set_quota))
        .routes(routes!(h::member_list))
        .routes(routes!(h::member_set, h::member_remove))
        .routes(routes!(h::flavor_list, h::flavor_create))
        .routes(routes!(h::flavor_delete))
        .routes(routes!(h::image_list, h::image_create))
        .routes(routes!(h::image_show, h::image_delete))
        .routes(routes!(st::image_upload))
        .routes(routes!(st::image_file_download))
        .routes(routes!(st::vm_console))
        .routes(routes!(st::vm_console_ws))
        .routes(routes!(st::vm_exec))
        .routes(routes!(st::vm_file_put, st::vm_file_get))
        .routes(routes!(st::env_file_put))
        .routes(routes!(st::node_channel))
        .routes(routes!(h::vm_create, h::vm_list))
        .routes(routes!(h::vm_show, h::vm_delete))
        .routes(routes!(h::vm_start))
        .routes(routes!(h::vm_stop))
        .routes(routes!(h::vm_restart))
        .routes(routes!(h::vm_pause))
        .routes(routes!(h::vm_resume))
        .routes(routes!(h::vm_wait))
        .routes(routes!(h::vm_stats))
        .routes(routes!(h::env_create, h::env_list))
        .routes(routes!(h::env_show, h::env_delete, h::env_update))
        .routes(routes!(h::env_run))
        .routes(routes!(st::env_exec))
        .routes(routes!(h::env_stop))
        .routes(routes!(h::env_start))
        .routes(routes!(runs::run_create, runs::run_list))
        .routes(routes!(runs::run_show, runs::run_cancel))
        .routes(routes!(h::join_token_create))
        .routes(routes!(h::node_register))
        .routes(routes!(h::node_heartbeat))
        .routes(routes!(h::node_list))
        .routes(routes!(h::node_show, h::node_remove))
        .routes(routes!(h::node_cordon))
        .routes(routes!(h::node_orphan_adopt))
        .routes(routes!(h::node_orphan_remove))
        .routes(routes!(h::node_uncordon))
        .routes(routes!(h::node_drain))
        .routes(routes!(h::node_metadata))
        .routes(routes!(h::audit_list))
        .routes(routes!(st::events))
        .routes(routes!(h::vm_state_counts))
}

/// The OpenAPI document, as committed at `openapi/byteport.json`.
pub fn openapi() -> utoipa::openapi::OpenApi {
    contracted(api_router().into_openapi())
}

/// The handlers' document with what the layers around them add.
fn contracted(mut doc: utoipa::openapi::OpenApi) -> utoipa::openapi::OpenApi {
    utoipa::Modify::modify(&contract::Contract, &mut doc);
    doc
}

/// Operation ids by `"METHOD /path"`, for the audit log.
fn operations(doc: &utoipa::openapi::OpenApi) -> HashMap<String, String> {
    let mut ops = HashMap::new();
    let v = serde_json::to_value(doc).unwrap_or_default();
    if let Some(paths) = v.get("paths").and_then(|p| p.as_object()) {
        for (path, item) in paths {
            for (method, op) in item.as_object().into_iter().flatten() {
                if let Some(id) = op.get("operationId").and_then(|i| i.as_str()) {
                    ops.insert(format!("{} {path}", method.to_uppercase()), id.to_owned());
                }
            }
        }
    }
    ops
}

/// The whole HTTP application.
pub fn router(app: App) -> Router {
    let (api, doc) = api_router().split_for_parts();
    let doc = contracted(doc);
    let metrics = Arc::new(Metrics::default());
    let audit_state = middleware::AuditState {
        app: app.clone(),
        ops: Arc::new(operations(&doc)),
    };
    let web_dir = app.settings.web_dir.clone();
    let doc_json = Arc::new(serde_json::to_string(&doc).unwrap_or_default());
    // `route_layer`s run after routing (so they see the matched route), the
    // last added outermost: metrics, then auth, audit, idempotency.
    let api = api
        .route_layer(axum::middleware::from_fn_with_state(
            app.clone(),
            middleware::idempotency,
        ))
        .route_layer(axum::middleware::from_fn_with_state(
            audit_state,
            middleware::audit,
        ))
        .route_layer(axum::middleware::from_fn_with_state(
            app.clone(),
            middleware::authenticate,
        ))
        .route_layer(axum::middleware::from_fn_with_state(
            metrics.clone(),
            middleware::track,
        ))
        .with_state(app.clone());
    Router::new()
        .merge(api)
        .route(
            "/v1/openapi.json",
            get(move || {
                let d = doc_json.clone();
                async move { ([(header::CONTENT_TYPE, "application/json")], (*d).clone()) }
            }),
        )
        .merge(utoipa_swagger_ui::SwaggerUi::new("/docs").url("/v1/openapi-swagger.json", doc))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_text).with_state((app, metrics)))
        .fallback(web::serve)
        .with_state(web::WebDir(Arc::new(web_dir)))
        .layer(DefaultBodyLimit::max(middleware::BODY_LIMIT))
}

async fn healthz() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        "{\"status\":\"ok\"}",
    )
}

async fn metrics_text(State((app, m)): State<(App, Arc<Metrics>)>) -> impl IntoResponse {
    // Read before this scrape's own queries.
    let mut extra = format!(
        "# HELP byteport_db_statements_total Database statements this replica has run.\n\
         # TYPE byteport_db_statements_total counter\nbyteport_db_statements_total {}\n\
         # HELP byteport_event_streams Open /v1/events streams on this replica.\n\
         # TYPE byteport_event_streams gauge\nbyteport_event_streams {}\n",
        app.store.statements(),
        app.event_streams_open(),
    );
    extra.push_str("# HELP byteport_vms VMs by state.\n# TYPE byteport_vms gauge\n");
    if let Ok(rows) = app.store.vm_count_by_state().await {
        for (state, n) in rows {
            extra.push_str(&format!("byteport_vms{{state=\"{state}\"}} {n}\n"));
        }
    }
    extra.push_str(&format!(
        "# HELP byteport_reservation_repairs_total Node reservations found drifted from their VMs and repaired.\n\
         # TYPE byteport_reservation_repairs_total counter\nbyteport_reservation_repairs_total {}\n",
        app.reservation_repairs
            .load(std::sync::atomic::Ordering::Relaxed)
    ));
    let r = &app.metadata_refusals;
    extra.push_str(&format!(
        "# HELP byteport_metadata_refusals_total Metadata requests refused: unknown VM, token or document (not_found), or too many (rate_limited).\n\
         # TYPE byteport_metadata_refusals_total counter\n\
         byteport_metadata_refusals_total{{reason=\"not_found\"}} {}\n\
         byteport_metadata_refusals_total{{reason=\"rate_limited\"}} {}\n",
        r.not_found.load(std::sync::atomic::Ordering::Relaxed),
        r.rate_limited.load(std::sync::atomic::Ordering::Relaxed),
    ));
    extra.push_str(&format!(
        "# HELP byteport_stuck_streams_total Console, exec and run streams closed because their reader fell behind.\n\
         # TYPE byteport_stuck_streams_total counter\nbyteport_stuck_streams_total {}\n",
        app.hub.stuck_streams.load(std::sync::atomic::Ordering::Relaxed)
    ));
    if let Err(e) = app.render_fleet_metrics(&mut extra).await {
        tracing::warn!(error = %e, "the fleet's metrics could not be read");
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        m.render(&extra),
    )
}
