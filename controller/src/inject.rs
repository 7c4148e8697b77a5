//! Sidecar injection: what a pod gets to join the mesh. One piece of code for the admission
//! webhook and for `weir inject` on manifests.
//!
//! A pod gets:
//! - `weir-init`, an init container running `weir-proxy init` (only NET_ADMIN and NET_RAW),
//!   which writes the interception rules;
//! - `weir-proxy`, the sidecar, as a native sidecar (an init container with
//!   `restartPolicy: Always`: it starts before the application and does not keep Jobs alive),
//!   running as UID 2102 with a read-only root filesystem, probes on its admin port, and a
//!   projected ServiceAccount token for the audience `weir`;
//! - the annotation `weir.io/injected`.
//!
//! Annotations on the pod adjust it: `weir.io/inject: disabled` opts out;
//! `weir.io/skip-inbound-ports`, `weir.io/skip-outbound-ports`, `weir.io/skip-outbound-cidrs`,
//! `weir.io/opaque-ports` (inbound ports carried as TCP without protocol detection),
//! `weir.io/proxy-cpu-request`, `weir.io/proxy-memory-request`, `weir.io/proxy-cpu-limit`,
//! `weir.io/proxy-memory-limit`, `weir.io/proxy-log-level`, and for span export
//! `weir.io/trace-collector` (an OTLP collector's `http://` address, or `none`),
//! `weir.io/trace-protocol` (`grpc` or `http`) and `weir.io/trace-sampling` (0 to 1), each
//! over the installation's setting. A pod that already has a `weir-proxy` container is left
//! as it is.

use serde_json::{Value, json};

pub const PROXY: &str = "weir-proxy";
pub const INIT: &str = "weir-init";
pub const TOKEN_VOLUME: &str = "weir-token";
pub const INJECTED: &str = "weir.io/injected";
pub const INJECT: &str = "weir.io/inject";
pub const PROXY_UID: i64 = 2102;
const TOKEN_DIR: &str = "/var/run/weir/tokens";
const INBOUND_PORT: u16 = 4143;
const OUTBOUND_PORT: u16 = 4140;
const ADMIN_PORT: u16 = 4191;

/// What injection needs to know about the installation.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The proxy image (it holds both `weir-proxy` and `weir-proxy init`).
    pub proxy_image: String,
    /// Where sidecars reach the controller's Discovery and Identity service.
    pub controller_addr: String,
    /// The audience of the projected token.
    pub token_audience: String,
    /// Secrets for pulling the proxy image, added to the pod's `imagePullSecrets`.
    pub image_pull_secrets: Vec<String>,
    /// The mesh's trust anchors (PEM bundle), given to every sidecar out of band: it verifies
    /// the controller, and its peers, against them.
    pub trust_anchors_pem: String,
    /// The controller's identity, `NAMESPACE/SERVICEACCOUNT`.
    pub controller_identity: String,
    /// Span export for every injected sidecar (pods' annotations override it).
    pub tracing: TraceSettings,
}

/// Where injected sidecars export spans (see `weir-proxy --trace-collector`).
#[derive(Clone, Debug, PartialEq)]
pub struct TraceSettings {
    /// The OTLP collector; `None`: no span export unless a pod's annotation asks for it.
    pub collector: Option<http::Uri>,
    pub protocol: weir_api::telemetry::Protocol,
    pub sampling: f64,
    /// Resource attributes added to every sidecar's spans.
    pub attributes: Vec<(String, String)>,
}

impl Default for TraceSettings {
    fn default() -> Self {
        Self { collector: None, protocol: weir_api::telemetry::Protocol::Grpc, sampling: 0.01, attributes: Vec::new() }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            proxy_image: "ghcr.io/weir-mesh/weir-proxy:0.1.0".into(),
            controller_addr: "weir-controller.weir-system.svc:8090".into(),
            token_audience: "weir".into(),
            image_pull_secrets: Vec::new(),
            trust_anchors_pem: String::new(),
            controller_identity: "weir-system/weir-controller".into(),
            tracing: TraceSettings::default(),
        }
    }
}

/// Why a pod was not changed.
#[derive(Debug, PartialEq, Eq)]
pub enum Skipped {
    /// `weir.io/inject: disabled`.
    OptedOut,
    /// It already runs a `weir-proxy`.
    AlreadyInjected,
    /// `hostNetwork: true`: interception rules would capture the node's traffic.
    HostNetwork,
}

