//! Thin handlers: extract, call one `app` function, shape the response.

use super::extract::{ApiJson, ApiQuery};
use crate::app::auth::{Issued, SESSION_COOKIE};
use crate::app::vm_views::VmJson;
use crate::app::{App, Ctx};
use crate::error::{AppError, AppResult};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use byteport_types::api::*;
use byteport_types::{VmAction, VmState};

type Resp<T> = AppResult<Json<T>>;

fn created<T: serde::Serialize>(v: T) -> AppResult<(StatusCode, Json<T>)> {
    Ok((StatusCode::CREATED, Json(v)))
}

fn accepted<T: serde::Serialize>(v: T) -> AppResult<(StatusCode, Json<T>)> {
    Ok((StatusCode::ACCEPTED, Json(v)))
}

pub(crate) fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == SESSION_COOKIE)
        .map(|(_, v)| v.to_owned())
}

fn with_cookie(app: &App, issued: Issued) -> AppResult<Response> {
    let secure = if app.settings.secure_cookies {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{SESSION_COOKIE}={}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{secure}",
        issued.session,
        app.settings.session_ttl.as_secs()
    );
    let mut resp = Json(issued.response).into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&cookie).map_err(AppError::internal)?,
    );
    Ok(resp)
}

// ---------- auth ----------

/// Log in with a name and password.
///
/// Returns a short-lived JWT and a refresh token, and sets the HTTP-only
/// session cookie that the web console uses.
#[utoipa::path(post, path = "/v1/auth/login", tag = "auth", request_body = LoginRequest,
    responses((status = 200, body = LoginResponse), (status = 401, body = ErrorBody)))]
pub async fn auth_login(
    State(app): State<App>,
    ctx: Ctx,
    ApiJson(req): ApiJson<LoginRequest>,
) -> AppResult<Response> {
    let issued = app.login(&ctx, &req.name, req.password).await?;
    with_cookie(&app, issued)
}

/// Exchange a refresh token (single use) for a new set of tokens.
#[utoipa::path(post, path = "/v1/auth/refresh", tag = "auth", request_body = RefreshRequest,
    responses((status = 200, body = LoginResponse), (status = 401, body = ErrorBody)))]
pub async fn auth_refresh(
    State(app): State<App>,
    ctx: Ctx,
    ApiJson(req): ApiJson<RefreshRequest>,
) -> AppResult<Response> {
    let issued = app.refresh(&ctx, &req.refresh_token).await?;
    with_cookie(&app, issued)
}

/// End the browser session (and spend a refresh token, if one is given).
#[utoipa::path(post, path = "/v1/auth/logout", tag = "auth", request_body(content = Option<RefreshRequest>),
    responses((status = 204)))]
pub async fn auth_logout(
    State(app): State<App>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> AppResult<Response> {
    let refresh = serde_json::from_slice::<RefreshRequest>(&body)
        .ok()
        .map(|r| r.refresh_token);
    app.logout(session_cookie(&headers).as_deref(), refresh.as_deref())
        .await?;
    let mut resp = StatusCode::NO_CONTENT.into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("byteport_session=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
    );
    Ok(resp)
}

/// Who the caller is, with project memberships.
#[utoipa::path(get, path = "/v1/auth/whoami", tag = "auth",
    responses((status = 200, body = Whoami), (status = 401, body = ErrorBody)))]
pub async fn auth_whoami(State(app): State<App>, ctx: Ctx) -> Resp<Whoami> {
    Ok(Json(app.whoami(&ctx).await?))
}

/// The caller's session, if any: unlike `whoami`, a caller with no (or an
/// expired) session gets 200 with no `whoami`, so the web console can ask
/// at load without a failed request.
#[utoipa::path(get, path = "/v1/auth/session", tag = "auth",
    responses((status = 200, body = SessionState)))]
pub async fn auth_session(State(app): State<App>, ctx: Ctx) -> Resp<SessionState> {
    let whoami = match ctx.actor {
        crate::app::Actor::User { .. } => Some(app.whoami(&ctx).await?),
        _ => None,
    };
    Ok(Json(SessionState { whoami }))
}

/// Create the first admin with the one-time token printed at first start.
#[utoipa::path(post, path = "/v1/bootstrap", tag = "auth", request_body = BootstrapRequest,
    responses((status = 201, body = User), (status = 401, body = ErrorBody)))]
