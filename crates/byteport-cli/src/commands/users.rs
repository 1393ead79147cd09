//! `byteport user`, `byteport invite` and `byteport settings`: accounts,
//! the single-use links that let people sign up, and the server-wide
//! settings (self-registration) that admins change.

use super::{Env, done, print_json, read_password};
use crate::client::{Method, decode, seg};
use crate::table::{Table, print_fields};
use crate::{InviteCmd, SettingsCmd, Toggle, UserCmd};
use anyhow::Result;
use byteport_types::api::{Invite, InviteCreated, ServerSettings, User};
use serde_json::json;

fn user_table(users: &[User]) {
    let mut t = Table::new(&["NAME", "ID", "ADMIN", "CREATED"]);
    for u in users {
        t.row(vec![
            u.name.to_string(),
            u.id.to_string(),
            if u.admin { "yes" } else { "no" }.into(),
            ts!(u.created_at),
        ]);
    }
    t.print();
}

pub(super) fn user(env: &Env, cmd: UserCmd) -> Result<()> {
    let c = &env.client;
    match cmd {
        UserCmd::List => {
            let v = c.get("/v1/users", &[])?;
            if env.json() {
                return print_json(&v);
            }
            user_table(&decode::<Vec<User>>(&v)?);
            Ok(())
        }
        UserCmd::Create {
            name,
            admin,
            password_stdin: _,
        } => {
            let password = read_password()?;
            let v = c.value(
                Method::Post,
                "/v1/users",
                &[],
                Some(&json!({"name": name, "password": password, "admin": admin})),
            )?;
            done(env, Some(v), format!("created user {name}"))
        }
        UserCmd::Show { user } => {
            let v = c.get(&format!("/v1/users/{}", seg(&user)), &[])?;
            if env.json() {
                return print_json(&v);
            }
            let u: User = decode(&v)?;
            print_fields(&[
                ("name", u.name.to_string()),
                ("id", u.id.to_string()),
                ("admin", u.admin.to_string()),
                ("created", ts!(u.created_at)),
            ]);
            Ok(())
        }
        UserCmd::Delete { user } => {
            c.request(
                Method::Delete,
                &format!("/v1/users/{}", seg(&user)),
                &[],
                None,
            )?;
            done(env, None, format!("deleted user {user}"))
        }
    }
}

/// The secret of an invite, given as the secret or as the whole link.
pub(super) fn invite_secret(s: &str) -> String {
    match s.split_once("invite=") {
        Some((_, rest)) => rest.split('&').next().unwrap_or(rest).to_owned(),
        None => s.trim().to_owned(),
    }
}

fn invite_table(invites: &[Invite]) {
    let mut t = Table::new(&["ID", "STATE", "PROJECT", "ROLE", "BY", "EXPIRES", "USED"]);
    for i in invites {
        t.row(vec![
            i.id.to_string(),
            format!("{:?}", i.state).to_lowercase(),
            i.project.as_ref().map_or("-".into(), |p| p.to_string()),
            i.role.map_or("-".into(), |r| r.to_string()),
            i.created_by.clone(),
            ts!(i.expires_at),
            opt_ts!(i.used_at),
        ]);
    }
    t.print();
}

pub(super) fn invite(env: &Env, cmd: InviteCmd) -> Result<()> {
    let c = &env.client;
    match cmd {
        InviteCmd::Create {
            project,
            role,
            expires_in_hours,
        } => {
            let v = c.value(
                Method::Post,
                "/v1/invites",
                &[],
                Some(&json!({
                    "project": project,
                    "role": role,
                    "expires_in_hours": expires_in_hours,
                })),
            )?;
            if env.json() {
                return print_json(&v);
            }
            let made: InviteCreated = decode(&v)?;
            let to = made
                .invite
                .project
                .as_ref()
                .map_or(String::new(), |p| format!(" to {p}"));
            println!(
                "invite {}{to}, valid until {} (single use):",
                made.invite.id,
                ts!(made.invite.expires_at)
            );
            println!("{}", made.link);
            Ok(())
        }
        InviteCmd::List => {
            let v = c.get("/v1/invites", &[])?;
            if env.json() {
                return print_json(&v);
            }
            invite_table(&decode::<Vec<Invite>>(&v)?);
            Ok(())
        }
        InviteCmd::Revoke { id } => {
            c.request(
                Method::Delete,
                &format!("/v1/invites/{}", seg(&id)),
                &[],
                None,
            )?;
            done(env, None, format!("revoked invite {id}"))
        }
    }
}

pub(super) fn settings(env: &Env, cmd: SettingsCmd) -> Result<()> {
    let c = &env.client;
    let v = match cmd {
        SettingsCmd::Show => c.get("/v1/settings", &[])?,
        SettingsCmd::Set { self_registration } => c.value(
            Method::Patch,
            "/v1/settings",
            &[],
            Some(&json!({"self_registration": self_registration.map(|s| s == Toggle::On)})),
        )?,
    };
    if env.json() {
        return print_json(&v);
    }
    let s: ServerSettings = decode(&v)?;
    print_fields(&[(
        "self-registration",
        if s.self_registration { "on" } else { "off" }.into(),
    )]);
    Ok(())
}
