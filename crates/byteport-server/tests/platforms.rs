//! Guest architectures through the API, with simulated nodes, on SQLite
//! and PostgreSQL: nodes say which architectures they run (natively or
//! emulated), VMs go only where theirs runs, and environments form a
//! matrix of images x architectures, N of each.

use axum::http::{Method, StatusCode};
use byteport_testkit::{SimNode, TestServer, backends};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};

const GET: Method = Method::GET;
const POST: Method = Method::POST;
const PUT: Method = Method::PUT;

/// Images `debian-R` (x86_64) and `debian-R-arm` (aarch64) for each
/// release, with the guest agent.
async fn debian_images(s: &TestServer, releases: &[u32]) {
    for r in releases {
        s.agent_image_for(&format!("debian-{r}"), "x86_64").await;
        s.agent_image_for(&format!("debian-{r}-arm"), "aarch64")
            .await;
    }
}

async fn roomy_quota(s: &TestServer, max_vms: u32) {
    let (st, v) = s
        .call(
            PUT,
            "/v1/projects/default/quota",
            Some(&s.admin),
            Some(json!({"max_vms": max_vms, "max_vcpus": 100000,
                "max_memory_mib": 100_000_000u64, "max_disk_gib": 1_000_000u64})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
}

fn env(name: &str, prefixes: &[&str], archs: &[&str], dup: Option<u32>) -> Value {
    let mut e = json!({"name": name, "os_prefixes": prefixes, "archs": archs,
        "vcpus": 1, "memory_mib": 256, "disk_gib": 1});
    if let Some(d) = dup {
        e["dup_each"] = json!(d);
    }
    e
}

fn vms(e: &Value) -> &Vec<Value> {
    e["vms"].as_array().expect("the environment's VMs")
}

async fn env_named(s: &TestServer, name: &str) -> Value {
    let (st, e) = s
        .call(
            GET,
            &format!("/v1/environments/{name}"),
            Some(&s.admin),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{e}");
    e
}

/// One heartbeat reporting every VM of `ids` in `state`, having applied
/// desired generation `generation` (also the report's own).
async fn report_all(s: &TestServer, node: &SimNode, ids: &[String], state: &str, generation: u64) {
    let vms: Vec<(&str, &str, u64, u64)> = ids
        .iter()
        .map(|id| (id.as_str(), state, generation, generation))
        .collect();
    let (st, v) = node.report(s, &vms).await;
    assert_eq!(st, StatusCode::OK, "{v}");
}

async fn env_count(s: &TestServer) -> usize {
    let (st, v) = s.call(GET, "/v1/environments", Some(&s.admin), None).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    v.as_array().map_or(0, Vec::len)
}

#[tokio::test(flavor = "multi_thread")]
async fn environments_form_a_matrix_placed_where_each_architecture_runs() {
    for b in backends() {
        let s = TestServer::start(b).await;
        let t = s.admin.clone();
        debian_images(&s, &[12, 13]).await;
        s.image_for("tiny", "x86_64").await;
        roomy_quota(&s, 100).await;
        // An x86_64 host without KVM (it says nothing: its own arch,
        // emulated), an aarch64 host with KVM, and an x86_64 host that
        // also emulates aarch64.
        let x86 = SimNode::join(&s, "x86-1", 65536).await;
        let arm = SimNode::join_running(&s, "arm-1", 64, 65536, &[("aarch64", "native")]).await;
        let both = SimNode::join_running(
            &s,
            "both-1",
            64,
            65536,
            &[("x86_64", "emulated"), ("aarch64", "emulated")],
        )
        .await;
        let (_, n) = s
            .call(GET, &format!("/v1/nodes/{}", x86.id), Some(&t), None)
            .await;
        assert_eq!(
            n["platforms"],
            json!([{"arch": "x86_64", "execution": "emulated"}])
        );
        // A node that names no engine has qemu, and VMs land on it.
        let (_, jt) = s
            .call(POST, "/v1/node-join-tokens", Some(&t), Some(json!({})))
            .await;
        let (st, quiet) = s
            .call(
                POST,
                "/v1/nodes/register",
                None,
                Some(json!({"join_token": jt["token"], "name": "quiet-1",
                    "capacity": {"vcpus": 1, "memory_mib": 256, "disk_gib": 10}})),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "{quiet}");
        assert_eq!(quiet["node"]["engines"], json!(["qemu"]), "{quiet}");
        let (_, n) = s
            .call(GET, &format!("/v1/nodes/{}", both.id), Some(&t), None)
            .await;
        assert_eq!(n["platforms"][1]["arch"], "aarch64", "{n}");

        // One VM per (image, architecture); each where its architecture
        // runs, aarch64 natively before emulated.
        let (st, e) = s
            .call(
                POST,
                "/v1/environments",
                Some(&t),
                Some(env("compat", &["debian"], &["x86_64", "aarch64"], None)),
            )
            .await;
        assert_eq!(st, StatusCode::ACCEPTED, "{e}");
        let got: BTreeMap<&str, (&str, &str)> = vms(&e)
            .iter()
            .map(|v| {
                (
                    v["name"].as_str().unwrap(),
                    (
                        v["arch"].as_str().unwrap(),
                        v["node_id"].as_str().unwrap_or("-"),
                    ),
                )
            })
            .collect();
        assert_eq!(
            got.keys().copied().collect::<Vec<_>>(),
            [
                "compat-debian-12",
                "compat-debian-12-arm",
                "compat-debian-13",
                "compat-debian-13-arm"
            ]
        );
        for (name, (arch, node)) in &got {
            if name.ends_with("-arm") {
                assert_eq!(*arch, "aarch64");
                assert_eq!(*node, arm.id, "{name} is placed natively");
            } else {
                assert_eq!(*arch, "x86_64");
                assert!(*node == x86.id || *node == both.id, "{name} on {node}");
            }
        }

        // A run goes to the VMs the filters name (none runs yet: each
        // result says so), and filters that match none are a 400.
        for (query, want) in [
            (
                "os_prefix=debian-12",
                vec!["compat-debian-12", "compat-debian-12-arm"],
            ),
            (
                "vm=compat-debian-13,compat-debian-12",
                vec!["compat-debian-12", "compat-debian-13"],
            ),
            (
                "os_prefix=debian-13&vm=compat-debian-13-arm",
                vec!["compat-debian-13-arm"],
            ),
        ] {
            let (st, r) = s
                .call(
                    POST,
                    &format!("/v1/environments/compat/run?{query}"),
                    Some(&t),
                    Some(json!({"argv": ["uname", "-m"]})),
                )
                .await;
            assert_eq!(st, StatusCode::OK, "{query}: {r}");
            let mut got: Vec<&str> = r["results"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x["vm_name"].as_str().unwrap())
                .collect();
            got.sort();
            assert_eq!(got, want, "{query}: {r}");
        }
        let (st, r) = s
            .call(
                POST,
                "/v1/environments/compat/run?os_prefix=alpine",
                Some(&t),
                Some(json!({"argv": ["true"]})),
            )
            .await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{r}");
        assert_eq!(r["error"]["code"], "no_matching_vm");

        // One architecture only, two of each image.
        let (st, e) = s
            .call(
                POST,
                "/v1/environments",
                Some(&t),
                Some(env("arm", &["debian"], &["aarch64"], Some(2))),
            )
            .await;
        assert_eq!(st, StatusCode::ACCEPTED, "{e}");
        let names: Vec<&str> = vms(&e)
            .iter()
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "arm-debian-12-arm-1",
                "arm-debian-12-arm-2",
                "arm-debian-13-arm-1",
                "arm-debian-13-arm-2"
            ]
        );
        assert!(vms(&e).iter().all(|v| v["arch"] == "aarch64"), "{e}");

        // Bad input is a 4xx and makes nothing.
        let before = env_count(&s).await;
        for (req, code) in [
            (env("x", &["debian"], &["riscv64"], None), "unknown_image"),
            (env("x", &["tiny"], &["aarch64"], None), "unknown_image"),
            (env("x", &["debian"], &[], Some(0)), "invalid_dup_each"),
            (env("x", &["debian"], &[], Some(51)), "invalid_dup_each"),
        ] {
            let (st, v) = s
                .call(POST, "/v1/environments", Some(&t), Some(req.clone()))
                .await;
            assert!(st.is_client_error(), "{req} -> {st} {v}");
            assert_eq!(v["error"]["code"], code, "{req} -> {v}");
        }
        assert_eq!(env_count(&s).await, before);

        // A riscv64 VM waits with the reason until a node runs riscv64:
        // this one gains the emulator and says so in its next heartbeat.
        s.image_for("tiny-riscv64", "riscv64").await;
        let (st, v) = s
            .call(
                POST,
                "/v1/vms",
                Some(&t),
                Some(json!({"name": "rv", "image": "tiny-riscv64", "flavor": "m1.tiny"})),
            )
            .await;
        assert_eq!(st, StatusCode::ACCEPTED, "{v}");
        let rv = format!("/v1/vms/{}", v["id"].as_str().unwrap());
        assert_eq!(v["state"], "pending");
        assert_eq!(
            v["state_reason"], "no online node runs riscv64 guests",
            "{v}"
        );
        let (st, v) = s
            .call(
                POST,
                &format!("/v1/nodes/{}/heartbeat", x86.id),
                Some(&x86.credential),
                Some(json!({"capacity": x86.capacity, "platforms": [
                    {"arch": "x86_64", "execution": "emulated"},
                    {"arch": "riscv64", "execution": "emulated"}]})),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{v}");
        // The background loop's next placement pass.
        assert_eq!(s.app.place_pending().await.expect("a pass"), 1);
        let (_, v) = s.call(GET, &rv, Some(&t), None).await;
        assert_eq!(v["node_id"], x86.id.as_str(), "{v}");
        // A node's platforms are checked.
        let (st, v) = s
            .call(
                POST,
                &format!("/v1/nodes/{}/heartbeat", x86.id),
                Some(&x86.credential),
                Some(json!({"capacity": x86.capacity, "platforms": [
                    {"arch": "x86_64", "execution": "emulated"},
                    {"arch": "x86_64", "execution": "native"}]})),
            )
            .await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
        assert_eq!(v["error"]["code"], "invalid_platforms");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_environment_of_500_vms_is_made_whole_across_20_nodes_by_architecture() {
    for b in backends() {
        let s = TestServer::start(b).await;
        let t = s.admin.clone();
        debian_images(&s, &[10, 11, 12, 13, 14]).await;
        roomy_quota(&s, 500).await;
        let mut arch_of = HashMap::new();
        let mut sims = Vec::new();
        for i in 0..10 {
            let n = SimNode::join_running(&s, &format!("amd-{i}"), 64, 65536, &[]).await;
            arch_of.insert(n.id.clone(), "x86_64");
            sims.push(n);
            let n =
                SimNode::join_running(&s, &format!("arm-{i}"), 64, 65536, &[("aarch64", "native")])
                    .await;
            arch_of.insert(n.id.clone(), "aarch64");
            sims.push(n);
        }
        // Ten images, both architectures, fifty of each: 500 VMs, the
        // quota's last one included.
        let (st, e) = s
            .call(
                POST,
                "/v1/environments",
                Some(&t),
                Some(env("big", &["debian"], &["x86_64", "aarch64"], Some(50))),
            )
            .await;
        assert_eq!(st, StatusCode::ACCEPTED, "{e}");
        assert_eq!(vms(&e).len(), 500);
        // Placed at once, or by the background loop's next pass.
        s.app.place_pending().await.expect("a pass");
        let (_, e) = s.call(GET, "/v1/environments/big", Some(&t), None).await;
        let mut per_node: HashMap<&str, usize> = HashMap::new();
        for v in vms(&e) {
            let node = v["node_id"].as_str().expect("every VM placed");
            assert_eq!(arch_of[node], v["arch"], "{v}");
            *per_node.entry(node).or_default() += 1;
        }
        assert_eq!(per_node.len(), 20, "spread over every node: {per_node:?}");
        let mut on_node: HashMap<String, Vec<String>> = HashMap::new();
        for v in vms(&e) {
            on_node
                .entry(v["node_id"].as_str().unwrap().to_owned())
                .or_default()
                .push(v["id"].as_str().unwrap().to_owned());
        }
        // No node over its limit: 64 vCPUs x 4 overcommit, 64 GiB.
        let (_, nodes) = s.call(GET, "/v1/nodes", Some(&t), None).await;
        for n in nodes.as_array().expect("nodes") {
            assert!(
                n["reserved"]["memory_mib"].as_u64().unwrap() <= 65536,
                "{n}"
            );
        }
        // All or nothing: one VM more is over the quota and makes none.
        let (st, v) = s
            .call(
                POST,
                "/v1/environments",
                Some(&t),
                Some(env("more", &["debian-10"], &["x86_64"], None)),
            )
            .await;
        assert_eq!(st, StatusCode::FORBIDDEN, "{v}");
        assert_eq!(v["error"]["code"], "quota_exceeded", "{v}");
        assert_eq!(env_count(&s).await, 1);

        // Every VM runs; one command fans out to all 500 and every VM's
        // own answer comes back, streamed and gathered.
        let mut serving = Vec::new();
        for n in &sims {
            report_all(&s, n, &on_node[&n.id], "running", 1).await;
            serving.push(n.serve_exec(&s, |vm, argv| (format!("{vm} {}\n", argv.join(" ")), 0)));
        }
        let (st, lines) = s
            .post_lines(
                "/v1/environments/big/exec",
                &t,
                json!({"argv": ["uname", "-m"]}),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{lines:?}");
        let fan = fan_out(&lines);
        assert_eq!(fan.started.len(), 500);
        assert_eq!(fan.done, json!({"succeeded": 500, "failed": 0}));
        for id in &fan.started {
            assert_eq!(fan.stdout[id], format!("{id} uname -m\n"));
            assert_eq!(fan.ends[id], json!({"code": 0}), "{id}");
        }
        let (st, r) = s
            .call(
                POST,
                "/v1/environments/big/run",
                Some(&t),
                Some(json!({"argv": ["uname", "-m"]})),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{r}");
        let results = r["results"].as_array().expect("results");
        assert_eq!(results.len(), 500);
        for x in results {
            assert_eq!(
                x["stdout"],
                format!("{} uname -m\n", x["vm_id"].as_str().unwrap())
            );
            assert_eq!(x["exit_code"], 0, "{x}");
        }

        // A node that goes away fails its own VMs' runs, and only those.
        serving.pop().expect("a node").abort();
        let gone = &on_node[&sims.last().unwrap().id];
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let (st, lines) = s
            .post_lines("/v1/environments/big/exec", &t, json!({"argv": ["true"]}))
            .await;
        assert_eq!(st, StatusCode::OK);
        let fan = fan_out(&lines);
        assert_eq!(
            fan.done,
            json!({"succeeded": 500 - gone.len(), "failed": gone.len()})
        );
        for id in gone {
            assert!(fan.ends[id]["error"].is_string(), "{id}: {}", fan.ends[id]);
        }

        // A bad command is one 400, and nothing runs.
        let (st, lines) = s
            .post_lines("/v1/environments/big/exec", &t, json!({"argv": []}))
            .await;
        assert_eq!(st, StatusCode::BAD_REQUEST);
        assert_eq!(lines[0]["error"]["code"], "invalid_argv");
    }
}

/// A streamed environment run taken apart: the VMs of `started`, each
/// VM's standard output, how each ended (`code`, or `error`), and `done`
/// without its time. Fails on a line out of place.
struct FanOut {
    started: Vec<String>,
    stdout: HashMap<String, String>,
    ends: HashMap<String, Value>,
    done: Value,
}

fn fan_out(lines: &[Value]) -> FanOut {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let started: Vec<String> = lines[0]["started"]["vms"]
        .as_array()
        .expect("started first")
        .iter()
        .map(|v| v["vm_id"].as_str().unwrap().to_owned())
        .collect();
    let (mut stdout, mut ends) = (HashMap::<String, String>::new(), HashMap::new());
    for l in &lines[1..lines.len() - 1] {
        let (kind, ev) = l.as_object().unwrap().iter().next().unwrap();
        let id = ev["vm_id"].as_str().unwrap().to_owned();
        assert!(!ends.contains_key(&id), "a line after {id}'s end: {l}");
        match kind.as_str() {
            "stdout" => {
                let b = b64.decode(ev["data"].as_str().unwrap()).unwrap();
                stdout
                    .entry(id)
                    .or_default()
                    .push_str(&String::from_utf8(b).unwrap());
            }
            "exit" => {
                ends.insert(id, json!({"code": ev["code"]}));
            }
            "error" => {
                ends.insert(id, json!({"error": ev["message"]}));
            }
            _ => panic!("unexpected line {l}"),
        }
    }
    assert_eq!(ends.len(), started.len(), "every VM ended");
    let mut done = lines.last().unwrap()["done"].clone();
    assert!(done["duration_ms"].is_u64(), "done last: {done}");
    done.as_object_mut().unwrap().remove("duration_ms");
    FanOut {
        started,
        stdout,
        ends,
        done,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_environment_stops_and_starts_whole_keeping_its_vms() {
    for b in backends() {
        let s = TestServer::start(b).await;
        let t = s.admin.clone();
        debian_images(&s, &[12]).await;
        let node = SimNode::join_running(&s, "n-1", 8, 8192, &[]).await;
        let (st, e) = s
            .call(
                POST,
                "/v1/environments",
                Some(&t),
                Some(env("pair", &["debian"], &["x86_64"], Some(2))),
            )
            .await;
        assert_eq!(st, StatusCode::ACCEPTED, "{e}");
        let ids: Vec<String> = vms(&e)
            .iter()
            .map(|v| v["id"].as_str().unwrap().to_owned())
            .collect();
        report_all(&s, &node, &ids, "running", 1).await;
        assert_eq!(env_named(&s, "pair").await["state"], "ready");

        // Stop: every VM is asked to stop, and once the node says so the
        // environment is stopped, its VMs kept.
        let (st, a) = s
            .call(POST, "/v1/environments/pair/stop", Some(&t), None)
            .await;
        assert_eq!(st, StatusCode::ACCEPTED, "{a}");
        assert_eq!(a["refused"], json!([]));
        assert!(
            vms(&a["environment"])
                .iter()
                .all(|v| v["desired_state"] == "stopped"),
            "{a}"
        );
        report_all(&s, &node, &ids, "stopped", 2).await;
        let e = env_named(&s, "pair").await;
        assert_eq!(e["state"], "stopped", "{e}");
        assert_eq!(vms(&e).len(), 2);
        // Again: nothing to do, nothing refused.
        let (st, a) = s
            .call(POST, "/v1/environments/pair/stop", Some(&t), None)
            .await;
        assert_eq!(st, StatusCode::ACCEPTED, "{a}");
        assert_eq!(a["refused"], json!([]));

        // Start: back to running on the same node, the same VMs.
        let (st, a) = s
            .call(POST, "/v1/environments/pair/start", Some(&t), None)
            .await;
        assert_eq!(st, StatusCode::ACCEPTED, "{a}");
        assert_eq!(a["refused"], json!([]), "{a}");
        for v in vms(&a["environment"]) {
            assert_eq!(v["desired_state"], "running", "{v}");
            assert_eq!(v["node_id"], node.id.as_str(), "{v}");
        }
        report_all(&s, &node, &ids, "running", 3).await;
        let e = env_named(&s, "pair").await;
        assert_eq!(e["state"], "ready", "{e}");
        let now: Vec<&str> = vms(&e).iter().map(|v| v["id"].as_str().unwrap()).collect();
        assert_eq!(now, ids.iter().map(String::as_str).collect::<Vec<_>>());

        // Only members act on it; an unknown one is a 404.
        let (st, _) = s
            .call(POST, "/v1/environments/nope/stop", Some(&t), None)
            .await;
        assert_eq!(st, StatusCode::NOT_FOUND);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_microvm_vm_waits_for_a_node_with_the_engine_and_needs_a_kernel_image() {
    for b in backends() {
        let s = TestServer::start(b).await;
        let t = s.admin.clone();
        s.image_for("disk-img", "x86_64").await;
        let (st, v) = s
            .call(
                POST,
                "/v1/images",
                Some(&t),
                Some(
                    json!({"name": "kern", "os_family": "linux", "os_version": "1",
                    "format": "initramfs", "size_bytes": 1024, "sha256": "cd".repeat(32),
                    "boot": "kernel", "kernel_sha256": "ef".repeat(32), "has_agent": true}),
                ),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        let node = SimNode::join(&s, "n-1", 8192).await;
        let vm = |name: &str, image: &str, engine: &str| json!({"name": name, "image": image, "flavor": "m1.tiny", "engine": engine});
        // An image that boots from its disk cannot run under microvm.
        let (st, v) = s
            .call(
                POST,
                "/v1/vms",
                Some(&t),
                Some(vm("a", "disk-img", "microvm")),
            )
            .await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
        assert_eq!(v["error"]["code"], "engine_unsupported", "{v}");
        let (st, v) = s
            .call(POST, "/v1/vms", Some(&t), Some(vm("a", "kern", "xen")))
            .await;
        assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
        assert_eq!(v["error"]["code"], "invalid_body", "{v}");
        let (_, list) = s.call(GET, "/v1/vms", Some(&t), None).await;
        assert_eq!(list["items"], json!([]), "nothing made: {list}");

        // The node has only qemu: the VM waits with the reason ...
        let (st, v) = s
            .call(POST, "/v1/vms", Some(&t), Some(vm("m", "kern", "microvm")))
            .await;
        assert_eq!(st, StatusCode::ACCEPTED, "{v}");
        assert_eq!(v["engine"], "microvm");
        assert_eq!(
            v["state_reason"], "no online node that runs x86_64 guests has the microvm engine",
            "{v}"
        );
        // ... until it says it has microvm too.
        let (st, hb) = s
            .call(
                POST,
                &format!("/v1/nodes/{}/heartbeat", node.id),
                Some(&node.credential),
                Some(json!({"capacity": node.capacity, "engines": ["qemu", "microvm"]})),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{hb}");
        assert_eq!(s.app.place_pending().await.expect("a pass"), 1);
        let (_, hb) = s
            .call(
                POST,
                &format!("/v1/nodes/{}/heartbeat", node.id),
                Some(&node.credential),
                Some(json!({"capacity": node.capacity})),
            )
            .await;
        assert_eq!(hb["vms"][0]["engine"], "microvm", "the node is told: {hb}");
        let (_, n) = s
            .call(GET, &format!("/v1/nodes/{}", node.id), Some(&t), None)
            .await;
        assert_eq!(n["engines"], json!(["qemu", "microvm"]), "{n}");

        // Firecracker: the node says why it has none, and a VM asking for
        // it waits with that reason.
        let why = "Firecracker needs KVM, and this host has none that works";
        let beat = |unavailable: Value| {
            let s = &s;
            let node = &node;
            async move {
                s.call(
                    POST,
                    &format!("/v1/nodes/{}/heartbeat", node.id),
                    Some(&node.credential),
                    Some(json!({"capacity": node.capacity,
                        "unavailable_engines": unavailable})),
                )
                .await
            }
        };
        let (st, hb) = beat(json!([{"engine": "firecracker", "reason": why}])).await;
        assert_eq!(st, StatusCode::OK, "{hb}");
        let (_, n) = s
            .call(GET, &format!("/v1/nodes/{}", node.id), Some(&t), None)
            .await;
        assert_eq!(
            n["unavailable_engines"],
            json!([{"engine": "firecracker", "reason": why}]),
            "{n}"
        );
        // A reason that is not one line of text is refused, nothing kept.
        let (st, hb) = beat(json!([{"engine": "firecracker", "reason": "a\nb"}])).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{hb}");
        let (_, again) = s
            .call(GET, &format!("/v1/nodes/{}", node.id), Some(&t), None)
            .await;
        assert_eq!(again["unavailable_engines"], n["unavailable_engines"]);
        let (st, v) = s
            .call(
                POST,
                "/v1/vms",
                Some(&t),
                Some(vm("f", "kern", "firecracker")),
            )
            .await;
        assert_eq!(st, StatusCode::ACCEPTED, "{v}");
        assert_eq!(v["state"], "pending", "{v}");
        assert_eq!(
            v["state_reason"],
            format!(
                "no online node that runs x86_64 guests has the firecracker engine (n-1: {why})"
            ),
            "{v}"
        );
        // A plain VM still runs under qemu.
        let (st, v) = s
            .call(
                POST,
                "/v1/vms",
                Some(&t),
                Some(json!({"name": "q", "image": "kern", "flavor": "m1.tiny"})),
            )
            .await;
        assert_eq!(st, StatusCode::ACCEPTED, "{v}");
        assert_eq!(v["engine"], "qemu");
        assert_eq!(v["node_id"], node.id.as_str(), "{v}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_environment_is_updated_whole_or_not_at_all() {
    const PATCH: Method = Method::PATCH;
    for b in backends() {
        let s = TestServer::start(b).await;
        let t = s.admin.clone();
        debian_images(&s, &[11, 12]).await;
        let node = SimNode::join_running(&s, "n-1", 16, 16384, &[]).await;
        let mut req = env("upd", &["debian"], &["x86_64"], Some(2));
        req["ports"] = json!([80, 443]);
        req["egress"] = json!("deny");
        req["lifetime_secs"] = json!(600);
        let (st, e) = s.call(POST, "/v1/environments", Some(&t), Some(req)).await;
        assert_eq!(st, StatusCode::ACCEPTED, "{e}");
        assert_eq!(vms(&e).len(), 4);
        for v in vms(&e) {
            assert_eq!(
                (&v["guest_ports"], &v["egress"]),
                (&json!([80, 443]), &json!("deny"))
            );
        }
        let ids: Vec<String> = vms(&e)
            .iter()
            .map(|v| v["id"].as_str().unwrap().to_owned())
            .collect();
        // Three run, one failed.
        let (st, v) = node
            .report(
                &s,
                &[
                    (&ids[0], "running", 1, 1),
                    (&ids[1], "error", 1, 1),
                    (&ids[2], "running", 1, 1),
                    (&ids[3], "running", 1, 1),
                ],
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{v}");

        // Every bad field is a 400, and nothing changes.
        let before = env_named(&s, "upd").await;
        for (body, code) in [
            (json!({}), "empty_update"),
            (json!({"lifetime_secs": 5}), "invalid_lifetime"),
            (
                json!({"lifetime_secs": 600, "no_expiry": true}),
                "invalid_lifetime",
            ),
            (
                json!({"remove_vms": ["nope"], "lifetime_secs": 900}),
                "unknown_vm",
            ),
            (
                json!({"remove_os_prefixes": ["Bad"]}),
                "invalid_os_prefixes",
            ),
            (json!({"ports": [22]}), "invalid_ports"),
            (
                json!({"ports": [80, 80], "remove_unresponsive": true}),
                "invalid_ports",
            ),
        ] {
            let (st, v) = s
                .call(PATCH, "/v1/environments/upd", Some(&t), Some(body.clone()))
                .await;
            assert_eq!(st, StatusCode::BAD_REQUEST, "{body}: {v}");
            assert_eq!(v["error"]["code"], code, "{body}: {v}");
        }
        let (st, v) = s
            .call(
                PATCH,
                "/v1/environments/upd",
                Some(&t),
                Some(json!({"egress": "sometimes"})),
            )
            .await;
        assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
        assert_eq!(env_named(&s, "upd").await, before);

        // The lifetime: extended from now, then no end at all.
        let (st, u) = s
            .call(
                PATCH,
                "/v1/environments/upd",
                Some(&t),
                Some(json!({"lifetime_secs": 86400})),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{u}");
        let at: chrono::DateTime<chrono::Utc> = u["environment"]["expires_at"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let left = (at - chrono::Utc::now()).num_seconds();
        assert!((86000..=86400).contains(&left), "{left}");
        let (_, u) = s
            .call(
                PATCH,
                "/v1/environments/upd",
                Some(&t),
                Some(json!({"no_expiry": true})),
            )
            .await;
        assert_eq!(u["environment"]["expires_at"], Value::Null, "{u}");

        // Ports and egress for every VM; the running ones take them at
        // their next start, and say so.
        let (st, u) = s
            .call(
                PATCH,
                "/v1/environments/upd",
                Some(&t),
                Some(json!({"ports": [8080], "egress": "allow"})),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{u}");
        for v in vms(&u["environment"]) {
            assert_eq!(
                (&v["guest_ports"], &v["egress"]),
                (&json!([8080]), &json!("allow"))
            );
        }
        let later: Vec<&str> = u["apply_at_next_start"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["vm_id"].as_str().unwrap())
            .collect();
        // The three that run, not the failed one (it starts anew).
        assert_eq!(later, [&ids[0], &ids[2], &ids[3]], "{u}");
        // The same again changes nothing.
        let (_, u) = s
            .call(
                PATCH,
                "/v1/environments/upd",
                Some(&t),
                Some(json!({"ports": [8080], "egress": "allow"})),
            )
            .await;
        assert_eq!(u["apply_at_next_start"], json!([]), "{u}");

        // Dropping VMs: those that stopped answering (here the failed
        // one), then by image prefix, then one by name.
        let removed = |u: &Value| -> Vec<String> {
            u["removed"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["vm_id"].as_str().unwrap().to_owned())
                .collect()
        };
        let (st, u) = s
            .call(
                PATCH,
                "/v1/environments/upd",
                Some(&t),
                Some(json!({"remove_unresponsive": true})),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{u}");
        assert_eq!(removed(&u), [ids[1].clone()], "{u}");
        let (st, u) = s
            .call(
                PATCH,
                "/v1/environments/upd",
                Some(&t),
                Some(json!({"remove_os_prefixes": ["debian-12"]})),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{u}");
        assert_eq!(removed(&u), [ids[2].clone(), ids[3].clone()], "{u}");
        let name0 = vms(&e)[0]["name"].as_str().unwrap().to_owned();
        let (st, u) = s
            .call(
                PATCH,
                "/v1/environments/upd",
                Some(&t),
                Some(json!({"remove_vms": [name0]})),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{u}");
        assert_eq!(u["removed"][0]["vm_name"], name0.as_str());
        assert!(
            vms(&u["environment"])
                .iter()
                .all(|v| v["desired_state"] == "deleted"),
            "{u}"
        );
        // A removed VM cannot be named again.
        let (st, v) = s
            .call(
                PATCH,
                "/v1/environments/upd",
                Some(&t),
                Some(json!({"remove_vms": [ids[1]]})),
            )
            .await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");

        // Viewers may not; outsiders get 404.
        let viewer = s.user("vic").await;
        let outsider = s.user("otto").await;
        let (st, _) = s
            .call(
                PUT,
                "/v1/projects/default/members/vic",
                Some(&t),
                Some(json!({"role": "viewer"})),
            )
            .await;
        assert_eq!(st, StatusCode::OK);
        let no_expiry = json!({"no_expiry": true});
        let (st, _) = s
            .call(
                PATCH,
                "/v1/environments/upd",
                Some(&viewer),
                Some(no_expiry.clone()),
            )
            .await;
        assert_eq!(st, StatusCode::FORBIDDEN);
        let (st, _) = s
            .call(
                PATCH,
                "/v1/environments/upd",
                Some(&outsider),
                Some(no_expiry),
            )
            .await;
        assert_eq!(st, StatusCode::NOT_FOUND);
    }
}
