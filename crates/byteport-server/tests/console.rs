//! What the web console stands on: the `/v1/events` stream (who sees
//! what, changes from another replica, nodes for admins) and the console's
//! static files at `/` beside the API, on SQLite and on PostgreSQL.

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use byteport_server::{App, Settings};
use byteport_store::DataStore;
use byteport_testkit::{TestServer, backends};
use futures_util::StreamExt;
use serde_json::{Value, json};
use std::time::Duration;
use tower::ServiceExt;

const GET: Method = Method::GET;
const POST: Method = Method::POST;
const PUT: Method = Method::PUT;

/// An open event stream: the raw body, and what was read of it.
struct Events {
    body: axum::body::BodyDataStream,
    buf: String,
    /// Comments and `retry` lines read so far.
    meta: String,
    /// Every `data` payload read so far, parsed.
    seen: Vec<Value>,
}

impl Events {
    async fn open(s: &TestServer, token: &str) -> Events {
        let req = Request::builder()
            .uri("/v1/events")
            .header("authorization", format!("Bearer {token}"))
            .body(Body::empty())
            .unwrap();
        let resp = s.router.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            resp.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        let mut e = Events {
            body: resp.into_body().into_data_stream(),
            buf: String::new(),
            meta: String::new(),
            seen: Vec::new(),
        };
        // The stream says it is ready before any change is sent.
        e.read_until(Duration::from_secs(5), |meta, _| meta.contains(": ready"))
            .await;
        assert!(e.meta.contains("retry: 1000"), "{}", e.meta);
        e
    }

    /// Reads until `done` holds or `limit` passes; returns whether it held.
    async fn read_until(&mut self, limit: Duration, done: impl Fn(&str, &[Value]) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while !done(&self.meta, &self.seen) {
            let chunk = tokio::time::timeout_at(deadline, self.body.next()).await;
            let Ok(Some(Ok(bytes))) = chunk else {
                return false;
            };
            self.buf.push_str(&String::from_utf8_lossy(&bytes));
            while let Some(end) = self.buf.find("\n\n") {
                let frame: String = self.buf.drain(..end + 2).collect();
                for line in frame.lines() {
                    if let Some(d) = line.strip_prefix("data: ").or(line.strip_prefix("data:")) {
                        self.seen
                            .push(serde_json::from_str(d).expect("event data is JSON"));
                    } else {
                        self.meta.push_str(line);
                        self.meta.push('\n');
                    }
                }
            }
        }
        true
    }

    /// Waits for a VM event matching `f`.
    async fn vm(&mut self, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let ok = self
            .read_until(Duration::from_secs(10), |_, seen| {
                seen.iter().any(|e| e.get("vm").is_some_and(&f))
            })
            .await;
        assert!(ok, "no event for {what}; saw {:?}", self.seen);
        self.seen
            .iter()
            .rev()
            .find_map(|e| e.get("vm").filter(|v| f(v)))
            .cloned()
            .unwrap()
    }

