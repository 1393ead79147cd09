//! The control plane's logic. Every operation takes a [`Ctx`] (who asks, and
//! where to note what was touched for the audit log), checks authorization,
//! and calls the store. Nothing here knows about HTTP.

mod access;
pub mod audit;
pub mod auth;
pub mod catalog;
pub mod environments;
pub mod events;
pub mod files;
pub mod guest;
pub mod hub;
pub mod image_files;
pub mod metadata;
pub mod nodes;
pub mod placement;
pub mod projects;
pub mod runs;
pub mod secrets;
pub mod signup;
pub mod users;
pub mod vm_views;
pub mod vms;

use crate::error::{AppError, AppResult};
use byteport_store::DataStore;
use byteport_types::api::Role;
use byteport_types::{NodeId, ProjectId, UserId};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::broadcast;
use uuid::Uuid;

/// Tunables of the control plane.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Lifetime of a JWT access token.
    pub access_ttl: Duration,
    /// Lifetime of a refresh token.
    pub refresh_ttl: Duration,
    /// Lifetime of a browser session cookie.
    pub session_ttl: Duration,
    /// Whether cookies carry `Secure` (when serving HTTPS).
    pub secure_cookies: bool,
    /// Where uploaded image files are kept, by sha256.
    pub image_dir: std::path::PathBuf,
    /// The placement policy for VMs that do not ask for one.
    pub placement_policy: byteport_scheduler::Policy,
    /// How far reservations may exceed a node's capacity.
    pub overcommit: byteport_scheduler::Overcommit,
    /// The built web console (`index.html` and `_app/`), served at `/`.
    pub web_dir: Option<std::path::PathBuf>,
    /// How long audit events are kept (`None`: for ever).
    pub audit_retention: Option<Duration>,
    /// Where the signing and metadata keys are kept (owner-only); in the
    /// database when `None` (see [`secrets`]).
    pub secrets_file: Option<std::path::PathBuf>,
}

/// Audit events are kept 90 days unless the operator says otherwise.
pub const DEFAULT_AUDIT_RETENTION: Duration = Duration::from_secs(90 * 24 * 3600);

impl Default for Settings {
    fn default() -> Self {
        Settings {
            access_ttl: Duration::from_secs(15 * 60),
            refresh_ttl: Duration::from_secs(30 * 24 * 3600),
            session_ttl: Duration::from_secs(12 * 3600),
            secure_cookies: false,
            image_dir: std::env::temp_dir().join("byteport-images"),
            placement_policy: byteport_scheduler::Policy::Spread,
            overcommit: byteport_scheduler::Overcommit::default(),
            web_dir: None,
            audit_retention: Some(DEFAULT_AUDIT_RETENTION),
            secrets_file: None,
        }
    }
}

/// The control plane: the store, secrets, and in-process notifications.
/// Cheap to clone (every request's handler gets one): one shared
/// [`AppState`], reached through `Deref`.
#[derive(Clone)]
pub struct App(Arc<AppState>);

impl std::ops::Deref for App {
    type Target = AppState;
    fn deref(&self) -> &AppState {
        &self.0
    }
}

/// What an [`App`] holds.
pub struct AppState {
    pub store: DataStore,
    pub settings: Arc<Settings>,
    pub(crate) keys: Arc<auth::Keys>,
    /// Ids of VMs whose record changed, for `wait` and event streams.
    pub(crate) vm_changes: broadcast::Sender<Uuid>,
    pub(crate) token_cache: Arc<auth::TokenCache>,
    pub(crate) session_cache: Arc<auth::SessionCache>,
    /// The channels of the nodes connected to this replica.
    pub hub: Arc<hub::NodeHub>,
    pub(crate) metadata_key: Arc<metadata::TokenKey>,
    pub(crate) metadata_limits: Arc<metadata::RateLimits>,
    /// Runs served by this replica, by id: a way to cancel each.
    pub(crate) runs_live: Arc<runs::Live>,
    /// Node reservations the recount pass found drifted and repaired.
    pub reservation_repairs: Arc<std::sync::atomic::AtomicU64>,
    /// Metadata requests refused (404, 429), counted instead of audited.
    pub metadata_refusals: Arc<metadata::Refusals>,
    /// The scheduler's decisions on this replica.
    pub scheduler: Arc<placement::Decisions>,
    /// The node inventory this replica's placements decide on.
    pub inventory: Arc<placement::Inventory>,
    /// Seconds from a VM's creation to its first report as running.
    pub boot_times: Arc<crate::metrics::Histogram>,
    /// Failed logins per account.
    pub(crate) login_limits: Arc<auth::LoginLimits>,
    /// Open sign-ups (without an invite) lately, on this replica.
    pub(crate) signup_window: Arc<signup::SignupWindow>,
    /// Open event streams per user, on this replica.
    pub(crate) event_streams: events::StreamCounts,
    /// The one reader of changes behind every event stream here.
    pub(crate) event_feed: Arc<events::EventFeed>,
    /// Roles, visible projects and project names (see [`access`]).
    pub(crate) access: Arc<access::AccessCache>,
    /// The last answer to each node's heartbeat.
    pub(crate) answers: Arc<nodes::Answers>,
    /// Each VM as the API shows it, as of its last change (see [`vm_views`]).
    pub(crate) views: Arc<vm_views::VmViews>,
}

