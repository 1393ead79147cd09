//! Authentication: passwords (argon2id), JWT access tokens, single-use
//! refresh tokens, browser sessions, personal API tokens, the first-start
//! bootstrap token. Every secret handed out is random and stored only as a
//! SHA-256 hash.

use super::{Actor, App, Ctx};
use crate::error::{AppError, AppResult};
use argon2::Argon2;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use base64::Engine;
use byteport_store::{api_token, session, user};
use byteport_types::api::{ApiToken, ApiTokenCreated, LoginResponse, TokenCreate, User};
use byteport_types::{Name, NodeId, TokenId, UserId};
use chrono::{Duration as ChronoDuration, Utc};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Prefixes tell what a secret is at a glance (and to secret scanners).
pub const API_TOKEN_PREFIX: &str = "bpt_";
pub const REFRESH_PREFIX: &str = "bpr_";
pub const SESSION_PREFIX: &str = "bps_";
pub const NODE_PREFIX: &str = "bpn_";
pub const JOIN_PREFIX: &str = "bpj_";
pub const BOOTSTRAP_PREFIX: &str = "bpb_";
/// The name of the browser session cookie.
pub const SESSION_COOKIE: &str = "byteport_session";

const BOOTSTRAP_KEY: &str = "bootstrap_token_hash";
/// A password's length in characters.
pub(crate) const MIN_PASSWORD: usize = 8;
pub(crate) const MAX_PASSWORD: usize = 256;
/// An API token's lifetime, in days.
pub(crate) const MAX_TOKEN_DAYS: u32 = 3650;
/// How long a verified API token is trusted without a database read.
const TOKEN_CACHE_TTL: Duration = Duration::from_secs(5);

pub(crate) struct Keys {
    enc: EncodingKey,
    dec: DecodingKey,
}

impl Keys {
    /// The signing key (see [`super::secrets`]).
    pub(crate) fn new(secret: &str) -> Self {
        Keys {
            enc: EncodingKey::from_secret(secret.as_bytes()),
            dec: DecodingKey::from_secret(secret.as_bytes()),
        }
    }
}

/// Answers kept for `TOKEN_CACHE_TTL`, so a busy client does not cost a
/// database read per request; at most about 10,000 entries.
pub(crate) struct TtlCache<K, V> {
    map: Mutex<HashMap<K, (V, Instant)>>,
}

impl<K, V> Default for TtlCache<K, V> {
    fn default() -> Self {
        TtlCache {
            map: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: std::hash::Hash + Eq, V: Clone> TtlCache<K, V> {
    pub(crate) fn get<Q>(&self, key: &Q) -> Option<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        let map = self.map.lock().ok()?;
        map.get(key)
            .filter(|(_, t)| t.elapsed() < TOKEN_CACHE_TTL)
            .map(|(v, _)| v.clone())
    }

    pub(crate) fn put(&self, key: K, value: V) {
        if let Ok(mut map) = self.map.lock() {
            if map.len() > 10_000 {
                map.retain(|_, (_, t)| t.elapsed() < TOKEN_CACHE_TTL);
            }
            map.insert(key, (value, Instant::now()));
        }
    }

    pub(crate) fn remove<Q>(&self, key: &Q)
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        if let Ok(mut map) = self.map.lock() {
            map.remove(key);
        }
    }

    pub(crate) fn clear_all(&self) {
        if let Ok(mut map) = self.map.lock() {
            map.clear();
        }
    }
}

/// Verified API tokens by hash. Revocation clears the entry on this
/// replica at once; other replicas forget it within `TOKEN_CACHE_TTL`.
pub(crate) type TokenCache = TtlCache<String, Actor>;

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: Uuid,
    name: String,
    adm: bool,
    iat: i64,
    exp: i64,
    /// The refresh session it was issued with: a logout (or the refresh
    /// that replaces it) ends the access token too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sid: Option<Uuid>,
}

/// What an access token's session and user are now (`None`: it is no
/// longer good), per session, for `TOKEN_CACHE_TTL`: a logout, a deleted
/// user or a demoted admin takes effect within that on every replica, at
/// one read per session per TTL.
pub(crate) type SessionCache = TtlCache<SessionKey, Option<Actor>>;

/// An access token's user and session.
type SessionKey = (Uuid, Option<Uuid>);

/// A random secret: `prefix` + 32 random bytes in URL-safe base64.
pub fn random_secret(prefix: &str) -> String {
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    )
}

