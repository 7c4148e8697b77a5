//! The Helm chart (`charts/weir`), with a real `helm`: linted strictly and rendered for several
//! value sets, the manifests validated against Kubernetes' own schemas (1.29, the chart's
//! minimum, and 1.37); broken values refused by `values.schema.json` with the field named; the
//! controller started with the flags and certificates the chart gives it, issuing workload
//! identities that sidecars use for mTLS and serving the webhook under its Service's name with
//! the CA bundle the webhook configuration carries; the Dockerfiles building what the chart
//! and injected pods run.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use base64::Engine;
use clap::Parser;
use rustls::pki_types::pem::PemObject;
use serde_json::{Value, json};
use weir_tests::chart::{self, NAMESPACE, find, render};
use weir_tests::*;

fn b64(s: &str) -> String {
    String::from_utf8(base64::engine::general_purpose::STANDARD.decode(s).unwrap()).unwrap()
}

fn container(docs: &[Value]) -> &Value {
    &find(docs, "Deployment", "weir-controller")["spec"]["template"]["spec"]["containers"][0]
}

fn args(docs: &[Value]) -> Vec<String> {
    container(docs)["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect()
}

/// The value of `--flag=value` among the controller's arguments.
fn flag(docs: &[Value], name: &str) -> Option<String> {
    args(docs).iter().find_map(|a| a.strip_prefix(&format!("--{name}=")).map(str::to_string))
}

fn container_port(docs: &[Value], name: &str) -> u64 {
    container(docs)["ports"].as_array().unwrap().iter().find(|p| p["name"] == name).unwrap()["containerPort"]
        .as_u64()
        .unwrap()
}

/// A trust anchor and an issuer signed by it, as a user would supply them.
fn supplied_ca() -> (String, String, String) {
    let root_key = rcgen::KeyPair::generate().unwrap();
    let mut root_params = rcgen::CertificateParams::new(Vec::new()).unwrap();
    root_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let root = root_params.self_signed(&root_key).unwrap();
    let root_issuer = rcgen::Issuer::new(root_params, root_key);
    let issuer_key = rcgen::KeyPair::generate().unwrap();
    let mut issuer_params = rcgen::CertificateParams::new(Vec::new()).unwrap();
    issuer_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    let issuer = issuer_params.signed_by(&issuer_key, &root_issuer).unwrap();
    (root.pem(), issuer.pem(), issuer_key.serialize_pem())
}

fn indent(pem: &str) -> String {
    pem.lines().map(|l| format!("      {l}\n")).collect()
}

/// Every optional part on, and the CA supplied.
fn everything_on(ca: &(String, String, String)) -> String {
    format!(
        "controller:\n  replicas: 3\n  namespaces: [shop, payments]\n  podLabels: {{team: mesh}}\n  \
         nodeSelector: {{kubernetes.io/os: linux}}\n  tolerations: [{{key: dedicated, operator: Exists}}]\n  \
         priorityClassName: system-cluster-critical\n  imagePullSecrets: [{{name: regcred}}]\n\
         proxy:\n  imagePullSecrets: [regcred]\n  tracing:\n    collector: http://otel-collector.observability:4317\n    \
         protocol: http\n    sampling: 0.1\n    attributes: {{deployment.environment: prod}}\n\
         identity:\n  trustDomain: mesh.example\n  trustAnchorPEM: |\n{}  issuer:\n    crtPEM: |\n{}    keyPEM: |\n{}\
         webhook:\n  failurePolicy: Ignore\n  excludeNamespaces: [monitoring]\n\
         metrics:\n  podMonitor:\n    enabled: true\n    labels: {{release: prometheus}}\n\
         grafana:\n  dashboards:\n    enabled: true\n",
        indent(&ca.0).replace("      ", "    "),
        indent(&ca.1),
        indent(&ca.2),
    )
}

/// `helm lint --strict`, then the rendered manifests (CRDs included) against Kubernetes'
/// schemas, strictly (unknown fields fail), for the oldest and newest versions supported.
fn lint_and_validate(values: Option<&str>) -> Vec<Value> {
    let dir = tempfile::tempdir().unwrap();
    let mut lint = Command::new(chart::helm());
    lint.args(["lint", "--strict", "--namespace", NAMESPACE]).arg(chart::chart_dir());
    if let Some(v) = values {
        std::fs::write(dir.path().join("values.yaml"), v).unwrap();
        lint.arg("--values").arg(dir.path().join("values.yaml"));
    }
    let out = lint.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.contains("0 chart(s) failed"), "helm lint --strict:\n{text}");

    let stream = chart::render_text(values, &["--include-crds"]).unwrap();
    let file = dir.path().join("rendered.yaml");
    std::fs::write(&file, &stream).unwrap();
    for version in ["1.29.0", "1.37.0"] {
        let out = Command::new(chart::kubernetes_validate())
            .args(["--strict", "--quiet", "-k", version])
            .arg(&file)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "kubernetes-validate {version}:\n{text}");
        // The only kinds without a schema here are prometheus-operator's.
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            assert!(line.contains("kind PodMonitor with api version monitoring.coreos.com/v1"), "{version}: {line}");
        }
    }
    chart::parse_documents(&stream)
}