/// Who is asking.
#[derive(Clone, Debug)]
pub enum Actor {
    Anonymous,
    User {
        id: UserId,
        name: String,
        admin: bool,
    },
    Node {
        id: NodeId,
        name: String,
    },
}

impl Actor {
    /// The label the audit log and idempotency keys use.
    pub fn label(&self) -> String {
        match self {
            Actor::Anonymous => "anonymous".into(),
            Actor::User { name, .. } => name.clone(),
            Actor::Node { name, .. } => format!("node:{name}"),
        }
    }

    /// A stable key for the idempotency table.
    pub fn key(&self) -> String {
        match self {
            Actor::Anonymous => "anonymous".into(),
            Actor::User { id, .. } => format!("user:{id}"),
            Actor::Node { id, .. } => format!("node:{id}"),
        }
    }
}

/// What a request touched, filled in by the operation for the audit log.
#[derive(Clone, Debug, Default)]
pub struct AuditNote {
    pub target_kind: Option<&'static str>,
    pub target_id: Option<String>,
    pub project_id: Option<ProjectId>,
    /// Who the caller turned out to be, when the request itself says so
    /// (a login, a refresh): the actor of its audit event.
    pub became: Option<(String, UserId)>,
}

/// The context of one request.
#[derive(Clone, Debug)]
pub struct Ctx {
    pub actor: Actor,
    pub note: Arc<Mutex<AuditNote>>,
}

impl Ctx {
    pub fn new(actor: Actor) -> Self {
        Ctx {
            actor,
            note: Arc::default(),
        }
    }

    /// Records the target of this request for the audit log.
    pub fn target(&self, kind: &'static str, id: impl ToString, project: Option<ProjectId>) {
        if let Ok(mut n) = self.note.lock() {
            n.target_kind = Some(kind);
            n.target_id = Some(id.to_string());
            if project.is_some() {
                n.project_id = project;
            }
        }
    }

    /// Records that this request proved the caller to be `name` (a login).
    pub fn became(&self, name: &str, id: UserId) {
        if let Ok(mut n) = self.note.lock() {
            n.became = Some((name.to_owned(), id));
        }
    }

    /// The calling user, or 401.
    pub fn user(&self) -> AppResult<(UserId, bool)> {
        match &self.actor {
            Actor::User { id, admin, .. } => Ok((*id, *admin)),
            _ => Err(AppError::Unauthorized(
                "log in first: this needs a user".into(),
            )),
        }
    }

    /// The calling user if an admin; 403 for other users, 401 for nobody.
    pub fn admin(&self) -> AppResult<UserId> {
        match self.user()? {
            (id, true) => Ok(id),
            _ => Err(AppError::Forbidden("this needs an admin".into())),
        }
    }
}

impl App {
    /// Builds the control plane on an open store: loads or creates the
    /// signing key and seeds the flavors and the default project.
    pub async fn new(store: DataStore, settings: Settings) -> AppResult<Self> {
        let secrets = secrets::Secrets::load(&store, settings.secrets_file.as_deref()).await?;
        let keys = auth::Keys::new(&secrets.jwt_secret);
        let metadata_key = metadata::TokenKey::new(&secrets.metadata_secret);
        let (vm_changes, _) = broadcast::channel(1024);
        let app = App(Arc::new(AppState {
            store,
            settings: Arc::new(settings),
            keys: Arc::new(keys),
            vm_changes,
            token_cache: Arc::default(),
            session_cache: Arc::default(),
            hub: Arc::default(),
            metadata_key: Arc::new(metadata_key),
            metadata_limits: Arc::default(),
            runs_live: Arc::default(),
            reservation_repairs: Arc::default(),
            metadata_refusals: Arc::default(),
            scheduler: Arc::default(),
            inventory: Arc::default(),
            boot_times: Arc::default(),
            login_limits: Arc::default(),
            signup_window: Arc::default(),
            event_streams: Arc::default(),
            event_feed: Arc::default(),
            access: Arc::default(),
            views: Arc::default(),
            answers: Arc::default(),
        }));
        catalog::seed_flavors(&app).await?;
        projects::seed_default(&app).await?;
        Ok(app)
    }

    /// The caller's role in a project: admins act as owners; a user with no
    /// role gets the same 404 as for a project that does not exist.
    pub(crate) async fn role(
        &self,
        ctx: &Ctx,
        project: ProjectId,
        kind: &'static str,
        id: &str,
    ) -> AppResult<Role> {
        let (user, admin) = ctx.user()?;
        if admin {
            return Ok(Role::Owner);
        }
        self.member_role(user.0, project.0)
            .await?
            .ok_or_else(|| AppError::not_found(kind, id))
    }

    /// Like [`App::role`], and 403 unless the role is at least `need`.
    pub(crate) async fn require(
        &self,
        ctx: &Ctx,
        project: ProjectId,
        need: Role,
        kind: &'static str,
        id: &str,
    ) -> AppResult<Role> {
        let role = self.role(ctx, project, kind, id).await?;
        if role < need {
            return Err(AppError::Forbidden(format!(
                "your role in this project is {role}; this needs {need}"
            )));
        }
        Ok(role)
    }
}

pub(crate) fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

pub(crate) fn to_u32(v: i64) -> u32 {
    u32::try_from(v).unwrap_or(0)
}