pub async fn bootstrap(
    State(app): State<App>,
    ctx: Ctx,
    ApiJson(req): ApiJson<BootstrapRequest>,
) -> AppResult<(StatusCode, Json<User>)> {
    created(
        app.bootstrap(&ctx, &req.token, req.name, req.password)
            .await?,
    )
}

// ---------- sign-up, invites and settings ----------

/// Whether this server takes sign-ups, and what an invite gives.
#[utoipa::path(get, path = "/v1/auth/signup", tag = "auth", params(SignupQuery),
    responses((status = 200, body = SignupInfo)))]
pub async fn signup_info(
    State(app): State<App>,
    ApiQuery(q): ApiQuery<SignupQuery>,
) -> Resp<SignupInfo> {
    Ok(Json(app.signup_info(q.invite.as_deref()).await?))
}

/// Make an account, with an invite or (when the server allows it)
/// without, and log in: answers as a login does.
#[utoipa::path(post, path = "/v1/auth/signup", tag = "auth", request_body = SignupRequest,
    responses((status = 201, body = LoginResponse), (status = 403, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn signup(
    State(app): State<App>,
    ctx: Ctx,
    ApiJson(req): ApiJson<SignupRequest>,
) -> AppResult<Response> {
    let issued = app.signup(&ctx, req).await?;
    let mut resp = with_cookie(&app, issued)?;
    *resp.status_mut() = StatusCode::CREATED;
    Ok(resp)
}

/// Where the caller reaches this server: the browser's `Origin`, or the
/// scheme and `Host`, for the links the server hands out.
fn origin(app: &App, headers: &HeaderMap) -> String {
    let header = |h| headers.get(h).and_then(|v: &HeaderValue| v.to_str().ok());
    if let Some(o) = header(header::ORIGIN).filter(|o| *o != "null") {
        return o.to_owned();
    }
    let scheme = if app.settings.secure_cookies {
        "https"
    } else {
        "http"
    };
    format!("{scheme}://{}", header(header::HOST).unwrap_or("localhost"))
}

/// Make a single-use invite link (admins; a project's owners to it). The
/// secret and link are shown only in this response.
#[utoipa::path(post, path = "/v1/invites", tag = "users", request_body = InviteCreate,
    responses((status = 201, body = InviteCreated), (status = 403, body = ErrorBody)))]
pub async fn invite_create(
    State(app): State<App>,
    ctx: Ctx,
    headers: HeaderMap,
    ApiJson(req): ApiJson<InviteCreate>,
) -> AppResult<(StatusCode, Json<InviteCreated>)> {
    let origin = origin(&app, &headers);
    created(app.invite_create(&ctx, req, &origin).await?)
}

/// List invites, newest first (admins see all; owners, their projects').
#[utoipa::path(get, path = "/v1/invites", tag = "users", responses((status = 200, body = Vec<Invite>)))]
pub async fn invite_list(State(app): State<App>, ctx: Ctx) -> Resp<Vec<Invite>> {
    Ok(Json(app.invite_list(&ctx).await?))
}

/// Revoke an invite: its link stops working.
#[utoipa::path(delete, path = "/v1/invites/{id}", tag = "users", params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn invite_delete(
    State(app): State<App>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> AppResult<StatusCode> {
    app.invite_delete(&ctx, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The server-wide settings (admins).
#[utoipa::path(get, path = "/v1/settings", tag = "users",
    responses((status = 200, body = ServerSettings), (status = 403, body = ErrorBody)))]
pub async fn settings_show(State(app): State<App>, ctx: Ctx) -> Resp<ServerSettings> {
    Ok(Json(app.server_settings(&ctx).await?))
}

/// Change server-wide settings (admins); absent fields stay.
#[utoipa::path(patch, path = "/v1/settings", tag = "users", request_body = ServerSettingsUpdate,
    responses((status = 200, body = ServerSettings), (status = 403, body = ErrorBody)))]
pub async fn settings_update(
    State(app): State<App>,
    ctx: Ctx,
    ApiJson(req): ApiJson<ServerSettingsUpdate>,
) -> Resp<ServerSettings> {
    Ok(Json(app.server_settings_update(&ctx, req).await?))
}

// ---------- users and tokens ----------