/// A bad annotation or pod, named with where it is.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {message}")]
pub struct InjectError {
    pub field: String,
    pub message: String,
}

fn err(field: impl Into<String>, message: impl Into<String>) -> InjectError {
    InjectError { field: field.into(), message: message.into() }
}

/// Injects into a pod template or pod (`metadata` + `spec`) in place. `Ok(None)` when
/// injected, `Ok(Some(why))` when left alone.
pub fn inject_pod(pod: &mut Value, settings: &Settings) -> Result<Option<Skipped>, InjectError> {
    let annotations = pod["metadata"]["annotations"].as_object().cloned().unwrap_or_default();
    // The sidecar announces the pod's labels (selectors of MeshAuthorizations match them).
    let labels: Vec<String> = pod["metadata"]["labels"]
        .as_object()
        .map(|l| l.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default())).collect())
        .unwrap_or_default();
    if annotations.get(INJECT).and_then(Value::as_str) == Some("disabled") {
        return Ok(Some(Skipped::OptedOut));
    }
    let spec = pod.get_mut("spec").and_then(|s| s.as_object_mut()).ok_or_else(|| err("spec", "a pod needs a spec"))?;
    if let Some(skipped) = left_alone(spec) {
        return Ok(Some(skipped));
    }
    // Every annotation is checked before anything changes: a bad one leaves the pod as it was.
    let options = Options::read(&annotations, settings)?;
    let probe_paths = serde_json::to_string(&app_probes(spec)).expect("probe paths serialise");
    let init = init_container(settings, &options);
    let proxy = proxy_container(settings, &options, &labels, &probe_paths);
    add_to_spec(spec, settings, init, proxy)?;
    mark_injected(pod)?;
    Ok(None)
}

/// Pods injection leaves alone: one already injected, one on the host's network.
fn left_alone(spec: &serde_json::Map<String, Value>) -> Option<Skipped> {
    let has =
        |list: &str| spec.get(list).and_then(|c| c.as_array()).is_some_and(|c| c.iter().any(|c| c["name"] == PROXY));
    if has("containers") || has("initContainers") {
        return Some(Skipped::AlreadyInjected);
    }
    (spec.get("hostNetwork").and_then(|h| h.as_bool()) == Some(true)).then_some(Skipped::HostNetwork)
}

/// What a pod's `weir.io/` annotations ask of its sidecar, each checked (an error names the
/// annotation).
struct Options {
    /// Inbound ports not redirected to the sidecar (always including its admin port).
    skip_inbound: Vec<String>,
    skip_outbound: Option<String>,
    skip_cidrs: Option<String>,
    /// Inbound ports the sidecar carries as opaque TCP, without protocol detection.
    opaque_ports: String,
    resources: Value,
    log_level: String,
    /// Span export as the annotations adjust the installation's (collector `None`: off).
    tracing: TraceSettings,
}

