//! The CRD schemas the API server enforces: every Weir resource in `examples/` passes its
//! CRD's `openAPIV3Schema`, and a set of malformed ones fails it, as the API server would
//! before the controller ever sees them: the structural schema with a JSON-schema validator,
//! and the cross-field rules (`x-kubernetes-validations`) with a CEL interpreter, each rule
//! evaluated with `self` bound to the value at its node, as the API server binds it.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::{Value, json};

/// A CRD's served schema: the structural part, and the raw schema for its CEL rules.
struct Schema {
    validator: jsonschema::Validator,
    raw: Value,
}

/// kind → the schema of its served version.
fn schemas() -> BTreeMap<String, Schema> {
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
            (crd.spec.names.kind.clone(), Schema { validator, raw: schema })
        })
        .collect()
}

/// Everything the API server would refuse `obj` for: schema errors, then failed CEL rules.
fn errors(schema: &Schema, obj: &Value) -> Vec<String> {
    let mut errs: Vec<String> =
        schema.validator.iter_errors(obj).map(|e| format!("{} at {}", e, e.instance_path())).collect();
    cel_errors(&schema.raw, obj, "", &mut errs);
    errs
}

/// Evaluates every `x-kubernetes-validations` rule of `schema` against the value it applies to
/// (descending through `properties`, `items` and `additionalProperties` where `value` has
/// them); a rule that is false, or fails to evaluate, is an error with its message.
fn cel_errors(schema: &Value, value: &Value, at: &str, errs: &mut Vec<String>) {
    for rule in schema["x-kubernetes-validations"].as_array().into_iter().flatten() {
        let text = rule["rule"].as_str().expect("a rule has a rule");
        let program = cel::Program::compile(text).unwrap_or_else(|e| panic!("CEL rule {text:?} does not compile: {e}"));
        let mut context = cel::Context::default();
        context.add_variable("self", cel::to_value(value).expect("JSON converts to CEL")).expect("self binds");
        match program.execute(&context) {
            Ok(cel::Value::Bool(true)) => {}
            Ok(other) => errs.push(format!("{} at {at} (rule {text:?} gave {other:?})", rule["message"])),
            Err(e) => errs.push(format!("{} at {at} (rule {text:?} failed: {e})", rule["message"])),
        }
    }
    if let (Some(props), Some(fields)) = (schema["properties"].as_object(), value.as_object()) {
        for (name, sub) in props {
            if let Some(v) = fields.get(name) {
                cel_errors(sub, v, &format!("{at}/{name}"), errs);
            }
        }
    }
    if let (Some(items), Some(list)) = (schema.get("items"), value.as_array()) {
        for (i, v) in list.iter().enumerate() {
            cel_errors(items, v, &format!("{at}/{i}"), errs);
        }
    }
    if let (Some(extra), Some(fields)) =
        (schema.get("additionalProperties").filter(|a| a.is_object()), value.as_object())
    {
        let known = schema["properties"].as_object();
        for (name, v) in fields.iter().filter(|(n, _)| known.is_none_or(|k| !k.contains_key(*n))) {
            cel_errors(extra, v, &format!("{at}/{name}"), errs);
        }
    }
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
                let schema = schemas.get(&kind).unwrap_or_else(|| panic!("{}: no CRD for {kind}", file.display()));
                let errs = errors(schema, &obj);
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
            "every weight of a split is 0 (CEL)",
            route(json!([{"backendRefs": [{"name": "a", "weight": 0}, {"name": "b", "weight": 0}]}])),
            "all weights are 0",
        ),
        (
            "per-try timeout above the request timeout (CEL)",
            policy(json!({"timeouts": {"request": "1s", "perTry": "1500ms"}})),
            "perTry must not exceed request",
        ),
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

/// The CEL rules admit what they must: a split with one zero weight, a per-try timeout equal
/// to the request timeout, either timeout alone (the refusals are in the test above).
#[test]
fn cel_rules_admit_valid_neighbours() {
    let schemas = schemas();
    let ok: Vec<(&str, Value)> = vec![
        (
            "one weight 0 of two",
            object(
                "Route",
                json!({"service": "web", "rules": [{"backendRefs": [{"name": "a", "weight": 0}, {"name": "b"}]}]}),
            ),
        ),
        (
            "a single backend at weight 0",
            object("Route", json!({"service": "web", "rules": [{"backendRefs": [{"name": "a", "weight": 0}]}]})),
        ),
        (
            "per-try equal to request",
            object(
                "ResiliencePolicy",
                json!({"targetRef": {"service": "web"}, "timeouts": {"request": "1s", "perTry": "1000ms"}}),
            ),
        ),
        (
            "per-try alone",
            object("ResiliencePolicy", json!({"targetRef": {"service": "web"}, "timeouts": {"perTry": "5s"}})),
        ),
    ];
    for (what, obj) in ok {
        let errs = errors(&schemas[obj["kind"].as_str().unwrap()], &obj);
        assert!(errs.is_empty(), "{what}: refused: {errs:?}");
    }
    // Every rule the CRDs carry was reached by one of these tests' objects: a rule added
    // later without a test case shows up here.
    let mut rules = Vec::new();
    for schema in schemas.values() {
        collect_rules(&schema.raw, &mut rules);
    }
    assert_eq!(rules.len(), 2, "a new CEL rule needs a refusal and an admission case here: {rules:?}");
}

fn collect_rules(schema: &Value, out: &mut Vec<String>) {
    match schema {
        Value::Object(map) => {
            for rule in map.get("x-kubernetes-validations").and_then(Value::as_array).into_iter().flatten() {
                out.push(rule["rule"].as_str().unwrap_or_default().to_string());
            }
            map.values().for_each(|v| collect_rules(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| collect_rules(v, out)),
        _ => {}
    }
}