/// Create a user (admins).
#[utoipa::path(post, path = "/v1/users", tag = "users", request_body = UserCreate,
    responses((status = 201, body = User), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn user_create(
    State(app): State<App>,
    ctx: Ctx,
    ApiJson(req): ApiJson<UserCreate>,
) -> AppResult<(StatusCode, Json<User>)> {
    created(app.user_create(&ctx, req).await?)
}

/// List users (admins).
#[utoipa::path(get, path = "/v1/users", tag = "users", responses((status = 200, body = Vec<User>)))]
pub async fn user_list(State(app): State<App>, ctx: Ctx) -> Resp<Vec<User>> {
    Ok(Json(app.user_list(&ctx).await?))
}

/// Show a user by name or id (admins, or the user themself).
#[utoipa::path(get, path = "/v1/users/{user}", tag = "users", params(("user" = String, Path)),
    responses((status = 200, body = User), (status = 404, body = ErrorBody)))]
pub async fn user_show(State(app): State<App>, ctx: Ctx, Path(user): Path<String>) -> Resp<User> {
    Ok(Json(app.user_show(&ctx, &user).await?))
}

/// Delete a user with their tokens and memberships (admins).
#[utoipa::path(delete, path = "/v1/users/{user}", tag = "users", params(("user" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn user_delete(
    State(app): State<App>,
    ctx: Ctx,
    Path(user): Path<String>,
) -> AppResult<StatusCode> {
    app.user_delete(&ctx, &user).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Create a personal API token; its secret is shown only in this response.
#[utoipa::path(post, path = "/v1/tokens", tag = "tokens", request_body = TokenCreate,
    responses((status = 201, body = ApiTokenCreated)))]
pub async fn token_create(
    State(app): State<App>,
    ctx: Ctx,
    ApiJson(req): ApiJson<TokenCreate>,
) -> AppResult<(StatusCode, Json<ApiTokenCreated>)> {
    created(app.token_create(&ctx, req).await?)
}

/// List the caller's API tokens (never their secrets).
#[utoipa::path(get, path = "/v1/tokens", tag = "tokens", responses((status = 200, body = Vec<ApiToken>)))]
pub async fn token_list(State(app): State<App>, ctx: Ctx) -> Resp<Vec<ApiToken>> {
    Ok(Json(app.token_list(&ctx).await?))
}

/// Revoke one of the caller's API tokens.
#[utoipa::path(delete, path = "/v1/tokens/{id}", tag = "tokens", params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn token_revoke(
    State(app): State<App>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> AppResult<StatusCode> {
    app.token_revoke(&ctx, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---------- projects ----------

/// Create a project (admins); the caller or `owner` becomes its owner.
#[utoipa::path(post, path = "/v1/projects", tag = "projects", request_body = ProjectCreate,
    responses((status = 201, body = Project), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn project_create(
    State(app): State<App>,
    ctx: Ctx,
    ApiJson(req): ApiJson<ProjectCreate>,
) -> AppResult<(StatusCode, Json<Project>)> {
    created(app.project_create(&ctx, req).await?)
}

/// The caller's projects (every project for admins), with quota and usage.
#[utoipa::path(get, path = "/v1/projects", tag = "projects", responses((status = 200, body = Vec<Project>)))]
pub async fn project_list(State(app): State<App>, ctx: Ctx) -> Resp<Vec<Project>> {
    Ok(Json(app.project_list(&ctx).await?))
}

/// Show a project by name or id.
#[utoipa::path(get, path = "/v1/projects/{project}", tag = "projects", params(("project" = String, Path)),
    responses((status = 200, body = Project), (status = 404, body = ErrorBody)))]
pub async fn project_show(
    State(app): State<App>,
    ctx: Ctx,
    Path(project): Path<String>,
) -> Resp<Project> {
    Ok(Json(app.project_show(&ctx, &project).await?))
}

/// Delete an empty project (admins).
#[utoipa::path(delete, path = "/v1/projects/{project}", tag = "projects", params(("project" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn project_delete(
    State(app): State<App>,
    ctx: Ctx,
    Path(project): Path<String>,
) -> AppResult<StatusCode> {
    app.project_delete(&ctx, &project).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Set a project's quota (owners).
#[utoipa::path(put, path = "/v1/projects/{project}/quota", tag = "projects", params(("project" = String, Path)),
    request_body = Quota, responses((status = 200, body = Project), (status = 403, body = ErrorBody)))]
