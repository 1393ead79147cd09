//! The OpenAPI document as a contract: after the handlers' annotations have
//! built it, this pass adds what every operation can answer because of the
//! layers around it (authentication, the JSON extractor, idempotency, rate
//! limits), and writes the limits the server enforces into the schemas, from
//! the same constants the checks use. A request the document allows is then
//! one the server takes, and one it forbids is refused.

use super::middleware::{ANONYMOUS, IDEMPOTENT};
use crate::app::{auth, catalog, environments, guest, nodes, projects, runs, vms};
use serde_json::{Value, json};

pub(crate) struct Contract;

impl utoipa::Modify for Contract {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        let Ok(mut doc) = serde_json::to_value(&*api) else {
            return;
        };
        statuses(&mut doc);
        limits(&mut doc);
        if let Ok(done) = serde_json::from_value(doc) {
            *api = done;
        }
    }
}

fn error(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    })
}

/// The statuses the layers around a handler add to what it says itself.
fn statuses(doc: &mut Value) {
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        for (method, op) in item.iter_mut() {
            let params = op["parameters"].as_array().cloned().unwrap_or_default();
            let in_path = params.iter().any(|p| p["in"] == "path");
            let in_query = params
                .iter()
                .any(|p| p["in"] == "query" || p["in"] == "header");
            let content = op["requestBody"]["content"].clone();
            let json_body = content.get("application/json").is_some();
            let raw_body = content.get("application/octet-stream").is_some();
            let mutating = matches!(method.as_str(), "post" | "put" | "patch" | "delete");
            let idempotent = method == "post" && IDEMPOTENT.contains(&path.as_str());
            let mut add: Vec<(&str, &str)> = vec![
                (
                    "401",
                    "No credentials, or bad ones (even where anonymous callers are let in)",
                ),
                (
                    "403",
                    "Not allowed for this caller, or a cross-origin use of the session cookie",
                ),
                ("429", "Too many requests of this kind: see Retry-After"),
            ];
            if ANONYMOUS.contains(&path.as_str()) {
                add.retain(|(s, _)| *s != "403");
            }
            if in_path || in_query || json_body || raw_body {
                // What a path names, or a body or query refers to (a
                // project, an owner, an image), may not exist.
                add.push(("404", "No such resource, or not one the caller may see"));
            }
            if json_body || raw_body || in_query || in_path {
                add.push(("400", "The input breaks a rule; the error says which"));
            }
            if json_body {
                add.push(("413", "The body is larger than the limit"));
                add.push(("415", "The body is not sent as application/json"));
                add.push((
                    "422",
                    "A well-formed body of the wrong shape: unknown or missing fields, wrong types",
                ));
            }
            if raw_body {
                add.push(("413", "The file is larger than the image says"));
            }
            if mutating {
                add.push((
                    "409",
                    "The change conflicts with the resource's state or another change",
                ));
            }
            if idempotent {
                add.push(("422", "The Idempotency-Key was used with another body"));
            }
            let responses = op["responses"].as_object_mut();
            if let Some(r) = responses {
                for (status, text) in add {
                    r.entry(status).or_insert_with(|| error(text));
                }
            }
            if idempotent {
                idempotency_header(op);
            }
        }
    }
}

/// The `Idempotency-Key` header, with its form.
fn idempotency_header(op: &mut Value) {
    let header = json!({
        "name": "Idempotency-Key",
        "in": "header",
        "required": false,
        "description": "Makes a retry safe: the first answer is kept 24 h and replayed for the same key and body.",
        "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[\\x21-\\x7e]+$"}
    });
    let params = op
        .as_object_mut()
        .map(|o| o.entry("parameters").or_insert_with(|| json!([])));
    if let Some(Value::Array(ps)) = params {
        ps.retain(|p| p["name"] != "Idempotency-Key");
        ps.push(header);
    }
}

/// Writes `rules` into property `prop` of component schema `schema`.
fn rule(doc: &mut Value, schema: &str, prop: &str, rules: Value) {
    let target = &mut doc["components"]["schemas"][schema]["properties"][prop];
    if let (Some(t), Some(r)) = (target.as_object_mut(), rules.as_object()) {
        for (k, v) in r {
            t.insert(k.clone(), v.clone());
        }
    }
}

/// Writes `rules` into the item schema of array property `prop`.
fn items_rule(doc: &mut Value, schema: &str, prop: &str, rules: Value) {
    let target = &mut doc["components"]["schemas"][schema]["properties"][prop]["items"];
    if let (Some(t), Some(r)) = (target.as_object_mut(), rules.as_object()) {
        for (k, v) in r {
            t.insert(k.clone(), v.clone());
        }
    }
}

/// Writes `rules` into the schema of query parameter `name` of `path`.
fn query_rule(doc: &mut Value, path: &str, method: &str, name: &str, rules: Value) {
    let Some(ps) = doc["paths"][path][method]["parameters"].as_array_mut() else {
        return;
    };
    for p in ps.iter_mut().filter(|p| p["name"] == name) {
        if let (Some(t), Some(r)) = (p["schema"].as_object_mut(), rules.as_object()) {
            for (k, v) in r {
                t.insert(k.clone(), v.clone());
            }
        }
    }
}

