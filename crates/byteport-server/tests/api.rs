//! API tests against the real server on SQLite and on a real PostgreSQL:
//! each test runs once per database that `byteport_testkit::backends()`
//! reports.

use axum::http::{Method, StatusCode};
use byteport_testkit::{SimNode, TestServer, backends};
use serde_json::{Value, json};

const GET: Method = Method::GET;
const POST: Method = Method::POST;
const PUT: Method = Method::PUT;
const DELETE: Method = Method::DELETE;

async fn create_vm(s: &TestServer, token: &str, project: &str, name: &str) -> (StatusCode, Value) {
    s.call(
        POST,
        "/v1/vms",
        Some(token),
        Some(json!({"name": name, "project": project, "image": "tiny", "flavor": "m1.tiny"})),
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn login_refresh_cookie_and_api_tokens() {
    for b in backends() {
        let s = TestServer::start(b).await;
        let (st, v) = s
            .call(
                POST,
                "/v1/auth/login",
                None,
                Some(json!({"name": "admin", "password": "wrong-password"})),
            )
            .await;
        assert_eq!(
            (st, v["error"]["code"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("unauthorized"))
        );

        let (st, headers, v) = s
            .call_with(
                POST,
                "/v1/auth/login",
                None,
                Some(json!({"name": "admin", "password": "admin-password"})),
                &[],
            )
            .await;
        assert_eq!(st, StatusCode::OK);
        let cookie = headers["set-cookie"].to_str().unwrap().to_owned();
        assert!(
            cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
            "{cookie}"
        );
        let session = cookie.split(';').next().unwrap().to_owned();

        // The cookie alone authenticates the browser.
        let (st, _, who) = s
            .call_with(GET, "/v1/auth/whoami", None, None, &[("cookie", &session)])
            .await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(who["user"]["name"], "admin");
        // A cross-site mutation with the cookie is refused.
        let (st, _, _) = s
            .call_with(
                POST,
                "/v1/tokens",
                None,
                Some(json!({"name": "x"})),
                &[
                    ("cookie", &session),
                    ("origin", "https://evil.example"),
                    ("host", "cloud.example"),
                ],
            )
            .await;
        assert_eq!(st, StatusCode::FORBIDDEN);

        // A refresh token works once.
        let refresh = v["refresh_token"].as_str().unwrap();
        let (st, _) = s
            .call(
                POST,
                "/v1/auth/refresh",
                None,
                Some(json!({"refresh_token": refresh})),
            )
            .await;
        assert_eq!(st, StatusCode::OK);
        let (st, _) = s
            .call(
                POST,
                "/v1/auth/refresh",
                None,
                Some(json!({"refresh_token": refresh})),
            )
            .await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);

        // Logout ends the cookie session.
        let (st, _, _) = s
            .call_with(POST, "/v1/auth/logout", None, None, &[("cookie", &session)])
            .await;
        assert_eq!(st, StatusCode::NO_CONTENT);
        let (st, _, _) = s
            .call_with(GET, "/v1/auth/whoami", None, None, &[("cookie", &session)])
            .await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);

        // API tokens: shown once, stored hashed, listed without the secret, revocable.
        let (st, t) = s
            .call(
                POST,
                "/v1/tokens",
                Some(&s.admin),
                Some(json!({"name": "ci"})),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED);
        let secret = t["secret"].as_str().unwrap().to_owned();
        assert!(secret.starts_with("bpt_"));
        let (st, _) = s.call(GET, "/v1/auth/whoami", Some(&secret), None).await;
        assert_eq!(st, StatusCode::OK);
        let (_, list) = s.call(GET, "/v1/tokens", Some(&s.admin), None).await;
        assert_eq!(list.as_array().unwrap().len(), 1);
        assert!(
            !list.to_string().contains(&secret),
            "the secret is never listed"
        );
        let id = t["token"]["id"].as_str().unwrap();
        let (st, _) = s
            .call(DELETE, &format!("/v1/tokens/{id}"), Some(&s.admin), None)
            .await;
        assert_eq!(st, StatusCode::NO_CONTENT);
        let (st, _) = s.call(GET, "/v1/auth/whoami", Some(&secret), None).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);
        // Another user cannot revoke (or learn of) someone's token.
        let (_, t2) = s
            .call(
                POST,
                "/v1/tokens",
                Some(&s.admin),
                Some(json!({"name": "ci2"})),
            )
            .await;
        let bob = s.user("bob").await;
        let id2 = t2["token"]["id"].as_str().unwrap();
        let (st, _) = s
            .call(DELETE, &format!("/v1/tokens/{id2}"), Some(&bob), None)
            .await;
        assert_eq!(st, StatusCode::NOT_FOUND);
        // The bootstrap token is spent.
        let (st, _) = s
            .call(
                POST,
                "/v1/bootstrap",
                None,
                Some(json!({"token": "bpb_x", "name": "eve", "password": "12345678"})),
            )
            .await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);
    }
}

/// Who may do what is decided on each request from the current state: a
/// member removed from the project gets 404 on the very next request, a
/// role lowered takes effect at once, and a revoked token is refused, each
/// right after the same caller was let in (the guard for any cache of
/// identities and memberships).
#[tokio::test(flavor = "multi_thread")]
async fn access_changes_take_effect_on_the_next_request() {
    for b in backends() {
        let s = TestServer::start(b).await;
        s.image("tiny").await;
        let member = s.user("member").await;
        s.project("alpha", &[("member", "member")]).await;
        let (st, vm) = create_vm(&s, &s.admin, "alpha", "target").await;
        assert_eq!(st, StatusCode::ACCEPTED, "{vm}");
        let show = format!("/v1/vms/{}", vm["id"].as_str().unwrap());
        let create = |name: &str| json!({"name": name, "project": "alpha", "image": "tiny", "flavor": "m1.tiny"});

        // A member: lets in, twice.
        for _ in 0..2 {
            let (st, v) = s.call(GET, &show, Some(&member), None).await;
            assert_eq!(st, StatusCode::OK, "{v}");
        }
        let (st, v) = s
            .call(POST, "/v1/vms", Some(&member), Some(create("by-member")))
            .await;
        assert_eq!(st, StatusCode::ACCEPTED, "{v}");
        // Lowered to viewer: reads still, creates no more.
        let (st, v) = s
            .call(
                PUT,
                "/v1/projects/alpha/members/member",
                Some(&s.admin),
                Some(json!({"role": "viewer"})),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{v}");
        let (st, v) = s
            .call(POST, "/v1/vms", Some(&member), Some(create("by-viewer")))
            .await;
        assert_eq!(st, StatusCode::FORBIDDEN, "{v}");
        let (st, _) = s.call(GET, &show, Some(&member), None).await;
        assert_eq!(st, StatusCode::OK);
        // Removed: the project and its VMs are gone for them at once.
        let (st, v) = s
            .call(
                DELETE,
                "/v1/projects/alpha/members/member",
                Some(&s.admin),
                None,
            )
            .await;
        assert!(st.is_success(), "{st} {v}");
        let (st, v) = s.call(GET, &show, Some(&member), None).await;
        assert_eq!(st, StatusCode::NOT_FOUND, "{v}");
        let (_, list) = s.call(GET, "/v1/vms", Some(&member), None).await;
        assert_eq!(list["items"], json!([]), "{list}");

        // A token used a moment ago, then revoked: refused.
        let (st, t) = s
            .call(
                POST,
                "/v1/tokens",
                Some(&s.admin),
                Some(json!({"name": "ci"})),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "{t}");
        let secret = t["secret"].as_str().unwrap().to_owned();
        for _ in 0..2 {
            let (st, _) = s.call(GET, &show, Some(&secret), None).await;
            assert_eq!(st, StatusCode::OK);
        }
        let id = t["token"]["id"].as_str().unwrap();
        let (st, _) = s
            .call(DELETE, &format!("/v1/tokens/{id}"), Some(&s.admin), None)
            .await;
        assert_eq!(st, StatusCode::NO_CONTENT);
        let (st, _) = s.call(GET, &show, Some(&secret), None).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);
    }
}