pub async fn project_set_quota(
    State(app): State<App>,
    ctx: Ctx,
    Path(project): Path<String>,
    ApiJson(q): ApiJson<Quota>,
) -> Resp<Project> {
    Ok(Json(app.project_set_quota(&ctx, &project, q).await?))
}

/// A project's members and their roles.
#[utoipa::path(get, path = "/v1/projects/{project}/members", tag = "projects", params(("project" = String, Path)),
    responses((status = 200, body = Vec<Member>)))]
pub async fn member_list(
    State(app): State<App>,
    ctx: Ctx,
    Path(project): Path<String>,
) -> Resp<Vec<Member>> {
    Ok(Json(app.member_list(&ctx, &project).await?))
}

/// Add a member or change their role (owners).
#[utoipa::path(put, path = "/v1/projects/{project}/members/{user}", tag = "projects",
    params(("project" = String, Path), ("user" = String, Path)), request_body = MemberSet,
    responses((status = 200, body = Member), (status = 403, body = ErrorBody)))]
pub async fn member_set(
    State(app): State<App>,
    ctx: Ctx,
    Path((project, user)): Path<(String, String)>,
    ApiJson(req): ApiJson<MemberSet>,
) -> Resp<Member> {
    Ok(Json(app.member_set(&ctx, &project, &user, req).await?))
}

/// Remove a member (owners).
#[utoipa::path(delete, path = "/v1/projects/{project}/members/{user}", tag = "projects",
    params(("project" = String, Path), ("user" = String, Path)), responses((status = 204)))]
pub async fn member_remove(
    State(app): State<App>,
    ctx: Ctx,
    Path((project, user)): Path<(String, String)>,
) -> AppResult<StatusCode> {
    app.member_remove(&ctx, &project, &user).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---------- flavors and images ----------

/// List flavors.
#[utoipa::path(get, path = "/v1/flavors", tag = "catalog", responses((status = 200, body = Vec<Flavor>)))]
pub async fn flavor_list(State(app): State<App>, ctx: Ctx) -> Resp<Vec<Flavor>> {
    Ok(Json(app.flavor_list(&ctx).await?))
}

/// Add a flavor (admins).
#[utoipa::path(post, path = "/v1/flavors", tag = "catalog", request_body = FlavorCreate,
    responses((status = 201, body = Flavor)))]
pub async fn flavor_create(
    State(app): State<App>,
    ctx: Ctx,
    ApiJson(req): ApiJson<FlavorCreate>,
) -> AppResult<(StatusCode, Json<Flavor>)> {
    created(app.flavor_create(&ctx, req).await?)
}

/// Remove a flavor (admins); VMs made from it keep their sizes.
#[utoipa::path(delete, path = "/v1/flavors/{name}", tag = "catalog", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn flavor_delete(
    State(app): State<App>,
    ctx: Ctx,
    Path(name): Path<String>,
) -> AppResult<StatusCode> {
    app.flavor_delete(&ctx, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// List images.
#[utoipa::path(get, path = "/v1/images", tag = "catalog", responses((status = 200, body = Vec<Image>)))]
pub async fn image_list(State(app): State<App>, ctx: Ctx) -> Resp<Vec<Image>> {
    Ok(Json(app.image_list(&ctx).await?))
}

/// Register an image in the catalog (admins).
#[utoipa::path(post, path = "/v1/images", tag = "catalog", request_body = ImageCreate,
    responses((status = 201, body = Image)))]
pub async fn image_create(
    State(app): State<App>,
    ctx: Ctx,
    ApiJson(req): ApiJson<ImageCreate>,
) -> AppResult<(StatusCode, Json<Image>)> {
    created(app.image_create(&ctx, req).await?)
}

/// Show an image by name.
#[utoipa::path(get, path = "/v1/images/{name}", tag = "catalog", params(("name" = String, Path)),
    responses((status = 200, body = Image), (status = 404, body = ErrorBody)))]
pub async fn image_show(State(app): State<App>, ctx: Ctx, Path(name): Path<String>) -> Resp<Image> {
    Ok(Json(app.image_show(&ctx, &name).await?))
}

/// Remove an image that no VM uses (admins).
#[utoipa::path(delete, path = "/v1/images/{name}", tag = "catalog", params(("name" = String, Path)),
    responses((status = 204), (status = 409, body = ErrorBody)))]