    fn vm_ids(&self) -> Vec<String> {
        self.seen
            .iter()
            .filter_map(|e| e["vm"]["id"].as_str().map(str::to_owned))
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_of_more_changes_than_a_page_with_one_timestamp_reaches_the_stream_whole() {
    use sea_orm::{EntityTrait, sea_query::Expr};
    for b in backends() {
        let s = TestServer::start(b).await;
        s.image("tiny").await;
        let quota = json!({"max_vms": 2000, "max_vcpus": 4000, "max_memory_mib": 8_000_000, "max_disk_gib": 100_000});
        let (st, v) = s
            .call(
                PUT,
                "/v1/projects/default/quota",
                Some(&s.admin),
                Some(quota),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{v}");
        let n = byteport_server::app::events::BATCH as usize + 150;
        for i in 0..n {
            let (st, v) = s
                .call(
                    POST,
                    "/v1/vms",
                    Some(&s.admin),
                    Some(json!({"name": format!("b-{i}"), "image": "tiny", "flavor": "m1.tiny"})),
                )
                .await;
            assert_eq!(st, StatusCode::ACCEPTED, "{v}");
        }
        let mut e = Events::open(&s, &s.admin).await;
        // Every VM changes in one statement: one timestamp for all.
        // To the millisecond: what every database keeps of a timestamp.
        let at = chrono::SubsecRound::trunc_subsecs(
            chrono::Utc::now() + chrono::TimeDelta::seconds(1),
            3,
        );
        byteport_store::vm::Entity::update_many()
            .col_expr(byteport_store::vm::Column::UpdatedAt, Expr::value(at))
            .exec(s.app.store.connection())
            .await
            .unwrap();
        let stamp = |v: &Value| {
            v["vm"]["updated_at"]
                .as_str()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .is_some_and(|t| t == at)
        };
        let whole = e
            .read_until(Duration::from_secs(20), |_, seen| {
                seen.iter().filter(|v| stamp(v)).count() >= n
            })
            .await;
        let got: std::collections::HashSet<&str> = e
            .seen
            .iter()
            .filter(|v| stamp(v))
            .filter_map(|v| v["vm"]["id"].as_str())
            .collect();
        assert!(
            whole && got.len() == n,
            "{b:?}: {} of {n} changes came",
            got.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn events_carry_what_each_caller_may_see_from_any_replica() {
    for b in backends() {
        let s = TestServer::start(b).await;
        s.image("tiny").await;
        let alice = s.user("alice").await;
        let bob = s.user("bob").await;
        s.project("team-a", &[("alice", "member")]).await;
        s.project("team-b", &[("bob", "member")]).await;

        // No credential, no stream.
        let (st, v) = s.call(GET, "/v1/events", None, None).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{v}");

        let mut a = Events::open(&s, &alice).await;
        let mut admin = Events::open(&s, &s.admin).await;

        let new_vm = |project: &str, name: &str| json!({"name": name, "project": project, "image": "tiny", "flavor": "m1.tiny"});
        let (st, vb) = s
            .call(POST, "/v1/vms", Some(&bob), Some(new_vm("team-b", "b-1")))
            .await;
        assert_eq!(st, StatusCode::ACCEPTED, "{vb}");
        let (st, va) = s
            .call(POST, "/v1/vms", Some(&alice), Some(new_vm("team-a", "a-1")))
            .await;
        assert_eq!(st, StatusCode::ACCEPTED, "{va}");
        let (ida, idb) = (va["id"].clone(), vb["id"].clone());

        // The dashboard's counts: each caller's own VMs only.
        let (st, c) = s.call(GET, "/v1/vm-states", Some(&alice), None).await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(c, json!([{"state": "pending", "count": 1}]));
        let (_, c) = s.call(GET, "/v1/vm-states", Some(&s.admin), None).await;
        assert_eq!(c, json!([{"state": "pending", "count": 2}]));
        let (st, _) = s.call(GET, "/v1/vm-states", None, None).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);

        let seen = admin.vm("bob's VM", |v| v["id"] == idb).await;
        assert_eq!(seen["project"], "team-b");
        admin.vm("alice's VM", |v| v["id"] == ida).await;
        let seen = a.vm("her own VM", |v| v["id"] == ida).await;
        assert_eq!(
            (seen["state"].as_str(), seen["project"].as_str()),
            (Some("pending"), Some("team-a"))
        );

        // Another replica changes the VM: nothing in this process is told,
        // the store alone has it. The streams still see it.
        let row = s
            .app
            .store
            .vm_fetch(ida.as_str().unwrap().parse().unwrap())
            .await
            .unwrap();
        s.app
            .store
            .vm_update_desired(row.id, row.desired_generation, "stopped", "stopped", false)
            .await
            .unwrap();
        a.vm("a change written by another replica", |v| {
            v["id"] == ida && v["state"] == "stopped"
        })
        .await;
        admin
            .vm("a change written by another replica", |v| {
                v["id"] == ida && v["state"] == "stopped"
            })
            .await;

        // A node joins: admins hear of it; alice does not.
        let (_, jt) = s
            .call(
                POST,
                "/v1/node-join-tokens",
                Some(&s.admin),
                Some(json!({})),
            )
            .await;
        let reg = json!({"join_token": jt["token"], "name": "n1", "engines": ["qemu"],
            "capacity": {"vcpus": 2, "memory_mib": 4096, "disk_gib": 100}});
        let (st, n) = s.call(POST, "/v1/nodes/register", None, Some(reg)).await;
        assert_eq!(st, StatusCode::CREATED, "{n}");
        let ok = admin
            .read_until(Duration::from_secs(10), |_, seen| {
                seen.iter().any(|e| e["node"]["name"] == "n1")
            })
            .await;
        assert!(ok, "no node event; saw {:?}", admin.seen);

        // Alice then deletes her VM: the deletion is an event too.
        let (st, _) = s
            .call(
                Method::DELETE,
                &format!("/v1/vms/{}", ida.as_str().unwrap()),
                Some(&alice),
                None,
            )
            .await;
        assert_eq!(st, StatusCode::ACCEPTED);
        a.vm("the deletion", |v| {
            v["id"] == ida && v["state"] != "stopped"
        })
        .await;
        // Give a stray event time to arrive, then check what alice saw.
        a.read_until(Duration::from_millis(1500), |_, _| false)
            .await;
        assert!(
            !a.vm_ids().contains(&idb.as_str().unwrap().to_owned()),
            "alice saw team-b's VM"
        );
        assert!(
            a.seen.iter().all(|e| e.get("node").is_none()),
            "alice saw a node"
        );
        // A member added to team-b later sees its VMs on a new stream.
        let (st, _) = s
            .call(
                PUT,
                "/v1/projects/team-b/members/alice",
                Some(&s.admin),
                Some(json!({"role": "viewer"})),
            )
            .await;
        assert_eq!(st, StatusCode::OK);
        let mut a2 = Events::open(&s, &alice).await;
        let row = s
            .app
            .store
            .vm_fetch(idb.as_str().unwrap().parse().unwrap())
            .await
            .unwrap();
        s.app
            .store
            .vm_set_pending_reason(row.id, "still waiting")
            .await
            .unwrap();
        let (st, _) = s
            .call(
                POST,
                &format!("/v1/vms/{}/stop", idb.as_str().unwrap()),
                Some(&bob),
                None,
            )
            .await;
        assert_eq!(st, StatusCode::ACCEPTED);
        a2.vm("team-b's VM, now that she may see it", |v| v["id"] == idb)
            .await;
    }
}

/// Statements the replica runs in `secs` seconds with nothing changing.
async fn statements_in(s: &TestServer, secs: u64) -> u64 {
    let before = s.app.store.statements();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    s.app.store.statements() - before
}

#[tokio::test(flavor = "multi_thread")]
async fn many_open_streams_cost_the_database_what_one_does() {
    for b in backends() {
        let s = TestServer::start(b).await;
        s.image("tiny").await;
        let alice = s.user("alice").await;
        let bob = s.user("bob").await;
        s.project("team-a", &[("alice", "member"), ("bob", "viewer")])
            .await;

        let mut admin = Events::open(&s, &s.admin).await;
        let mut first = Events::open(&s, &alice).await;
        // One poll a second, of the VMs and (for the admin) the nodes.
        let one = statements_in(&s, 3).await;
        assert!(one > 0, "{b:?}: the open streams read nothing");

        let mut more = Vec::new();
        for _ in 0..30 {
            more.push(Events::open(&s, &alice).await);
            more.push(Events::open(&s, &bob).await);
        }
        assert_eq!(s.app.event_streams_open(), 62);
        let many = statements_in(&s, 3).await;
        // One poll more or less in the window, not one per stream.
        assert!(
            many <= one + 4,
            "{b:?}: 62 streams ran {many} statements in 3 s, 2 streams {one}"
        );

        // Every stream still gets the change it may see.
        let (st, v) = s
            .call(
                POST,
                "/v1/vms",
                Some(&alice),
                Some(json!({"name": "a-1", "project": "team-a", "image": "tiny", "flavor": "m1.tiny"})),
            )
            .await;
        assert_eq!(st, StatusCode::ACCEPTED, "{v}");
        let id = v["id"].clone();
        admin.vm("the new VM", |v| v["id"] == id).await;
        first.vm("the new VM", |v| v["id"] == id).await;
        for e in &mut more {
            let seen = e.vm("the new VM", |v| v["id"] == id).await;
            assert_eq!(seen["project"], "team-a");
        }

        // With every stream closed, the feed stops reading.
        drop((admin, first, more));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(s.app.event_streams_open(), 0);
        assert_eq!(statements_in(&s, 2).await, 0, "{b:?}: the feed reads on");
    }
}

/// A router like the daemon's, serving `web` as the console's build.
async fn router_with_console(web: Option<&std::path::Path>) -> axum::Router {
    let dir = std::env::temp_dir().join(format!("bp-console-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let store = DataStore::connect(&format!(
        "sqlite://{}?mode=rwc",
        dir.join("db.sqlite").display()
    ))
    .await
    .unwrap();
    let settings = Settings {
        image_dir: dir.join("images"),
        web_dir: web.map(std::path::Path::to_path_buf),
        ..Settings::default()
    };
    byteport_server::router(App::new(store, settings).await.unwrap())
}

async fn get(
    r: &axum::Router,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let mut b = Request::builder().uri(path);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = r
        .clone()
        .oneshot(b.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let (st, h) = (resp.status(), resp.headers().clone());
    let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    (st, h, body.to_vec())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_console_is_served_beside_the_api() {
    let web = std::env::temp_dir().join(format!("bp-web-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(web.join("_app/immutable/entry")).unwrap();
    std::fs::write(web.join("index.html"), "<!doctype html><p>console</p>").unwrap();
    std::fs::write(
        web.join("_app/immutable/entry/app.1a2b.js"),
        "console.log(1)",
    )
    .unwrap();
    std::fs::write(
        web.join("_app/immutable/entry/app.1a2b.js.gz"),
        b"\x1f\x8b-gz",
    )
    .unwrap();
    std::fs::write(web.join("_app/version.json"), "{}").unwrap();
    let r = router_with_console(Some(&web)).await;

    let html = [("accept", "text/html,application/xhtml+xml,*/*;q=0.8")];
    for path in [
        "/",
        "/vms",
        "/vms/0190f0aa-0000-7000-8000-000000000000",
        "/login",
    ] {
        let (st, h, body) = get(&r, path, &html).await;
        assert_eq!(st, StatusCode::OK, "{path}");
        assert_eq!(h["content-type"], "text/html; charset=utf-8", "{path}");
        assert_eq!(h["cache-control"], "no-cache", "{path}");
        assert_eq!(body, b"<!doctype html><p>console</p>", "{path}");
    }
    let asset = "/_app/immutable/entry/app.1a2b.js";
    let (st, h, body) = get(&r, asset, &[]).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(h["content-type"], "text/javascript; charset=utf-8");
    assert_eq!(h["cache-control"], "public, max-age=31536000, immutable");
    assert_eq!(body, b"console.log(1)");
    let (_, h, body) = get(&r, asset, &[("accept-encoding", "gzip, deflate")]).await;
    assert_eq!(h["content-encoding"], "gzip");
    assert_eq!(body, b"\x1f\x8b-gz");
    // A client that does not ask for HTML gets a 404 for a path that names
    // no file, never the page (cloud-init probing for vendor-data, say).
    let (st, h, _) = get(&r, "/some/data/vendor-data", &[]).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert_eq!(h["content-type"], "application/json");
    let (st, _, body) = get(&r, "/", &[]).await;
    assert_eq!(
        (st, body.as_slice()),
        (StatusCode::OK, &b"<!doctype html><p>console</p>"[..])
    );
    // Not hashed: revalidated.
    let (st, h, _) = get(&r, "/_app/version.json", &[]).await;
    assert_eq!(
        (st, &h["cache-control"]),
        (StatusCode::OK, &"no-cache".parse().unwrap())
    );
    // A missing asset is a 404, not the page (a script must not get HTML).
    let (st, _, _) = get(&r, "/_app/immutable/entry/gone.js", &[]).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    for bad in [
        "/../Cargo.toml",
        "/_app/../../etc/passwd",
        "/.hidden",
        "/%2e%2e/x",
    ] {
        let (st, _, body) = get(&r, bad, &html).await;
        assert!(
            st == StatusCode::NOT_FOUND || body == b"<!doctype html><p>console</p>",
            "{bad}: {st}"
        );
    }

    // The API keeps its own answers.
    let (st, h, body) = get(&r, "/v1/no-such-route", &[]).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert_eq!(h["content-type"], "application/json");
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["code"], "not_found");
    let (st, _, body) = get(&r, "/healthz", &[]).await;
    assert_eq!(
        (st, body),
        (StatusCode::OK, b"{\"status\":\"ok\"}".to_vec())
    );
    let (st, h, _) = get(&r, "/metrics", &[]).await;
    assert_eq!(st, StatusCode::OK);
    assert!(
        h["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let (st, _, _) = get(&r, "/v1/openapi.json", &[]).await;
    assert_eq!(st, StatusCode::OK);
    let (st, _, body) = get(&r, "/docs/", &[]).await;
    assert_eq!(st, StatusCode::OK);
    assert!(String::from_utf8_lossy(&body).contains("swagger"));
    // Not a GET: the API's 404, never the page.
    let resp = r
        .clone()
        .oneshot(
            Request::builder()
                .method(POST)
                .uri("/vms")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);

    // Without a build, `/` says how to make one.
    let r = router_with_console(None).await;
    let (st, _, body) = get(&r, "/", &[]).await;
    assert_eq!(st, StatusCode::OK);
    assert!(String::from_utf8_lossy(&body).contains("npm run build"));
    let (st, _, _) = get(&r, "/vms", &html).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let _ = std::fs::remove_dir_all(&web);
}
