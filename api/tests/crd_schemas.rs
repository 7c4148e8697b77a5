//! The CRD schemas the API server enforces: every Weir resource in `examples/` passes its
//! CRD's `openAPIV3Schema`, and a set of malformed ones fails it (checked with a JSON-schema
//! validator, as the API server would before the controller ever sees them).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::{Value, json};

/// kind → the schema of its served version.
fn schemas() -> BTreeMap<String, jsonschema::Validator> {
    weir_api::crds()
        .into_iter()
        .map(|crd| {
            let version = crd.spec.versions.iter().find(|v| v.served).expect("a served version");
            let schema = serde_json::to_value(
                version.schema.as_ref().and_then(|s| s.open_api_v3_schema.as_ref()).expect("openAPIV3Schema"),
            )
            .unwrap();
            // OpenAPI 3.0 schemas are JSON Schema draft 4 with extensions (ignored here).
            let validator = jsonschema::options()
                .with_draft(jsonschema::Draft::Draft4)
                .build(&schema)
                .unwrap_or_else(|e| panic!("{}: not a valid schema: {e}", crd.spec.names.kind));
            (crd.spec.names.kind.clone(), validator)
        })
        .collect()
}

fn errors(validator: &jsonschema::Validator, obj: &Value) -> Vec<String> {
    validator.iter_errors(obj).map(|e| format!("{} at {}", e, e.instance_path())).collect()
}

#[test]
fn examples_pass_their_crd_schema() {
    let schemas = schemas();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut checked: BTreeMap<String, usize> = BTreeMap::new();
    for dir in std::fs::read_dir(&root).unwrap() {
        let dir = dir.unwrap().path();
        if !dir.is_dir() {
            continue;
        }
        for file in std::fs::read_dir(&dir).unwrap() {
            let file = file.unwrap().path();
            if file.extension().is_none_or(|e| e != "yaml") {
                continue;
            }
            let text = std::fs::read_to_string(&file).unwrap();
            for doc in serde_yaml::Deserializer::from_str(&text) {
                let obj = Value::deserialize(doc).unwrap();
                if obj["apiVersion"] != weir_api::API_VERSION {
                    continue;
                }
                let kind = obj["kind"].as_str().unwrap().to_string();
                let validator = schemas.get(&kind).unwrap_or_else(|| panic!("{}: no CRD for {kind}", file.display()));
                let errs = errors(validator, &obj);
                assert!(errs.is_empty(), "{}: {kind} fails its schema: {errs:?}", file.display());
                *checked.entry(kind).or_default() += 1;
            }
        }
    }
    // Every kind has at least one example.
    assert_eq!(checked.keys().cloned().collect::<Vec<_>>(), schemas.keys().cloned().collect::<Vec<_>>(), "{checked:?}");
}

fn object(kind: &str, spec: Value) -> Value {
    json!({"apiVersion": weir_api::API_VERSION, "kind": kind, "metadata": {"name": "x", "namespace": "shop"}, "spec": spec})
}

#[test]
fn malformed_resources_fail_their_crd_schema() {
    let schemas = schemas();
    let route = |rules: Value| object("Route", json!({"service": "web", "rules": rules}));
    let policy = |extra: Value| {
        let mut spec = json!({"targetRef": {"service": "web"}});
        spec.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        object("ResiliencePolicy", spec)
    };
    let cases: Vec<(&str, Value, &str)> = vec![
        ("Route without a service", object("Route", json!({"rules": []})), "service"),
        ("negative weight", route(json!([{"backendRefs": [{"name": "a", "weight": -1}]}])), "weight"),
        ("rule without backends", route(json!([{"backendRefs": []}])), "backendRefs"),
        ("backend port out of range", route(json!([{"backendRefs": [{"name": "a", "port": 70000}]}])), "port"),
        (
            "unknown path match type",
            route(json!([{"matches": [{"path": {"type": "Glob", "value": "/"}}], "backendRefs": [{"name": "a"}]}])),
            "Glob",
        ),
        (
            "timeout not a duration",
            route(json!([{"backendRefs": [{"name": "a"}], "timeouts": {"request": "2 seconds"}}])),
            "2 seconds",
        ),
        ("policy without a target", object("ResiliencePolicy", json!({})), "targetRef"),
        ("per-try not a duration", policy(json!({"timeouts": {"perTry": "fast"}})), "fast"),
        ("abort status out of range", policy(json!({"faults": {"abort": {"httpStatus": 700, "percent": 1}}})), "700"),
        ("authorization mode unknown", object("MeshAuthorization", json!({"mode": "loose"})), "loose"),
        ("authorization port out of range", object("MeshAuthorization", json!({"targetRef": {"port": 0}})), "0"),
        ("canary without backends", object("Canary", json!({"service": "web"})), "stable"),
        (
            "canary step weight above 100",
            object("Canary", json!({"service": "web", "stable": "a", "canary": "b", "stepWeight": 150})),
            "150",
        ),
    ];
    for (what, obj, mention) in cases {
        let kind = obj["kind"].as_str().unwrap();
        let errs = errors(&schemas[kind], &obj);
        assert!(!errs.is_empty(), "{what}: accepted by the {kind} schema");
        assert!(errs.iter().any(|e| e.contains(mention)), "{what}: errors do not mention {mention:?}: {errs:?}");
    }
}

#[test]
fn cross_field_rules_are_cel_validations() {
    // Rules spanning fields cannot be JSON schema; they ship as CEL for the API server.
    let yaml: BTreeMap<String, String> = weir_api::crds_yaml().unwrap().into_iter().collect();
    assert!(yaml["routes.weir.io.yaml"].contains("rule: size(self.backendRefs) <= 1 || self.backendRefs.exists("));
    assert!(yaml["resiliencepolicies.weir.io.yaml"].contains("duration(self.perTry) <= duration(self.request)"));
}