pub async fn image_delete(
    State(app): State<App>,
    ctx: Ctx,
    Path(name): Path<String>,
) -> AppResult<StatusCode> {
    app.image_delete(&ctx, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---------- VMs ----------

/// Create a VM. It starts `pending` until a node takes it.
#[utoipa::path(post, path = "/v1/vms", tag = "vms", request_body = VmCreate,
    params(("Idempotency-Key" = Option<String>, Header, description = "a retry with the same key and body returns the first response")),
    responses((status = 202, body = Vm), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn vm_create(
    State(app): State<App>,
    ctx: Ctx,
    ApiJson(req): ApiJson<VmCreate>,
) -> AppResult<(StatusCode, Json<Vm>)> {
    accepted(app.vm_create(&ctx, req).await?)
}

/// List VMs, newest last, a page at a time.
#[utoipa::path(get, path = "/v1/vms", tag = "vms", params(VmListQuery),
    responses((status = 200, body = Page<Vm>), (status = 400, body = ErrorBody)))]
pub async fn vm_list(
    State(app): State<App>,
    ctx: Ctx,
    ApiQuery(q): ApiQuery<VmListQuery>,
) -> Resp<Page<VmJson>> {
    Ok(Json(app.vm_list(&ctx, q).await?))
}

/// The caller's VMs (not deleted) counted by state, across every project
/// they see.
#[utoipa::path(get, path = "/v1/vm-states", tag = "vms",
    responses((status = 200, body = Vec<VmStateCount>), (status = 401, body = ErrorBody)))]
pub async fn vm_state_counts(State(app): State<App>, ctx: Ctx) -> Resp<Vec<VmStateCount>> {
    Ok(Json(app.vm_state_counts(&ctx).await?))
}

/// Show a VM.
#[utoipa::path(get, path = "/v1/vms/{id}", tag = "vms", params(("id" = String, Path)),
    responses((status = 200, body = Vm), (status = 404, body = ErrorBody)))]
pub async fn vm_show(State(app): State<App>, ctx: Ctx, Path(id): Path<String>) -> Resp<VmJson> {
    Ok(Json(app.vm_show(&ctx, &id).await?))
}

/// Delete a VM: `deleting` until its node has removed every trace.
#[utoipa::path(delete, path = "/v1/vms/{id}", tag = "vms", params(("id" = String, Path)),
    responses((status = 202, body = Vm), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn vm_delete(
    State(app): State<App>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> AppResult<(StatusCode, Json<Vm>)> {
    accepted(app.vm_act(&ctx, &id, VmAction::Delete).await?)
}

/// A VM's latest figures as its node measures them from the host: CPU,
/// resident memory and the disk space its overlay takes (`measured`), or
/// why there are none (`note`).
#[utoipa::path(get, path = "/v1/vms/{id}/stats", tag = "vms", params(("id" = String, Path)),
    responses((status = 200, body = VmStatsView), (status = 404, body = ErrorBody)))]
pub async fn vm_stats(
    State(app): State<App>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> Resp<VmStatsView> {
    Ok(Json(app.vm_stats(&ctx, &id).await?))
}

// ---------- environments ----------

/// Create an environment: one VM per image whose name starts with one of
/// `os_prefixes`, all within the project's quota or none.
#[utoipa::path(post, path = "/v1/environments", tag = "environments", request_body = EnvironmentCreate,
    params(("Idempotency-Key" = Option<String>, Header, description = "a retry with the same key and body returns the first response")),
    responses((status = 202, body = Environment), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn env_create(
    State(app): State<App>,
    ctx: Ctx,
    ApiJson(req): ApiJson<EnvironmentCreate>,
) -> AppResult<(StatusCode, Json<Environment>)> {
    accepted(app.env_create(&ctx, req).await?)
}

/// List the environments of every project the caller sees.
#[utoipa::path(get, path = "/v1/environments", tag = "environments",
    responses((status = 200, body = Vec<Environment>), (status = 401, body = ErrorBody)))]
pub async fn env_list(State(app): State<App>, ctx: Ctx) -> Resp<Vec<Environment>> {
    Ok(Json(app.env_list(&ctx).await?))
}

/// Show an environment (by id, or by name with `project`) and its VMs.
#[utoipa::path(get, path = "/v1/environments/{env}", tag = "environments",
    params(("env" = String, Path, description = "id or name"), EnvironmentQuery),
    responses((status = 200, body = Environment), (status = 404, body = ErrorBody)))]