#[test]
fn chart_lints_and_renders_valid_kubernetes_objects() {
    // Defaults: two replicas kept apart, a disruption budget, the webhook and a generated CA.
    let docs = lint_and_validate(None);
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds.iter().filter(|k| **k == "CustomResourceDefinition").count(), 4);
    let deploy = find(&docs, "Deployment", "weir-controller");
    assert_eq!(deploy["spec"]["replicas"], 2);
    let pod = &deploy["spec"]["template"];
    let selector = &deploy["spec"]["selector"]["matchLabels"];
    for (k, v) in selector.as_object().unwrap() {
        assert_eq!(&pod["metadata"]["labels"][k], v, "pod labels must match the selector");
        assert_eq!(&find(&docs, "Service", "weir-controller")["spec"]["selector"][k], v);
        assert_eq!(&find(&docs, "PodDisruptionBudget", "weir-controller")["spec"]["selector"]["matchLabels"][k], v);
    }
    assert!(pod["spec"]["affinity"]["podAntiAffinity"].is_object());
    // The admin port (canary controls) is on no Service; only sidecars' gRPC is.
    let ports = find(&docs, "Service", "weir-controller")["spec"]["ports"].as_array().unwrap().clone();
    assert_eq!(ports.iter().map(|p| p["name"].as_str().unwrap()).collect::<Vec<_>>(), ["grpc"]);
    assert_eq!(pod["metadata"]["annotations"]["weir.io/inject"], "disabled");
    let c = container(&docs);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/live");
    assert_eq!(c["image"], "ghcr.io/weir-mesh/weir-controller:0.1.0");
    let identity = find(&docs, "Secret", "weir-identity");
    // Generated: one self-signed CA as both trust anchor and issuer.
    assert_eq!(identity["data"]["root.crt"], identity["data"]["issuer.crt"]);
    assert!(b64(identity["data"]["issuer.key"].as_str().unwrap()).contains("PRIVATE KEY"));

    // Everything on, with a supplied CA.
    let ca = supplied_ca();
    let docs = lint_and_validate(Some(&everything_on(&ca)));
    let identity = find(&docs, "Secret", "weir-identity");
    assert_eq!(
        [&identity["data"]["root.crt"], &identity["data"]["issuer.crt"], &identity["data"]["issuer.key"]]
            .map(|v| b64(v.as_str().unwrap())),
        [ca.0.clone(), ca.1.clone(), ca.2.clone()]
    );
    assert_eq!(find(&docs, "Deployment", "weir-controller")["spec"]["replicas"], 3);
    let a = args(&docs);
    assert!(a.contains(&"--namespace=shop".into()) && a.contains(&"--namespace=payments".into()), "{a:?}");
    assert!(a.contains(&"--proxy-image-pull-secret=regcred".into()), "{a:?}");
    assert_eq!(flag(&docs, "trust-domain").as_deref(), Some("mesh.example"));
    // Span export for injected sidecars, as flags the controller accepts.
    assert_eq!(flag(&docs, "inject-trace-collector").as_deref(), Some("http://otel-collector.observability:4317"));
    assert_eq!(flag(&docs, "inject-trace-protocol").as_deref(), Some("http"));
    assert_eq!(flag(&docs, "inject-trace-sampling").as_deref(), Some("0.1"));
    assert_eq!(flag(&docs, "inject-trace-attribute").as_deref(), Some("deployment.environment=prod"));
    let argv = std::iter::once("weir-controller".to_string()).chain(a.iter().cloned());
    let parsed = weir_controller::Args::try_parse_from(argv).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(parsed.inject_trace_sampling, 0.1);
    find(&docs, "PodMonitor", "weir-controller");
    assert_eq!(find(&docs, "PodMonitor", "weir-proxies")["spec"]["podMetricsEndpoints"][0]["port"], "weir-admin");
    let hooks = &find(&docs, "MutatingWebhookConfiguration", "weir-sidecar-injector")["webhooks"];
    assert_eq!(hooks[0]["failurePolicy"], "Ignore");
    let skipped = &hooks[0]["namespaceSelector"]["matchExpressions"][1]["values"];
    assert_eq!(skipped, &json!(["kube-system", "kube-node-lease", NAMESPACE, "monitoring"]));

    // The least: one replica (no disruption budget that would block every drain), no webhook.
    let docs = lint_and_validate(Some("controller:\n  replicas: 1\nwebhook:\n  enabled: false\n"));
    for (kind, name) in [
        ("PodDisruptionBudget", "weir-controller"),
        ("MutatingWebhookConfiguration", "weir-sidecar-injector"),
        ("Service", "weir-webhook"),
        ("Secret", "weir-webhook-tls"),
    ] {
        assert!(!docs.iter().any(|d| d["kind"] == kind && d["metadata"]["name"] == name), "{kind} {name} rendered");
    }
    assert_eq!(flag(&docs, "webhook-addr"), None);
}