impl Options {
    fn read(annotations: &serde_json::Map<String, Value>, settings: &Settings) -> Result<Self, InjectError> {
        let annotation = |k: &str| annotations.get(k).and_then(|v| v.as_str()).map(str::to_string);
        // A comma-separated annotation, checked whole by `check`, then normalised.
        let list = |key: &str, check: fn(&str) -> Result<(), String>| -> Result<Option<String>, InjectError> {
            let Some(v) = annotation(key) else { return Ok(None) };
            check(&v).map_err(|m| err(format!("metadata.annotations[{key}]"), m))?;
            Ok(Some(v.split(',').map(str::trim).filter(|s| !s.is_empty()).collect::<Vec<_>>().join(",")))
        };
        let port_check = |list: &str| weir_api::service::parse_port_list(list).map(|_| ());
        let cidr_check = |list: &str| -> Result<(), String> {
            list.split(',')
                .filter(|s| !s.trim().is_empty())
                .try_for_each(|c| weir_api::service::parse_ipv4_cidr(c).map(|_| ()))
        };
        let mut skip_inbound = vec![ADMIN_PORT.to_string()];
        skip_inbound.extend(list("weir.io/skip-inbound-ports", port_check)?);
        let quantity = |key: &str, default: &str| -> Result<String, InjectError> {
            let v = annotation(key).unwrap_or_else(|| default.to_string());
            let digits = v.trim_end_matches(|c: char| c.is_ascii_alphabetic());
            let unit = &v[digits.len()..];
            if digits.is_empty()
                || digits.parse::<f64>().is_err()
                || !["", "m", "k", "M", "G", "Ki", "Mi", "Gi"].contains(&unit)
            {
                return Err(err(format!("metadata.annotations[{key}]"), format!("{v:?} is not a resource quantity")));
            }
            Ok(v)
        };
        let resources = json!({
            "requests": {
                "cpu": quantity("weir.io/proxy-cpu-request", "10m")?,
                "memory": quantity("weir.io/proxy-memory-request", "20Mi")?,
            },
            "limits": {
                "cpu": quantity("weir.io/proxy-cpu-limit", "1")?,
                "memory": quantity("weir.io/proxy-memory-limit", "250Mi")?,
            },
        });
        let log_level = annotation("weir.io/proxy-log-level").unwrap_or_else(|| "info".into());
        if log_level.is_empty() || log_level.contains(char::is_whitespace) {
            return Err(err(
                "metadata.annotations[weir.io/proxy-log-level]",
                format!("{log_level:?} is not a log level"),
            ));
        }
        let mut tracing = settings.tracing.clone();
        let checked = |key: &str| -> Option<(String, String)> { annotation(key).map(|v| (key.to_string(), v)) };
        let bad = |key: &str, m: String| err(format!("metadata.annotations[{key}]"), m);
        if let Some((key, v)) = checked("weir.io/trace-collector") {
            tracing.collector = match v.trim() {
                "none" => None,
                v => Some(weir_api::telemetry::parse_collector(v).map_err(|m| bad(&key, m))?),
            };
        }
        if let Some((key, v)) = checked("weir.io/trace-protocol") {
            tracing.protocol = v.trim().parse().map_err(|m| bad(&key, m))?;
        }
        if let Some((key, v)) = checked("weir.io/trace-sampling") {
            tracing.sampling = weir_api::telemetry::parse_sampling(&v).map_err(|m| bad(&key, m))?;
        }
        Ok(Options {
            tracing,
            skip_inbound,
            skip_outbound: list("weir.io/skip-outbound-ports", port_check)?,
            skip_cidrs: list("weir.io/skip-outbound-cidrs", cidr_check)?,
            opaque_ports: list("weir.io/opaque-ports", port_check)?.unwrap_or_default(),
            resources,
            log_level,
        })
    }
}