pub async fn env_show(
    State(app): State<App>,
    ctx: Ctx,
    Path(env): Path<String>,
    ApiQuery(q): ApiQuery<EnvironmentQuery>,
) -> Resp<Environment> {
    Ok(Json(app.env_show(&ctx, &env, q.project.as_deref()).await?))
}

/// Delete an environment and every VM in it.
#[utoipa::path(delete, path = "/v1/environments/{env}", tag = "environments",
    params(("env" = String, Path, description = "id or name"), EnvironmentQuery),
    responses((status = 202, body = Environment), (status = 404, body = ErrorBody)))]
pub async fn env_delete(
    State(app): State<App>,
    ctx: Ctx,
    Path(env): Path<String>,
    ApiQuery(q): ApiQuery<EnvironmentQuery>,
) -> AppResult<(StatusCode, Json<Environment>)> {
    accepted(app.env_delete(&ctx, &env, q.project.as_deref()).await?)
}

/// Change a live environment: extend or shorten its lifetime (or end
/// it), drop VMs by name or id, by image prefix or those that stopped
/// answering, and set every VM's ports and outbound policy (a running VM
/// takes those when it next starts). Checked whole first: a 400 changes
/// nothing.
#[utoipa::path(patch, path = "/v1/environments/{env}", tag = "environments",
    params(("env" = String, Path, description = "id or name"), EnvironmentQuery),
    request_body = EnvironmentUpdate,
    responses((status = 200, body = EnvironmentUpdated), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn env_update(
    State(app): State<App>,
    ctx: Ctx,
    Path(env): Path<String>,
    ApiQuery(q): ApiQuery<EnvironmentQuery>,
    ApiJson(req): ApiJson<EnvironmentUpdate>,
) -> Resp<EnvironmentUpdated> {
    Ok(Json(
        app.env_update(&ctx, &env, q.project.as_deref(), req)
            .await?,
    ))
}

macro_rules! env_action {
    ($fn:ident, $path:literal, $action:expr, $doc:literal) => {
        #[doc = $doc]
        #[utoipa::path(post, path = $path, tag = "environments",
            params(("env" = String, Path, description = "id or name"), EnvironmentQuery),
            responses((status = 202, body = EnvironmentAction), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
        pub async fn $fn(
            State(app): State<App>,
            ctx: Ctx,
            Path(env): Path<String>,
            ApiQuery(q): ApiQuery<EnvironmentQuery>,
        ) -> AppResult<(StatusCode, Json<EnvironmentAction>)> {
            accepted(app.env_act(&ctx, &env, q.project.as_deref(), $action).await?)
        }
    };
}

env_action!(
    env_stop,
    "/v1/environments/{env}/stop",
    VmAction::Stop,
    "Stop every VM of an environment: each guest powers off, its disk is kept."
);
env_action!(
    env_start,
    "/v1/environments/{env}/start",
    VmAction::Start,
    "Start every stopped VM of an environment again."
);

/// Run a command on every VM of an environment at once, through their
/// guest agents, and get each VM's output and exit code.
#[utoipa::path(post, path = "/v1/environments/{env}/run", tag = "environments",
    params(("env" = String, Path, description = "id or name"), EnvironmentRunQuery),
    request_body = ExecRequest,
    responses((status = 200, body = EnvironmentRunResult), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn env_run(
    State(app): State<App>,
    ctx: Ctx,
    Path(env): Path<String>,
    ApiQuery(q): ApiQuery<EnvironmentRunQuery>,
    ApiJson(req): ApiJson<ExecRequest>,
) -> Resp<EnvironmentRunResult> {
    Ok(Json(app.env_run(&ctx, &env, &q, req).await?))
}

macro_rules! vm_action {
    ($fn:ident, $path:literal, $action:expr, $doc:literal) => {
        #[doc = $doc]
        #[utoipa::path(post, path = $path, tag = "vms", params(("id" = String, Path)),
            responses((status = 202, body = Vm), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
        pub async fn $fn(State(app): State<App>, ctx: Ctx, Path(id): Path<String>) -> AppResult<(StatusCode, Json<Vm>)> {
            accepted(app.vm_act(&ctx, &id, $action).await?)
        }
    };
}

vm_action!(
    vm_start,
    "/v1/vms/{id}/start",
    VmAction::Start,
    "Start a stopped VM."
);
vm_action!(
    vm_stop,
    "/v1/vms/{id}/stop",
    VmAction::Stop,
    "Stop a VM: ACPI shutdown, forced after a timeout."
);
vm_action!(
    vm_restart,
    "/v1/vms/{id}/restart",
    VmAction::Restart,
    "Restart a running VM."
);
vm_action!(
    vm_pause,
    "/v1/vms/{id}/pause",
    VmAction::Pause,
    "Pause a running VM (its vCPUs stop)."
);
vm_action!(
    vm_resume,
    "/v1/vms/{id}/resume",
    VmAction::Resume,
    "Resume a paused VM."
);

/// Wait until a VM reaches a state (504 when the wait times out, 409 if it never can).
#[utoipa::path(get, path = "/v1/vms/{id}/wait", tag = "vms", params(("id" = String, Path), VmWaitQuery),
    responses((status = 200, body = Vm), (status = 504, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn vm_wait(
    State(app): State<App>,
    ctx: Ctx,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<VmWaitQuery>,
) -> Resp<Vm> {
    let target: VmState = q.state;
    Ok(Json(app.vm_wait(&ctx, &id, target, q.timeout_secs).await?))
}

// ---------- nodes ----------

/// Create a single-use join token for a new node (admins).
#[utoipa::path(post, path = "/v1/node-join-tokens", tag = "nodes", request_body = JoinTokenCreate,
    responses((status = 201, body = JoinToken)))]
pub async fn join_token_create(
    State(app): State<App>,
    ctx: Ctx,
    ApiJson(req): ApiJson<JoinTokenCreate>,
) -> AppResult<(StatusCode, Json<JoinToken>)> {
    created(app.join_token_create(&ctx, req).await?)
}

/// Register a node with a join token; returns its own credential.
#[utoipa::path(post, path = "/v1/nodes/register", tag = "nodes", request_body = NodeRegister,
    responses((status = 201, body = NodeRegistered), (status = 401, body = ErrorBody)))]
pub async fn node_register(
    State(app): State<App>,
    ctx: Ctx,
    ApiJson(req): ApiJson<NodeRegister>,
) -> AppResult<(StatusCode, Json<NodeRegistered>)> {
    created(app.node_register(&ctx, req).await?)
}

/// A node's heartbeat (node credential): capacity, usage, observed VMs.
#[utoipa::path(post, path = "/v1/nodes/{id}/heartbeat", tag = "nodes", params(("id" = String, Path)),
    request_body = Heartbeat, responses((status = 200, body = HeartbeatResponse)))]
