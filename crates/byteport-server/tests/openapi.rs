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
