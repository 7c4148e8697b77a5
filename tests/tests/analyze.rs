//! `weir analyze`: a directory with one of each mistake gets every one named (file, resource,
//! field) and exit 1; the examples pass with exit 0; Kubernetes manifests of other kinds are
//! skipped and their core Services count as Services.

use weir_tests::*;

const WEIR: &str = "apiVersion: weir.io/v1alpha1";

fn service(name: &str, ports: &str) -> String {
    format!("kind: Service\nmetadata: {{ name: {name}, namespace: shop }}\nspec:\n  ports: [{ports}]\n")
}

fn route(name: &str, service: &str, rules: &str) -> String {
    format!(
        "{WEIR}\nkind: Route\nmetadata: {{ name: {name}, namespace: shop }}\nspec:\n  service: {service}\n  rules:\n{rules}"
    )
}

fn policy(name: &str, target: &str) -> String {
    format!(
        "{WEIR}\nkind: ResiliencePolicy\nmetadata: {{ name: {name}, namespace: shop }}\nspec:\n  targetRef: {target}\n  timeouts: {{ request: 1s }}\n"
    )
}

fn canary(name: &str) -> String {
    format!(
        "{WEIR}\nkind: Canary\nmetadata: {{ name: {name}, namespace: shop }}\nspec:\n  service: web\n  stable: web-v1\n  canary: web-v2\n"
    )
}

#[tokio::test]
async fn every_mistake_is_named_and_fails_the_run() {
    let scratch = Scratch::new();
    let files: &[(&str, String)] = &[
        (
            "00-services.yaml",
            [service("web", "{ port: 80 }"), service("web-v1", "{ port: 80 }"), service("web-v2", "{ port: 80 }")]
                .join("---\n"),
        ),
        // Not YAML at all.
        ("broken.yaml", "kind: Route\nmetadata: [unclosed\n".into()),
        // A field the schema does not have.
        ("field.yaml", route("typo", "web", "  - backendRefs: [{ name: web-v1, wieght: 10 }]\n")),
        // References to what does not exist.
        ("missing.yaml", route("nowhere", "shop-cart", "  - backendRefs: [{ name: web-v1 }]\n")),
        ("policy-missing.yaml", policy("ghost", "{ service: ghost }")),
        ("policy-rule.yaml", policy("by-rule", "{ service: web, rule: checkout }")),
        // The same resource twice.
        ("zz-duplicate.yaml", service("web-v2", "{ port: 80 }")),
        // Accepted, but not doing what it looks like: a rule behind a catch-all, a policy for a
        // port the Service does not have, a canary beside a Route, a second canary.
        (
            "shadow.yaml",
            route(
                "web",
                "web",
                "  - backendRefs: [{ name: web-v1 }]\n  - matches: [{ path: { value: /api } }]\n    backendRefs: [{ name: web-v2 }]\n",
            ),
        ),
        ("policy-port.yaml", policy("port", "{ service: web, port: 8080 }")),
        ("canary.yaml", [canary("web"), canary("web-again")].join("---\n")),
    ];
    for (name, text) in files {
        scratch.write(name, text);
    }
    let dir = scratch.config_dir().display().to_string();
    let (code, out, err) = run_weir(&["analyze", &dir]).await;
    assert_eq!(code, Some(1), "errors must fail the run\n{out}{err}");
    let at = |file: &str| format!("{dir}/{file}");
    let expected = [
        format!("{}: error: invalid YAML", at("broken.yaml")),
        format!("{}: Route shop/typo: spec.rules[0].backendRefs[0].wieght: error: unknown field", at("field.yaml")),
        format!("{}: Route shop/nowhere: spec.service: error: Service shop/shop-cart not found", at("missing.yaml")),
        format!(
            "{}: ResiliencePolicy shop/ghost: spec.targetRef.service: error: Service shop/ghost not found",
            at("policy-missing.yaml")
        ),
        format!(
            "{}: ResiliencePolicy shop/by-rule: spec.targetRef.rule: error: no Route rule named \"checkout\" for Service shop/web",
            at("policy-rule.yaml")
        ),
        format!(
            "{}: Service shop/web-v2: metadata.name: error: duplicate: Service shop/web-v2 is already defined in",
            at("zz-duplicate.yaml")
        ),
        format!(
            "{}: Route shop/web: spec.rules[1]: warning: never matches: spec.rules[0] comes first",
            at("shadow.yaml")
        ),
        format!(
            "{}: ResiliencePolicy shop/port: spec.targetRef.port: warning: Service shop/web has no port 8080 (its ports: 80)",
            at("policy-port.yaml")
        ),
        format!(
            "{}: Canary shop/web: spec.service: warning: Route shop/web also steers Service shop/web",
            at("canary.yaml")
        ),
        format!(
            "{}: Canary shop/web-again: spec.service: error: Canary shop/web already rolls out Service web",
            at("canary.yaml")
        ),
    ];
    for line in &expected {
        assert!(out.lines().any(|l| l.starts_with(line.as_str())), "missing {line:?} in\n{out}");
    }
    assert_eq!(out.lines().filter(|l| l.contains(": error: ")).count(), 7, "{out}");
    assert_eq!(out.lines().filter(|l| l.contains(": warning: ")).count(), 3, "{out}");
    assert!(out.trim_end().ends_with("resources: 7 errors, 3 warnings"), "{out}");

    // The same as JSON, for tools.
    let (code, json, _) = run_weir(&["analyze", &dir, "-o", "json"]).await;
    assert_eq!(code, Some(1));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!((v["errors"].as_u64(), v["warnings"].as_u64()), (Some(7), Some(3)), "{v:#}");
    let shadow =
        v["findings"].as_array().unwrap().iter().find(|f| f["field"] == "spec.rules[1]").expect("the shadowed rule");
    assert_eq!(shadow["severity"], "warning");
    assert_eq!(shadow["resource"]["kind"], "Route");
}