pub async fn node_heartbeat(
    State(app): State<App>,
    ctx: Ctx,
    Path(id): Path<String>,
    ApiJson(hb): ApiJson<Heartbeat>,
) -> Resp<HeartbeatResponse> {
    Ok(Json(app.node_heartbeat(&ctx, &id, hb).await?))
}

/// The header a node passes the guest's metadata token in.
pub const METADATA_TOKEN_HEADER: &str = "x-byteport-metadata-token";

/// One NoCloud document of a VM on this node (node credential), relayed
/// for the guest: `meta-data`, `user-data`, `vendor-data` or
/// `network-config`. The guest's token goes in `X-Byteport-Metadata-Token`;
/// a wrong token, another node's VM or a deleted VM is 404.
#[utoipa::path(get, path = "/v1/nodes/{id}/metadata/{vm}/{document}", tag = "nodes",
    params(("id" = String, Path), ("vm" = String, Path), ("document" = String, Path),
        ("X-Byteport-Metadata-Token" = String, Header, description = "The guest's metadata token")),
    responses((status = 200, description = "The document", content_type = "text/plain", body = String),
        (status = 404, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn node_metadata(
    State(app): State<App>,
    ctx: Ctx,
    Path((node, vm, document)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> AppResult<Response> {
    use crate::app::metadata::Document;
    let missing = || {
        app.metadata_refusals
            .not_found
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        AppError::not_found("metadata", "for this VM and token")
    };
    let node = node.parse().map_err(|_| missing())?;
    let vm = vm.parse().map_err(|_| missing())?;
    let doc = Document::parse(&document).ok_or_else(missing)?;
    let token = headers
        .get(METADATA_TOKEN_HEADER)
        .and_then(|v| v.to_str().ok());
    let text = app.metadata_document(&ctx, node, vm, token, doc).await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
}

/// List nodes with capacity and usage (admins).
#[utoipa::path(get, path = "/v1/nodes", tag = "nodes", responses((status = 200, body = Vec<Node>)))]
pub async fn node_list(State(app): State<App>, ctx: Ctx) -> Resp<Vec<Node>> {
    Ok(Json(app.node_list(&ctx).await?))
}

/// Show a node (admins).
#[utoipa::path(get, path = "/v1/nodes/{id}", tag = "nodes", params(("id" = String, Path)),
    responses((status = 200, body = Node), (status = 404, body = ErrorBody)))]
pub async fn node_show(State(app): State<App>, ctx: Ctx, Path(id): Path<String>) -> Resp<Node> {
    Ok(Json(app.node_show(&ctx, &id).await?))
}

/// Stop placing new VMs on a node (admins).
#[utoipa::path(post, path = "/v1/nodes/{id}/cordon", tag = "nodes", params(("id" = String, Path, description = "id or name")),
    responses((status = 200, body = Node), (status = 404, body = ErrorBody)))]
