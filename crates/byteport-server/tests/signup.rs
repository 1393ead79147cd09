//! Sign-up: self-registration (off by default, an admin turns it on) and
//! invite links (single use, expiring, revocable, joining a project), on
//! SQLite and PostgreSQL.

use axum::http::{Method, StatusCode};
use byteport_testkit::{TestServer, backends};
use serde_json::{Value, json};

const GET: Method = Method::GET;
const POST: Method = Method::POST;
const PATCH: Method = Method::PATCH;
const DELETE: Method = Method::DELETE;

async fn signup(s: &TestServer, body: Value) -> (StatusCode, Value) {
    s.call(POST, "/v1/auth/signup", None, Some(body)).await
}

async fn invite(s: &TestServer, token: &str, body: Value) -> (StatusCode, Value) {
    s.call(POST, "/v1/invites", Some(token), Some(body)).await
}

#[tokio::test(flavor = "multi_thread")]
async fn self_registration_is_off_until_an_admin_turns_it_on() {
    for b in backends() {
        let s = TestServer::start(b).await;
        let users = s.count("users").await;

        let (st, v) = s.call(GET, "/v1/auth/signup", None, None).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        assert_eq!(v["self_registration"], false);
        let (st, v) = signup(&s, json!({"name": "eve", "password": "eve-password"})).await;
        assert_eq!(st, StatusCode::FORBIDDEN, "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("invite link"),
            "{v}"
        );
        assert_eq!(
            s.count("users").await,
            users,
            "a refused sign-up made a user"
        );

        // Only admins see or change the settings.
        let bob = s.user("bob").await;
        let (st, _) = s
            .call(
                PATCH,
                "/v1/settings",
                Some(&bob),
                Some(json!({"self_registration": true})),
            )
            .await;
        assert_eq!(st, StatusCode::FORBIDDEN);
        let (st, v) = s
            .call(
                PATCH,
                "/v1/settings",
                Some(&s.admin),
                Some(json!({"self_registration": "yes"})),
            )
            .await;
        assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
        let (st, v) = s
            .call(
                PATCH,
                "/v1/settings",
                Some(&s.admin),
                Some(json!({"self_registration": true})),
            )
            .await;
        assert_eq!(
            (st, &v["self_registration"]),
            (StatusCode::OK, &json!(true))
        );
        let (_, v) = s.call(GET, "/v1/auth/signup", None, None).await;
        assert_eq!(v["self_registration"], true);

        // Now anyone may sign up, and is logged in at once, in no project.
        let (st, headers, v) = s
            .call_with(
                POST,
                "/v1/auth/signup",
                None,
                Some(json!({"name": "eve", "password": "eve-password"})),
                &[],
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        assert!(headers["set-cookie"].to_str().unwrap().contains("HttpOnly"));
        assert_eq!(
            (v["user"]["name"].as_str(), &v["user"]["admin"]),
            (Some("eve"), &json!(false))
        );
        let eve = v["access_token"].as_str().unwrap().to_owned();
        let (st, who) = s.call(GET, "/v1/auth/whoami", Some(&eve), None).await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(who["memberships"], json!([]));
        let (st, _) = s
            .call(GET, "/v1/vms?project=default", Some(&eve), None)
            .await;
        assert_eq!(st, StatusCode::NOT_FOUND, "a new account sees no project");
        // The new account logs in with its password, like any other.
        s.login("eve", "eve-password").await;

        // Bad input is refused and makes nobody.
        let users = s.count("users").await;
        for (body, code) in [
            (
                json!({"name": "eve", "password": "another-password"}),
                StatusCode::CONFLICT,
            ),
            (
                json!({"name": "Bad Name!", "password": "long-enough"}),
                StatusCode::UNPROCESSABLE_ENTITY,
            ),
            (
                json!({"name": "frank", "password": "short"}),
                StatusCode::BAD_REQUEST,
            ),
            (
                json!({"name": "frank", "password": "long-enough", "admin": true}),
                StatusCode::UNPROCESSABLE_ENTITY,
            ),
        ] {
            let (st, v) = signup(&s, body.clone()).await;
            assert_eq!(st, code, "{body}: {v}");
        }
        assert_eq!(s.count("users").await, users);

        // The sign-up was audited under the new user's name.
        let (_, log) = s
            .call(GET, "/v1/audit?limit=50", Some(&s.admin), None)
            .await;
        let events = log["items"]
            .as_array()
            .or(log.as_array())
            .cloned()
            .unwrap_or_default();
        assert!(
            events
                .iter()
                .any(|e| e["action"] == "signup" && e["actor"] == "eve" && e["status"] == 201),
            "{log}"
        );

        // Turned off again, the door closes.
        s.call(
            PATCH,
            "/v1/settings",
            Some(&s.admin),
            Some(json!({"self_registration": false})),
        )
        .await;
        let (st, _) = signup(&s, json!({"name": "gina", "password": "gina-password"})).await;
        assert_eq!(st, StatusCode::FORBIDDEN);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invite_link_makes_one_account_in_its_project() {
    for b in backends() {
        let s = TestServer::start(b).await;
        s.user("olga").await;
        let olga = s.login("olga", "user-password").await;
        let mia = s.user("mia").await;
        s.project("web", &[("olga", "owner"), ("mia", "member")])
            .await;

        // A member may not invite; an owner may, to her project only.
        let (st, _) = invite(&s, &mia, json!({"project": "web"})).await;
        assert_eq!(st, StatusCode::FORBIDDEN);
        let (st, _) = invite(&s, &olga, json!({})).await;
        assert_eq!(
            st,
            StatusCode::FORBIDDEN,
            "only admins invite to no project"
        );
        let (st, _) = invite(&s, &olga, json!({"role": "viewer"})).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "a role needs a project");
        let (st, _) = invite(&s, &olga, json!({"project": "web", "expires_in_hours": 0})).await;
        assert_eq!(st, StatusCode::BAD_REQUEST);
        let (st, _) = invite(&s, &olga, json!({"project": "nope"})).await;
        assert_eq!(st, StatusCode::NOT_FOUND);
        assert_eq!(s.count("invites").await, 0, "refused invites were stored");

        let (st, headers, made) = s
            .call_with(
                POST,
                "/v1/invites",
                Some(&olga),
                Some(json!({"project": "web", "role": "viewer"})),
                &[("host", "cloud.example:8080")],
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "{made}");
        drop(headers);
        let secret = made["secret"].as_str().unwrap().to_owned();
        assert!(secret.starts_with("bpi_"), "{made}");
        assert_eq!(
            made["link"].as_str().unwrap(),
            format!("http://cloud.example:8080/register?invite={secret}")
        );
        assert_eq!(made["invite"]["state"], "pending");
        assert_eq!(made["invite"]["created_by"], "olga");

        // Whoever holds the link learns what it gives, and nobody else
        // learns anything of a wrong one.
        let (st, v) = s
            .call(GET, &format!("/v1/auth/signup?invite={secret}"), None, None)
            .await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(
            (&v["invite"]["project"], &v["invite"]["role"]),
            (&json!("web"), &json!("viewer"))
        );
        let (_, v) = s
            .call(GET, "/v1/auth/signup?invite=bpi_wrong", None, None)
            .await;
        assert_eq!(v["invite"], Value::Null);

        // With self-registration off, the invite still works, once.
        let (st, v) = signup(
            &s,
            json!({"name": "nina", "password": "nina-password", "invite": "bpi_wrong"}),
        )
        .await;
        assert_eq!(st, StatusCode::FORBIDDEN, "{v}");
        // A refused sign-up (a taken name) leaves the invite unspent.
        let (st, _) = signup(
            &s,
            json!({"name": "mia", "password": "nina-password", "invite": secret}),
        )
        .await;
        assert_eq!(st, StatusCode::CONFLICT);
        let (st, v) = signup(
            &s,
            json!({"name": "nina", "password": "nina-password", "invite": secret}),
        )
        .await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        let nina = v["access_token"].as_str().unwrap().to_owned();
        let (_, who) = s.call(GET, "/v1/auth/whoami", Some(&nina), None).await;
        assert_eq!(
            (
                &who["memberships"][0]["project"],
                &who["memberships"][0]["role"]
            ),
            (&json!("web"), &json!("viewer"))
        );
        let (st, _) = s.call(GET, "/v1/vms?project=web", Some(&nina), None).await;
        assert_eq!(st, StatusCode::OK, "the invited viewer sees her project");
        let (st, v) = signup(
            &s,
            json!({"name": "nora", "password": "nora-password", "invite": secret}),
        )
        .await;
        assert_eq!(st, StatusCode::FORBIDDEN, "an invite is single use: {v}");

        // The owner sees it used; the member sees none of them.
        let (_, list) = s.call(GET, "/v1/invites", Some(&olga), None).await;
        assert_eq!(list[0]["state"], "used", "{list}");
        assert_eq!(list[0]["used_by"], who["user"]["id"]);
        let (_, list) = s.call(GET, "/v1/invites", Some(&mia), None).await;
        assert_eq!(list, json!([]));

        // Two sign-ups racing for one invite: exactly one account.
        let (_, made) = invite(&s, &s.admin, json!({"project": "web"})).await;
        let secret = made["secret"].as_str().unwrap().to_owned();
        let users = s.count("users").await;
        let (a, b) = tokio::join!(
            signup(
                &s,
                json!({"name": "race-a", "password": "race-password", "invite": secret})
            ),
            signup(
                &s,
                json!({"name": "race-b", "password": "race-password", "invite": secret})
            ),
        );
        let mut codes = [a.0, b.0];
        codes.sort();
        assert_eq!(
            codes,
            [StatusCode::CREATED, StatusCode::FORBIDDEN],
            "{a:?} {b:?}"
        );
        assert_eq!(s.count("users").await, users + 1);

        // An expired invite and a revoked one are refused.
        let (_, made) = invite(&s, &s.admin, json!({"expires_in_hours": 1})).await;
        let expired = made["secret"].as_str().unwrap().to_owned();
        assert_eq!(made["invite"]["project"], Value::Null, "{made}");
        // The only unused invite to no project: made to expire at its birth.
        s.sql("UPDATE invites SET expires_at = created_at WHERE used_at IS NULL AND project_id IS NULL")
            .await;
        let (st, _) = signup(
            &s,
            json!({"name": "old", "password": "old-password", "invite": expired}),
        )
        .await;
        assert_eq!(st, StatusCode::FORBIDDEN);
        let (_, list) = s.call(GET, "/v1/invites", Some(&s.admin), None).await;
        assert!(
            list.as_array()
                .unwrap()
                .iter()
                .any(|i| i["state"] == "expired"),
            "{list}"
        );

        let (_, made) = invite(&s, &olga, json!({"project": "web"})).await;
        let revoked = made["secret"].as_str().unwrap().to_owned();
        let id = made["invite"]["id"].as_str().unwrap().to_owned();
        let (st, _) = s
            .call(DELETE, &format!("/v1/invites/{id}"), Some(&mia), None)
            .await;
        assert_eq!(st, StatusCode::FORBIDDEN);
        let (st, _) = s
            .call(DELETE, &format!("/v1/invites/{id}"), Some(&olga), None)
            .await;
        assert_eq!(st, StatusCode::NO_CONTENT);
        let (st, _) = s
            .call(DELETE, &format!("/v1/invites/{id}"), Some(&olga), None)
            .await;
        assert_eq!(st, StatusCode::NOT_FOUND);
        let (st, _) = signup(
            &s,
            json!({"name": "rev", "password": "rev-password", "invite": revoked}),
        )
        .await;
        assert_eq!(st, StatusCode::FORBIDDEN);
    }
}