/// Every actor against every route family; each cell is the exact status.
#[tokio::test(flavor = "multi_thread")]
async fn authorization_matrix() {
    for b in backends() {
        let s = TestServer::start(b).await;
        s.image("tiny").await;
        let viewer = s.user("viewer").await;
        let member = s.user("member").await;
        let owner = s.user("owner").await;
        let stranger = s.user("stranger").await;
        s.project(
            "alpha",
            &[
                ("viewer", "viewer"),
                ("member", "member"),
                ("owner", "owner"),
            ],
        )
        .await;
        s.project("beta", &[("stranger", "owner")]).await;
        let (st, vm) = create_vm(&s, &s.admin, "alpha", "target").await;
        assert_eq!(st, StatusCode::ACCEPTED);
        let vm_id = vm["id"].as_str().unwrap().to_owned();

        let actors: [(&str, Option<&str>); 6] = [
            ("anonymous", None),
            ("viewer", Some(&viewer)),
            ("member", Some(&member)),
            ("owner", Some(&owner)),
            ("other-owner", Some(&stranger)),
            ("admin", Some(&s.admin)),
        ];
        type Body = fn(&str) -> Option<Value>;
        let none: Body = |_| None;
        #[rustfmt::skip]
        let cells: Vec<(&str, Method, String, Body, [u16; 6])> = vec![
            //                                                                                       anon viewer member owner other admin
            ("vm list",       GET,    "/v1/vms?project=alpha".into(),             none,                [401, 200, 200, 200, 404, 200]),
            ("vm show",       GET,    format!("/v1/vms/{vm_id}"),                 none,                [401, 200, 200, 200, 404, 200]),
            ("vm create",     POST,   "/v1/vms".into(), |a| Some(json!({"name": format!("by-{a}"), "project": "alpha", "image": "tiny", "flavor": "m1.tiny"})),
                                                                                                       [401, 403, 202, 202, 404, 202]),
            ("vm pause",      POST,   format!("/v1/vms/{vm_id}/pause"),           none,                [401, 403, 409, 409, 404, 409]),
            ("project show",  GET,    "/v1/projects/alpha".into(),                none,                [401, 200, 200, 200, 404, 200]),
            ("members",       GET,    "/v1/projects/alpha/members".into(),        none,                [401, 200, 200, 200, 404, 200]),
            ("member set",    PUT,    "/v1/projects/alpha/members/viewer".into(), |_| Some(json!({"role": "viewer"})),
                                                                                                       [401, 403, 403, 200, 404, 200]),
            ("quota set",     PUT,    "/v1/projects/alpha/quota".into(), |_| Some(json!({"max_vms": 20, "max_vcpus": 40, "max_memory_mib": 65536, "max_disk_gib": 500})),
                                                                                                       [401, 403, 403, 200, 404, 200]),
            ("audit",         GET,    "/v1/audit?project=alpha".into(),           none,                [401, 403, 403, 200, 404, 200]),
            ("project create", POST,  "/v1/projects".into(), |a| Some(json!({"name": format!("p-{a}")})),
                                                                                                       [401, 403, 403, 403, 403, 201]),
            ("user list",     GET,    "/v1/users".into(),                         none,                [401, 403, 403, 403, 403, 200]),
            ("flavor list",   GET,    "/v1/flavors".into(),                       none,                [401, 200, 200, 200, 200, 200]),
            ("flavor create", POST,   "/v1/flavors".into(), |a| Some(json!({"name": format!("f-{a}"), "vcpus": 1, "memory_mib": 256, "disk_gib": 1})),
                                                                                                       [401, 403, 403, 403, 403, 201]),
            ("image list",    GET,    "/v1/images".into(),                        none,                [401, 200, 200, 200, 200, 200]),
            ("image create",  POST,   "/v1/images".into(), |a| Some(json!({"name": format!("i-{a}"), "os_family": "linux", "os_version": "1", "format": "qcow2", "size_bytes": 1, "sha256": "ab".repeat(32)})),
                                                                                                       [401, 403, 403, 403, 403, 201]),
            ("node list",     GET,    "/v1/nodes".into(),                         none,                [401, 403, 403, 403, 403, 200]),
            ("join token",    POST,   "/v1/node-join-tokens".into(), |_| Some(json!({})),              [401, 403, 403, 403, 403, 201]),
        ];
        // Delete changes what later actors see, so it runs separately below.
        let mut failures = Vec::new();
        for (family, method, path, body, expect) in &cells {
            for ((actor, token), want) in actors.iter().zip(expect) {
                let (st, v) = s.call(method.clone(), path, *token, body(actor)).await;
                if st.as_u16() != *want {
                    failures.push(format!("{family} as {actor}: want {want}, got {st} {v}"));
                }
            }
        }
        // Delete: viewer 403, stranger 404, then the member deletes it.
        let del = format!("/v1/vms/{vm_id}");
        for (token, want) in [
            (None, 401),
            (Some(&viewer), 403),
            (Some(&stranger), 404),
            (Some(&member), 202),
        ] {
            let (st, v) = s.call(DELETE, &del, token.map(String::as_str), None).await;
            if st.as_u16() != want {
                failures.push(format!("vm delete: want {want}, got {st} {v}"));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));

        // A hidden VM looks exactly like one that never existed.
        let (_, hidden) = s
            .call(GET, &format!("/v1/vms/{vm_id}"), Some(&stranger), None)
            .await;
        let ghost = "01a20000-0000-7000-8000-000000000000";
        let (_, missing) = s
            .call(GET, &format!("/v1/vms/{ghost}"), Some(&stranger), None)
            .await;
        assert_eq!(
            hidden["error"]["message"]
                .as_str()
                .unwrap()
                .replace(&vm_id, "ID"),
            missing["error"]["message"]
                .as_str()
                .unwrap()
                .replace(ghost, "ID")
        );
        // Listing without a project shows only the caller's projects.
        let (_, mine) = s.call(GET, "/v1/vms", Some(&stranger), None).await;
        assert_eq!(mine["items"].as_array().unwrap().len(), 0);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn lifecycle_through_the_api_follows_the_state_machine() {
    for b in backends() {
        let s = TestServer::start(b).await;
        s.image("tiny").await;
        let t = s.admin.clone();
        let (st, vm) = create_vm(&s, &t, "default", "web-1").await;
        assert_eq!(st, StatusCode::ACCEPTED);
        assert_eq!(vm["state"], "pending");
        assert_eq!(vm["desired_state"], "running");
        let id = vm["id"].as_str().unwrap().to_owned();
        let act = |a: &'static str| format!("/v1/vms/{id}/{a}");

        for (action, want, state_after) in [
            ("start", 409, "pending"),
            ("pause", 409, "pending"),
            ("resume", 409, "pending"),
            ("restart", 409, "pending"),
            ("stop", 202, "stopped"),
            ("stop", 409, "stopped"),
            ("pause", 409, "stopped"),
            ("start", 202, "pending"),
        ] {
            let before = s.app.store.vm_fetch(id.parse().unwrap()).await.unwrap();
            let (st, v) = s.call(POST, &act(action), Some(&t), None).await;
            assert_eq!(st.as_u16(), want, "{action}: {v}");
            if want == 409 {
                assert_eq!(v["error"]["code"], "invalid_transition");
                let msg = v["error"]["message"].as_str().unwrap();
                assert!(msg.contains(action) && msg.contains(&before.state), "{msg}");
                let after = s.app.store.vm_fetch(id.parse().unwrap()).await.unwrap();
                assert_eq!(before, after, "a refused {action} changed nothing");
            }
            let (_, shown) = s.call(GET, &format!("/v1/vms/{id}"), Some(&t), None).await;
            assert_eq!(shown["state"], state_after, "after {action}");
        }

        // wait: reached at once, or a timeout that names the state.
        let (st, v) = s
            .call(
                GET,
                &format!("/v1/vms/{id}/wait?state=running&timeout_secs=1"),
                Some(&t),
                None,
            )
            .await;
        assert_eq!(st, StatusCode::GATEWAY_TIMEOUT, "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("still pending")
        );
        let (st, _) = s
            .call(
                GET,
                &format!("/v1/vms/{id}/wait?state=pending&timeout_secs=1"),
                Some(&t),
                None,
            )
            .await;
        assert_eq!(st, StatusCode::OK);

        let (st, v) = s
            .call(DELETE, &format!("/v1/vms/{id}"), Some(&t), None)
            .await;
        assert_eq!(
            (st, v["state"].as_str()),
            (StatusCode::ACCEPTED, Some("deleted"))
        );
        for action in ["start", "stop", "restart", "pause", "resume"] {
            let (st, v) = s.call(POST, &act(action), Some(&t), None).await;
            assert_eq!(st, StatusCode::CONFLICT, "{action} on a deleted VM");
            assert!(v["error"]["message"].as_str().unwrap().contains("deleted"));
        }
        let (st, _) = s
            .call(DELETE, &format!("/v1/vms/{id}"), Some(&t), None)
            .await;
        assert_eq!(st, StatusCode::CONFLICT);
        // Its name is free again; deleted VMs are listed only when asked for.
        let (st, _) = create_vm(&s, &t, "default", "web-1").await;
        assert_eq!(st, StatusCode::ACCEPTED);
        let (_, live) = s.call(GET, "/v1/vms?name=web-1", Some(&t), None).await;
        assert_eq!(live["items"].as_array().unwrap().len(), 1);
        let (_, gone) = s.call(GET, "/v1/vms?state=deleted", Some(&t), None).await;
        assert_eq!(gone["items"].as_array().unwrap().len(), 1);
        // The same name twice in one project is a conflict.
        let (st, v) = create_vm(&s, &t, "default", "web-1").await;
        assert_eq!(st, StatusCode::CONFLICT, "{v}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_a_clear_4xx_and_changes_nothing() {
    for b in backends() {
        let s = TestServer::start(b).await;
        s.image("tiny").await;
        let t = s.admin.clone();
        let vms_before = s.count("vms").await;
        let ok = json!({"name": "ok", "image": "tiny", "flavor": "m1.tiny"});
        let with = |k: &str, v: Value| {
            let mut o = ok.clone();
            o[k] = v;
            o
        };
        let cases: Vec<(&str, Value, u16, &str, &str)> = vec![
            (
                "unknown field",
                with("colour", json!("red")),
                422,
                "invalid_body",
                "unknown field `colour`",
            ),
            (
                "shell name",
                with("name", json!("a;rm -rf /")),
                422,
                "invalid_body",
                "only a-z, 0-9",
            ),
            (
                "path name",
                with("name", json!("../etc")),
                422,
                "invalid_body",
                "name",
            ),
            (
                "upper-case name",
                with("name", json!("Web")),
                422,
                "invalid_body",
                "'W'",
            ),
            (
                "long name",
                with("name", json!("x".repeat(64))),
                422,
                "invalid_body",
                "at most 63",
            ),
            (
                "negative size",
                with("vcpus", json!(-1)),
                422,
                "invalid_body",
                "vcpus",
            ),
            (
                "absurd vcpus",
                with("vcpus", json!(100000)),
                400,
                "invalid_size",
                "vcpus is 100000",
            ),
            (
                "absurd memory",
                with("memory_mib", json!(1u64 << 40)),
                400,
                "invalid_size",
                "memory_mib",
            ),
            (
                "zero disk",
                with("disk_gib", json!(0)),
                400,
                "invalid_size",
                "disk_gib is 0",
            ),
            (
                "no size",
                json!({"name": "ok", "image": "tiny"}),
                400,
                "missing_size",
                "give a flavor",
            ),
            (
                "unknown image",
                with("image", json!("nope")),
                400,
                "unknown_image",
                "no image named nope",
            ),
            (
                "unknown flavor",
                with("flavor", json!("m9.huge")),
                400,
                "unknown_flavor",
                "m9.huge",
            ),
            (
                "binary user-data",
                with("user_data", json!("#cloud-config\u{1}")),
                400,
                "invalid_user_data",
                "control character",
            ),
            (
                "a NUL in any text",
                with("user_data", json!("#cloud-config\u{0}")),
                400,
                "invalid_text",
                "NUL",
            ),
            (
                "huge user-data",
                with("user_data", json!("a".repeat(70_000))),
                400,
                "invalid_user_data",
                "at most 65536",
            ),
            (
                "bad ssh key",
                with("ssh_keys", json!(["not a key"])),
                400,
                "invalid_ssh_key",
                "ssh_keys[0]",
            ),
            (
                "bad label",
                with("labels", json!({"a b": "c"})),
                400,
                "invalid_label",
                "label key",
            ),
        ];
        for (what, body, status, code, needle) in cases {
            let (st, v) = s.call(POST, "/v1/vms", Some(&t), Some(body)).await;
            assert_eq!(st.as_u16(), status, "{what}: {v}");
            assert_eq!(v["error"]["code"], code, "{what}: {v}");
            let msg = v["error"]["message"].as_str().unwrap_or_default();
            assert!(msg.contains(needle), "{what}: {msg:?} lacks {needle:?}");
        }
        // Malformed JSON, the wrong content type, a body over the limit.
        let raw = |body: String, ct: &'static str| {
            axum::http::Request::builder()
                .method(POST)
                .uri("/v1/vms")
                .header("authorization", format!("Bearer {t}"))
                .header("content-type", ct)
                .body(axum::body::Body::from(body))
                .unwrap()
        };
        let (st, _, v) = s.raw(raw("{\"name\": ".into(), "application/json")).await;
        assert_eq!(
            (st.as_u16(), v["error"]["code"].as_str()),
            (400, Some("invalid_json"))
        );
        let (st, _, v) = s.raw(raw(ok.to_string(), "text/plain")).await;
        assert_eq!(
            (st.as_u16(), v["error"]["code"].as_str()),
            (415, Some("unsupported_media_type"))
        );
        let big = format!(
            "{{\"name\":\"ok\",\"image\":\"tiny\",\"flavor\":\"m1.tiny\",\"user_data\":\"{}\"}}",
            "a".repeat(2 << 20)
        );
        let (st, _, v) = s.raw(raw(big, "application/json")).await;
        assert_eq!(
            (st.as_u16(), v["error"]["code"].as_str()),
            (413, Some("body_too_large"))
        );
        // Bad query strings.
        for q in [
            "limit=0",
            "limit=501",
            "cursor=zzz",
            "state=sleeping",
            "label=novalue",
        ] {
            let (st, v) = s.call(GET, &format!("/v1/vms?{q}"), Some(&t), None).await;
            assert_eq!(st, StatusCode::BAD_REQUEST, "{q}: {v}");
        }
        assert_eq!(
            s.count("vms").await,
            vms_before,
            "no rejected request created a VM"
        );
        let (st, v) = s
            .call(
                POST,
                "/v1/users",
                Some(&t),
                Some(json!({"name": "short", "password": "123"})),
            )
            .await;
        assert_eq!(
            (st.as_u16(), v["error"]["code"].as_str()),
            (400, Some("invalid_password"))
        );
        assert_eq!(s.count("users").await, 1);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn idempotency_key_replays_and_rejects_a_different_body() {
    for b in backends() {
        let s = TestServer::start(b).await;
        s.image("tiny").await;
        let t = s.admin.clone();
        let body = json!({"name": "once", "image": "tiny", "flavor": "m1.tiny"});
        let key = [("idempotency-key", "key-1")];
        let (st1, _, v1) = s
            .call_with(POST, "/v1/vms", Some(&t), Some(body.clone()), &key)
            .await;
        let (st2, h2, v2) = s
            .call_with(POST, "/v1/vms", Some(&t), Some(body.clone()), &key)
            .await;
        assert_eq!((st1, st2), (StatusCode::ACCEPTED, StatusCode::ACCEPTED));
        assert_eq!(v1, v2, "the retry returns the first response");
        assert_eq!(h2["idempotent-replayed"], "true");
        assert_eq!(s.count("vms").await, 1, "created once");
        let other = json!({"name": "twice", "image": "tiny", "flavor": "m1.tiny"});
        let (st, _, v) = s
            .call_with(POST, "/v1/vms", Some(&t), Some(other), &key)
            .await;
        assert_eq!(
            (st.as_u16(), v["error"]["code"].as_str()),
            (422, Some("idempotency_mismatch"))
        );
        assert_eq!(s.count("vms").await, 1);
        // Keys belong to their user: another user's same key is a new request.
        let bob = s.user("bob").await;
        s.project("bobs", &[("bob", "member")]).await;
        let bobs = json!({"name": "once", "project": "bobs", "image": "tiny", "flavor": "m1.tiny"});
        let (st, _, v) = s
            .call_with(POST, "/v1/vms", Some(&bob), Some(bobs), &key)
            .await;
        assert_eq!(st, StatusCode::ACCEPTED, "{v}");
        assert_ne!(v["id"], v1["id"]);
        // Keys apply to creating POSTs only: an action retried with one is
        // judged as any second action is (never applied twice).
        let id = v1["id"].as_str().unwrap();
        let k2 = [("idempotency-key", "stop-1")];
        let (a, _, _) = s
            .call_with(POST, &format!("/v1/vms/{id}/stop"), Some(&t), None, &k2)
            .await;
        let (b2, _, _) = s
            .call_with(POST, &format!("/v1/vms/{id}/stop"), Some(&t), None, &k2)
            .await;
        assert_eq!((a, b2), (StatusCode::ACCEPTED, StatusCode::CONFLICT));
        let (c, _, _) = s
            .call_with(POST, &format!("/v1/vms/{id}/stop"), Some(&t), None, &[])
            .await;
        assert_eq!(
            c,
            StatusCode::CONFLICT,
            "without the key, a second stop is refused"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn pagination_walks_every_vm_once() {
    for b in backends() {
        let s = TestServer::start(b).await;
        s.image("tiny").await;
        let t = s.admin.clone();
        let (st, _) = s
            .call(
                PUT,
                "/v1/projects/default/quota",
                Some(&t),
                Some(json!({"max_vms": 1000, "max_vcpus": 1000, "max_memory_mib": 1048576, "max_disk_gib": 100000})),
            )
            .await;
        assert_eq!(st, StatusCode::OK);
        let n = 250;
        for i in 0..n {
            let label = if i % 5 == 0 { "blue" } else { "green" };
            let (st, v) = s
                .call(
                    POST,
                    "/v1/vms",
                    Some(&t),
                    Some(json!({"name": format!("vm-{i}"), "image": "tiny", "flavor": "m1.tiny", "labels": {"colour": label}})),
                )
                .await;
            assert_eq!(st, StatusCode::ACCEPTED, "{v}");
        }
        let mut seen = std::collections::HashSet::new();
        let mut cursor: Option<String> = None;
        let mut pages = 0;
        loop {
            let path = match &cursor {
                Some(c) => format!("/v1/vms?limit=100&cursor={c}"),
                None => "/v1/vms?limit=100".into(),
            };
            let (st, v) = s.call(GET, &path, Some(&t), None).await;
            assert_eq!(st, StatusCode::OK);
            pages += 1;
            for vm in v["items"].as_array().unwrap() {
                assert!(
                    seen.insert(vm["name"].as_str().unwrap().to_owned()),
                    "no VM twice"
                );
            }
            match v["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => break,
            }
        }
        assert_eq!((seen.len(), pages), (n, 3));
        let (_, blue) = s
            .call(GET, "/v1/vms?label=colour=blue&limit=500", Some(&t), None)
            .await;
        assert_eq!(blue["items"].as_array().unwrap().len(), n / 5);
        let (_, one) = s.call(GET, "/v1/vms?name=vm-7", Some(&t), None).await;
        assert_eq!(one["items"][0]["name"], "vm-7");
    }
}

/// The list and `GET /v1/vms/{id}` answer from views kept per change: a
/// VM changed behind this replica's back (as another replica on the same
/// database would, straight through the store) shows its change on the
/// very next read, in the list, in a filtered list, and on its own.
#[tokio::test(flavor = "multi_thread")]
async fn a_vm_changed_by_another_replica_shows_its_change_on_the_next_read() {
    for b in backends() {
        let s = TestServer::start(b).await;
        s.image("tiny").await;
        let t = s.admin.clone();
        let mut ids = Vec::new();
        for i in 0..3 {
            let (st, v) = create_vm(&s, &t, "default", &format!("seen-{i}")).await;
            assert_eq!(st, StatusCode::ACCEPTED, "{v}");
            ids.push(v["id"].as_str().unwrap().to_owned());
        }
        let read = |path: String| {
            let s = &s;
            let t = t.clone();
            async move { s.call(GET, &path, Some(&t), None).await.1 }
        };
        // Read twice: the second read answers from the views.
        for _ in 0..2 {
            let l = read("/v1/vms".into()).await;
            assert_eq!(l["items"].as_array().unwrap().len(), 3, "{l}");
            assert_eq!(
                read(format!("/v1/vms/{}", ids[1])).await["state"],
                "pending"
            );
        }
        let id = uuid::Uuid::parse_str(&ids[1]).unwrap();
        s.app
            .store
            .vm_set_pending_reason(id, "changed elsewhere")
            .await
            .expect("a change through the store");
        let l = read("/v1/vms".into()).await;
        let entry = l["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["id"] == json!(ids[1]))
            .cloned()
            .expect("listed");
        assert_eq!(entry["state_reason"], "changed elsewhere", "{l}");
        let one = read(format!("/v1/vms/{}", ids[1])).await;
        assert_eq!(one, entry, "the list and the VM agree");
        let named = read("/v1/vms?state=pending&name=seen-1".into()).await;
        assert_eq!(named["items"].as_array().unwrap().len(), 1, "{named}");
        assert_eq!(named["items"][0], entry);
        // The others are as they were.
        for other in [&ids[0], &ids[2]] {
            let v = read(format!("/v1/vms/{other}")).await;
            assert_ne!(v["state_reason"], "changed elsewhere", "{v}");
        }
        // A page walk with the cursor still sees every VM once.
        let first = read("/v1/vms?limit=2".into()).await;
        let cursor = first["next_cursor"].as_str().expect("a second page");
        let second = read(format!("/v1/vms?limit=2&cursor={cursor}")).await;
        let mut walked: Vec<String> = first["items"]
            .as_array()
            .unwrap()
            .iter()
            .chain(second["items"].as_array().unwrap())
            .map(|v| v["id"].as_str().unwrap().to_owned())
            .collect();
        walked.sort();
        let mut want = ids.clone();
        want.sort();
        assert_eq!(walked, want);
        assert!(second["next_cursor"].is_null(), "{second}");
    }
}

/// What the list says of a VM is what `GET /v1/vms/{id}` says, field for
/// field, whatever the VM holds: pending or placed, with labels, keys,
/// user-data, ports, an engine, in an environment or not.
#[tokio::test(flavor = "multi_thread")]
async fn a_list_entry_is_the_vm_field_for_field() {
    for b in backends() {
        let s = TestServer::start(b).await;
        s.image("tiny").await;
        let t = s.admin.clone();
        let bodies = [
            json!({"name": "plain", "image": "tiny", "flavor": "m1.tiny"}),
            json!({"name": "full", "image": "tiny", "vcpus": 1, "memory_mib": 512, "disk_gib": 2,
                "hostname": "full-host", "labels": {"tier": "web", "team": "a"},
                "ssh_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx0ZXN0a2V5dGVzdGtleXRlc3RrZXl0ZXN0 t@h"],
                "user_data": "#cloud-config\nruncmd: [[true]]\n", "ports": [80, 8080],
                "egress": "deny", "engine": "libvirt"}),
        ];
        for body in bodies {
            let (st, v) = s.call(POST, "/v1/vms", Some(&t), Some(body)).await;
            assert_eq!(st, StatusCode::ACCEPTED, "{v}");
        }
        // One placed on a node and reported running.
        let node = SimNode::join(&s, "n-1", 8192).await;
        let (st, v) = create_vm(&s, &t, "default", "placed").await;
        assert_eq!(st, StatusCode::ACCEPTED, "{v}");
        let placed = v["id"].as_str().unwrap().to_owned();
        let (st, _) = node.report(&s, &[(&placed, "running", 1, 1)]).await;
        assert_eq!(st, StatusCode::OK);
        // And the VMs of an environment.
        let (st, e) = s
            .call(
                POST,
                "/v1/environments",
                Some(&t),
                Some(json!({"name": "env", "os_prefixes": ["tiny"], "flavor": "m1.tiny"})),
            )
            .await;
        assert_eq!(st, StatusCode::ACCEPTED, "{e}");

        let (st, list) = s.call(GET, "/v1/vms?limit=100", Some(&t), None).await;
        assert_eq!(st, StatusCode::OK, "{list}");
        let items = list["items"].as_array().unwrap();
        assert_eq!(items.len(), 4, "{list}");
        for item in items {
            let id = item["id"].as_str().unwrap();
            let (st, one) = s.call(GET, &format!("/v1/vms/{id}"), Some(&t), None).await;
            assert_eq!(st, StatusCode::OK, "{one}");
            assert_eq!(item, &one, "the list entry of {} differs", item["name"]);
            // Both read the narrow row: it is the whole row but for what
            // the API never shows.
            let uuid = id.parse().unwrap();
            let whole = s.app.store.vm_fetch(uuid).await.unwrap();
            let narrow = s.app.store.vm_fetch_narrow(uuid).await.unwrap();
            let expected = byteport_store::vm::Model {
                user_data: whole.user_data.as_ref().map(|_| String::new()),
                metadata_token_hash: None,
                ..whole
            };
            assert_eq!(narrow, expected, "{b:?}");
        }
        // The figures asserted above are the VM's, not blanks.
        let full = items.iter().find(|v| v["name"] == "full").unwrap();
        assert_eq!(full["has_user_data"], true, "{full}");
        assert_eq!(full["labels"]["tier"], "web", "{full}");
        assert_eq!(full["engine"], "libvirt", "{full}");
        assert!(
            full.get("user_data").is_none(),
            "no user-data in a VM: {full}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn quota_is_enforced_with_the_numbers() {
    for b in backends() {
        let s = TestServer::start(b).await;
        s.image("tiny").await;
        let t = s.admin.clone();
        let (st, _) = s
            .call(
                PUT,
                "/v1/projects/default/quota",
                Some(&t),
                Some(json!({"max_vms": 2, "max_vcpus": 3, "max_memory_mib": 8192, "max_disk_gib": 100})),
            )
            .await;
        assert_eq!(st, StatusCode::OK);
        let (st, v) = s
            .call(
                POST,
                "/v1/vms",
                Some(&t),
                Some(json!({"name": "big", "image": "tiny", "flavor": "m1.large"})),
            )
            .await;
        assert_eq!(st, StatusCode::FORBIDDEN);
        assert_eq!(v["error"]["code"], "quota_exceeded");
        assert_eq!(
            v["error"]["message"],
            "quota max_vcpus exceeded: this needs 4, the project uses 0 of 3"
        );
        for name in ["a", "b"] {
            assert_eq!(
                create_vm(&s, &t, "default", name).await.0,
                StatusCode::ACCEPTED
            );
        }
        let (st, v) = create_vm(&s, &t, "default", "c").await;
        assert_eq!(st, StatusCode::FORBIDDEN);
        assert_eq!(
            v["error"]["message"],
            "quota max_vms exceeded: this needs 1, the project uses 2 of 2"
        );
        assert_eq!(s.count("vms").await, 2);
        let (_, p) = s.call(GET, "/v1/projects/default", Some(&t), None).await;
        assert_eq!(
            p["usage"],
            json!({"vms": 2, "vcpus": 2, "memory_mib": 1024, "disk_gib": 10})
        );
        // Deleting frees the quota.
        let (_, list) = s.call(GET, "/v1/vms?name=a", Some(&t), None).await;
        let id = list["items"][0]["id"].as_str().unwrap();
        assert_eq!(
            s.call(DELETE, &format!("/v1/vms/{id}"), Some(&t), None)
                .await
                .0,
            StatusCode::ACCEPTED
        );
        assert_eq!(
            create_vm(&s, &t, "default", "c").await.0,
            StatusCode::ACCEPTED
        );
        // Concurrent creates never exceed it.
        let (st, _) = s
            .call(
                PUT,
                "/v1/projects/default/quota",
                Some(&t),
                Some(json!({"max_vms": 10, "max_vcpus": 100, "max_memory_mib": 65536, "max_disk_gib": 1000})),
            )
            .await;
        assert_eq!(st, StatusCode::OK);
        let mut tasks = Vec::new();
        for i in 0..20 {
            let r = s.router.clone();
            let t = t.clone();
            tasks.push(tokio::spawn(async move {
                use tower::ServiceExt;
                let req = axum::http::Request::builder()
                    .method(POST)
                    .uri("/v1/vms")
                    .header("authorization", format!("Bearer {t}"))
                    .header("content-type", "application/json")
                    .body(axum::body::Body::from(
                        json!({"name": format!("race-{i}"), "image": "tiny", "flavor": "m1.tiny"})
                            .to_string(),
                    ))
                    .unwrap();
                r.oneshot(req).await.unwrap().status()
            }));
        }
        let mut accepted = 0;
        for task in tasks {
            if task.await.unwrap() == StatusCode::ACCEPTED {
                accepted += 1;
            }
        }
        assert_eq!(accepted, 8, "10 allowed, 2 already live");
        let (_, p) = s.call(GET, "/v1/projects/default", Some(&t), None).await;
        assert_eq!(p["usage"]["vms"], 10);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn nodes_register_once_and_heartbeat_with_their_own_credential() {
    for b in backends() {
        let s = TestServer::start(b).await;
        let t = s.admin.clone();
        let (st, jt) = s
            .call(POST, "/v1/node-join-tokens", Some(&t), Some(json!({})))
            .await;
        assert_eq!(st, StatusCode::CREATED);
        let join = jt["token"].as_str().unwrap();
        let reg = json!({"join_token": join, "name": "node-1", "engines": ["qemu"],
            "capacity": {"vcpus": 2, "memory_mib": 24000, "disk_gib": 200}});
        let (st, n) = s
            .call(POST, "/v1/nodes/register", None, Some(reg.clone()))
            .await;
        assert_eq!(st, StatusCode::CREATED, "{n}");
        let (st, _) = s.call(POST, "/v1/nodes/register", None, Some(reg)).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED, "a join token works once");
        let cred = n["credential"].as_str().unwrap();
        let id = n["node"]["id"].as_str().unwrap();
        let hb = json!({"capacity": {"vcpus": 2, "memory_mib": 24000, "disk_gib": 200},
            "usage": {"vcpus": 1, "memory_mib": 512, "disk_gib": 5}, "vms": []});
        let (st, v) = s
            .call(
                POST,
                &format!("/v1/nodes/{id}/heartbeat"),
                Some(cred),
                Some(hb.clone()),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{v}");
        assert_eq!(v["vms"], json!([]));
        let (st, _) = s
            .call(
                POST,
                &format!("/v1/nodes/{id}/heartbeat"),
                Some(&t),
                Some(hb.clone()),
            )
            .await;
        assert_eq!(
            st,
            StatusCode::UNAUTHORIZED,
            "a user cannot heartbeat for a node"
        );
        let (st, _) = s
            .call(
                POST,
                &format!("/v1/nodes/{id}/heartbeat"),
                Some("bpn_forged"),
                Some(hb),
            )
            .await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);
        let (_, nodes) = s.call(GET, "/v1/nodes", Some(&t), None).await;
        assert_eq!(nodes[0]["name"], "node-1");
        assert_eq!(nodes[0]["status"], "online");
        assert_eq!(nodes[0]["usage"]["memory_mib"], 512);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_mutation_is_audited_and_metrics_count_requests() {
    for b in backends() {
        let s = TestServer::start(b).await;
        s.image("tiny").await;
        let t = s.admin.clone();
        let (_, vm) = create_vm(&s, &t, "default", "audited").await;
        let id = vm["id"].as_str().unwrap();
        s.call(POST, &format!("/v1/vms/{id}/pause"), Some(&t), None)
            .await;
        let (st, v) = s
            .call(GET, "/v1/audit?project=default", Some(&t), None)
            .await;
        assert_eq!(st, StatusCode::OK);
        let items = v["items"].as_array().unwrap();
        let pause = &items[0];
        assert_eq!(
            (
                pause["action"].as_str(),
                pause["status"].as_u64(),
                pause["result"].as_str(),
                pause["actor"].as_str()
            ),
            (
                Some("vm_pause"),
                Some(409),
                Some("invalid_transition"),
                Some("admin")
            )
        );
        let create = &items[1];
        assert_eq!(
            (create["action"].as_str(), create["target_id"].as_str()),
            (Some("vm_create"), Some(id))
        );
        let text = {
            use tower::ServiceExt;
            let r = s
                .router
                .clone()
                .oneshot(
                    axum::http::Request::get("/metrics")
                        .body(axum::body::Body::empty())
                        .unwrap(),
                )
                .await
                .unwrap();
            String::from_utf8(
                axum::body::to_bytes(r.into_body(), usize::MAX)
                    .await
                    .unwrap()
                    .to_vec(),
            )
            .unwrap()
        };
        assert!(
            text.contains(
                "byteport_http_requests_total{method=\"POST\",route=\"/v1/vms\",status=\"202\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("byteport_http_request_duration_seconds_bucket{method=\"POST\",route=\"/v1/vms/{id}/pause\",status=\"409\",le=\"+Inf\"} 1"));
        assert!(text.contains("byteport_vms{state=\"pending\"} 1"));
    }
}

/// Registers a simulated node and returns (id, credential), for tests
/// that write their heartbeats themselves.
async fn sim_node(s: &TestServer, name: &str, memory_mib: u64) -> (String, String) {
    let n = SimNode::join(s, name, memory_mib).await;
    (n.id, n.credential)
}

#[tokio::test(flavor = "multi_thread")]
async fn placement_reserves_capacity_and_cordon_drain_remove_behave() {
    for b in backends() {
        let s = TestServer::start(b).await;
        let t = s.admin.clone();
        s.image("tiny").await;
        let (n1, cred1) = sim_node(&s, "node-1", 2048).await;
        let vm = |name: &str, mem: u64| json!({"name": name, "image": "tiny", "vcpus": 1, "memory_mib": mem, "disk_gib": 10});
        // Placed at once, and the node's reservation holds it.
        let (st, a) = s.call(POST, "/v1/vms", Some(&t), Some(vm("a", 1536))).await;
        assert_eq!(st, StatusCode::ACCEPTED, "{a}");
        assert_eq!(a["node_id"], n1.as_str());
        assert_eq!(a["state"], "provisioning");
        let (_, node) = s.call(GET, "/v1/nodes/node-1", Some(&t), None).await;
        assert_eq!(node["reserved"]["memory_mib"], 1536, "{node}");
        // No room left: pending, with the scheduler's reason.
        let (_, b2) = s.call(POST, "/v1/vms", Some(&t), Some(vm("b", 1024))).await;
        assert_eq!(b2["state"], "pending");
        let why = b2["state_reason"].as_str().unwrap_or_default();
        assert!(why.contains("1024 MiB") && why.contains("512 MiB"), "{why}");
        // A cordoned node takes nothing new, even with room.
        let (st, c) = s
            .call(POST, "/v1/nodes/node-1/cordon", Some(&t), None)
            .await;
        assert_eq!(
            (st, c["status"].as_str()),
            (StatusCode::OK, Some("cordoned"))
        );
        let (n2, _) = sim_node(&s, "node-2", 4096).await;
        let (_, c2) = s
            .call(POST, "/v1/nodes/node-2/cordon", Some(&t), None)
            .await;
        assert_eq!(c2["status"], "cordoned");
        assert_eq!(s.app.place_pending().await.unwrap(), 0);
        // Uncordoned, the waiting VM lands on the node with room.
        s.call(POST, "/v1/nodes/node-2/uncordon", Some(&t), None)
            .await;
        assert_eq!(s.app.place_pending().await.unwrap(), 1);
        let bid = b2["id"].as_str().unwrap();
        let (_, b3) = s.call(GET, &format!("/v1/vms/{bid}"), Some(&t), None).await;
        assert_eq!(b3["node_id"], n2.as_str());
        // A heartbeat keeps a cordon.
        let hb = json!({"capacity": {"vcpus": 2, "memory_mib": 2048, "disk_gib": 100}, "vms": []});
        let (st, resp) = s
            .call(
                POST,
                &format!("/v1/nodes/{n1}/heartbeat"),
                Some(&cred1),
                Some(hb.clone()),
            )
            .await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(
            resp["vms"][0]["id"], a["id"],
            "the node is told to run its VM"
        );
        let (_, node) = s
            .call(GET, &format!("/v1/nodes/{n1}"), Some(&t), None)
            .await;
        assert_eq!(node["status"], "cordoned");
        // Drain: its VMs are asked to stop; removal waits until it holds none.
        let (st, _) = s.call(POST, "/v1/nodes/node-1/drain", Some(&t), None).await;
        assert_eq!(st, StatusCode::OK);
        let aid = a["id"].as_str().unwrap();
        let (_, a2) = s.call(GET, &format!("/v1/vms/{aid}"), Some(&t), None).await;
        assert_eq!(a2["desired_state"], "stopped", "{a2}");
        let (st, e) = s.call(DELETE, "/v1/nodes/node-1", Some(&t), None).await;
        assert_eq!(st, StatusCode::CONFLICT, "{e}");
        // Deleting the VM: once the node reports it gone, the reservation
        // returns and the node can be removed.
        s.call(DELETE, &format!("/v1/vms/{aid}"), Some(&t), None)
            .await;
        let gone = json!({"capacity": {"vcpus": 2, "memory_mib": 2048, "disk_gib": 100},
            "vms": [{"id": aid, "state": "deleted", "generation": 5, "desired_generation": 9}]});
        s.call(
            POST,
            &format!("/v1/nodes/{n1}/heartbeat"),
            Some(&cred1),
            Some(gone),
        )
        .await;
        let (_, node) = s
            .call(GET, &format!("/v1/nodes/{n1}"), Some(&t), None)
            .await;
        assert_eq!(node["reserved"]["memory_mib"], 0, "{node}");
        let (st, _) = s.call(DELETE, "/v1/nodes/node-1", Some(&t), None).await;
        assert_eq!(st, StatusCode::NO_CONTENT);
        let (st, _) = s
            .call(
                POST,
                &format!("/v1/nodes/{n1}/heartbeat"),
                Some(&cred1),
                Some(hb),
            )
            .await;
        assert_eq!(
            st,
            StatusCode::UNAUTHORIZED,
            "a removed node's credential is dead"
        );
        // Only admins manage nodes.
        let alice = s.user("alice").await;
        let (st, _) = s
            .call(POST, "/v1/nodes/node-2/cordon", Some(&alice), None)
            .await;
        assert_eq!(st, StatusCode::FORBIDDEN);
    }
}

/// A create through another replica's router (same database).
async fn create_on(r: &axum::Router, token: &str, body: Value) -> (StatusCode, Value) {
    use tower::ServiceExt;
    let req = axum::http::Request::builder()
        .method(POST)
        .uri("/v1/vms")
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(axum::body::Body::from(body.to_string()))
        .unwrap();
    let resp = r.clone().oneshot(req).await.unwrap();
    let st = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    (st, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread")]
async fn creates_decide_on_a_shared_inventory_that_another_replicas_placements_and_freed_room_correct()
 {
    use std::sync::atomic::Ordering::Relaxed;
    for b in backends() {
        let s = TestServer::start(b).await;
        let t = s.admin.clone();
        s.image("tiny").await;
        let mut nodes = std::collections::HashMap::new();
        for i in 0..4 {
            let n = SimNode::join(&s, &format!("n-{i}"), 1024).await;
            nodes.insert(n.id.clone(), n);
        }
        let other =
            byteport_server::App::new(s.app.store.clone(), byteport_server::Settings::default())
                .await
                .unwrap();
        let other_router = byteport_server::router(other.clone());
        let vm = |name: &str| json!({"name": name, "image": "tiny", "vcpus": 1, "memory_mib": 512, "disk_gib": 1});

        // Four creates here: one read of the nodes for all of them (two
        // if the copy's time to live ran out on a slow machine).
        let reads = s.app.inventory.reads.load(Relaxed);
        for i in 0..4 {
            let (st, v) = s
                .call(POST, "/v1/vms", Some(&t), Some(vm(&format!("a-{i}"))))
                .await;
            assert_eq!(
                (st, v["state"].as_str()),
                (StatusCode::ACCEPTED, Some("provisioning")),
                "{v}"
            );
        }
        let made = s.app.inventory.reads.load(Relaxed) - reads;
        assert!(made <= 2, "{b:?}: {made} reads of the nodes for 4 creates");

        // The other replica fills the rest; this one's copy does not know.
        let mut theirs = Vec::new();
        for i in 0..4 {
            let (st, v) = create_on(&other_router, &t, vm(&format!("b-{i}"))).await;
            assert_eq!(
                (st, v["state"].as_str()),
                (StatusCode::ACCEPTED, Some("provisioning")),
                "{v}"
            );
            theirs.push(v);
        }
        // A decision on the stale copy loses its race to the store's
        // guard, reads again, and the VM waits with the true reason; no
        // node is over its limit.
        let (st, late) = s.call(POST, "/v1/vms", Some(&t), Some(vm("late"))).await;
        assert_eq!(st, StatusCode::ACCEPTED, "{late}");
        assert_eq!(late["state"], "pending", "{b:?}: {late}");
        assert!(
            late["state_reason"]
                .as_str()
                .unwrap_or("")
                .contains("512 MiB"),
            "{late}"
        );
        for id in nodes.keys() {
            let (_, n) = s
                .call(GET, &format!("/v1/nodes/{id}"), Some(&t), None)
                .await;
            assert_eq!(n["reserved"]["memory_mib"], 1024, "{b:?}: {n}");
        }

        // Room given back through this replica is seen at once, not
        // after the copy's time to live.
        let gone = &theirs[0];
        let gid = gone["id"].as_str().unwrap();
        let (st, _) = s
            .call(DELETE, &format!("/v1/vms/{gid}"), Some(&t), None)
            .await;
        assert_eq!(st, StatusCode::ACCEPTED);
        let node = &nodes[gone["node_id"].as_str().unwrap()];
        let (st, _) = node.report(&s, &[(gid, "deleted", 5, 9)]).await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(s.app.place_pending().await.unwrap(), 1, "{b:?}");
        let (_, placed) = s
            .call(
                GET,
                &format!("/v1/vms/{}", late["id"].as_str().unwrap()),
                Some(&t),
                None,
            )
            .await;
        assert_eq!(placed["node_id"], gone["node_id"], "{placed}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn anti_affinity_groups_and_per_vm_policy() {
    for b in backends() {
        let s = TestServer::start(b).await;
        let t = s.admin.clone();
        s.image("tiny").await;
        for i in 0..3 {
            sim_node(&s, &format!("n-{i}"), 8192).await;
        }
        let vm = |name: &str, placement: Value| {
            json!({"name": name, "image": "tiny", "vcpus": 1, "memory_mib": 512, "disk_gib": 1,
                   "placement": placement})
        };
        let mut nodes = std::collections::HashSet::new();
        for i in 0..3 {
            let (st, v) = s
                .call(
                    POST,
                    "/v1/vms",
                    Some(&t),
                    Some(vm(
                        &format!("web-{i}"),
                        json!({"group": "web", "policy": "pack"}),
                    )),
                )
                .await;
            assert_eq!(st, StatusCode::ACCEPTED, "{v}");
            assert_eq!(v["placement"]["group"], "web");
            assert!(
                nodes.insert(v["node_id"].as_str().unwrap().to_owned()),
                "two of a group on one node"
            );
        }
        let (_, v) = s
            .call(
                POST,
                "/v1/vms",
                Some(&t),
                Some(vm("web-3", json!({"group": "web"}))),
            )
            .await;
        assert_eq!(v["state"], "pending");
        assert!(
            v["state_reason"]
                .as_str()
                .unwrap()
                .contains("anti-affinity"),
            "{v}"
        );
        // Pack puts two ungrouped VMs on the same, fullest node.
        let (_, a) = s
            .call(
                POST,
                "/v1/vms",
                Some(&t),
                Some(vm("p-a", json!({"policy": "pack"}))),
            )
            .await;
        let (_, b2) = s
            .call(
                POST,
                "/v1/vms",
                Some(&t),
                Some(vm("p-b", json!({"policy": "pack"}))),
            )
            .await;
        assert_eq!(a["node_id"], b2["node_id"]);
        // A region no node is in.
        let (_, r) = s
            .call(
                POST,
                "/v1/vms",
                Some(&t),
                Some(vm("far", json!({"region": "eu-1"}))),
            )
            .await;
        assert_eq!(r["state"], "pending");
        assert!(
            r["state_reason"].as_str().unwrap().contains("region eu-1"),
            "{r}"
        );
        let (st, e) = s
            .call(
                POST,
                "/v1/vms",
                Some(&t),
                Some(vm("bad", json!({"region": "a b"}))),
            )
            .await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{e}");
        let (st, _) = s
            .call(
                POST,
                "/v1/vms",
                Some(&t),
                Some(vm("bad", json!({"policy": "random"}))),
            )
            .await;
        assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_vm_keeps_only_its_disk_reserved() {
    for b in backends() {
        let s = TestServer::start(b).await;
        let t = s.admin.clone();
        s.image("tiny").await;
        let solo = SimNode::join(&s, "solo", 2048).await;
        let n = solo.id.clone();
        let body = |name: &str| json!({"name": name, "image": "tiny", "vcpus": 1, "memory_mib": 2048, "disk_gib": 10});
        let (_, a) = s.call(POST, "/v1/vms", Some(&t), Some(body("a"))).await;
        let aid = a["id"].as_str().unwrap().to_owned();
        solo.report(&s, &[(&aid, "running", 1, 1)]).await;
        s.call(POST, &format!("/v1/vms/{aid}/stop"), Some(&t), None)
            .await;
        solo.report(&s, &[(&aid, "stopped", 2, 2)]).await;
        let (_, node) = s.call(GET, &format!("/v1/nodes/{n}"), Some(&t), None).await;
        assert_eq!(
            node["reserved"],
            json!({"vcpus": 0, "memory_mib": 0, "disk_gib": 10}),
            "{node}"
        );
        // Its memory now goes to another VM...
        let (_, b2) = s.call(POST, "/v1/vms", Some(&t), Some(body("b"))).await;
        assert_eq!(b2["node_id"], n.as_str());
        // ...so the stopped one cannot start again until there is room.
        let (st, e) = s
            .call(POST, &format!("/v1/vms/{aid}/start"), Some(&t), None)
            .await;
        assert_eq!(st, StatusCode::CONFLICT, "{e}");
        assert!(
            e["error"]["message"].as_str().unwrap().contains("no room"),
            "{e}"
        );
        let (_, a2) = s.call(GET, &format!("/v1/vms/{aid}"), Some(&t), None).await;
        assert_eq!(a2["state"], "stopped", "a refused start changes nothing");
        let bid = b2["id"].as_str().unwrap();
        s.call(DELETE, &format!("/v1/vms/{bid}"), Some(&t), None)
            .await;
        solo.report(&s, &[(bid, "deleted", 9, 9)]).await;
        let (st, a3) = s
            .call(POST, &format!("/v1/vms/{aid}/start"), Some(&t), None)
            .await;
        assert_eq!(st, StatusCode::ACCEPTED, "{a3}");
        let (_, node) = s.call(GET, &format!("/v1/nodes/{n}"), Some(&t), None).await;
        assert_eq!(
            node["reserved"],
            json!({"vcpus": 1, "memory_mib": 2048, "disk_gib": 10}),
            "{node}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_metadata_service_gives_each_vm_its_own_documents_only() {
    for b in backends() {
        let s = TestServer::start(b).await;
        let t = s.admin.clone();
        s.image("tiny").await;
        let (n1, cred1) = sim_node(&s, "node-1", 8192).await;
        let user_data = "#cloud-config\nruncmd:\n  - [sh, -c, 'echo \"$((6*7))\" > /answer']\n";
        let key =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFkKBq7T6Wc7q2dB0wq5V7Vt5m7wq3G9m3oHq1v7c3mZ u@h";
        let (st, a) = s
            .call(
                POST,
                "/v1/vms",
                Some(&t),
                Some(json!({"name": "a", "image": "tiny", "flavor": "m1.tiny",
                    "user_data": user_data, "ssh_keys": [key], "hostname": "alpha"})),
            )
            .await;
        assert_eq!(st, StatusCode::ACCEPTED, "{a}");
        let (_, bvm) = create_vm(&s, &t, "default", "b").await;
        let (a_id, b_id) = (a["id"].as_str().unwrap(), bvm["id"].as_str().unwrap());
        // Who the keys log in as: the image's user; none when it names none.
        assert_eq!(a["ssh_user"], Value::Null, "{a}");
        let img = |user: &str| {
            json!({"name": "deb", "os_family": "debian", "os_version": "12", "format": "qcow2",
                "size_bytes": 1, "sha256": "cd".repeat(32), "login_user": user})
        };
        for bad in ["Root", "rm -rf", "", "9lives", &"u".repeat(33)] {
            let (st, e) = s.call(POST, "/v1/images", Some(&t), Some(img(bad))).await;
            assert_eq!(
                (st, e["error"]["code"].as_str()),
                (StatusCode::BAD_REQUEST, Some("invalid_login_user")),
                "{bad:?}: {e}"
            );
        }
        let (st, i) = s
            .call(POST, "/v1/images", Some(&t), Some(img("debian")))
            .await;
        assert_eq!(
            (st, i["login_user"].as_str()),
            (StatusCode::CREATED, Some("debian")),
            "{i}"
        );
        let (_, d) = s
            .call(
                POST,
                "/v1/vms",
                Some(&t),
                Some(json!({"name": "d", "image": "deb", "flavor": "m1.tiny"})),
            )
            .await;
        assert_eq!(d["ssh_user"], "debian", "{d}");
        assert!(
            !a.to_string().contains("metadata_token"),
            "the API never shows the token: {a}"
        );
        // The node learns each VM's token with its desired state.
        let (st, hb) = s
            .call(
                POST,
                &format!("/v1/nodes/{n1}/heartbeat"),
                Some(&cred1),
                Some(json!({"capacity": {"vcpus": 2, "memory_mib": 8192, "disk_gib": 100}})),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{hb}");
        let token_of = |id: &str| {
            hb["vms"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["id"] == id)
                .and_then(|v| v["metadata_token"].as_str())
                .unwrap_or_else(|| panic!("no token for {id}: {hb}"))
                .to_owned()
        };
        let (ta, tb) = (token_of(a_id), token_of(b_id));
        assert_ne!(ta, tb);
        let doc = |node: &str, vm: &str, d: &str| format!("/v1/nodes/{node}/metadata/{vm}/{d}");
        let hdr = "x-byteport-metadata-token";

        let (st, meta) = s
            .get_text(&doc(&n1, a_id, "meta-data"), &cred1, &[(hdr, &ta)])
            .await;
        assert_eq!(st, StatusCode::OK, "{meta}");
        let meta: Value = serde_json::from_str(&meta).expect("meta-data is JSON, hence YAML");
        assert_eq!(meta["instance-id"], a_id);
        assert_eq!(meta["local-hostname"], "alpha");
        assert_eq!(meta["public-keys"], json!([key]));
        let (st, ud) = s
            .get_text(&doc(&n1, a_id, "user-data"), &cred1, &[(hdr, &ta)])
            .await;
        assert_eq!(
            (st, ud.as_str()),
            (StatusCode::OK, user_data),
            "the user's bytes"
        );
        let (st, vd) = s
            .get_text(&doc(&n1, a_id, "vendor-data"), &cred1, &[(hdr, &ta)])
            .await;
        assert_eq!(st, StatusCode::OK);
        assert!(vd.starts_with("#cloud-config"), "{vd}");
        let (st, net) = s
            .get_text(&doc(&n1, a_id, "network-config"), &cred1, &[(hdr, &ta)])
            .await;
        assert_eq!(st, StatusCode::OK);
        let net: Value = serde_json::from_str(&net).unwrap();
        assert_eq!(net["version"], 2);
        assert_eq!(net["ethernets"]["eth0"]["dhcp4"], true);
        assert_eq!(net["ethernets"]["eth0"]["dhcp6"], false);
        let mac = net["ethernets"]["eth0"]["match"]["macaddress"]
            .as_str()
            .unwrap();
        assert!(mac.starts_with("52:54:00:") && mac.len() == 17, "{mac}");
        // b has no user-data: an empty document, not an error.
        let (st, ud) = s
            .get_text(&doc(&n1, b_id, "user-data"), &cred1, &[(hdr, &tb)])
            .await;
        assert_eq!((st, ud.as_str()), (StatusCode::OK, ""));

        // Wrong, missing and another VM's token; unknown documents and ids:
        // all the same 404, which says nothing about the VM.
        let wrong = "A".repeat(43);
        for (vm, tok) in [
            (a_id, Some(wrong.as_str())),
            (a_id, None),
            (a_id, Some(tb.as_str())),
            (b_id, Some(ta.as_str())),
        ] {
            let h: Vec<(&str, &str)> = tok.map(|t| (hdr, t)).into_iter().collect();
            let (st, body) = s.get_text(&doc(&n1, vm, "user-data"), &cred1, &h).await;
            assert_eq!(st, StatusCode::NOT_FOUND, "{vm} {tok:?}: {body}");
            assert!(!body.contains("runcmd"), "{body}");
        }
        for path in [doc(&n1, a_id, "secrets"), doc(&n1, "not-a-vm", "user-data")] {
            let (st, _) = s.get_text(&path, &cred1, &[(hdr, &ta)]).await;
            assert_eq!(st, StatusCode::NOT_FOUND, "{path}");
        }
        // Another node cannot read a VM that is not on it, nor speak for
        // node-1; a user cannot read metadata at all.
        let (n2, cred2) = sim_node(&s, "node-2", 8192).await;
        let (st, _) = s
            .get_text(&doc(&n2, a_id, "user-data"), &cred2, &[(hdr, &ta)])
            .await;
        assert_eq!(st, StatusCode::NOT_FOUND);
        let (st, _) = s
            .get_text(&doc(&n1, a_id, "user-data"), &cred2, &[(hdr, &ta)])
            .await;
        assert_eq!(st, StatusCode::FORBIDDEN);
        let (st, _) = s
            .get_text(&doc(&n1, a_id, "user-data"), &t, &[(hdr, &ta)])
            .await;
        assert_eq!(st, StatusCode::FORBIDDEN);

        // Every request is audited against the VM.
        let (_, audit) = s.call(GET, "/v1/audit?limit=500", Some(&t), None).await;
        let events: Vec<&Value> = audit["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["target_id"] == a_id && e["action"] == "metadata_user_data")
            .collect();
        assert!(
            events
                .iter()
                .any(|e| e["status"] == 200 && e["actor"] == "node:node-1"),
            "{audit}"
        );
        // The refused ones are counted, not audited one by one.
        assert!(!events.iter().any(|e| e["status"] == 404), "{audit}");
        let metrics = s.get_text("/metrics", &t, &[]).await.1;
        let refusals = |reason: &str| {
            metrics
                .lines()
                .find(|l| {
                    l.starts_with(&format!(
                        "byteport_metadata_refusals_total{{reason=\"{reason}\"}}"
                    ))
                })
                .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .unwrap_or_default()
        };
        assert!(refusals("not_found") >= 7, "{metrics}");

        // A burst is served, then 429 until the bucket refills.
        let mut codes = Vec::new();
        for _ in 0..30 {
            let (st, _) = s
                .get_text(&doc(&n1, b_id, "meta-data"), &cred1, &[(hdr, &tb)])
                .await;
            codes.push(st.as_u16());
        }
        let ok = codes.iter().filter(|c| **c == 200).count();
        assert!((18..=22).contains(&ok), "{codes:?}");
        assert_eq!(codes.last(), Some(&429), "{codes:?}");
        let metrics = s.get_text("/metrics", &t, &[]).await.1;
        assert!(
            metrics.contains(&format!(
                "byteport_metadata_refusals_total{{reason=\"rate_limited\"}} {}",
                30 - ok
            )),
            "{metrics}"
        );
        // Another VM is not held back by b's requests.
        let (st, _) = s
            .get_text(&doc(&n1, a_id, "meta-data"), &cred1, &[(hdr, &ta)])
            .await;
        assert_eq!(st, StatusCode::OK);

        // Once deleted, the VM's metadata is gone with it.
        let (st, _) = s
            .call(DELETE, &format!("/v1/vms/{a_id}"), Some(&t), None)
            .await;
        assert_eq!(st, StatusCode::ACCEPTED);
        let (st, _) = s
            .get_text(&doc(&n1, a_id, "meta-data"), &cred1, &[(hdr, &ta)])
            .await;
        assert_eq!(st, StatusCode::NOT_FOUND);
    }
}

/// A batch commits in a few statements whatever its size, and each of its
/// placements is still guarded on its own: one past its node's limit, one
/// of a VM deleted meanwhile and a second one of the same VM land nothing,
/// the others land, and each node reserves exactly what landed on it.
#[tokio::test(flavor = "multi_thread")]
async fn a_placement_batch_lands_what_fits_and_reserves_only_that() {
    use byteport_store::{PlaceItem, Size};
    for b in backends() {
        let s = TestServer::start(b).await;
        let t = s.admin.clone();
        s.image("tiny").await;
        let mut ids = Vec::new();
        for i in 0..5 {
            let body = json!({"name": format!("b{i}"), "image": "tiny", "vcpus": 1,
                "memory_mib": 1024, "disk_gib": 10});
            let (st, v) = s.call(POST, "/v1/vms", Some(&t), Some(body)).await;
            assert_eq!(st, StatusCode::ACCEPTED, "{v}");
            ids.push(uuid::Uuid::parse_str(v["id"].as_str().unwrap()).unwrap());
        }
        let (n1, _) = sim_node(&s, "node-1", 2048).await;
        let (n2, _) = sim_node(&s, "node-2", 2048).await;
        let (n1, n2) = (
            uuid::Uuid::parse_str(&n1).unwrap(),
            uuid::Uuid::parse_str(&n2).unwrap(),
        );
        let (st, _) = s
            .call(
                Method::DELETE,
                &format!("/v1/vms/{}", ids[3]),
                Some(&t),
                None,
            )
            .await;
        assert!(st.is_success(), "{st}");
        let size = Size {
            vcpus: 1,
            memory_mib: 1024,
            disk_gib: 10,
        };
        let limit = Size {
            vcpus: 2,
            memory_mib: 2048,
            disk_gib: 100,
        };
        let item = |vm: usize, node| PlaceItem {
            vm_id: ids[vm],
            node_id: node,
            size,
            limit,
        };
        let landed = s
            .app
            .store
            .vm_place_many(&[
                item(0, n1),
                item(1, n1),
                // node-1 is full by now.
                item(2, n1),
                // Deleted.
                item(3, n2),
                item(4, n2),
                // Placed just above.
                item(4, n1),
            ])
            .await
            .expect("the batch");
        assert_eq!(landed, [true, true, false, false, true, false]);
        let vm = |i: usize| {
            let id = ids[i];
            let s = &s;
            let t = t.clone();
            async move {
                s.call(GET, &format!("/v1/vms/{id}"), Some(&t), None)
                    .await
                    .1
            }
        };
        for (i, node) in [(0, Some(n1)), (1, Some(n1)), (2, None), (4, Some(n2))] {
            let v = vm(i).await;
            assert_eq!(
                v["node_id"].as_str(),
                node.map(|n| n.to_string()).as_deref(),
                "{v}"
            );
            let want = if node.is_some() {
                "provisioning"
            } else {
                "pending"
            };
            assert_eq!(v["state"], want, "{v}");
        }
        assert_eq!(vm(3).await["state"], "deleted");
        let (_, nodes) = s.call(GET, "/v1/nodes", Some(&t), None).await;
        for n in nodes.as_array().unwrap() {
            let want = if n["id"] == json!(n1.to_string()) {
                2048
            } else {
                1024
            };
            assert_eq!(n["reserved"]["memory_mib"], want, "{n}");
            assert_eq!(n["reserved"]["vcpus"], want / 1024, "{n}");
        }
        // What is left places as before.
        assert_eq!(s.app.place_pending().await.unwrap(), 1);
        assert_eq!(vm(2).await["node_id"], json!(n2.to_string()));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_placement_pass_commits_a_batch_within_capacity_and_anti_affinity() {
    for b in backends() {
        let s = TestServer::start(b).await;
        let t = s.admin.clone();
        s.image("tiny").await;
        // No node yet: every VM waits.
        let mut ids = Vec::new();
        for i in 0..6 {
            let mut body = json!({"name": format!("v{i}"), "image": "tiny", "vcpus": 1,
                "memory_mib": 1024, "disk_gib": 10});
            if i < 3 {
                body["placement"] = json!({"group": "db"});
            }
            let (st, v) = s.call(POST, "/v1/vms", Some(&t), Some(body)).await;
            assert_eq!(
                (st, v["state"].as_str()),
                (StatusCode::ACCEPTED, Some("pending")),
                "{v}"
            );
            ids.push(v["id"].as_str().unwrap().to_owned());
        }
        // Room for five of the six, on three nodes.
        sim_node(&s, "node-1", 2048).await;
        sim_node(&s, "node-2", 2048).await;
        sim_node(&s, "node-3", 1024).await;
        let placed = s.app.place_pending().await.expect("a pass");
        assert_eq!(placed, 5);
        let mut on: std::collections::HashMap<String, Vec<usize>> = Default::default();
        let mut pending = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            let (_, v) = s.call(GET, &format!("/v1/vms/{id}"), Some(&t), None).await;
            match v["node_id"].as_str() {
                Some(n) => on.entry(n.to_owned()).or_default().push(i),
                None => {
                    pending.push((i, v["state_reason"].as_str().unwrap_or_default().to_owned()))
                }
            }
        }
        assert_eq!(pending.len(), 1, "{pending:?}");
        assert!(pending[0].1.contains("1024 MiB"), "{pending:?}");
        // The group's members are on three different nodes.
        let group_nodes: std::collections::HashSet<&String> = on
            .iter()
            .filter(|(_, vms)| vms.iter().any(|i| *i < 3))
            .map(|(n, _)| n)
            .collect();
        let group_placed = on.values().flatten().filter(|i| **i < 3).count();
        assert_eq!(group_nodes.len(), group_placed, "{on:?}");
        // Every node's reservation is what its VMs add up to, within capacity.
        let (_, nodes) = s.call(GET, "/v1/nodes", Some(&t), None).await;
        for n in nodes.as_array().unwrap() {
            let id = n["id"].as_str().unwrap();
            let count = on.get(id).map_or(0, Vec::len) as u64;
            assert_eq!(n["reserved"]["memory_mib"], 1024 * count, "{n}");
            assert!(
                n["reserved"]["memory_mib"].as_u64() <= n["capacity"]["memory_mib"].as_u64(),
                "{n}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn environments_are_made_whole_within_quota_and_removed_whole() {
    for b in backends() {
        let s = TestServer::start(b).await;
        for name in ["debian-11", "debian-12", "alpine-3"] {
            s.image(name).await;
        }
        let t = s.admin.clone();
        let body = |name: &str, prefixes: &[&str]| json!({"name": name, "os_prefixes": prefixes, "flavor": "m1.tiny", "lifetime_secs": 3600});

        // One VM per matching image, labelled, in the environment.
        let (st, e) = s
            .call(
                POST,
                "/v1/environments",
                Some(&t),
                Some(body("compat", &["debian", "alpine"])),
            )
            .await;
        assert_eq!(st, StatusCode::ACCEPTED, "{e}");
        let names: Vec<&str> = e["vms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            ["compat-alpine-3", "compat-debian-11", "compat-debian-12"]
        );
        assert_eq!(e["state"], "creating", "no node yet: {e}");
        assert_eq!(e["vms"][0]["labels"]["environment"], "compat");
        assert_eq!(e["vms"][0]["environment_id"], e["id"]);
        let expires =
            chrono::DateTime::parse_from_rfc3339(e["expires_at"].as_str().unwrap()).unwrap();
        let created =
            chrono::DateTime::parse_from_rfc3339(e["created_at"].as_str().unwrap()).unwrap();
        assert_eq!((expires - created).num_seconds(), 3600);
        let id = e["id"].as_str().unwrap().to_owned();

        // Bad input changes nothing.
        let bad = [
            (body("x", &["fedora"]), "unknown_image"),
            (body("x", &[]), "invalid_os_prefixes"),
            (body("x", &["Debian"]), "invalid_os_prefixes"),
            (
                json!({"name": "x", "os_prefixes": ["debian"], "flavor": "m1.tiny", "lifetime_secs": 5}),
                "invalid_lifetime",
            ),
            (
                json!({"name": "x", "os_prefixes": ["debian"], "flavor": "m1.tiny", "user_data": "\u{1}"}),
                "invalid_user_data",
            ),
            (
                json!({"name": "x", "os_prefixes": ["debian"]}),
                "missing_size",
            ),
            (
                json!({"name": "x", "os_prefixes": ["debian"], "flavor": "m1.tiny", "bogus": 1}),
                "invalid_body",
            ),
        ];
        for (req, code) in bad {
            let (st, v) = s
                .call(POST, "/v1/environments", Some(&t), Some(req.clone()))
                .await;
            assert!(st.is_client_error(), "{req} -> {st} {v}");
            assert_eq!(v["error"]["code"], code, "{req} -> {v}");
        }
        let (st, v) = s
            .call(
                POST,
                "/v1/environments",
                Some(&t),
                Some(body("compat", &["alpine"])),
            )
            .await;
        assert_eq!(st, StatusCode::CONFLICT, "{v}");
        // All or nothing: two more VMs do not fit a quota of four.
        let (st, _) = s
            .call(
                PUT,
                "/v1/projects/default/quota",
                Some(&t),
                Some(json!({"max_vms": 4, "max_vcpus": 100, "max_memory_mib": 65536, "max_disk_gib": 1000})),
            )
            .await;
        assert_eq!(st, StatusCode::OK);
        let (st, v) = s
            .call(
                POST,
                "/v1/environments",
                Some(&t),
                Some(body("more", &["debian"])),
            )
            .await;
        assert_eq!(st, StatusCode::FORBIDDEN, "{v}");
        assert_eq!(
            v["error"]["message"],
            "quota max_vms exceeded: this needs 2, the project uses 3 of 4"
        );
        assert_eq!(s.count("vms").await, 3);
        assert_eq!(s.count("environments").await, 1);

        // Roles: a viewer sees it and cannot change it; an outsider sees nothing.
        let viewer = s.user("vera").await;
        let outsider = s.user("otto").await;
        let (st, _) = s
            .call(
                PUT,
                "/v1/projects/default/members/vera",
                Some(&t),
                Some(json!({"role": "viewer"})),
            )
            .await;
        assert_eq!(st, StatusCode::OK);
        let (st, v) = s
            .call(GET, "/v1/environments/compat", Some(&viewer), None)
            .await;
        assert_eq!((st, v["id"].as_str()), (StatusCode::OK, Some(id.as_str())));
        for (m, path) in [
            (POST, "/v1/environments/compat/run".to_owned()),
            (DELETE, "/v1/environments/compat".to_owned()),
        ] {
            let (st, _) = s
                .call(m, &path, Some(&viewer), Some(json!({"argv": ["true"]})))
                .await;
            assert_eq!(st, StatusCode::FORBIDDEN, "viewer {path}");
        }
        for path in [
            format!("/v1/environments/{id}"),
            "/v1/environments/compat".into(),
        ] {
            let (st, _) = s.call(GET, &path, Some(&outsider), None).await;
            assert_eq!(st, StatusCode::NOT_FOUND, "outsider {path}");
        }
        let (_, list) = s.call(GET, "/v1/environments", Some(&outsider), None).await;
        assert_eq!(list, json!([]));
        let (_, list) = s.call(GET, "/v1/environments", Some(&viewer), None).await;
        assert_eq!(list.as_array().unwrap().len(), 1);

        // A run on VMs that are not running says so per VM; a bad command is a 400.
        let (st, r) = s
            .call(
                POST,
                "/v1/environments/compat/run",
                Some(&t),
                Some(json!({"argv": ["uname"]})),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{r}");
        let results = r["results"].as_array().unwrap();
        assert_eq!(results.len(), 3);
        for x in results {
            assert!(
                x["error"]
                    .as_str()
                    .unwrap()
                    .contains("exec needs it running"),
                "{x}"
            );
            assert!(x["exit_code"].is_null());
        }
        let (st, v) = s
            .call(
                POST,
                "/v1/environments/compat/run",
                Some(&t),
                Some(json!({"argv": []})),
            )
            .await;
        assert_eq!(
            (st, v["error"]["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_argv"))
        );

        // Delete: every VM goes, the name is free again, the id still shows it.
        let (st, e) = s
            .call(DELETE, "/v1/environments/compat", Some(&t), None)
            .await;
        assert_eq!(st, StatusCode::ACCEPTED, "{e}");
        assert_eq!(e["state"], "deleted", "unplaced VMs go at once: {e}");
        let (st, _) = s.call(GET, "/v1/environments/compat", Some(&t), None).await;
        assert_eq!(st, StatusCode::NOT_FOUND);
        let (st, e) = s
            .call(GET, &format!("/v1/environments/{id}"), Some(&t), None)
            .await;
        assert_eq!((st, e["state"].as_str()), (StatusCode::OK, Some("deleted")));
        let (_, p) = s.call(GET, "/v1/projects/default", Some(&t), None).await;
        assert_eq!(p["usage"]["vms"], 0);

        // A lifetime ends: the background pass deletes it and says so in the audit log.
        let (st, e) = s
            .call(
                POST,
                "/v1/environments",
                Some(&t),
                Some(body("compat", &["alpine"])),
            )
            .await;
        assert_eq!(st, StatusCode::ACCEPTED, "{e}");
        assert_eq!(s.app.env_reap().await.unwrap(), 0, "not yet");
        s.sql("UPDATE environments SET expires_at = created_at")
            .await;
        assert_eq!(s.app.env_reap().await.unwrap(), 1);
        let (_, e) = s
            .call(
                GET,
                &format!("/v1/environments/{}", e["id"].as_str().unwrap()),
                Some(&t),
                None,
            )
            .await;
        assert_eq!(e["state"], "deleted", "{e}");
        let (_, audit) = s.call(GET, "/v1/audit?limit=50", Some(&t), None).await;
        let actions: Vec<&str> = audit["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|a| a["action"].as_str())
            .collect();
        for a in ["environment_expired", "env_create", "env_delete"] {
            assert!(actions.contains(&a), "{a} in {actions:?}");
        }
    }
}

async fn stats_of(s: &TestServer, id: &str, token: &str) -> (StatusCode, Value) {
    s.call(GET, &format!("/v1/vms/{id}/stats"), Some(token), None)
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vm_shows_the_figures_its_node_measured() {
    for b in backends() {
        let s = TestServer::start(b).await;
        let t = s.admin.clone();
        s.image("tiny").await;
        let (n, cred) = sim_node(&s, "node-1", 4096).await;
        let (st, v) = create_vm(&s, &t, "default", "web-1").await;
        assert_eq!(st, StatusCode::ACCEPTED, "{v}");
        let id = v["id"].as_str().unwrap().to_owned();
        assert_eq!(v["node_id"].as_str(), Some(n.as_str()), "placed: {v}");
        // Nothing measured yet: no figures, and why.
        let (st, e) = stats_of(&s, &id, &t).await;
        assert_eq!(st, StatusCode::OK, "{e}");
        assert!(e["measured"].is_null(), "{e}");
        assert!(e["note"].as_str().unwrap().contains("no figures"), "{e}");

        let capacity = json!({"vcpus": 2, "memory_mib": 4096, "disk_gib": 100});
        let figures = json!({"id": id, "cpu_percent": 37.5, "cpu_time_ms": 12340,
            "memory_rss_mib": 180, "disk_used_mib": 12, "uptime_secs": 61});
        let hb = json!({"capacity": capacity, "vms": [], "vm_stats": [figures]});
        let path = format!("/v1/nodes/{n}/heartbeat");
        let (st, r) = s.call(POST, &path, Some(&cred), Some(hb)).await;
        assert_eq!(st, StatusCode::OK, "{r}");
        let (st, v) = stats_of(&s, &id, &t).await;
        assert_eq!(st, StatusCode::OK, "{v}");
        assert!(v["note"].is_null(), "{v}");
        let f = &v["measured"];
        let got = (
            f["cpu_percent"].as_f64(),
            f["cpu_time_ms"].as_u64(),
            f["memory_rss_mib"].as_u64(),
            f["disk_used_mib"].as_u64(),
            f["uptime_secs"].as_u64(),
        );
        assert_eq!(
            got,
            (Some(37.5), Some(12340), Some(180), Some(12), Some(61))
        );
        assert!(f["at"].is_string());
        // Beside what the VM was given, to compare with.
        let sizes = (
            v["vcpus"].as_u64(),
            v["memory_mib"].as_u64(),
            v["disk_gib"].as_u64(),
        );
        assert_eq!(sizes, (Some(1), Some(512), Some(5)));

        // Another project's user cannot see them.
        let outsider = s.user("otto").await;
        let (st, _) = stats_of(&s, &id, &outsider).await;
        assert_eq!(st, StatusCode::NOT_FOUND);
        // A heartbeat without the VM's figures: none any more.
        let (st, _) = s
            .call(
                POST,
                &path,
                Some(&cred),
                Some(json!({"capacity": capacity})),
            )
            .await;
        assert_eq!(st, StatusCode::OK);
        let (st, v) = stats_of(&s, &id, &t).await;
        assert_eq!((st, v["measured"].is_null()), (StatusCode::OK, true), "{v}");
    }
}

#[tokio::test]
async fn runs_refuse_bad_input_and_strangers_and_make_no_record() {
    for b in backends() {
        let s = TestServer::start(b).await;
        let member = s.user("member").await;
        let viewer = s.user("viewer").await;
        let stranger = s.user("stranger").await;
        s.project("alpha", &[("member", "member"), ("viewer", "viewer")])
            .await;
        let ok = json!({"project": "alpha", "language": "shell", "code": "echo hi"});
        let with = |k: &str, v: Value| {
            let mut b = ok.clone();
            b[k] = v;
            b
        };
        for (body, code) in [
            (with("language", json!("cobol")), "unknown_language"),
            (with("code", json!("")), "invalid_code"),
            (with("code", json!("x".repeat(65 * 1024))), "invalid_code"),
            (with("code", json!("echo \u{0}")), "invalid_text"),
            (with("args", json!(["a\u{0}"])), "invalid_text"),
            (with("env", json!({"1BAD": "x"})), "invalid_env"),
            (
                with("stdin", json!("x".repeat(600 * 1024))),
                "invalid_stdin",
            ),
            (with("timeout_secs", json!(601)), "invalid_timeout"),
            (with("vcpus", json!(9)), "invalid_size"),
            (with("memory_mib", json!(100_000)), "invalid_size"),
            (
                with("files", json!([{"path": "main.sh", "content": "true"}])),
                "invalid_code",
            ),
            (
                json!({"project": "alpha", "language": "shell", "files": [{"path": "../main.sh", "content": ""}], "entry": "../main.sh"}),
                "invalid_path",
            ),
            (
                json!({"project": "alpha", "language": "shell", "files": [{"path": "/etc/x", "content": ""}]}),
                "invalid_path",
            ),
            (
                json!({"project": "alpha", "language": "shell", "files": [{"path": "a.sh", "content": ""}]}),
                "invalid_entry",
            ),
            (
                json!({"project": "alpha", "language": "shell", "files": (0..65).map(|i| json!({"path": format!("f{i}"), "content": ""})).collect::<Vec<_>>()}),
                "invalid_files",
            ),
            (
                json!({"project": "alpha", "language": "shell", "files": [{"path": "main.sh", "content": ""}, {"path": "main.sh", "content": ""}]}),
                "invalid_files",
            ),
            (
                json!({"project": "alpha", "language": "rust"}),
                "invalid_code",
            ),
        ] {
            let (st, v) = s.call(POST, "/v1/runs", Some(&member), Some(body)).await;
            assert_eq!(st, StatusCode::BAD_REQUEST, "{code}: {v}");
            assert_eq!(v["error"]["code"], code, "{v}");
        }
        // An unknown field, and a body that is not JSON at all.
        let (st, _) = s
            .call(
                POST,
                "/v1/runs",
                Some(&member),
                Some(with("shell", json!(true))),
            )
            .await;
        assert!(st.is_client_error(), "{st}");
        // No runtime image yet: the error says how to get one.
        let (st, v) = s
            .call(POST, "/v1/runs", Some(&member), Some(ok.clone()))
            .await;
        assert_eq!(st, StatusCode::CONFLICT, "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("run-shell"),
            "{v}"
        );
        // Roles: a viewer may not run, a stranger does not see the project.
        let (st, _) = s
            .call(POST, "/v1/runs", Some(&viewer), Some(ok.clone()))
            .await;
        assert_eq!(st, StatusCode::FORBIDDEN);
        let (st, _) = s
            .call(POST, "/v1/runs", Some(&stranger), Some(ok.clone()))
            .await;
        assert_eq!(st, StatusCode::NOT_FOUND);
        let (st, _) = s.call(POST, "/v1/runs", None, Some(ok.clone())).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);
        let missing = format!("/v1/runs/{}", uuid::Uuid::now_v7());
        for tok in [&member, &s.admin] {
            let (st, _) = s.call(GET, &missing, Some(tok), None).await;
            assert_eq!(st, StatusCode::NOT_FOUND);
            let (st, _) = s.call(DELETE, &missing, Some(tok), None).await;
            assert_eq!(st, StatusCode::NOT_FOUND);
        }
        let (st, v) = s
            .call(GET, "/v1/runs?project=alpha", Some(&viewer), None)
            .await;
        assert_eq!(
            (st, v["items"].as_array().map(Vec::len)),
            (StatusCode::OK, Some(0))
        );
        let (st, _) = s
            .call(GET, "/v1/runs?project=alpha", Some(&stranger), None)
            .await;
        assert_eq!(st, StatusCode::NOT_FOUND);
        let (st, _) = s
            .call(GET, "/v1/runs?state=sleepy", Some(&member), None)
            .await;
        assert_eq!(st, StatusCode::BAD_REQUEST);
        assert_eq!(s.count("runs").await, 0, "a refused run left a record");
        // The quota of runs at once is the project's, and shown.
        let (st, p) = s
            .call(
                PUT,
                "/v1/projects/alpha/quota",
                Some(&s.admin),
                Some(json!({"max_vms": 5, "max_vcpus": 5, "max_memory_mib": 4096, "max_disk_gib": 50, "max_concurrent_runs": 2})),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{p}");
        assert_eq!(p["quota"]["max_concurrent_runs"], 2);
        assert!(
            p["network_cidr"].as_str().unwrap().ends_with(".0/24"),
            "{p}"
        );
    }
}

/// A running run holds its project's `max_concurrent_runs`, vCPUs and
/// memory: the next run past any of them is refused with the numbers,
/// and so is a VM that would need what the runs hold; an ended run holds
/// nothing.
#[tokio::test]
async fn runs_count_against_the_projects_quotas_while_they_run() {
    for b in backends() {
        let s = TestServer::start(b).await;
        s.project("alpha", &[]).await;
        let (st, p) = s
            .call(
                PUT,
                "/v1/projects/alpha/quota",
                Some(&s.admin),
                Some(json!({"max_vms": 5, "max_vcpus": 3, "max_memory_mib": 2048, "max_disk_gib": 50, "max_concurrent_runs": 2})),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{p}");
        let project = uuid::Uuid::parse_str(p["id"].as_str().unwrap()).unwrap();
        let run = |vcpus: i64, memory_mib: i64| byteport_store::run::Model {
            id: uuid::Uuid::now_v7(),
            project_id: project,
            user_name: "admin".into(),
            language: "shell".into(),
            code_sha256: "0".repeat(64),
            state: "running".into(),
            exit_code: None,
            signal: None,
            message: None,
            vcpus,
            memory_mib,
            timeout_secs: 30,
            node_id: None,
            timings: "{}".into(),
            stdout: String::new(),
            stderr: String::new(),
            output_truncated: false,
            created_at: chrono::Utc::now(),
            ended_at: None,
        };
        let store = &s.app.store;
        let first = store.run_insert(run(2, 1024)).await.expect("the first run");
        // Past the vCPUs (2 held + 2 > 3), then past the memory.
        let e = store.run_insert(run(2, 256)).await.unwrap_err().to_string();
        assert!(e.contains("max_vcpus"), "{e}");
        let e = store
            .run_insert(run(1, 1536))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_memory_mib"), "{e}");
        store.run_insert(run(1, 512)).await.expect("the second run");
        let e = store.run_insert(run(0, 0)).await.unwrap_err().to_string();
        assert!(e.contains("max_concurrent_runs"), "{e}");
        // A VM needs what the runs hold (all 3 vCPUs).
        s.image("tiny").await;
        let (st, v) = s
            .call(
                POST,
                "/v1/vms",
                Some(&s.admin),
                Some(json!({"name": "big", "project": "alpha", "image": "tiny", "vcpus": 1, "memory_mib": 1024, "disk_gib": 1})),
            )
            .await;
        assert!(st.is_client_error(), "{st} {v}");
        assert_eq!(v["error"]["code"], "quota_exceeded", "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("uses 3 of 3"),
            "{v}"
        );
        assert_eq!(s.count("runs").await, 2);
        // The first ends: its room is free again.
        let mut ended = first;
        ended.state = "exited".into();
        ended.ended_at = Some(chrono::Utc::now());
        store.run_finish(ended).await.expect("finish");
        store.run_insert(run(2, 1024)).await.expect("room again");
    }
}

/// A VM whose QEMU crashed keeps only its disk reserved, as a stopped one
/// does, and a start takes its vCPUs and memory again; a report older than
/// the last one applied is ignored; a reservation that drifted from the
/// node's VMs is repaired by the recount and counted in /metrics.
#[tokio::test(flavor = "multi_thread")]
async fn crashes_release_compute_old_reports_are_ignored_and_drift_is_repaired() {
    for b in backends() {
        let s = TestServer::start(b).await;
        let t = s.admin.clone();
        s.image("tiny").await;
        let node = SimNode::join(&s, "solo", 2048).await;
        let (_, a) = s
            .call(
                POST,
                "/v1/vms",
                Some(&t),
                Some(json!({"name": "a", "image": "tiny", "vcpus": 2, "memory_mib": 2048, "disk_gib": 10})),
            )
            .await;
        let aid = a["id"].as_str().unwrap().to_owned();
        let reserved = || async {
            let (_, n) = s
                .call(GET, &format!("/v1/nodes/{}", node.id), Some(&t), None)
                .await;
            n["reserved"].clone()
        };
        node.report(&s, &[(&aid, "running", 10, 1)]).await;
        assert_eq!(
            reserved().await,
            json!({"vcpus": 2, "memory_mib": 2048, "disk_gib": 10})
        );
        // QEMU died: the VM is in error and holds only its disk.
        let (st, _) = node.report(&s, &[(&aid, "error", 20, 1)]).await;
        assert_eq!(st, StatusCode::OK);
        let (_, v) = s.call(GET, &format!("/v1/vms/{aid}"), Some(&t), None).await;
        assert_eq!(v["state"], "error", "{v}");
        assert_eq!(
            reserved().await,
            json!({"vcpus": 0, "memory_mib": 0, "disk_gib": 10})
        );
        // A report older than that one, arriving late: ignored.
        node.report(&s, &[(&aid, "running", 15, 1)]).await;
        let (_, v) = s.call(GET, &format!("/v1/vms/{aid}"), Some(&t), None).await;
        assert_eq!(v["state"], "error", "an older report applied: {v}");
        assert_eq!(v["observed_generation"], 20, "{v}");
        // A start takes the vCPUs and memory again.
        let (st, v) = s
            .call(POST, &format!("/v1/vms/{aid}/start"), Some(&t), None)
            .await;
        assert_eq!(st, StatusCode::ACCEPTED, "{v}");
        assert_eq!(
            reserved().await,
            json!({"vcpus": 2, "memory_mib": 2048, "disk_gib": 10})
        );
        // Drift (a leak by a crash of old, or a hand edit): the recount
        // repairs it, once, and says so.
        s.sql("UPDATE nodes SET reserved_vcpus = 7, reserved_disk_gib = 0")
            .await;
        assert_eq!(s.app.reservations_recount().await.unwrap(), 1);
        assert_eq!(s.app.reservations_recount().await.unwrap(), 0);
        assert_eq!(
            reserved().await,
            json!({"vcpus": 2, "memory_mib": 2048, "disk_gib": 10})
        );
        let (_, metrics) = s.get_text("/metrics", &t, &[]).await;
        assert!(
            metrics.contains("byteport_reservation_repairs_total 1"),
            "{metrics}"
        );
    }
}

/// A VM that its node brings back from an error without a start (QEMU
/// restarted it) holds its vCPUs and memory again: a running VM is never
/// left out of its node's reservation.
#[tokio::test(flavor = "multi_thread")]
async fn a_vm_running_again_after_an_error_holds_its_compute_again() {
    for b in backends() {
        let s = TestServer::start(b).await;
        let t = s.admin.clone();
        s.image("tiny").await;
        let node = SimNode::join(&s, "solo", 2048).await;
        let (_, a) = s
            .call(
                POST,
                "/v1/vms",
                Some(&t),
                Some(json!({"name": "a", "image": "tiny", "vcpus": 1, "memory_mib": 512, "disk_gib": 3})),
            )
            .await;
        let aid = a["id"].as_str().unwrap().to_owned();
        let reserved = || async {
            let (_, n) = s
                .call(GET, &format!("/v1/nodes/{}", node.id), Some(&t), None)
                .await;
            n["reserved"].clone()
        };
        let held = json!({"vcpus": 1, "memory_mib": 512, "disk_gib": 3});
        node.report(&s, &[(&aid, "running", 10, 1)]).await;
        assert_eq!(reserved().await, held);
        node.report(&s, &[(&aid, "error", 20, 1)]).await;
        assert_eq!(
            reserved().await,
            json!({"vcpus": 0, "memory_mib": 0, "disk_gib": 3})
        );
        node.report(&s, &[(&aid, "running", 30, 1)]).await;
        let (_, v) = s.call(GET, &format!("/v1/vms/{aid}"), Some(&t), None).await;
        assert_eq!(v["state"], "running", "{v}");
        assert_eq!(reserved().await, held);
        // Once: more reports change nothing, and the recount agrees.
        node.report(&s, &[(&aid, "running", 40, 1)]).await;
        assert_eq!(reserved().await, held);
        assert_eq!(s.app.reservations_recount().await.unwrap(), 0);
    }
}

/// /metrics shows the fleet: each node's heartbeat age and status, each
/// VM's CPU and memory from its node, the scheduler's decisions and the
/// time from create to running.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_carry_nodes_vms_scheduler_decisions_and_boot_times() {
    for b in backends() {
        let s = TestServer::start(b).await;
        let t = s.admin.clone();
        s.image("tiny").await;
        let node = SimNode::join(&s, "solo", 2048).await;
        let create = |name: &'static str, mib: u64| {
            let (s, t) = (&s, &t);
            async move {
                let (st, v) = s
                    .call(
                        POST,
                        "/v1/vms",
                        Some(t),
                        Some(json!({"name": name, "image": "tiny", "vcpus": 1, "memory_mib": mib, "disk_gib": 1})),
                    )
                    .await;
                assert_eq!(st, StatusCode::ACCEPTED, "{v}");
                v["id"].as_str().unwrap().to_owned()
            }
        };
        let a = create("a", 1024).await;
        // Too big for the node: stays pending, a no_fit decision.
        create("huge", 4096).await;
        node.report_measured(&s, &[(&a, "running", 10, 1)], &[(&a, 1500, 300)])
            .await;
        let (_, m) = s.get_text("/metrics", &t, &[]).await;
        let value = |prefix: &str| {
            m.lines()
                .find(|l| l.starts_with(prefix))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("no {prefix} in {m}"))
        };
        let age = value("byteport_node_heartbeat_age_seconds{node=\"solo\"}");
        assert!((0.0..5.0).contains(&age), "{age}");
        assert_eq!(
            value("byteport_node_status{node=\"solo\",status=\"online\"}"),
            1.0
        );
        let labels = format!("{{vm=\"{a}\",node=\"solo\"}}");
        assert_eq!(
            value(&format!("byteport_vm_cpu_seconds_total{labels}")),
            1.5
        );
        assert_eq!(
            value(&format!("byteport_vm_memory_rss_bytes{labels}")),
            300.0 * 1024.0 * 1024.0
        );
        assert!(value("byteport_scheduler_decisions_total{result=\"placed\"}") >= 1.0);
        assert!(value("byteport_scheduler_decisions_total{result=\"no_fit\"}") >= 1.0);
        assert_eq!(value("byteport_vm_boot_seconds_count"), 1.0);
        assert_eq!(value("byteport_vm_boot_seconds_bucket{le=\"+Inf\"}"), 1.0);
        // Every series the shipped Grafana dashboard reads is served.
        let dash = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../packaging/monitoring/grafana-dashboard.json"),
        )
        .unwrap();
        let mut read = 0;
        for (at, _) in dash.match_indices("byteport_") {
            let name: String = dash[at..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            if name == "byteport_" {
                continue;
            }
            read += 1;
            assert!(
                m.lines().any(|l| l.starts_with(&name)),
                "the dashboard reads {name}, which /metrics does not serve"
            );
        }
        assert!(read >= 10, "{read}");
    }
}

/// Without credentials every route but logging in, the first admin and a
/// node's join answers 401 before any lookup: whether a project, VM or
/// user exists is not told to a stranger.
#[tokio::test]
async fn requests_without_credentials_get_401_before_any_lookup() {
    for b in backends() {
        let s = TestServer::start(b).await;
        s.project("alpha", &[]).await;
        let missing = uuid::Uuid::now_v7();
        for (method, path) in [
            (DELETE, "/v1/projects/alpha".to_owned()),
            (DELETE, format!("/v1/projects/{missing}")),
            (GET, "/v1/projects/alpha".to_owned()),
            (GET, format!("/v1/vms/{missing}")),
            (GET, "/v1/users/admin".to_owned()),
            (GET, "/v1/flavors".to_owned()),
            (GET, format!("/v1/runs/{missing}")),
        ] {
            let (st, v) = s.call(method.clone(), &path, None, None).await;
            assert_eq!(st, StatusCode::UNAUTHORIZED, "{method} {path}: {v}");
        }
        // What anonymous callers need still answers.
        let (st, _) = s
            .call(
                POST,
                "/v1/auth/login",
                None,
                Some(json!({"name": "admin", "password": "admin-password"})),
            )
            .await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(s.count("projects").await, 2, "nothing was deleted");
    }
}

/// The audit log says what people did: a login is the user's, a node's
/// heartbeats are not events at all.
#[tokio::test]
async fn audit_names_who_logged_in_and_skips_heartbeats() {
    for b in backends() {
        let s = TestServer::start(b).await;
        let node = SimNode::join(&s, "quiet", 2048).await;
        for _ in 0..3 {
            let (st, _) = node.report(&s, &[]).await;
            assert_eq!(st, StatusCode::OK);
        }
        s.login("admin", "admin-password").await;
        let (st, v) = s
            .call(GET, "/v1/audit?limit=500", Some(&s.admin), None)
            .await;
        assert_eq!(st, StatusCode::OK, "{v}");
        let items = v["items"].as_array().unwrap();
        assert!(
            !items.iter().any(|e| e["action"] == "node_heartbeat"),
            "{v}"
        );
        let login = items
            .iter()
            .find(|e| e["action"] == "auth_login")
            .unwrap_or_else(|| panic!("no login event: {v}"));
        assert_eq!(login["actor"], "admin", "{login}");
    }
}

/// The console's WebSocket acts for the user: opened with the session
/// cookie from another site's page (a foreign `Origin`), it is refused
/// before anything else, as mutations are; from the console's own origin
/// it goes on to the VM's lookup.
#[tokio::test]
async fn the_console_websocket_checks_the_origin_of_a_cookie() {
    use axum::body::Body;
    use axum::http::Request;
    // About HTTP only: one database is enough.
    let s = TestServer::start(byteport_store::Backend::Sqlite).await;
    let login = Request::builder()
        .method(POST)
        .uri("/v1/auth/login")
        .header("content-type", "application/json")
        .body(Body::from(
            json!({"name": "admin", "password": "admin-password"}).to_string(),
        ))
        .unwrap();
    let (st, headers, _) = s.raw(login).await;
    assert_eq!(st, StatusCode::OK);
    let cookie = headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with("byteport_session="))
        .and_then(|c| c.split(';').next())
        .expect("a session cookie")
        .to_owned();
    let upgrade = |origin: &str| {
        Request::builder()
            .method(GET)
            .uri(format!("/v1/vms/{}/console/ws", uuid::Uuid::now_v7()))
            .header("host", "cloud.example:7480")
            .header("origin", origin)
            .header("cookie", &cookie)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .body(Body::empty())
            .unwrap()
    };
    let (st, _, v) = s.raw(upgrade("https://evil.example")).await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{v}");
    let (st, _, v) = s.raw(upgrade("http://cloud.example:7480")).await;
    assert_ne!(st, StatusCode::FORBIDDEN, "{v}");
}

/// Guessing a password is slowed to a stop: after five failures within a
/// minute the account's logins answer 429 with `Retry-After`, even with
/// the right password, while other accounts log in as before.
#[tokio::test]
async fn failed_logins_lock_the_account_for_a_while() {
    use axum::body::Body;
    use axum::http::Request;
    let s = TestServer::start(byteport_store::Backend::Sqlite).await;
    s.user("other").await;
    let login = |name: &str, password: &str| {
        Request::builder()
            .method(POST)
            .uri("/v1/auth/login")
            .header("content-type", "application/json")
            .body(Body::from(
                json!({"name": name, "password": password}).to_string(),
            ))
            .unwrap()
    };
    for _ in 0..5 {
        let (st, _, _) = s.raw(login("admin", "wrong-password")).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);
    }
    let (st, headers, v) = s.raw(login("admin", "admin-password")).await;
    assert_eq!(st, StatusCode::TOO_MANY_REQUESTS, "{v}");
    let wait: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    // Another account is not locked by admin's failures.
    let (st, _, v) = s.raw(login("other", "user-password")).await;
    assert_eq!(st, StatusCode::OK, "{v}");
}

/// An uploaded disk is inspected with qemu-img: one that names a backing
/// file, or is not the format it claims, is refused and not kept; a
/// standalone qcow2 makes the image available.
#[tokio::test]
async fn uploaded_disks_that_reach_for_other_files_are_refused() {
    use axum::body::Body;
    use axum::http::Request;
    use sha2::Digest;
    if std::process::Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(
            std::env::var("BYTEPORT_REQUIRE_QEMU").as_deref() != Ok("1"),
            "qemu-img is missing"
        );
        eprintln!("SKIP: qemu-img is missing (apt-get install qemu-utils)");
        return;
    }
    let s = TestServer::start(byteport_store::Backend::Sqlite).await;
    let dir = std::env::temp_dir().join(format!("bp-inspect-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let make = |name: &str, extra: &[&str]| {
        let p = dir.join(name);
        let st = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .args(extra)
            .arg(&p)
            .arg("16M")
            .status()
            .unwrap();
        assert!(st.success());
        std::fs::read(p).unwrap()
    };
    let cases = [
        (
            "backed",
            make("backed.qcow2", &["-b", "/etc/hostname", "-F", "raw"]),
            "qcow2",
            Some("backing file"),
        ),
        (
            "claims-raw",
            make("plain1.qcow2", &[]),
            "raw",
            Some("not the raw"),
        ),
        ("plain", make("plain2.qcow2", &[]), "qcow2", None),
    ];
    for (name, bytes, format, refusal) in cases {
        let sha = hex::encode(sha2::Sha256::digest(&bytes));
        let (st, v) = s
            .call(
                POST,
                "/v1/images",
                Some(&s.admin),
                Some(
                    json!({"name": name, "os_family": "linux", "os_version": "1",
                    "format": format, "size_bytes": bytes.len(), "sha256": sha}),
                ),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        let put = Request::builder()
            .method(axum::http::Method::PUT)
            .uri(format!("/v1/images/{name}/files/image"))
            .header("authorization", format!("Bearer {}", s.admin))
            .header("content-type", "application/octet-stream")
            .body(Body::from(bytes))
            .unwrap();
        let (st, _, v) = s.raw(put).await;
        match refusal {
            Some(why) => {
                assert_eq!(st, StatusCode::BAD_REQUEST, "{name}: {v}");
                assert_eq!(v["error"]["code"], "invalid_image", "{v}");
                assert!(v["error"]["message"].as_str().unwrap().contains(why), "{v}");
                let (_, img) = s
                    .call(GET, &format!("/v1/images/{name}"), Some(&s.admin), None)
                    .await;
                assert_eq!(img["status"], "registered", "{img}");
            }
            None => assert_eq!(st, StatusCode::OK, "{name}: {v}"),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// An access token ends with its session: after a logout with its refresh
/// token, or once its user is deleted, it is refused at once (other
/// replicas within seconds), not when it expires.
#[tokio::test]
async fn access_tokens_end_with_their_session_and_their_user() {
    use axum::body::Body;
    use axum::http::Request;
    for b in backends() {
        let s = TestServer::start(b).await;
        let login = |name: &str, password: &str| {
            Request::builder()
                .method(POST)
                .uri("/v1/auth/login")
                .header("content-type", "application/json")
                .body(Body::from(
                    json!({"name": name, "password": password}).to_string(),
                ))
                .unwrap()
        };
        let (st, _, issued) = s.raw(login("admin", "admin-password")).await;
        assert_eq!(st, StatusCode::OK, "{issued}");
        let access = issued["access_token"].as_str().unwrap().to_owned();
        let refresh = issued["refresh_token"].as_str().unwrap().to_owned();
        let (st, _) = s.call(GET, "/v1/auth/whoami", Some(&access), None).await;
        assert_eq!(st, StatusCode::OK);
        let (st, v) = s
            .call(
                POST,
                "/v1/auth/logout",
                Some(&access),
                Some(json!({"refresh_token": refresh})),
            )
            .await;
        assert!(st.is_success(), "{st} {v}");
        let (st, _) = s.call(GET, "/v1/auth/whoami", Some(&access), None).await;
        assert_eq!(
            st,
            StatusCode::UNAUTHORIZED,
            "the token outlived its logout"
        );

        // A user deleted: their token goes with them.
        let theirs = s.user("leaving").await;
        let (st, _) = s.call(GET, "/v1/auth/whoami", Some(&theirs), None).await;
        assert_eq!(st, StatusCode::OK);
        let (st, v) = s
            .call(DELETE, "/v1/users/leaving", Some(&s.admin), None)
            .await;
        assert!(st.is_success(), "{st} {v}");
        let (st, _) = s.call(GET, "/v1/auth/whoami", Some(&theirs), None).await;
        assert_eq!(
            st,
            StatusCode::UNAUTHORIZED,
            "a deleted user's token still works"
        );
    }
}

/// One user holds at most 32 event streams open at once; the next is a
/// 429, and closing one makes room again.
#[tokio::test]
async fn a_user_holds_a_bounded_number_of_event_streams() {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;
    let s = TestServer::start(byteport_store::Backend::Sqlite).await;
    let open = || async {
        let req = Request::builder()
            .uri("/v1/events")
            .header("authorization", format!("Bearer {}", s.admin))
            .body(Body::empty())
            .unwrap();
        s.router.clone().oneshot(req).await.unwrap()
    };
    let mut held = Vec::new();
    for _ in 0..32 {
        let r = open().await;
        assert_eq!(r.status(), StatusCode::OK);
        held.push(r);
    }
    let r = open().await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(r.headers().contains_key("retry-after"));
    held.pop();
    let r = open().await;
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "a closed stream gave its room back"
    );
}

/// A project's owner may lower its quota but not raise it: the limits
/// are the cloud's to grant, so raising one is an admin's call.
#[tokio::test]
async fn owners_lower_quotas_and_only_admins_raise_them() {
    for b in backends() {
        let s = TestServer::start(b).await;
        let owner = s.user("olive").await;
        s.project("beta", &[("olive", "owner")]).await;
        let (_, p) = s.call(GET, "/v1/projects/beta", Some(&owner), None).await;
        let mut q = p["quota"].clone();
        let vms = q["max_vms"].as_u64().unwrap();
        q["max_vms"] = json!(vms - 1);
        let (st, v) = s
            .call(
                PUT,
                "/v1/projects/beta/quota",
                Some(&owner),
                Some(q.clone()),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "lowering: {v}");
        q["max_vms"] = json!(vms + 10);
        let (st, v) = s
            .call(
                PUT,
                "/v1/projects/beta/quota",
                Some(&owner),
                Some(q.clone()),
            )
            .await;
        assert_eq!(st, StatusCode::FORBIDDEN, "raising: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains("max_vms"),
            "{v}"
        );
        let (_, p) = s.call(GET, "/v1/projects/beta", Some(&owner), None).await;
        assert_eq!(p["quota"]["max_vms"], vms - 1, "a refused raise changed it");
        let (st, v) = s
            .call(PUT, "/v1/projects/beta/quota", Some(&s.admin), Some(q))
            .await;
        assert_eq!(st, StatusCode::OK, "an admin raises: {v}");
    }
}

/// `Idempotency-Key` applies to the creating POSTs only: an answer that
/// holds a secret (a new API token) is never stored; a claim left by a
/// request that died with its server is taken over once it is stale
/// instead of answering 409 forever.
#[tokio::test]
async fn idempotency_keeps_no_secret_and_stale_claims_expire() {
    use axum::body::Body;
    use axum::http::Request;
    for b in backends() {
        let s = TestServer::start(b).await;
        let post = |path: &str, key: &str, body: Value| {
            Request::builder()
                .method(POST)
                .uri(path)
                .header("authorization", format!("Bearer {}", s.admin))
                .header("content-type", "application/json")
                .header("idempotency-key", key)
                .body(Body::from(body.to_string()))
                .unwrap()
        };
        let (st, _, t1) = s
            .raw(post("/v1/tokens", "tok-1", json!({"name": "ci"})))
            .await;
        assert_eq!(st, StatusCode::CREATED, "{t1}");
        assert_eq!(
            s.count("idempotency_keys").await,
            0,
            "a token's answer was stored"
        );

        // A project create, claimed by a request that never finished.
        let body = json!({"name": "gamma"});
        let (st, _, _) = s.raw(post("/v1/projects", "p-1", body.clone())).await;
        assert_eq!(st, StatusCode::CREATED);
        s.sql("UPDATE idempotency_keys SET status = 0, created_at = '2000-01-01 00:00:00+00:00'")
            .await;
        let (_, _, v) = s.raw(post("/v1/projects", "p-1", body)).await;
        // Served again (here: the project exists now), not "still served".
        assert!(
            !v.to_string().contains("still being served"),
            "a stale claim still blocks: {v}"
        );
    }
}

#[tokio::test]
async fn audit_events_past_their_retention_are_removed() {
    for b in backends() {
        let s = TestServer::start(b).await;
        let (st, v) = s
            .call(
                POST,
                "/v1/projects",
                Some(&s.admin),
                Some(json!({"name": "old"})),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        let aged = s.count("audit_events").await;
        assert!(aged >= 1);
        s.sql("UPDATE audit_events SET at = '2000-01-01 00:00:00+00:00'")
            .await;
        let (st, v) = s
            .call(
                POST,
                "/v1/projects",
                Some(&s.admin),
                Some(json!({"name": "new"})),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        // The default retention is 90 days: the aged ones go, the new stays.
        assert_eq!(s.app.audit_expire().await.unwrap(), aged as u64);
        assert_eq!(s.count("audit_events").await, 1);
        let (_, a) = s.call(GET, "/v1/audit", Some(&s.admin), None).await;
        assert_eq!(a["items"][0]["action"], "project_create", "{a}");
    }
}

#[tokio::test]
async fn keys_move_to_an_owner_only_file_that_every_replica_must_share() {
    use axum::body::Body;
    use axum::http::Request;
    use byteport_server::{App, Settings, app::secrets};
    use tower::ServiceExt;
    for b in backends() {
        // A control plane that kept its keys in the database, as tests do.
        let s = TestServer::start(b).await;
        let dir = std::env::temp_dir().join(format!("bp-secrets-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("secrets.json");
        let with = |f: &std::path::Path| Settings {
            secrets_file: Some(f.to_owned()),
            ..Settings::default()
        };
        let whoami = |app: App, token: String| async move {
            let req = Request::builder()
                .uri("/v1/auth/whoami")
                .header("authorization", format!("Bearer {token}"))
                .body(Body::empty())
                .unwrap();
            byteport_server::router(app)
                .oneshot(req)
                .await
                .unwrap()
                .status()
        };

        // Its first start with a file moves the same keys there: tokens it
        // signed still verify, and the database holds no key any more.
        let app = App::new(s.app.store.clone(), with(&file)).await.unwrap();
        assert_eq!(whoami(app, s.admin.clone()).await, StatusCode::OK);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&file).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        for key in ["jwt_secret", "metadata_secret"] {
            assert_eq!(s.app.store.setting_get(key).await.unwrap(), None, "{key}");
        }

        // A replica without the file, or with other keys, refuses to start.
        let missing = dir.join("none.json");
        let e = App::new(s.app.store.clone(), with(&missing))
            .await
            .err()
            .unwrap();
        assert!(format!("{e:?}").contains("is missing"), "{e:?}");
        let other = dir.join("other.json");
        std::fs::write(&other, r#"{"jwt_secret":"a","metadata_secret":"b"}"#).unwrap();
        let e = App::new(s.app.store.clone(), with(&other))
            .await
            .err()
            .unwrap();
        assert!(format!("{e:?}").contains("not this database's"), "{e:?}");

        // A rotated signing key ends the access tokens signed before.
        let rotate = secrets::Rotate {
            jwt: true,
            metadata: false,
        };
        secrets::rotate(&s.app.store, &file, rotate).await.unwrap();
        let app = App::new(s.app.store.clone(), with(&file)).await.unwrap();
        assert_eq!(whoami(app, s.admin.clone()).await, StatusCode::UNAUTHORIZED);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[tokio::test]
async fn a_database_from_a_newer_version_is_refused_with_the_reason() {
    use sea_orm::ConnectionTrait;
    for b in backends() {
        let dir = std::env::temp_dir().join(format!("bp-schema-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let url = byteport_testkit::fresh_database(b, &dir).await;
        let store = byteport_store::DataStore::connect(&url)
            .await
            .expect("migrates");
        // Reopening a database this version made is fine.
        drop(store);
        let store = byteport_store::DataStore::connect(&url)
            .await
            .expect("reopens");
        // A migration this version does not know, as a newer one leaves.
        store
            .connection()
            .execute_unprepared(
                "INSERT INTO seaql_migrations (version, applied_at) VALUES ('m9999_from_the_future', 0)",
            )
            .await
            .unwrap();
        drop(store);
        let e = byteport_store::DataStore::connect(&url)
            .await
            .err()
            .expect("refused");
        let text = e.to_string();
        assert!(
            text.contains("migrated by a newer BytePort") && text.contains("m9999_from_the_future"),
            "{b:?}: {text}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// A heartbeat that reports nothing new costs no write per VM, and its
/// answer is the same as the one before; a user's change shows in the
/// very next answer even so.
#[tokio::test(flavor = "multi_thread")]
async fn an_unchanged_heartbeat_gets_the_same_answer_and_sees_a_users_change() {
    for b in backends() {
        let s = TestServer::start(b).await;
        let t = s.admin.clone();
        s.image("tiny").await;
        s.image("other").await;
        s.project("team-b", &[]).await;
        let node = SimNode::join(&s, "steady", 8192).await;
        let mut ids = Vec::new();
        for (name, project, image) in [("a", "default", "tiny"), ("b", "team-b", "other")] {
            let (st, v) = s
                .call(
                    POST,
                    "/v1/vms",
                    Some(&t),
                    Some(json!({"name": name, "project": project, "image": image,
                        "vcpus": 1, "memory_mib": 512, "disk_gib": 1})),
                )
                .await;
            assert_eq!(st, StatusCode::ACCEPTED, "{v}");
            ids.push(v["id"].as_str().unwrap().to_owned());
        }
        let running: Vec<(&str, &str, u64, u64)> = ids
            .iter()
            .map(|id| (id.as_str(), "running", 1, 1))
            .collect();
        let (st, first) = node.report(&s, &running).await;
        assert_eq!(st, StatusCode::OK, "{first}");
        assert_eq!(first["vms"].as_array().unwrap().len(), 2, "{first}");
        for id in &ids {
            let (_, v) = s.call(GET, &format!("/v1/vms/{id}"), Some(&t), None).await;
            assert_eq!(v["state"], "running", "{v}");
        }
        let (_, again) = node.report(&s, &running).await;
        assert_eq!(again, first, "the same reports, the same answer");
        // Also when the answer is served again from what was kept: then
        // the heartbeat is its node's write and one narrow read.
        for _ in 0..2 {
            let before = s.app.store.statements();
            let (st, more) = node.report(&s, &running).await;
            let ran = s.app.store.statements() - before;
            assert_eq!(st, StatusCode::OK);
            assert_eq!(more, first, "an unchanged node's answer changed");
            eprintln!("a steady heartbeat ran {ran} statements");
            assert!(ran <= 2, "{b:?}: a steady heartbeat ran {ran} statements");
        }
        let images: Vec<&str> = again["vms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["image"]["name"].as_str().unwrap())
            .collect();
        assert_eq!(images, ["tiny", "other"], "{again}");

        // Another replica changes a VM: nothing in this process is told,
        // the store alone has it. The next answer carries it.
        let row = s.app.store.vm_fetch(ids[1].parse().unwrap()).await.unwrap();
        let moved = s
            .app
            .store
            .vm_update_desired(row.id, row.desired_generation, "stopped", "stopping", false)
            .await
            .unwrap();
        let (_, seen) = node.report(&s, &running).await;
        assert_eq!(seen["vms"][1]["desired_state"], "stopped", "{b:?}: {seen}");
        s.app
            .store
            .vm_update_desired(
                moved.id,
                moved.desired_generation,
                "running",
                "running",
                false,
            )
            .await
            .unwrap();
        let (_, back) = node.report(&s, &running).await;
        assert_eq!(back["vms"][1]["desired_state"], "running", "{back}");
        let first = back;

        // A stop by the user: the next heartbeat, with nothing new to
        // report, carries it.
        let (st, _) = s
            .call(POST, &format!("/v1/vms/{}/stop", ids[0]), Some(&t), None)
            .await;
        assert_eq!(st, StatusCode::ACCEPTED);
        let (_, after) = node.report(&s, &running).await;
        assert_eq!(after["vms"][0]["desired_state"], "stopped", "{after}");
        assert!(
            after["vms"][0]["desired_generation"].as_u64()
                > first["vms"][0]["desired_generation"].as_u64(),
            "{after}"
        );
        assert_eq!(after["vms"][1], first["vms"][1]);
        // A report the store already has changes nothing, and a newer one
        // still lands.
        let (_, v) = s
            .call(GET, &format!("/v1/vms/{}", ids[0]), Some(&t), None)
            .await;
        assert_eq!(v["state"], "stopping", "{v}");
        node.report(&s, &[(&ids[0], "stopped", 2, 2)]).await;
        let (_, v) = s
            .call(GET, &format!("/v1/vms/{}", ids[0]), Some(&t), None)
            .await;
        assert_eq!(v["state"], "stopped", "{v}");
        // A delete reaches the node in the next answer too.
        let (st, v) = s
            .call(DELETE, &format!("/v1/vms/{}", ids[1]), Some(&t), None)
            .await;
        assert!(st.is_success(), "{st} {v}");
        let (_, next) = node.report(&s, &running).await;
        let gone = next["vms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["id"] == ids[1].as_str())
            .cloned()
            .unwrap_or_default();
        assert_eq!(gone["desired_state"], "deleted", "{next}");
    }
}
