//! The committed API document must match the code.

#[test]
fn committed_openapi_document_matches_the_code() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../openapi/byteport.json");
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    let generated = byteport_server::openapi_json();
    assert!(
        committed == generated,
        "openapi/byteport.json is out of date with the code; run `cargo xtask openapi` and commit the result"
    );
    let doc: serde_json::Value = serde_json::from_str(&generated).expect("valid JSON");
    assert!(
        doc["openapi"].as_str().unwrap_or("").starts_with("3.1"),
        "OpenAPI 3.1"
    );
    assert!(doc["paths"]["/v1/vms"]["post"]["operationId"] == "vm_create");
}

/// What the document says and what the server does agree at the edges a
/// contract-testing tool tries first.
#[tokio::test]
async fn the_document_states_the_limits_the_server_enforces() {
    use axum::body::Body;
    use axum::http::{Method, Request, StatusCode};
    use byteport_testkit::{TestServer, backends};
    use serde_json::json;
    let doc: serde_json::Value = serde_json::from_str(&byteport_server::openapi_json()).unwrap();
    let schema =
        |name: &str, prop: &str| doc["components"]["schemas"][name]["properties"][prop].clone();
    let query = |path: &str, name: &str| {
        doc["paths"][path]["get"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap()["schema"]
            .clone()
    };
    // Every operation with a JSON body documents 415 and 422; every one
    // documents 401; a list with a query documents 400.
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let r = &op["responses"];
            assert!(r.get("401").is_some(), "{method} {path}");
            if op["requestBody"]["content"]
                .get("application/json")
                .is_some()
            {
                assert!(
                    r.get("415").is_some() && r.get("422").is_some(),
                    "{method} {path}"
                );
            }
        }
    }
    assert!(
        doc["paths"]["/v1/audit"]["get"]["responses"]
            .get("400")
            .is_some()
    );
    assert_eq!(query("/v1/vms", "limit")["minimum"], 1);
    assert_eq!(query("/v1/vms", "limit")["maximum"], 500);
    assert_eq!(schema("UserCreate", "password")["minLength"], 8);
    assert_eq!(schema("ExecRequest", "argv")["minItems"], 1);
    assert_eq!(schema("ExecRequest", "timeout_secs")["maximum"], 3600);
    assert_eq!(schema("RunCreate", "timeout_secs")["maximum"], 600);
    let max_vms = schema("Quota", "max_vms")["maximum"].as_u64().unwrap();

    for b in backends() {
        let s = TestServer::start(b).await;
        // Just past each limit: refused, as the document says.
        let (st, _) = s
            .call(Method::GET, "/v1/vms?limit=0", Some(&s.admin), None)
            .await;
        assert_eq!(st, StatusCode::BAD_REQUEST);
        let (st, _) = s
            .call(Method::GET, "/v1/vms?limit=500", Some(&s.admin), None)
            .await;
        assert_eq!(st, StatusCode::OK);
        let (st, v) = s
            .call(
                Method::POST,
                "/v1/users",
                Some(&s.admin),
                Some(json!({"name": "short", "password": "1234567"})),
            )
            .await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
        let (st, v) = s
            .call(
                Method::POST,
                "/v1/users",
                Some(&s.admin),
                Some(json!({"name": "eight", "password": "12345678"})),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        let over =
            json!({"max_vms": max_vms + 1, "max_vcpus": 1, "max_memory_mib": 1, "max_disk_gib": 1});
        let (st, v) = s
            .call(
                Method::PUT,
                "/v1/projects/default/quota",
                Some(&s.admin),
                Some(over),
            )
            .await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
        let at =
            json!({"max_vms": max_vms, "max_vcpus": 1, "max_memory_mib": 1, "max_disk_gib": 1});
        let (st, v) = s
            .call(
                Method::PUT,
                "/v1/projects/default/quota",
                Some(&s.admin),
                Some(at),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{v}");
        // A JSON body without its content type: the documented 415.
        let req = Request::builder()
            .method(Method::POST)
            .uri("/v1/projects")
            .header("authorization", format!("Bearer {}", s.admin))
            .body(Body::from(r#"{"name":"p"}"#))
            .unwrap();
        let (st, _, v) = s.raw(req).await;
        assert_eq!(st, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{v}");
    }
}
