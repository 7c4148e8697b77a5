//! What the watched objects become: a core Service with its EndpointSlices and pods becomes a
//! Weir Service ([`service_spec`]), a custom resource a [`Definition`] parsed and validated as
//! local mode parses files ([`weir_definition`]). Pure functions of the stores' contents.

use super::*;

/// A custom resource as a definition: the same parse and validation as local mode.
pub(super) fn weir_definition(kind: Kind, obj: &DynamicObject) -> Definition {
    let key = ResourceKey::new(kind, obj.namespace().unwrap_or_default(), obj.name_any());
    let api_version = obj.types.as_ref().map(|t| t.api_version.as_str()).unwrap_or(weir_api::API_VERSION);
    let spec = obj.data.get("spec").cloned().unwrap_or_else(|| serde_json::json!({}));
    let parsed = serde_yaml::to_value(&spec)
        .map_err(|e| weir_api::validate::FieldError::new("spec", e.to_string()))
        .and_then(|spec| crate::source::local::parse_spec(kind, Some(api_version), spec))
        .map_err(|e| Problem::new(Some(e.field), e.message));
    Definition { origin: ORIGIN.into(), key: Some(key), parsed }
}

/// Whether a Weir sidecar runs in the pod.
pub fn is_meshed(pod: &Pod) -> bool {
    pod.spec.as_ref().is_some_and(|s| {
        s.containers.iter().chain(s.init_containers.iter().flatten()).any(|c| c.name == PROXY_CONTAINER)
    })
}

/// Pods by namespace and name.
pub(crate) type PodIndex<'a> = HashMap<(&'a str, &'a str), &'a Pod>;

pub(super) fn ns_name(meta: &ObjectMeta) -> (&str, &str) {
    (meta.namespace.as_deref().unwrap_or(""), meta.name.as_deref().unwrap_or(""))
}

/// A core Service and its EndpointSlices as a Weir Service; `None` for kinds the mesh does not
/// route (ExternalName).
pub(crate) fn service_spec(svc: &KubeService, slices: &[&EndpointSlice], pods: &PodIndex) -> Option<LocalServiceSpec> {
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let ns = svc.namespace().unwrap_or_default();
    let tcp = |p: &Option<String>| p.as_deref().is_none_or(|p| p == "TCP");
    let ports: Vec<&k8s_openapi::api::core::v1::ServicePort> =
        spec.ports.iter().flatten().filter(|p| tcp(&p.protocol) && (1..=65535).contains(&p.port)).collect();
    let mut cluster_ips: Vec<String> = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter())
        .filter(|ip| ip.parse::<IpAddr>().is_ok())
        .cloned()
        .collect();
    let mut seen_ips = BTreeSet::new();
    cluster_ips.retain(|ip| seen_ips.insert(ip.parse::<IpAddr>().expect("filtered")));
    // Ports the `weir.io/opaque-ports` annotation declares opaque, as appProtocol `tcp` does.
    let opaque = match svc.annotations().get(OPAQUE_PORTS) {
        None => Vec::new(),
        Some(list) => weir_api::service::parse_port_list(list).unwrap_or_else(|e| {
            tracing::warn!(service = %format!("{ns}/{}", svc.name_any()), annotation = OPAQUE_PORTS, error = %e, "annotation ignored");
            Vec::new()
        }),
    };

    // A dual-stack Service lists each pod once per family: follow its primary family.
    let family = spec.ip_families.as_ref().and_then(|f| f.first()).cloned();
    let mut slices: Vec<&EndpointSlice> = slices
        .iter()
        .copied()
        .filter(|s| s.address_type != "FQDN" && family.as_ref().is_none_or(|f| *f == s.address_type))
        .collect();
    slices.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    // (address, service port) → (ready, endpoint); the same endpoint may sit in two slices
    // while the slice controller moves it, and a ready copy wins over a terminating one.
    let mut found: BTreeMap<(SocketAddr, u16), (bool, LocalEndpoint)> = BTreeMap::new();
    for slice in slices {
        for ep in slice.endpoints.iter().flatten() {
            let conditions = ep.conditions.clone().unwrap_or_default();
            let is_ready = conditions.ready.unwrap_or(true);
            let serving = conditions.serving.unwrap_or(is_ready);
            if !is_ready && !serving {
                continue;
            }
            let Some(ip) = ep.addresses.first().and_then(|a| a.parse::<IpAddr>().ok()) else { continue };
            let pod = match ep.target_ref.as_ref().filter(|r| r.kind.as_deref() == Some("Pod")) {
                None => None,
                Some(r) => {
                    let pod = r
                        .name
                        .as_ref()
                        .and_then(|n| pods.get(&(r.namespace.as_deref().unwrap_or(&ns), n.as_str())).copied())
                        .filter(|p| r.uid.is_none() || p.metadata.uid.is_none() || r.uid == p.metadata.uid);
                    // Its pod not seen yet (or a namesake from before): leave the endpoint out
                    // rather than route to it without its identity.
                    let Some(pod) = pod else { continue };
                    Some(pod)
                }
            };
            let mut labels: BTreeMap<String, String> = pod.map(|p| p.labels().clone()).unwrap_or_default();
            if let Some(zone) = &ep.zone {
                labels.insert(ZONE_LABEL.into(), zone.clone());
            }
            for sp in &ports {
                let Some(target) = slice.ports.iter().flatten().find(|p| {
                    p.name.as_deref().unwrap_or("") == sp.name.as_deref().unwrap_or("")
                        && tcp(&p.protocol)
                        && p.port.is_some_and(|n| (1..=65535).contains(&n))
                }) else {
                    continue;
                };
                let addr = SocketAddr::new(ip, target.port.expect("filtered") as u16);
                let service_port = sp.port as u16;
                if found.get(&(addr, service_port)).is_some_and(|(r, _)| *r || !is_ready) {
                    continue;
                }
                let endpoint = LocalEndpoint {
                    address: addr.to_string(),
                    meshed: pod.is_some_and(is_meshed),
                    port: Some(service_port),
                    service_account: pod.map(|p| {
                        p.spec
                            .as_ref()
                            .and_then(|s| s.service_account_name.clone())
                            .unwrap_or_else(|| "default".to_string())
                    }),
                    labels: labels.clone(),
                    workload: pod.map(|p| p.name_any()),
                    weight: 1,
                };
                found.insert((addr, service_port), (is_ready, endpoint));
            }
        }
    }
    // Ready endpoints; when none is ready, those still serving while they terminate (so a
    // Service whose pods are all rolling keeps answering, as kube-proxy does). Sorted, so the
    // same cluster always gives the same Service.
    let any_ready = found.values().any(|(r, _)| *r);
    let endpoints = found.into_values().filter(|(r, _)| *r == any_ready).map(|(_, e)| e).collect();
    Some(LocalServiceSpec {
        ports: ports
            .iter()
            .map(|p| ServicePort {
                name: p.name.clone(),
                port: p.port as u16,
                app_protocol: if opaque.contains(&(p.port as u16)) {
                    Some("tcp".into())
                } else {
                    p.app_protocol.clone()
                },
            })
            .collect(),
        endpoints,
        cluster_ips,
    })
}