/// The stored form of a secret.
pub fn hash_secret(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// Hashes a password with argon2id, off the async threads.
/// Password hashes computed at once: each takes a core for a while, so a
/// flood of logins queues here instead of starving every other request.
static HASHING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

pub async fn hash_password(password: String) -> AppResult<String> {
    check_password(&password)?;
    let _slot = HASHING.acquire().await.map_err(AppError::internal)?;
    tokio::task::spawn_blocking(move || {
        let mut salt = [0u8; 16];
        rand::rng().fill_bytes(&mut salt);
        Argon2::default()
            .hash_password_with_salt(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(AppError::internal)
    })
    .await
    .map_err(AppError::internal)?
}

async fn verify_password(password: String, hash: String) -> bool {
    let Ok(_slot) = HASHING.acquire().await else {
        return false;
    };
    tokio::task::spawn_blocking(move || {
        PasswordHash::new(&hash)
            .map(|h| {
                Argon2::default()
                    .verify_password(password.as_bytes(), &h)
                    .is_ok()
            })
            .unwrap_or(false)
    })
    .await
    .unwrap_or(false)
}

pub fn check_password(p: &str) -> AppResult<()> {
    if p.chars().count() < MIN_PASSWORD {
        return Err(AppError::bad(
            "invalid_password",
            format!("the password must have at least {MIN_PASSWORD} characters"),
        ));
    }
    if p.chars().count() > MAX_PASSWORD {
        return Err(AppError::bad(
            "invalid_password",
            format!("the password is longer than {MAX_PASSWORD} characters"),
        ));
    }
    Ok(())
}

pub(crate) fn user_view(u: &user::Model) -> AppResult<User> {
    Ok(User {
        id: UserId(u.id),
        name: Name::parse(&u.name).map_err(AppError::internal)?,
        admin: u.admin,
        created_at: u.created_at,
    })
}

fn token_view(t: &api_token::Model) -> AppResult<ApiToken> {
    Ok(ApiToken {
        id: TokenId(t.id),
        name: Name::parse(&t.name).map_err(AppError::internal)?,
        prefix: t.prefix.clone(),
        created_at: t.created_at,
        expires_at: t.expires_at,
        last_used_at: t.last_used_at,
    })
}

/// The tokens of a successful login, and the cookie session's secret.
pub struct Issued {
    pub response: LoginResponse,
    pub session: String,
}

impl App {
    /// Resolves a bearer secret (JWT, API token or node credential) or a
    /// session cookie to the actor it names.
    pub async fn authenticate(
        &self,
        bearer: Option<&str>,
        cookie: Option<&str>,
    ) -> AppResult<Actor> {
        let bad = || AppError::Unauthorized("the credentials are invalid or expired".into());
        if let Some(secret) = bearer {
            if secret.starts_with(API_TOKEN_PREFIX) {
                let hash = hash_secret(secret);
                if let Some(a) = self.token_cache.get(&hash) {
                    return Ok(a);
                }
                let t = self.store.token_fetch(&hash).await?.ok_or_else(bad)?;
                let u = self.store.user_fetch(t.user_id).await.map_err(|_| bad())?;
                let now = Utc::now();
                if t.last_used_at
                    .is_none_or(|at| now - at > ChronoDuration::minutes(1))
                {
                    self.store.token_touch(t.id, now).await?;
                }
                let actor = Actor::User {
                    id: UserId(u.id),
                    name: u.name,
                    admin: u.admin,
                };
                self.token_cache.put(hash, actor.clone());
                return Ok(actor);
            }
            if secret.starts_with(NODE_PREFIX) {
                // Kept as API tokens are: a node removed through this
                // replica is forgotten at once, through another within
                // the cache's time to live.
                let hash = hash_secret(secret);
                if let Some(a) = self.token_cache.get(&hash) {
                    return Ok(a);
                }
                let n = self
                    .store
                    .node_by_credential(&hash)
                    .await?
                    .ok_or_else(bad)?;
                let actor = Actor::Node {
                    id: NodeId(n.id),
                    name: n.name,
                };
                self.token_cache.put(hash, actor.clone());
                return Ok(actor);
            }
            let mut v = Validation::new(Algorithm::HS256);
            v.leeway = 5;
            let data =
                jsonwebtoken::decode::<Claims>(secret, &self.keys.dec, &v).map_err(|_| bad())?;
            // Signed, and not expired; is its session still live and its
            // user still who it says?
            let key = (data.claims.sub, data.claims.sid);
            let actor = match self.session_cache.get(&key) {
                Some(a) => a,
                None => {
                    let live = match data.claims.sid {
                        Some(sid) => self.store.session_live(sid).await?.is_some(),
                        None => true,
                    };
                    let actor = match (live, self.store.user_fetch(data.claims.sub).await) {
                        (true, Ok(u)) => Some(Actor::User {
                            id: UserId(u.id),
                            name: u.name,
                            admin: u.admin,
                        }),
                        _ => None,
                    };
                    self.session_cache.put(key, actor.clone());
                    actor
                }
            };
            return actor.ok_or_else(bad);
        }
        if let Some(c) = cookie {
            let s = self
                .store
                .session_fetch(&hash_secret(c), "cookie")
                .await?
                .ok_or_else(bad)?;
            let u = self.store.user_fetch(s.user_id).await.map_err(|_| bad())?;
            return Ok(Actor::User {
                id: UserId(u.id),
                name: u.name,
                admin: u.admin,
            });
        }
        Ok(Actor::Anonymous)
    }

    pub(crate) async fn issue(&self, u: &user::Model) -> AppResult<Issued> {
        let now = Utc::now();
        let sid = Uuid::now_v7();
        let claims = Claims {
            sub: u.id,
            name: u.name.clone(),
            adm: u.admin,
            iat: now.timestamp(),
            exp: now.timestamp() + self.settings.access_ttl.as_secs() as i64,
            sid: Some(sid),
        };
        let access = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.keys.enc)
            .map_err(AppError::internal)?;
        let refresh = random_secret(REFRESH_PREFIX);
        let cookie = random_secret(SESSION_PREFIX);
        for (id, secret, kind, ttl) in [
            (sid, &refresh, "refresh", self.settings.refresh_ttl),
            (Uuid::now_v7(), &cookie, "cookie", self.settings.session_ttl),
        ] {
            self.store
                .session_insert(session::Model {
                    id,
                    user_id: u.id,
                    token_hash: hash_secret(secret),
                    kind: kind.into(),
                    expires_at: now + ChronoDuration::from_std(ttl).map_err(AppError::internal)?,
                    revoked: false,
                    created_at: now,
                })
                .await?;
        }
        Ok(Issued {
            response: LoginResponse {
                access_token: access,
                token_type: "Bearer".into(),
                expires_in: self.settings.access_ttl.as_secs(),
                refresh_token: refresh,
                user: user_view(u)?,
            },
            session: cookie,
        })
    }

    /// Checks a name and password; issues tokens and a cookie session.
    pub async fn login(&self, ctx: &Ctx, name: &str, password: String) -> AppResult<Issued> {
        if let Some(wait) = self.login_limits.locked(name) {
            return Err(AppError::RateLimited(
                format!(
                    "too many failed logins for {name}: try again in {} s",
                    wait.as_secs().max(1)
                ),
                wait.as_secs().max(1),
            ));
        }
        let result = self.login_check(ctx, name, password).await;
        match &result {
            Err(AppError::Unauthorized(_)) => self.login_limits.failed(name),
            Ok(_) => self.login_limits.succeeded(name),
            Err(_) => {}
        }
        result
    }

    async fn login_check(&self, ctx: &Ctx, name: &str, password: String) -> AppResult<Issued> {
        let bad = || AppError::Unauthorized("wrong user name or password".into());
        let Some(u) = self.store.user_fetch_by_name(name).await? else {
            // Spend the same time as a real check so timing does not tell
            // which names exist.
            let _ = hash_password("x".repeat(MIN_PASSWORD)).await;
            return Err(bad());
        };
        if !verify_password(password, u.password_hash.clone()).await {
            return Err(bad());
        }
        ctx.target("user", u.id, None);
        ctx.became(&u.name, UserId(u.id));
        self.issue(&u).await
    }

    /// Spends a refresh token for a new set.
    pub async fn refresh(&self, ctx: &Ctx, token: &str) -> AppResult<Issued> {
        let bad = || {
            AppError::Unauthorized("the refresh token is invalid, expired or already used".into())
        };
        let hash = hash_secret(token);
        let s = self
            .store
            .session_fetch(&hash, "refresh")
            .await?
            .ok_or_else(bad)?;
        if !self.store.session_revoke(&hash).await? {
            return Err(bad());
        }
        let u = self.store.user_fetch(s.user_id).await.map_err(|_| bad())?;
        ctx.target("user", u.id, None);
        ctx.became(&u.name, UserId(u.id));
        self.issue(&u).await
    }

    /// Ends a browser session and/or spends a refresh token.
    pub async fn logout(&self, cookie: Option<&str>, refresh: Option<&str>) -> AppResult<()> {
        for secret in [cookie, refresh].into_iter().flatten() {
            self.store.session_revoke(&hash_secret(secret)).await?;
        }
        // The access tokens of those sessions end here at once (other
        // replicas within TOKEN_CACHE_TTL).
        self.session_cache.clear_all();
        Ok(())
    }

    /// Makes a fresh bootstrap token if no user exists yet; returns it so
    /// the server can print it. Each start replaces the previous one.
    pub async fn bootstrap_token(&self) -> AppResult<Option<String>> {
        if self.store.user_count().await? > 0 {
            return Ok(None);
        }
        let token = random_secret(BOOTSTRAP_PREFIX);
        self.store
            .setting_set(BOOTSTRAP_KEY, &hash_secret(&token))
            .await?;
        Ok(Some(token))
    }

    /// Creates the first admin with the one-time bootstrap token.
    pub async fn bootstrap(
        &self,
        ctx: &Ctx,
        token: &str,
        name: Name,
        password: String,
    ) -> AppResult<User> {
        let bad =
            || AppError::Unauthorized("the bootstrap token is invalid or already used".into());
        // The token first: hashing costs, and a stranger must not make us
        // spend it (the token is taken for good below, once hashed).
        let expected = self.store.setting_get(BOOTSTRAP_KEY).await?;
        if expected.as_deref() != Some(hash_secret(token).as_str()) {
            return Err(bad());
        }
        let hash = hash_password(password).await?;
        if self.store.user_count().await? > 0
            || !self
                .store
                .setting_take(BOOTSTRAP_KEY, &hash_secret(token))
                .await?
        {
            return Err(bad());
        }
        let u = self
            .store
            .user_insert(user::Model {
                id: Uuid::now_v7(),
                name: name.to_string(),
                password_hash: hash,
                admin: true,
                created_at: Utc::now(),
            })
            .await?;
        self.projects_adopt_default(u.id).await?;
        ctx.target("user", u.id, None);
        user_view(&u)
    }

    pub async fn token_create(&self, ctx: &Ctx, req: TokenCreate) -> AppResult<ApiTokenCreated> {
        let (user, _) = ctx.user()?;
        let expires_at = match req.expires_in_days {
            None => None,
            Some(d @ 1..=MAX_TOKEN_DAYS) => Some(Utc::now() + ChronoDuration::days(i64::from(d))),
            Some(d) => {
                return Err(AppError::bad(
                    "invalid_expiry",
                    format!("expires_in_days is {d}; it must be between 1 and {MAX_TOKEN_DAYS}"),
                ));
            }
        };
        let secret = random_secret(API_TOKEN_PREFIX);
        let t = self
            .store
            .token_insert(api_token::Model {
                id: Uuid::now_v7(),
                user_id: user.0,
                name: req.name.to_string(),
                prefix: secret[..API_TOKEN_PREFIX.len() + 6].to_owned(),
                token_hash: hash_secret(&secret),
                created_at: Utc::now(),
                expires_at,
                last_used_at: None,
                revoked: false,
            })
            .await?;
        ctx.target("token", t.id, None);
        Ok(ApiTokenCreated {
            token: token_view(&t)?,
            secret,
        })
    }

    pub async fn token_list(&self, ctx: &Ctx) -> AppResult<Vec<ApiToken>> {
        let (user, _) = ctx.user()?;
        self.store
            .token_list(user.0)
            .await?
            .iter()
            .map(token_view)
            .collect()
    }

    pub async fn token_revoke(&self, ctx: &Ctx, id: &str) -> AppResult<()> {
        let (user, _) = ctx.user()?;
        let tid: Uuid = id.parse().map_err(|_| AppError::not_found("token", id))?;
        ctx.target("token", tid, None);
        self.store
            .token_revoke(user.0, tid)
            .await
            .map_err(|_| AppError::not_found("token", id))?;
        self.token_cache.clear_all();
        Ok(())
    }
}

/// Failed logins per account: past [`LoginLimits::MAX_FAILURES`] within
/// [`LoginLimits::WINDOW`], the account's logins are refused (429 with
/// `Retry-After`) until the window ends; a success clears the count. Kept
/// per replica, in memory.
#[derive(Default)]
pub(crate) struct LoginLimits(std::sync::Mutex<HashMap<String, (std::time::Instant, u32)>>);

impl LoginLimits {
    pub const MAX_FAILURES: u32 = 5;
    pub const WINDOW: std::time::Duration = std::time::Duration::from_secs(60);
    /// Accounts tracked at most (names need not exist): the oldest go.
    const MAX_TRACKED: usize = 10_000;

    fn key(name: &str) -> String {
        name.to_ascii_lowercase()
    }

    /// How long the account stays locked, if it is.
    fn locked(&self, name: &str) -> Option<std::time::Duration> {
        let m = self.0.lock().ok()?;
        let (since, n) = m.get(&Self::key(name))?;
        let left = Self::WINDOW.checked_sub(since.elapsed())?;
        (*n >= Self::MAX_FAILURES).then_some(left)
    }

    fn failed(&self, name: &str) {
        let Ok(mut m) = self.0.lock() else { return };
        if m.len() >= Self::MAX_TRACKED {
            m.retain(|_, (since, _)| since.elapsed() < Self::WINDOW);
        }
        let e = m
            .entry(Self::key(name))
            .or_insert((std::time::Instant::now(), 0));
        if e.0.elapsed() >= Self::WINDOW {
            *e = (std::time::Instant::now(), 0);
        }
        e.1 += 1;
    }

    fn succeeded(&self, name: &str) {
        if let Ok(mut m) = self.0.lock() {
            m.remove(&Self::key(name));
        }
    }
}