/// The init container that installs the interception rules (and needs NET_ADMIN for it).
fn init_container(settings: &Settings, options: &Options) -> Value {
    let mut args = vec![
        "init".to_string(),
        "--inbound-port".into(),
        INBOUND_PORT.to_string(),
        "--outbound-port".into(),
        OUTBOUND_PORT.to_string(),
        "--proxy-uid".into(),
        PROXY_UID.to_string(),
        "--skip-inbound-ports".into(),
        options.skip_inbound.join(","),
    ];
    if let Some(p) = &options.skip_outbound {
        args.extend(["--skip-outbound-ports".into(), p.clone()]);
    }
    if let Some(c) = &options.skip_cidrs {
        args.extend(["--skip-outbound-cidrs".into(), c.clone()]);
    }
    json!({
        "name": INIT,
        "image": settings.proxy_image,
        "command": ["weir-proxy"],
        "args": args,
        "resources": {"requests": {"cpu": "10m", "memory": "10Mi"}, "limits": {"cpu": "100m", "memory": "50Mi"}},
        "securityContext": {
            "runAsUser": 0, "runAsNonRoot": false, "privileged": false, "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
    })
}

/// The sidecar itself: a native sidecar (an init container that keeps running), unprivileged,
/// configured through its environment.
fn proxy_container(settings: &Settings, options: &Options, labels: &[String], probe_paths: &str) -> Value {
    let field = |path: &str| json!({"fieldRef": {"fieldPath": path}});
    let probe =
        |path: &str| json!({"httpGet": {"path": path, "port": ADMIN_PORT}, "periodSeconds": 5, "failureThreshold": 3});
    let mut container = json!({
        "name": PROXY,
        "image": settings.proxy_image,
        "command": ["weir-proxy"],
        "restartPolicy": "Always",
        "env": [
            {"name": "POD_NAME", "valueFrom": field("metadata.name")},
            {"name": "POD_NAMESPACE", "valueFrom": field("metadata.namespace")},
            {"name": "WEIR_WORKLOAD", "value": "$(POD_NAMESPACE)/$(POD_NAME)"},
            {"name": "WEIR_SERVICE_ACCOUNT", "valueFrom": field("spec.serviceAccountName")},
            {"name": "WEIR_CONTROLLER", "value": settings.controller_addr},
            {"name": "WEIR_TOKEN_FILE", "value": format!("{TOKEN_DIR}/token")},
            {"name": "WEIR_TRUST_ANCHORS_PEM", "value": settings.trust_anchors_pem},
            {"name": "WEIR_CONTROLLER_IDENTITY", "value": settings.controller_identity},
            {"name": "WEIR_LABELS", "value": labels.join(",")},
            {"name": "WEIR_OUTBOUND_ADDR", "value": format!("127.0.0.1:{OUTBOUND_PORT}")},
            {"name": "WEIR_INBOUND_ADDR", "value": format!("0.0.0.0:{INBOUND_PORT}")},
            {"name": "WEIR_ADMIN_ADDR", "value": format!("0.0.0.0:{ADMIN_PORT}")},
            {"name": "WEIR_LOG_LEVEL", "value": options.log_level},
            {"name": "WEIR_OPAQUE_PORTS", "value": options.opaque_ports},
            {"name": "WEIR_PROBE_PATHS", "value": probe_paths},
        ],
        "ports": [
            {"name": "weir-inbound", "containerPort": INBOUND_PORT},
            {"name": "weir-admin", "containerPort": ADMIN_PORT},
        ],
        "readinessProbe": probe("/ready"),
        "livenessProbe": probe("/live"),
        "startupProbe": {"httpGet": {"path": "/live", "port": ADMIN_PORT}, "periodSeconds": 1, "failureThreshold": 30},
        "resources": options.resources,
        "securityContext": {
            "runAsUser": PROXY_UID, "runAsGroup": PROXY_UID, "runAsNonRoot": true, "privileged": false,
            "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [{"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true}],
    });
    let t = &options.tracing;
    if let (Some(collector), Some(env)) = (&t.collector, container["env"].as_array_mut()) {
        // The pod's own name, expanded by the kubelet from the variable above.
        let attributes: Vec<String> = std::iter::once("k8s.pod.name=$(POD_NAME)".to_string())
            .chain(t.attributes.iter().map(|(k, v)| format!("{k}={v}")))
            .collect();
        env.extend([
            json!({"name": "WEIR_TRACE_COLLECTOR", "value": collector.to_string()}),
            json!({"name": "WEIR_TRACE_PROTOCOL", "value": t.protocol.to_string()}),
            json!({"name": "WEIR_TRACE_SAMPLING", "value": t.sampling.to_string()}),
            json!({"name": "WEIR_TRACE_ATTRIBUTES", "value": attributes.join(",")}),
        ]);
    }
    container
}

/// Puts the containers, the projected token volume and the image pull secrets into the spec.
fn add_to_spec(
    spec: &mut serde_json::Map<String, Value>,
    settings: &Settings,
    init: Value,
    proxy: Value,
) -> Result<(), InjectError> {
    // The interception rules first, then the sidecar, then the pod's own init containers
    // (which may then use the network through the mesh).
    let mut inits = vec![init, proxy];
    if let Some(existing) = spec.get("initContainers").and_then(|c| c.as_array()) {
        inits.extend(existing.iter().cloned());
    }
    spec.insert("initContainers".into(), Value::Array(inits));
    let volume = json!({
        "name": TOKEN_VOLUME,
        "projected": {"sources": [{"serviceAccountToken": {
            "audience": settings.token_audience, "expirationSeconds": 3600, "path": "token",
        }}]},
    });
    match spec.get_mut("volumes").and_then(|v| v.as_array_mut()) {
        Some(vols) => vols.push(volume),
        None => {
            spec.insert("volumes".into(), json!([volume]));
        }
    }
    if !settings.image_pull_secrets.is_empty() {
        let secrets = spec.entry("imagePullSecrets").or_insert_with(|| json!([]));
        let list = secrets.as_array_mut().ok_or_else(|| err("spec.imagePullSecrets", "not a list"))?;
        for name in &settings.image_pull_secrets {
            if !list.iter().any(|s| s["name"] == name.as_str()) {
                list.push(json!({ "name": name }));
            }
        }
    }
    Ok(())
}