#[test]
fn broken_values_are_refused_naming_the_field() {
    let cases = [
        ("controller:\n  replicas: two\n", "/controller/replicas"),
        ("controller:\n  replicsa: 2\n", "replicsa"),
        ("controller:\n  image:\n    pullPolicy: Sometimes\n", "/controller/image/pullPolicy"),
        ("controller:\n  leaseDuration: 15 seconds\n", "/controller/leaseDuration"),
        ("controller:\n  namespaces: [Shop]\n", "/controller/namespaces/0"),
        ("controller:\n  logFormat: xml\n", "/controller/logFormat"),
        ("webhook:\n  failurePolicy: fail\n", "/webhook/failurePolicy"),
        ("webhook:\n  timeoutSeconds: 60\n", "/webhook/timeoutSeconds"),
        ("identity:\n  trustAnchorPEM: not a certificate\n", "/identity/trustAnchorPEM"),
        ("metrics:\n  podMonitor:\n    enabled: yes please\n", "/metrics/podMonitor/enabled"),
        ("proxy:\n  imagePullSecrets: [Reg Cred]\n", "/proxy/imagePullSecrets/0"),
        ("proxy:\n  tracing:\n    collector: otel:4317\n", "/proxy/tracing/collector"),
        ("proxy:\n  tracing:\n    sampling: 5\n", "/proxy/tracing/sampling"),
        ("proxy:\n  tracing:\n    protocol: zipkin\n", "/proxy/tracing/protocol"),
        // A budget no drain could ever satisfy.
        ("controller:\n  podDisruptionBudget:\n    minAvailable: 2\n", "must be below controller.replicas (2)"),
        // Valid one by one, but not together.
        (
            "identity:\n  trustAnchorPEM: \"-----BEGIN CERTIFICATE-----\\n\"\n",
            "give trustAnchorPEM, issuer.crtPEM and issuer.keyPEM together",
        ),
    ];
    for (values, field) in cases {
        match render(Some(values), &[]) {
            Ok(_) => panic!("values accepted:\n{values}"),
            Err(e) => assert!(e.contains(field), "values:\n{values}\nerror does not name {field}:\n{e}"),
        }
    }
}

