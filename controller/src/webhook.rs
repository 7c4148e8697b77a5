//! The sidecar injection admission webhook (HTTPS, `--webhook-addr`): answers AdmissionReviews
//! for Pod creations with a JSON patch made by [`crate::inject`].
//!
//! Two paths, one per entry of the MutatingWebhookConfiguration:
//! - `/inject/namespace`: for namespaces labelled `weir.io/inject=enabled` (the entry's
//!   namespaceSelector): every pod is injected unless it says `weir.io/inject: disabled`;
//! - `/inject/pod`: for every other namespace: only pods annotated `weir.io/inject: enabled`.
//!
//! A pod that cannot be injected (a malformed annotation) is refused with the reason, so the
//! user sees it in the ReplicaSet's events; anything else is allowed unchanged.

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use base64::Engine;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use weir_api::rt::Drain;

use crate::identity::CaRx;
use crate::inject::{INJECT, Settings, inject_pod};

/// Largest AdmissionReview accepted.
const MAX_BODY: usize = 4 << 20;

/// Which webhook entry called.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// The namespace opted in.
    Namespace,
    /// Only pods that opt in themselves.
    Pod,
}

/// The TLS identity from `dir/tls.crt` and `dir/tls.key` (what a Kubernetes TLS Secret holds).
pub fn load_tls(dir: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join("tls.crt"))
        .with_context(|| format!("reading {}", dir.join("tls.crt").display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing {}", dir.join("tls.crt").display()))?;
    if certs.is_empty() {
        anyhow::bail!("{} holds no certificate", dir.join("tls.crt").display());
    }
    let key = PrivateKeyDer::from_pem_file(dir.join("tls.key"))
        .with_context(|| format!("reading {}", dir.join("tls.key").display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the webhook certificate and key do not match")?;
    Ok(Arc::new(config))
}

/// Answers one AdmissionReview.
pub fn review(scope: Scope, review: &Value, settings: &Settings) -> Result<Value, String> {
    let request = review.get("request").filter(|r| r.is_object()).ok_or("not an AdmissionReview: no request")?;
    let uid = request.get("uid").and_then(|u| u.as_str()).ok_or("request.uid is missing")?;
    let answer = |response: Value| {
        let mut r = json!({ "uid": uid });
        if let (Some(out), Some(extra)) = (r.as_object_mut(), response.as_object()) {
            out.extend(extra.clone());
        }
        json!({ "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": r })
    };
    let allowed = || answer(json!({ "allowed": true }));
    if request["kind"]["kind"] != "Pod" || request["operation"] != "CREATE" {
        return Ok(allowed());
    }
    let original = request.get("object").filter(|o| o.is_object()).ok_or("request.object is missing")?;
    let opted = original["metadata"]["annotations"][INJECT].as_str();
    if scope == Scope::Pod && opted != Some("enabled") {
        return Ok(allowed());
    }
    let mut pod = original.clone();
    match inject_pod(&mut pod, settings) {
        Ok(Some(_)) => Ok(allowed()),
        Ok(None) => {
            let patch = json_patch(original, &pod);
            let encoded = base64::engine::general_purpose::STANDARD.encode(patch.to_string());
            Ok(answer(json!({ "allowed": true, "patchType": "JSONPatch", "patch": encoded })))
        }
        Err(e) => Ok(answer(json!({
            "allowed": false,
            "status": { "code": 400, "message": format!("weir sidecar injection: {e}") },
        }))),
    }
}

/// The JSON patch from `before` to `after` over what injection changes.
fn json_patch(before: &Value, after: &Value) -> Value {
    let mut ops = Vec::new();
    let changed = [
        ("/spec", "initContainers"),
        ("/spec", "volumes"),
        ("/spec", "imagePullSecrets"),
        ("/metadata", "annotations"),
    ];
    for (parent, key) in changed {
        let pointer = format!("{parent}/{key}");
        let (b, a) = (before.pointer(&pointer), after.pointer(&pointer));
        match (b, a) {
            (None, Some(a)) => ops.push(json!({ "op": "add", "path": pointer, "value": a })),
            (Some(b), Some(a)) if a != b => ops.push(json!({ "op": "replace", "path": pointer, "value": a })),
            _ => {}
        }
    }
    Value::Array(ops)
}

async fn handle(req: Request<Incoming>, settings: Arc<Settings>, ca: CaRx) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r
    };
    let scope = match (req.method(), req.uri().path()) {
        (&http::Method::POST, "/inject/namespace") => Scope::Namespace,
        (&http::Method::POST, "/inject/pod") => Scope::Pod,
        _ => {
            return reply(
                StatusCode::NOT_FOUND,
                "POST an AdmissionReview to /inject/namespace or /inject/pod\n".into(),
            );
        }
    };
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return reply(StatusCode::PAYLOAD_TOO_LARGE, format!("reading the request: {e}\n")),
    };
    let parsed: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return reply(StatusCode::BAD_REQUEST, format!("not JSON: {e}\n")),
    };
    // The trust bundle in force now: a pod created after a rotation gets the new anchors.
    let settings = Settings { trust_anchors_pem: ca.borrow().roots_pem(), ..Settings::clone(&settings) };
    match review(scope, &parsed, &settings) {
        Ok(answer) => {
            let mut r = reply(StatusCode::OK, answer.to_string());
            r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
            r
        }
        Err(e) => reply(StatusCode::BAD_REQUEST, format!("{e}\n")),
    }
}

