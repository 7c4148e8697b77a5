//! The sidecar injection webhook, served over HTTPS by a real controller: AdmissionReviews for
//! a namespace that opted in, a pod that opted in or out, an already injected pod, a Job's pod,
//! a pod with init containers of its own, a malformed annotation, and a malformed request.

use std::sync::Arc;

use serde_json::{Value, json};
use weir_tests::*;

fn init_names(pod: &Value) -> Vec<String> {
    pod["spec"]["initContainers"]
        .as_array()
        .map(|c| c.iter().map(|c| c["name"].as_str().unwrap_or_default().to_string()).collect())
        .unwrap_or_default()
}

fn pod(annotations: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"generateName": "web-7d9f-", "namespace": "shop", "labels": {"app": "web"}, "annotations": annotations},
           "spec": {"serviceAccountName": "web", "containers": [{"name": "app", "image": "web:1"}]}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_reviews_get_the_sidecar_where_asked() {
    let scratch = Scratch::new();
    scratch.write("services.yaml", &service("shop", "web", &[]));
    let tls_dir = scratch.dir.path().join("webhook-tls");
    std::fs::create_dir(&tls_dir).unwrap();
    let issued = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(tls_dir.join("tls.crt"), issued.cert.pem()).unwrap();
    std::fs::write(tls_dir.join("tls.key"), issued.signing_key.serialize_pem()).unwrap();
    let flags: Vec<String> = [
        "--webhook-addr",
        "127.0.0.1:0",
        "--webhook-tls-dir",
        tls_dir.to_str().unwrap(),
        "--proxy-image",
        "registry.example/weir-proxy:test",
    ]
    .map(String::from)
    .into_iter()
    .chain(scratch.identity_flags(&[], &[]))
    .collect();
    let controller = scratch.controller_with(None, &flags).await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(issued.cert.der().clone()).unwrap();
    let hook =
        WebhookClient { addr: controller.addr("webhook"), roots: Arc::new(roots), server_name: "localhost".into() };

    // A namespace that opted in: injected, sidecar first, with the configured image.
    let (rsp, patched) = hook.admit("/inject/namespace", pod(json!({}))).await;
    assert_eq!(rsp["allowed"], true);
    assert_eq!(init_names(&patched), ["weir-init", "weir-proxy"]);
    assert_eq!(patched["spec"]["initContainers"][1]["image"], "registry.example/weir-proxy:test");
    assert_eq!(patched["spec"]["initContainers"][1]["restartPolicy"], "Always");
    assert_eq!(patched["metadata"]["annotations"]["weir.io/injected"], "true");
    // The sidecar gets the mesh's trust anchors out of band (it verifies the controller with
    // them) and the controller's identity.
    let env = patched["spec"]["initContainers"][1]["env"].as_array().unwrap().clone();
    let var = |name: &str| env.iter().find(|e| e["name"] == name).map(|e| e["value"].clone()).unwrap_or_default();
    let anchors = std::fs::read_to_string(scratch.anchors()).unwrap();
    assert_eq!(
        var("WEIR_TRUST_ANCHORS_PEM").as_str().map(|p| p.replace(char::is_whitespace, "")),
        Some(anchors.replace(char::is_whitespace, ""))
    );
    assert_eq!(var("WEIR_CONTROLLER_IDENTITY"), "weir-system/weir-controller");
    // Injecting the result again changes nothing.
    let (rsp, again) = hook.admit("/inject/namespace", patched.clone()).await;
    assert!(rsp["patch"].is_null());
    assert_eq!(again, patched);

    // The pod opts out in an opted-in namespace.
    let (rsp, _) = hook.admit("/inject/namespace", pod(json!({"weir.io/inject": "disabled"}))).await;
    assert_eq!((rsp["allowed"].clone(), rsp["patch"].is_null()), (json!(true), true));
    // Elsewhere only pods that opt in are touched.
    let (rsp, _) = hook.admit("/inject/pod", pod(json!({}))).await;
    assert!(rsp["patch"].is_null());
    let (_, patched) = hook.admit("/inject/pod", pod(json!({"weir.io/inject": "enabled"}))).await;
    assert_eq!(init_names(&patched), ["weir-init", "weir-proxy"]);

    // A Job's pod: the native sidecar does not keep it from completing.
    let mut job = pod(json!({}));
    job["metadata"]["ownerReferences"] =
        json!([{"apiVersion": "batch/v1", "kind": "Job", "name": "report", "uid": "j1"}]);
    job["spec"]["restartPolicy"] = json!("Never");
    let (_, patched) = hook.admit("/inject/namespace", job).await;
    assert_eq!(patched["spec"]["initContainers"][1]["restartPolicy"], "Always");
    assert_eq!(patched["spec"]["restartPolicy"], "Never");

    // Init containers of its own run after the sidecar, with their volumes kept.
    let mut own = pod(json!({}));
    own["spec"]["initContainers"] = json!([{"name": "migrate", "image": "web:1"}]);
    own["spec"]["volumes"] = json!([{"name": "data", "emptyDir": {}}]);
    let (_, patched) = hook.admit("/inject/namespace", own).await;
    assert_eq!(init_names(&patched), ["weir-init", "weir-proxy", "migrate"]);
    let vols: Vec<&str> =
        patched["spec"]["volumes"].as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(vols, ["data", "weir-token"]);

    // A malformed annotation refuses the pod, saying why.
    let (rsp, _) = hook.admit("/inject/namespace", pod(json!({"weir.io/skip-inbound-ports": "http"}))).await;
    assert_eq!(rsp["allowed"], false);
    assert_eq!(rsp["status"]["code"], 400);
    let message = rsp["status"]["message"].as_str().unwrap();
    assert!(message.contains("weir.io/skip-inbound-ports") && message.contains("\"http\" is not a port"), "{message}");

    // Not an AdmissionReview: 400; elsewhere: 404.
    let (status, body) = hook.post("/inject/namespace", "{\"kind\": \"Pod\"}".into()).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("no request"), "{body}");
    let (status, _) = hook.post("/mutate", "{}".into()).await;
    assert_eq!(status, 404);
}