pub async fn node_cordon(State(app): State<App>, ctx: Ctx, Path(id): Path<String>) -> Resp<Node> {
    Ok(Json(app.node_cordon(&ctx, &id, true).await?))
}

/// Place new VMs on a node again (admins).
#[utoipa::path(post, path = "/v1/nodes/{id}/uncordon", tag = "nodes", params(("id" = String, Path, description = "id or name")),
    responses((status = 200, body = Node), (status = 404, body = ErrorBody)))]
pub async fn node_uncordon(State(app): State<App>, ctx: Ctx, Path(id): Path<String>) -> Resp<Node> {
    Ok(Json(app.node_cordon(&ctx, &id, false).await?))
}

/// Cordon a node and stop its VMs (admins); their disks stay on it.
#[utoipa::path(post, path = "/v1/nodes/{id}/drain", tag = "nodes", params(("id" = String, Path, description = "id or name")),
    responses((status = 200, body = Node), (status = 404, body = ErrorBody)))]
pub async fn node_drain(State(app): State<App>, ctx: Ctx, Path(id): Path<String>) -> Resp<Node> {
    Ok(Json(app.node_drain(&ctx, &id).await?))
}

/// Adopt a VM its node holds that the control plane does not know (admins):
/// it becomes a stopped VM of its project again.
#[utoipa::path(post, path = "/v1/nodes/{id}/orphans/{vm}/adopt", tag = "nodes",
    params(("id" = String, Path, description = "id or name"), ("vm" = String, Path, description = "the orphan's id")),
    request_body = OrphanAdopt,
    responses((status = 200, body = Vm), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn node_orphan_adopt(
    State(app): State<App>,
    ctx: Ctx,
    Path((id, vm)): Path<(String, String)>,
    ApiJson(req): ApiJson<OrphanAdopt>,
) -> Resp<Vm> {
    Ok(Json(app.node_orphan_adopt(&ctx, &id, &vm, req).await?))
}

/// Remove an orphan (admins): its node deletes it with its disk.
#[utoipa::path(delete, path = "/v1/nodes/{id}/orphans/{vm}", tag = "nodes",
    params(("id" = String, Path, description = "id or name"), ("vm" = String, Path, description = "the orphan's id")),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn node_orphan_remove(
    State(app): State<App>,
    ctx: Ctx,
    Path((id, vm)): Path<(String, String)>,
) -> AppResult<StatusCode> {
    app.node_orphan_remove(&ctx, &id, &vm).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Remove a node that holds no VM (admins).
#[utoipa::path(delete, path = "/v1/nodes/{id}", tag = "nodes", params(("id" = String, Path, description = "id or name")),
    responses((status = 204), (status = 409, body = ErrorBody)))]
pub async fn node_remove(
    State(app): State<App>,
    ctx: Ctx,
    Path(id): Path<String>,
) -> AppResult<StatusCode> {
    app.node_remove(&ctx, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---------- audit ----------

/// The audit log, newest first: a project's (owners) or all (admins).
#[utoipa::path(get, path = "/v1/audit", tag = "audit", params(AuditQuery),
    responses((status = 200, body = Page<AuditEvent>)))]
pub async fn audit_list(
    State(app): State<App>,
    ctx: Ctx,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> Resp<Page<AuditEvent>> {
    Ok(Json(app.audit_list(&ctx, q).await?))
}
