//! Accounts: users, their sessions and API tokens, the invites that let
//! people sign up, and the key-value settings the server keeps.

use crate::{
    DataStore, Result, StoreError, api_token, invite, member, project, session, setting,
    unique_conflict, user,
};
use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, EntityTrait, IntoActiveModel, PaginatorTrait, QueryFilter,
    QueryOrder, Set,
};
use uuid::Uuid;

impl DataStore {
    // ---------- settings ----------

    pub async fn setting_get(&self, key: &str) -> Result<Option<String>> {
        Ok(setting::Entity::find_by_id(key.to_owned())
            .one(&self.db)
            .await?
            .map(|s| s.value))
    }

    /// Stores `value` unless the key exists; returns the value that won, so
    /// replicas starting together agree on one secret.
    pub async fn setting_get_or_insert(&self, key: &str, value: &str) -> Result<String> {
        let row = setting::ActiveModel {
            key: Set(key.to_owned()),
            value: Set(value.to_owned()),
        };
        setting::Entity::insert(row)
            .on_conflict_do_nothing_on([setting::Column::Key])
            .exec(&self.db)
            .await?;
        self.setting_get(key).await?.ok_or(StoreError::NotFound)
    }

    pub async fn setting_delete(&self, key: &str) -> Result<()> {
        setting::Entity::delete_by_id(key.to_owned())
            .exec(&self.db)
            .await?;
        Ok(())
    }

    pub async fn setting_set(&self, key: &str, value: &str) -> Result<()> {
        let row = setting::ActiveModel {
            key: Set(key.to_owned()),
            value: Set(value.to_owned()),
        };
        setting::Entity::insert(row)
            .on_conflict(
                OnConflict::column(setting::Column::Key)
                    .update_column(setting::Column::Value)
                    .to_owned(),
            )
            .exec(&self.db)
            .await?;
        Ok(())
    }

    /// Deletes a setting; true when this call removed it (one winner).
    pub async fn setting_take(&self, key: &str, value: &str) -> Result<bool> {
        let res = setting::Entity::delete_many()
            .filter(setting::Column::Key.eq(key))
            .filter(setting::Column::Value.eq(value))
            .exec(&self.db)
            .await?;
        Ok(res.rows_affected == 1)
    }

    // ---------- users, sessions, tokens ----------

    pub async fn user_count(&self) -> Result<u64> {
        Ok(user::Entity::find().count(&self.db).await?)
    }

    pub async fn user_insert(&self, u: user::Model) -> Result<user::Model> {
        if self.user_fetch_by_name(&u.name).await?.is_some() {
            return Err(StoreError::Conflict(format!(
                "user {} already exists",
                u.name
            )));
        }
        u.into_active_model()
            .insert(&self.db)
            .await
            .map_err(unique_conflict("user"))
    }

    pub async fn user_fetch(&self, id: Uuid) -> Result<user::Model> {
        user::Entity::find_by_id(id)
            .one(&self.db)
            .await?
            .ok_or(StoreError::NotFound)
    }

    pub async fn user_fetch_by_name(&self, name: &str) -> Result<Option<user::Model>> {
        Ok(user::Entity::find()
            .filter(user::Column::Name.eq(name))
            .one(&self.db)
            .await?)
    }

    pub async fn user_list(&self) -> Result<Vec<user::Model>> {
        Ok(user::Entity::find()
            .order_by_asc(user::Column::Name)
            .all(&self.db)
            .await?)
    }