/// The limits the server checks, from the constants it checks them with.
fn limits(doc: &mut Value) {
    let size = |vcpus: u32, min_mem: u64, max_mem: u64, disk: Option<u64>| {
        let mut v = vec![
            ("vcpus", json!({"minimum": 1, "maximum": vcpus})),
            (
                "memory_mib",
                json!({"minimum": min_mem, "maximum": max_mem}),
            ),
        ];
        if let Some(d) = disk {
            v.push(("disk_gib", json!({"minimum": 1, "maximum": d})));
        }
        v
    };
    let vm_size = size(
        catalog::MAX_VCPUS,
        catalog::MIN_MEMORY_MIB,
        catalog::MAX_MEMORY_MIB,
        Some(catalog::MAX_DISK_GIB),
    );
    for schema in ["VmCreate", "FlavorCreate", "EnvironmentCreate"] {
        for (prop, r) in &vm_size {
            rule(doc, schema, prop, r.clone());
        }
    }
    let run_size = size(
        runs::MAX_RUN_VCPUS,
        runs::MIN_RUN_MEMORY_MIB,
        runs::MAX_RUN_MEMORY_MIB,
        None,
    );
    for (prop, r) in run_size {
        rule(doc, "RunCreate", prop, r);
    }
    rule(
        doc,
        "RunCreate",
        "timeout_secs",
        json!({"minimum": 1, "maximum": runs::MAX_TIMEOUT_SECS}),
    );
    rule(
        doc,
        "RunCreate",
        "args",
        json!({"maxItems": runs::MAX_ARGS}),
    );
    rule(
        doc,
        "RunCreate",
        "files",
        json!({"maxItems": runs::MAX_FILES}),
    );
    rule(
        doc,
        "RunCreate",
        "code",
        json!({"minLength": 1, "maxLength": runs::MAX_CODE}),
    );
    rule(
        doc,
        "ExecRequest",
        "argv",
        json!({"minItems": 1, "maxItems": guest::MAX_ARGV}),
    );
    rule(
        doc,
        "ExecRequest",
        "timeout_secs",
        json!({"minimum": 1, "maximum": guest::MAX_EXEC_SECS}),
    );
    // Ports are 16 bits.
    let port = json!({"minimum": 0, "maximum": u16::MAX});
    rule(doc, "PortForward", "guest_port", port.clone());
    rule(doc, "PortForward", "host_port", port.clone());
    items_rule(doc, "VmCreate", "ports", port);
    // Images: the words and the formats the catalogue takes.
    let word =
        json!({"minLength": 1, "maxLength": catalog::MAX_WORD, "pattern": "^[A-Za-z0-9._-]+$"});
    for prop in ["os_family", "os_version", "arch"] {
        rule(doc, "ImageCreate", prop, word.clone());
    }
    rule(
        doc,
        "ImageCreate",
        "format",
        json!({"enum": catalog::FORMATS}),
    );
    let languages: Vec<&str> = byteport_types::runtime::RUNTIMES
        .iter()
        .map(|r| r.language)
        .collect();
    rule(doc, "RunCreate", "language", json!({"enum": languages}));
    rule(
        doc,
        "EnvironmentCreate",
        "os_prefixes",
        json!({"minItems": 1, "maxItems": environments::MAX_PREFIXES}),
    );
    // Passwords, in characters.
    let password = json!({
        "minLength": auth::MIN_PASSWORD,
        "maxLength": auth::MAX_PASSWORD,
    });
    for schema in ["UserCreate", "BootstrapRequest"] {
        rule(doc, schema, "password", password.clone());
    }
    rule(
        doc,
        "TokenCreate",
        "expires_in_days",
        json!({"minimum": 1, "maximum": auth::MAX_TOKEN_DAYS}),
    );
    rule(
        doc,
        "JoinTokenCreate",
        "expires_in_minutes",
        json!({"minimum": 1, "maximum": nodes::MAX_JOIN_TOKEN_MINUTES}),
    );
    rule(
        doc,
        "EnvironmentCreate",
        "lifetime_secs",
        json!({"minimum": environments::MIN_LIFETIME, "maximum": environments::MAX_LIFETIME}),
    );
    let q = projects::MAX_QUOTA;
    for (prop, max) in [
        ("max_vms", u64::from(q.max_vms)),
        ("max_vcpus", u64::from(q.max_vcpus)),
        ("max_memory_mib", q.max_memory_mib),
        ("max_disk_gib", q.max_disk_gib),
        ("max_concurrent_runs", u64::from(q.max_concurrent_runs)),
    ] {
        rule(doc, "Quota", prop, json!({"maximum": max}));
    }
    for (path, max) in [
        ("/v1/vms", u64::from(vms::MAX_PAGE)),
        ("/v1/audit", 500),
        ("/v1/runs", 500),
    ] {
        query_rule(
            doc,
            path,
            "get",
            "limit",
            json!({"minimum": 1, "maximum": max}),
        );
    }
    query_rule(
        doc,
        "/v1/vms/{id}/console",
        "get",
        "bytes",
        json!({"minimum": 1, "maximum": guest::MAX_CONSOLE_TAIL}),
    );
    query_rule(
        doc,
        "/v1/vms/{id}/wait",
        "get",
        "timeout_secs",
        json!({"maximum": vms::MAX_WAIT}),
    );
}