#[tokio::test]
async fn the_examples_pass_and_warnings_fail_only_when_strict() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    for example in ["demo", "routing", "resilience"] {
        let dir = root.join(example).display().to_string();
        let (code, out, err) = run_weir(&["analyze", &dir]).await;
        assert_eq!(code, Some(0), "{example}:\n{out}{err}");
        assert!(out.contains("resources: 0 errors, 0 warnings"), "{example}:\n{out}");
    }
    // A warning alone passes, unless --strict.
    let scratch = Scratch::new();
    scratch.write("services.yaml", &service("web", "{ port: 80 }"));
    scratch.write("policy.yaml", &policy("port", "{ service: web, port: 8080 }"));
    let dir = scratch.config_dir().display().to_string();
    assert_eq!(run_weir(&["analyze", &dir]).await.0, Some(0));
    assert_eq!(run_weir(&["analyze", "--strict", &dir]).await.0, Some(1));
}

/// Kubernetes manifests as they are kept in a repository: Deployments and ConfigMaps are not
/// Weir's and are skipped; a core Service is a Service routes may refer to.
#[tokio::test]
async fn kubernetes_manifests_are_read_for_what_weir_reads() {
    let scratch = Scratch::new();
    scratch.write(
        "app.yaml",
        &[
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: { name: api, namespace: shop }\nspec:\n  selector: { matchLabels: { app: api } }\n  template:\n    metadata: { labels: { app: api } }\n    spec: { containers: [{ name: api, image: api:1 }] }\n".to_string(),
            "apiVersion: v1\nkind: Service\nmetadata: { name: api, namespace: shop }\nspec:\n  selector: { app: api }\n  ports: [{ port: 80, targetPort: 8080 }]\n".to_string(),
            route("api", "api", "  - backendRefs: [{ name: api }]\n"),
            policy("api", "{ service: api, port: 80 }"),
        ]
        .join("---\n"),
    );
    let file = scratch.config_dir().join("app.yaml").display().to_string();
    let (code, out, err) = run_weir(&["analyze", &file]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("3 resources: 0 errors, 0 warnings"), "{out}");
}