/// Serves the webhook over TLS until drained.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    settings: Settings,
    ca: CaRx,
    drain: Drain,
    grace: Duration,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let settings = Arc::new(settings);
    let limits = weir_api::server::Limits::admin();
    weir_api::server::serve(listener, &limits, drain, grace, "webhook", move |stream, conn| {
        let (acceptor, settings, ca) = (acceptor.clone(), settings.clone(), ca.clone());
        async move {
            let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => return tracing::debug!(error = %e, "webhook TLS handshake failed"),
                Err(_) => return tracing::debug!("webhook TLS handshake timed out"),
            };
            let svc = hyper::service::service_fn(move |req| {
                let (settings, ca) = (settings.clone(), ca.clone());
                async move { Ok::<_, Infallible>(handle(req, settings, ca).await) }
            });
            if let Err(e) = conn.serve_http(tls, svc).await {
                tracing::debug!(error = %e, "webhook connection ended with an error");
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(pod: Value) -> Value {
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
               "request": {"uid": "u-1", "kind": {"group": "", "version": "v1", "kind": "Pod"}, "operation": "CREATE",
                           "namespace": "shop", "object": pod}})
    }

    #[test]
    fn patches_only_what_injection_changed() {
        let pod = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "app"}]}});
        let answer = review(Scope::Namespace, &admission(pod), &Settings::default()).unwrap();
        assert_eq!(answer["response"]["uid"], "u-1");
        assert_eq!(answer["response"]["allowed"], true);
        let patch: Value = serde_json::from_slice(
            &base64::engine::general_purpose::STANDARD.decode(answer["response"]["patch"].as_str().unwrap()).unwrap(),
        )
        .unwrap();
        let paths: Vec<&str> = patch.as_array().unwrap().iter().map(|o| o["path"].as_str().unwrap()).collect();
        assert_eq!(paths, ["/spec/initContainers", "/spec/volumes", "/metadata/annotations"]);
        assert!(patch.as_array().unwrap().iter().all(|o| o["op"] == "add"));

        // With pull secrets for the proxy image: added beside the pod's own, once.
        let settings = Settings { image_pull_secrets: vec!["regcred".into(), "own".into()], ..Settings::default() };
        let pod = json!({"metadata": {"name": "p"},
                         "spec": {"containers": [{"name": "app"}], "imagePullSecrets": [{"name": "own"}]}});
        let answer = review(Scope::Namespace, &admission(pod), &settings).unwrap();
        let patch: Value = serde_json::from_slice(
            &base64::engine::general_purpose::STANDARD.decode(answer["response"]["patch"].as_str().unwrap()).unwrap(),
        )
        .unwrap();
        let op = patch.as_array().unwrap().iter().find(|o| o["path"] == "/spec/imagePullSecrets").unwrap();
        assert_eq!((&op["op"], &op["value"]), (&json!("replace"), &json!([{"name": "own"}, {"name": "regcred"}])));
    }

    #[test]
    fn not_a_review_is_an_error() {
        assert!(review(Scope::Pod, &json!({"kind": "AdmissionReview"}), &Settings::default()).is_err());
    }
}