/// The controller with exactly the chart's flags, but local mode on loopback: its own
/// addresses and the directories of the Secrets it mounts are the test's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_runs_with_the_charts_flags_and_certificates() {
    let docs = render(None, &[]).unwrap();
    let chart_args = args(&docs);
    // Every flag is one the controller knows, with a value it accepts.
    let mut argv = vec!["weir-controller".to_string()];
    argv.extend(chart_args.iter().cloned());
    weir_controller::Args::try_parse_from(&argv).unwrap_or_else(|e| panic!("{e}"));
    // Ports, Services and mounts agree with the flags.
    let port_of = |f: &str| flag(&docs, f).unwrap().rsplit_once(':').unwrap().1.parse::<u64>().unwrap();
    assert_eq!(port_of("grpc-addr"), container_port(&docs, "grpc"));
    assert_eq!(port_of("admin-addr"), container_port(&docs, "admin"));
    assert_eq!(port_of("webhook-addr"), container_port(&docs, "webhook"));
    let service_port = |svc: &str, target: &str| {
        find(&docs, "Service", svc)["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["targetPort"] == target)
            .unwrap()["port"]
            .as_u64()
            .unwrap()
    };
    // Injected sidecars dial the controller's Service.
    assert_eq!(
        flag(&docs, "inject-controller-addr").unwrap(),
        format!("weir-controller.{NAMESPACE}.svc:{}", service_port("weir-controller", "grpc"))
    );
    let mounts = container(&docs)["volumeMounts"].as_array().unwrap().clone();
    let mounted = |path: &str| mounts.iter().any(|m| m["mountPath"] == path && m["readOnly"] == true);
    assert!(mounted(&flag(&docs, "identity-dir").unwrap()) && mounted(&flag(&docs, "webhook-tls-dir").unwrap()));

    // The Secrets as the kubelet would mount them.
    let scratch = Scratch::new();
    scratch.write("services.yaml", &service("test", "web", &[]));
    let mount = |secret: &str, dir: &Path| {
        std::fs::create_dir_all(dir).unwrap();
        for (file, data) in find(&docs, "Secret", secret)["data"].as_object().unwrap() {
            std::fs::write(dir.join(file), b64(data.as_str().unwrap())).unwrap();
        }
    };
    mount("weir-identity", &scratch.dir.path().join("identity"));
    let tls_dir = scratch.dir.path().join("webhook-tls");
    mount("weir-webhook-tls", &tls_dir);
    let own = ["grpc-addr", "admin-addr", "log-level", "identity-dir", "webhook-addr", "webhook-tls-dir"];
    let mut flags: Vec<String> =
        chart_args.iter().filter(|a| !own.iter().any(|f| a.starts_with(&format!("--{f}=")))).cloned().collect();
    flags.extend(["--webhook-addr=127.0.0.1:0".to_string(), format!("--webhook-tls-dir={}", tls_dir.display())]);
    flags.extend(scratch.identity_flags(&[("t-web", "test/web"), ("t-client", "test/client")], &[]));
    let controller = scratch.controller_with(None, &flags).await;

    // Workload certificates from the chart's CA: the sidecars talk mTLS and know each other.
    let backend = Backend::start("v1").await;
    let server = scratch
        .proxy_with(controller.addr("grpc"), "test/web", Some(backend.addr), &scratch.token_flags("t-web"))
        .await;
    let client =
        scratch.proxy_with(controller.addr("grpc"), "test/client", None, &scratch.token_flags("t-client")).await;
    for admin in [server.addr("admin"), client.addr("admin")] {
        wait_ready(admin).await;
    }
    let endpoint = format!("{{ address: \"{}\", meshed: true, serviceAccount: web }}", server.addr("inbound"));
    scratch.write("services.yaml", &service("test", "web", &[endpoint]));
    wait_config(client.addr("admin"), "the endpoint", |c| endpoint_count(c, "test", "web") == 1).await;
    for _ in 0..3 {
        let r = send(&http1(), client.addr("outbound"), "GET", "web.test", "/", &[]).await.unwrap();
        assert_eq!((r.status, r.backend()), (200, "v1"), "{}", r.body);
    }
    let metrics = admin_text(server.addr("admin"), "/metrics").await;
    assert!(
        metrics.contains(
            "weir_inbound_requests_by_client_total{client_identity=\"spiffe://cluster.local/ns/test/sa/client\",tls=\"true\"} 3"
        ),
        "{metrics}"
    );

    // The webhook: reached as the API server would, by its Service's name and trusting only
    // the configuration's CA bundle, on each entry's path.
    let config = find(&docs, "MutatingWebhookConfiguration", "weir-sidecar-injector");
    let mut roots = rustls::RootCertStore::empty();
    for entry in config["webhooks"].as_array().unwrap() {
        let bundle = b64(entry["clientConfig"]["caBundle"].as_str().unwrap());
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(bundle.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
    }
    let svc = &config["webhooks"][0]["clientConfig"]["service"];
    assert_eq!(svc["port"].as_u64(), Some(service_port("weir-webhook", "webhook")));
    let hook = WebhookClient {
        addr: controller.addr("webhook"),
        roots: Arc::new(roots),
        server_name: format!("{}.{}.svc", svc["name"].as_str().unwrap(), svc["namespace"].as_str().unwrap()),
    };
    let pod = |annotations: Value| {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "web-1", "namespace": "shop", "annotations": annotations},
               "spec": {"serviceAccountName": "web", "containers": [{"name": "app", "image": "web:1"}]}})
    };
    let entries = config["webhooks"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    for (entry, annotations) in entries.iter().zip([json!({}), json!({"weir.io/inject": "enabled"})]) {
        let path = entry["clientConfig"]["service"]["path"].as_str().unwrap();
        let (rsp, patched) = hook.admit(path, pod(annotations)).await;
        assert_eq!(rsp["allowed"], true, "{path}: {rsp}");
        let proxy = &patched["spec"]["initContainers"][1];
        assert_eq!(proxy["image"], "ghcr.io/weir-mesh/weir-proxy:0.1.0", "{path}");
        let env = proxy["env"].as_array().unwrap();
        let controller_env = env.iter().find(|e| e["name"] == "WEIR_CONTROLLER").unwrap();
        assert_eq!(controller_env["value"], flag(&docs, "inject-controller-addr").unwrap());
    }
    // The pod entry leaves pods that did not ask alone.
    let (rsp, _) = hook.admit(entries[1]["clientConfig"]["service"]["path"].as_str().unwrap(), pod(json!({}))).await;
    assert!(rsp["patch"].is_null());
}