/// The `weir.io/injected: "true"` annotation.
fn mark_injected(pod: &mut Value) -> Result<(), InjectError> {
    let meta = pod
        .as_object_mut()
        .expect("a pod with a spec is an object")
        .entry("metadata")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .ok_or_else(|| err("metadata", "not a mapping"))?;
    let annotations = meta.entry("annotations").or_insert_with(|| json!({}));
    if let Some(a) = annotations.as_object_mut() {
        a.insert(INJECTED.into(), json!("true"));
    }
    Ok(())
}

/// The kubelet's plaintext HTTP probes (liveness, readiness, startup) of the pod's containers,
/// for the sidecar to admit under a strict MeshAuthorization: `httpGet` with scheme HTTP and
/// no `host` (those go to the pod), a numeric port or one named by the container. HTTPS probes
/// reach the application as its own TLS; probes of another host are not the pod's.
fn app_probes(spec: &serde_json::Map<String, Value>) -> Vec<weir_api::service::ProbePath> {
    let mut out = Vec::new();
    for c in spec.get("containers").and_then(Value::as_array).into_iter().flatten() {
        for kind in ["livenessProbe", "readinessProbe", "startupProbe"] {
            let get = &c[kind]["httpGet"];
            if !get.is_object() || get.get("host").is_some() || get["scheme"].as_str().is_some_and(|s| s != "HTTP") {
                continue;
            }
            let port = match &get["port"] {
                Value::Number(n) => n.as_u64(),
                Value::String(name) => name.parse::<u64>().ok().or_else(|| {
                    c["ports"].as_array()?.iter().find(|p| p["name"] == name.as_str())?["containerPort"].as_u64()
                }),
                _ => None,
            };
            let Some(port) = port.and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0) else { continue };
            let path = get["path"].as_str().unwrap_or("/");
            let path = path.split('?').next().unwrap_or("/");
            let path = if path.starts_with('/') { path.to_string() } else { format!("/{path}") };
            let p = weir_api::service::ProbePath { port, path };
            if !out.contains(&p) {
                out.push(p);
            }
        }
    }
    out
}

/// Where a workload kind keeps its pod template.
pub fn pod_template_path(kind: &str) -> Option<&'static [&'static str]> {
    match kind {
        "Pod" => Some(&[]),
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" | "ReplicationController" => {
            Some(&["spec", "template"])
        }
        "CronJob" => Some(&["spec", "jobTemplate", "spec", "template"]),
        _ => None,
    }
}