    /// Deletes a user with its memberships, sessions and tokens.
    pub async fn user_delete(&self, id: Uuid) -> Result<()> {
        let tx = self.begin_write().await?;
        member::Entity::delete_many()
            .filter(member::Column::UserId.eq(id))
            .exec(&tx)
            .await?;
        session::Entity::delete_many()
            .filter(session::Column::UserId.eq(id))
            .exec(&tx)
            .await?;
        api_token::Entity::delete_many()
            .filter(api_token::Column::UserId.eq(id))
            .exec(&tx)
            .await?;
        let res = user::Entity::delete_by_id(id).exec(&tx).await?;
        if res.rows_affected == 0 {
            return Err(StoreError::NotFound);
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn session_insert(&self, s: session::Model) -> Result<()> {
        s.into_active_model().insert(&self.db).await?;
        Ok(())
    }

    /// A live (unrevoked, unexpired) session by token hash.
    pub async fn session_fetch(
        &self,
        token_hash: &str,
        kind: &str,
    ) -> Result<Option<session::Model>> {
        Ok(session::Entity::find()
            .filter(session::Column::TokenHash.eq(token_hash))
            .filter(session::Column::Kind.eq(kind))
            .filter(session::Column::Revoked.eq(false))
            .filter(session::Column::ExpiresAt.gt(Utc::now()))
            .one(&self.db)
            .await?)
    }

    /// A live session by its id (an access token names the one it came
    /// with).
    pub async fn session_live(&self, id: Uuid) -> Result<Option<session::Model>> {
        Ok(session::Entity::find_by_id(id)
            .filter(session::Column::Revoked.eq(false))
            .filter(session::Column::ExpiresAt.gt(Utc::now()))
            .one(&self.db)
            .await?)
    }

    /// Revokes a live session; true when this call revoked it, so a refresh
    /// token can be spent once even by two racing requests.
    pub async fn session_revoke(&self, token_hash: &str) -> Result<bool> {
        let res = session::Entity::update_many()
            .col_expr(session::Column::Revoked, Expr::value(true))
            .filter(session::Column::TokenHash.eq(token_hash))
            .filter(session::Column::Revoked.eq(false))
            .exec(&self.db)
            .await?;
        Ok(res.rows_affected == 1)
    }

    pub async fn token_insert(&self, t: api_token::Model) -> Result<api_token::Model> {
        Ok(t.into_active_model().insert(&self.db).await?)
    }

    pub async fn token_list(&self, user_id: Uuid) -> Result<Vec<api_token::Model>> {
        Ok(api_token::Entity::find()
            .filter(api_token::Column::UserId.eq(user_id))
            .filter(api_token::Column::Revoked.eq(false))
            .order_by_asc(api_token::Column::Id)
            .all(&self.db)
            .await?)
    }

    /// A live token by its hash.
    pub async fn token_fetch(&self, token_hash: &str) -> Result<Option<api_token::Model>> {
        let t = api_token::Entity::find()
            .filter(api_token::Column::TokenHash.eq(token_hash))
            .filter(api_token::Column::Revoked.eq(false))
            .one(&self.db)
            .await?;
        Ok(t.filter(|t| t.expires_at.is_none_or(|e| e > Utc::now())))
    }

    pub async fn token_touch(&self, id: Uuid, at: DateTime<Utc>) -> Result<()> {
        api_token::Entity::update_many()
            .col_expr(api_token::Column::LastUsedAt, Expr::value(at))
            .filter(api_token::Column::Id.eq(id))
            .exec(&self.db)
            .await?;
        Ok(())
    }

    pub async fn token_revoke(&self, user_id: Uuid, id: Uuid) -> Result<()> {
        let res = api_token::Entity::update_many()
            .col_expr(api_token::Column::Revoked, Expr::value(true))
            .filter(api_token::Column::Id.eq(id))
            .filter(api_token::Column::UserId.eq(user_id))
            .filter(api_token::Column::Revoked.eq(false))
            .exec(&self.db)
            .await?;
        if res.rows_affected == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    // ---------- invites and sign-up ----------

    pub async fn invite_insert(&self, i: invite::Model) -> Result<invite::Model> {
        Ok(i.into_active_model().insert(&self.db).await?)
    }

    /// Every invite, newest first (ids grow with time).
    pub async fn invite_list(&self) -> Result<Vec<invite::Model>> {
        Ok(invite::Entity::find()
            .order_by_desc(invite::Column::Id)
            .all(&self.db)
            .await?)
    }

    pub async fn invite_fetch(&self, id: Uuid) -> Result<Option<invite::Model>> {
        Ok(invite::Entity::find_by_id(id).one(&self.db).await?)
    }

    pub async fn invite_fetch_by_hash(&self, token_hash: &str) -> Result<Option<invite::Model>> {
        Ok(invite::Entity::find()
            .filter(invite::Column::TokenHash.eq(token_hash))
            .one(&self.db)
            .await?)
    }

    /// Revokes an invite (used or not); `NotFound` when there is none.
    pub async fn invite_delete(&self, id: Uuid) -> Result<()> {
        let res = invite::Entity::delete_by_id(id).exec(&self.db).await?;
        if res.rows_affected == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    /// Creates a user who signs up. With an invite (by the hash of its
    /// secret) the invite is spent and its membership made in the same
    /// transaction: of two sign-ups with one invite, one wins, and a
    /// refused sign-up (a taken name) leaves the invite unspent.
    /// `NotFound` means the invite is unknown, spent or expired; a
    /// conflict names what else went wrong.
    pub async fn user_signup(
        &self,
        u: user::Model,
        invite_hash: Option<&str>,
    ) -> Result<(user::Model, Option<invite::Model>)> {
        let _w = self.serialize().await;
        let tx = self.begin_write().await?;
        let mut spent = None;
        if let Some(hash) = invite_hash {
            let res = invite::Entity::update_many()
                .col_expr(invite::Column::UsedAt, Expr::value(u.created_at))
                .col_expr(invite::Column::UsedBy, Expr::value(u.id))
                .filter(invite::Column::TokenHash.eq(hash))
                .filter(invite::Column::UsedAt.is_null())
                .filter(invite::Column::ExpiresAt.gt(u.created_at))
                .exec(&tx)
                .await?;
            if res.rows_affected != 1 {
                return Err(StoreError::NotFound);
            }
            spent = invite::Entity::find()
                .filter(invite::Column::TokenHash.eq(hash))
                .one(&tx)
                .await?;
        }
        if user::Entity::find()
            .filter(user::Column::Name.eq(&u.name))
            .one(&tx)
            .await?
            .is_some()
        {
            return Err(StoreError::Conflict(format!(
                "user {} already exists",
                u.name
            )));
        }
        let u = u
            .into_active_model()
            .insert(&tx)
            .await
            .map_err(unique_conflict("user"))?;
        if let Some(i) = &spent
            && let (Some(project_id), Some(role)) = (i.project_id, &i.role)
        {
            if project::Entity::find_by_id(project_id)
                .one(&tx)
                .await?
                .is_none()
            {
                return Err(StoreError::Conflict(
                    "the project of this invite no longer exists".into(),
                ));
            }
            member::ActiveModel {
                project_id: Set(project_id),
                user_id: Set(u.id),
                role: Set(role.clone()),
            }
            .insert(&tx)
            .await?;
        }
        tx.commit().await?;
        Ok((u, spent))
    }
}