/// What a Dockerfile builds and how its image runs.
struct Image {
    package: String,
    binary: String,
    entrypoint: String,
    user: String,
    stages: usize,
}

fn image(file: &str) -> Image {
    let text = std::fs::read_to_string(chart::chart_dir().join("../../docker").join(file)).unwrap();
    let after = |prefix: &str| {
        text.lines().rev().find_map(|l| l.trim().strip_prefix(prefix)).unwrap_or_else(|| panic!("{file}: no {prefix}"))
    };
    let package = text.split("cargo build --release --locked -p ").nth(1).unwrap().split_whitespace().next().unwrap();
    let binary = text.split("target/release/").nth(1).unwrap().split_whitespace().next().unwrap();
    let entry: Vec<String> = serde_json::from_str(after("ENTRYPOINT ")).unwrap();
    Image {
        package: package.into(),
        binary: binary.into(),
        entrypoint: entry[0].clone(),
        user: after("USER ").into(),
        stages: text.lines().filter(|l| l.starts_with("FROM ")).count(),
    }
}

#[test]
fn dockerfiles_build_what_the_chart_and_injected_pods_run() {
    let docs = render(None, &[]).unwrap();
    let pod = &find(&docs, "Deployment", "weir-controller")["spec"]["template"]["spec"];
    let controller = image("controller.Dockerfile");
    assert_eq!((controller.package.as_str(), controller.binary.as_str()), ("weir-controller", "weir-controller"));
    assert_eq!(controller.entrypoint, "/usr/local/bin/weir-controller");
    assert!(controller.stages >= 2, "multi-stage");
    // The chart runs the image's entrypoint as the image's non-root user.
    assert!(container(&docs)["command"].is_null());
    assert_eq!(controller.user, format!("{0}:{0}", pod["securityContext"]["runAsUser"]));

    let proxy = image("proxy.Dockerfile");
    assert_eq!((proxy.package.as_str(), proxy.binary.as_str()), ("weir-proxy", "weir-proxy"));
    assert!(proxy.stages >= 2, "multi-stage");
    // Injected containers run `weir-proxy` from PATH as the proxy UID.
    assert_eq!(proxy.entrypoint, "/usr/local/bin/weir-proxy");
    assert_eq!(proxy.user, format!("{0}:{0}", weir_controller::inject::PROXY_UID));
    let mut injected = json!({"kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": [{"name": "app"}]}});
    weir_controller::inject::inject_pod(&mut injected, &weir_controller::inject::Settings::default()).unwrap();
    for c in injected["spec"]["initContainers"].as_array().unwrap() {
        let command = c["command"].as_array().map(|c| c[0].as_str().unwrap().to_string());
        assert!(command.is_none_or(|c| c == "weir-proxy" || c == proxy.entrypoint), "{c}");
    }
}