/// Injects into any workload manifest (Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet,
/// Job, CronJob); other kinds come back unchanged with `Ok(None)`.
pub fn inject_manifest(doc: &mut Value, settings: &Settings) -> Result<Option<Result<(), Skipped>>, InjectError> {
    let kind = doc["kind"].as_str().unwrap_or_default().to_string();
    let Some(path) = pod_template_path(&kind) else { return Ok(None) };
    let mut target = &mut *doc;
    let mut at = String::new();
    for p in path {
        at = if at.is_empty() { p.to_string() } else { format!("{at}.{p}") };
        target = target.get_mut(*p).ok_or_else(|| err(&at, format!("a {kind} needs {at}")))?;
    }
    inject_pod(target, settings)
        .map(|skipped| Some(skipped.map_or(Ok(()), Err)))
        .map_err(|e| err(if at.is_empty() { e.field } else { format!("{at}.{}", e.field) }, e.message))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment(annotations: Value) -> Value {
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"template": {
                "metadata": {"labels": {"app": "web"}, "annotations": annotations},
                "spec": {
                    "serviceAccountName": "web",
                    "initContainers": [{"name": "migrate", "image": "web:1"}],
                    "containers": [{"name": "app", "image": "web:1"}],
                    "volumes": [{"name": "data", "emptyDir": {}}]
                }
            }}
        })
    }

    #[test]
    fn a_deployment_gets_the_init_rules_and_a_native_sidecar_once() {
        let mut d = deployment(json!({"weir.io/skip-outbound-ports": "5432, 6379", "weir.io/proxy-log-level": "debug",
                                      "weir.io/opaque-ports": "3306, 6000-6002"}));
        assert_eq!(inject_manifest(&mut d, &Settings::default()), Ok(Some(Ok(()))));
        let spec = &d["spec"]["template"]["spec"];
        let inits: Vec<&str> =
            spec["initContainers"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
        assert_eq!(inits, [INIT, PROXY, "migrate"]);
        let init = &spec["initContainers"][0];
        assert_eq!(init["securityContext"]["capabilities"]["add"], json!(["NET_ADMIN", "NET_RAW"]));
        let args: Vec<&str> = init["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
        assert!(args.windows(2).any(|w| w == ["--skip-outbound-ports", "5432,6379"]), "{args:?}");
        assert!(args.windows(2).any(|w| w == ["--skip-inbound-ports", "4191"]), "{args:?}");
        let proxy = &spec["initContainers"][1];
        assert_eq!(proxy["restartPolicy"], "Always");
        assert_eq!(proxy["securityContext"]["runAsUser"], PROXY_UID);
        assert_eq!(proxy["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(proxy["readinessProbe"]["httpGet"]["path"], "/ready");
        let env = |name: &str| proxy["env"].as_array().unwrap().iter().find(|e| e["name"] == name).unwrap().clone();
        assert_eq!(env("WEIR_LOG_LEVEL")["value"], "debug");
        assert_eq!(env("WEIR_OPAQUE_PORTS")["value"], "3306,6000-6002");
        assert_eq!(env("WEIR_LABELS")["value"], "app=web");
        assert_eq!(env("WEIR_SERVICE_ACCOUNT")["valueFrom"]["fieldRef"]["fieldPath"], "spec.serviceAccountName");
        let vols = spec["volumes"].as_array().unwrap();
        assert_eq!(vols.len(), 2);
        assert_eq!(vols[1]["projected"]["sources"][0]["serviceAccountToken"]["audience"], "weir");
        assert_eq!(d["spec"]["template"]["metadata"]["annotations"][INJECTED], "true");
        // Idempotent: a second pass changes nothing.
        let before = d.clone();
        assert_eq!(inject_manifest(&mut d, &Settings::default()), Ok(Some(Err(Skipped::AlreadyInjected))));
        assert_eq!(d, before);
    }

    #[test]
    fn the_pods_http_probes_go_to_the_sidecar() {
        let mut d = deployment(json!({}));
        d["spec"]["template"]["spec"]["containers"] = json!([{
            "name": "app", "image": "shop",
            "ports": [{"name": "http", "containerPort": 8080}, {"name": "admin", "containerPort": 9090}],
            "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}},
            "readinessProbe": {"httpGet": {"path": "/ready?full=1", "port": 9090}},
            "startupProbe": {"httpGet": {"path": "/healthz", "port": 8080}},
        }, {
            "name": "other", "image": "x",
            "livenessProbe": {"httpGet": {"path": "/tls", "port": 8443, "scheme": "HTTPS"}},
            "readinessProbe": {"httpGet": {"path": "/elsewhere", "port": 80, "host": "example.com"}},
            "startupProbe": {"tcpSocket": {"port": 5432}},
        }]);
        inject_manifest(&mut d, &Settings::default()).unwrap().unwrap().unwrap();
        let inits = d["spec"]["template"]["spec"]["initContainers"].as_array().unwrap();
        let proxy = inits.iter().find(|c| c["name"] == PROXY).unwrap();
        let env = proxy["env"].as_array().unwrap().iter().find(|e| e["name"] == "WEIR_PROBE_PATHS").unwrap();
        let paths = weir_api::service::parse_probe_paths(env["value"].as_str().unwrap()).unwrap();
        let want = [(8080, "/healthz"), (9090, "/ready")]
            .map(|(port, path)| weir_api::service::ProbePath { port, path: path.into() });
        assert_eq!(paths, want, "named ports resolved, queries dropped, HTTPS and other hosts left out, no duplicates");
    }

    #[test]
    fn opt_out_host_network_and_other_kinds_are_left_alone() {
        let mut d = deployment(json!({"weir.io/inject": "disabled"}));
        let before = d.clone();
        assert_eq!(inject_manifest(&mut d, &Settings::default()), Ok(Some(Err(Skipped::OptedOut))));
        assert_eq!(d, before);
        let mut pod =
            json!({"kind": "Pod", "metadata": {"name": "p"}, "spec": {"hostNetwork": true, "containers": []}});
        assert_eq!(inject_manifest(&mut pod, &Settings::default()), Ok(Some(Err(Skipped::HostNetwork))));
        let mut svc = json!({"kind": "Service", "metadata": {"name": "s"}, "spec": {}});
        assert_eq!(inject_manifest(&mut svc, &Settings::default()), Ok(None));
        let mut cron = json!({"kind": "CronJob", "metadata": {"name": "c"},
            "spec": {"jobTemplate": {"spec": {"template": {"spec": {"containers": [{"name": "job"}], "restartPolicy": "Never"}}}}}});
        assert_eq!(inject_manifest(&mut cron, &Settings::default()), Ok(Some(Ok(()))));
        assert_eq!(cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["initContainers"][1]["name"], PROXY);
    }

    #[test]
    fn bad_annotations_say_where() {
        for (annotations, field, message) in [
            (json!({"weir.io/skip-inbound-ports": "80,http"}), "weir.io/skip-inbound-ports", "\"http\" is not a port"),
            (json!({"weir.io/opaque-ports": "5432-5000"}), "weir.io/opaque-ports", "runs backwards"),
            // What `weir-proxy init` would refuse, the webhook refuses (its pod would crash-loop).
            (json!({"weir.io/skip-inbound-ports": "9000-80"}), "weir.io/skip-inbound-ports", "runs backwards"),
            (json!({"weir.io/skip-outbound-cidrs": "fd00::/8"}), "weir.io/skip-outbound-cidrs", "IPv6"),
            (json!({"weir.io/skip-outbound-cidrs": "10.0.0.0"}), "weir.io/skip-outbound-cidrs", "is not ADDR/BITS"),
            (json!({"weir.io/proxy-memory-limit": "lots"}), "weir.io/proxy-memory-limit", "not a resource quantity"),
            (json!({"weir.io/trace-collector": "otel:4317"}), "weir.io/trace-collector", "expected http://"),
            (json!({"weir.io/trace-sampling": "5%"}), "weir.io/trace-sampling", "from 0 to 1"),
            (json!({"weir.io/trace-protocol": "zipkin"}), "weir.io/trace-protocol", "grpc or http"),
        ] {
            let mut d = deployment(annotations);
            let e = inject_manifest(&mut d, &Settings::default()).unwrap_err();
            assert_eq!(e.field, format!("spec.template.metadata.annotations[{field}]"));
            assert!(e.message.contains(message), "{e}");
        }
        let mut d = json!({"kind": "Deployment", "metadata": {"name": "x"}, "spec": {}});
        assert_eq!(inject_manifest(&mut d, &Settings::default()).unwrap_err().field, "spec.template");
    }

    #[test]
    fn span_export_comes_from_the_installation_and_the_pods_annotations() {
        let env = |d: &Value| -> serde_json::Map<String, Value> {
            let proxy = &d["spec"]["template"]["spec"]["initContainers"][1];
            proxy["env"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| (e["name"].as_str().unwrap().to_string(), e["value"].clone()))
                .collect()
        };
        // Off by default.
        let mut d = deployment(json!({}));
        inject_manifest(&mut d, &Settings::default()).unwrap();
        assert!(!env(&d).contains_key("WEIR_TRACE_COLLECTOR"));
        // On for the installation; the pod's annotations adjust it, or turn it off.
        let settings = Settings {
            tracing: TraceSettings {
                collector: Some("http://otel.observability:4317".parse().unwrap()),
                attributes: vec![("deployment.environment".into(), "prod".into())],
                ..TraceSettings::default()
            },
            ..Settings::default()
        };
        let mut d = deployment(json!({}));
        inject_manifest(&mut d, &settings).unwrap();
        let e = env(&d);
        assert_eq!(e["WEIR_TRACE_COLLECTOR"], "http://otel.observability:4317/");
        assert_eq!(e["WEIR_TRACE_PROTOCOL"], "grpc");
        assert_eq!(e["WEIR_TRACE_SAMPLING"], "0.01");
        assert_eq!(e["WEIR_TRACE_ATTRIBUTES"], "k8s.pod.name=$(POD_NAME),deployment.environment=prod");
        let mut d = deployment(json!({"weir.io/trace-sampling": "1", "weir.io/trace-protocol": "http",
                                      "weir.io/trace-collector": "http://otel:4318"}));
        inject_manifest(&mut d, &settings).unwrap();
        let e = env(&d);
        assert_eq!(
            (&e["WEIR_TRACE_COLLECTOR"], &e["WEIR_TRACE_PROTOCOL"]),
            (&json!("http://otel:4318/"), &json!("http"))
        );
        assert_eq!(e["WEIR_TRACE_SAMPLING"], "1");
        let mut d = deployment(json!({"weir.io/trace-collector": "none"}));
        inject_manifest(&mut d, &settings).unwrap();
        assert!(!env(&d).contains_key("WEIR_TRACE_COLLECTOR"));
    }
}