/// The metric names Weir's sources define (`"weir_..."` string literals).
fn defined_metrics() -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut dirs = vec![chart::chart_dir().join("../../proxy/src"), chart::chart_dir().join("../../controller/src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                for piece in text.split("\"weir_").skip(1) {
                    if let Some((name, _)) = piece.split_once('"') {
                        names.insert(format!("weir_{name}"));
                    }
                }
            }
        }
    }
    names
}

#[test]
fn the_dashboard_queries_metrics_weir_exports() {
    let docs =
        render(Some("grafana:\n  dashboards:\n    enabled: true\n    labels: {grafana_dashboard: \"1\"}\n"), &[])
            .unwrap();
    let config_map = find(&docs, "ConfigMap", "weir-dashboard-weir-mesh");
    assert_eq!(config_map["metadata"]["labels"]["grafana_dashboard"], "1");
    let dashboard: Value = serde_json::from_str(config_map["data"]["weir-mesh.json"].as_str().unwrap()).unwrap();
    let defined = defined_metrics();
    let mut queried = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            for piece in expr.split("weir_").skip(1) {
                let name: String = piece.chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect();
                let name = format!("weir_{name}");
                let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(&name);
                assert!(
                    defined.contains(base),
                    "panel {:?} queries {name}, which Weir does not export",
                    panel["title"]
                );
                queried += 1;
            }
        }
    }
    assert!(queried >= 20, "{queried}");
    // Off by default.
    assert!(!render(None, &[]).unwrap().iter().any(|d| d["kind"] == "ConfigMap"));
}
