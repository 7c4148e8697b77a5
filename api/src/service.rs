//! The local-mode `Service` document: a Service with its endpoints written out, standing in
//! for a Kubernetes Service plus its EndpointSlices when Weir runs from a directory of YAML.
//!
//! ```yaml
//! kind: Service
//! metadata: { name: reviews-v1, namespace: shop }
//! spec:
//!   ports: [{ port: 80 }]
//!   endpoints:
//!   - address: 127.0.0.1:4143     # the endpoint's sidecar inbound listener
//!     meshed: true
//!     serviceAccount: reviews
//!     labels: { version: v1 }
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::validate::{FieldError, dns_label, dns_subdomain};

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LocalServiceSpec {
    /// Ports clients call; empty accepts any port.
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    #[serde(default)]
    pub endpoints: Vec<LocalEndpoint>,
    /// Virtual addresses clients may also call the Service at (a Kubernetes Service's
    /// ClusterIPs; in local mode, addresses that interception sends to the sidecar).
    #[serde(default, rename = "clusterIPs", skip_serializing_if = "Vec::is_empty")]
    pub cluster_ips: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub port: u16,
    /// As Kubernetes' `appProtocol`: `tcp` declares the port opaque (connections skip protocol
    /// detection, so protocols where the server speaks first start at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
}

impl ServicePort {
    /// Whether connections to this port are opaque TCP by declaration.
    pub fn is_opaque(&self) -> bool {
        self.app_protocol.as_deref().is_some_and(|p| p.eq_ignore_ascii_case("tcp"))
    }
}

/// One port (`8080`) or an inclusive range (`6000-6002`), as `(first, last)`.
pub fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let port = |p: &str| -> Result<u16, String> {
        p.trim().parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| format!("{p:?} is not a port (1-65535)"))
    };
    match s.split_once('-') {
        Some((a, b)) => {
            let (a, b) = (port(a)?, port(b)?);
            if a > b {
                return Err(format!("{s:?}: the range runs backwards"));
            }
            Ok((a, b))
        }
        None => port(s).map(|p| (p, p)),
    }
}

/// The ports of a list such as the `weir.io/opaque-ports` annotation: comma-separated ports
/// and ranges (`5432,6379-6380`), as Linkerd's `config.linkerd.io/opaque-ports`; sorted,
/// without duplicates.
pub fn parse_port_list(list: &str) -> Result<Vec<u16>, String> {
    let mut out = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = parse_port_range(part)?;
        out.extend(a..=b);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// An IPv4 network `ADDR/BITS` (the interception rules are IPv4 only).
pub fn parse_ipv4_cidr(s: &str) -> Result<(std::net::IpAddr, u8), String> {
    let (addr, bits) = s.trim().split_once('/').ok_or_else(|| format!("{s:?} is not ADDR/BITS"))?;
    let addr: std::net::IpAddr = addr.parse().map_err(|_| format!("{addr:?} is not an IP address"))?;
    if addr.is_ipv6() {
        return Err(format!("{s:?}: IPv6 networks are not supported yet (iptables rules are IPv4 only)"));
    }
    let bits: u8 = bits.parse().map_err(|_| format!("{bits:?} is not a prefix length"))?;
    if bits > 32 {
        return Err(format!("{s:?}: an IPv4 prefix is at most 32 bits"));
    }
    Ok((addr, bits))
}

/// A kubelet HTTP probe of an application container: the port and path it GETs. The injector
/// hands a pod's probes to its sidecar (`WEIR_PROBE_PATHS`, a JSON list of these), which
/// admits them as Linkerd's default policy does, so a strict MeshAuthorization does not fail
/// the pod's own health checks.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
pub struct ProbePath {
    pub port: u16,
    pub path: String,
}

/// Parses a JSON list of [`ProbePath`]s (empty: none); paths must start with `/`.
pub fn parse_probe_paths(json: &str) -> Result<Vec<ProbePath>, String> {
    if json.trim().is_empty() {
        return Ok(Vec::new());
    }
    let paths: Vec<ProbePath> =
        serde_json::from_str(json).map_err(|e| format!("not a JSON list of {{\"port\", \"path\"}}: {e}"))?;
    for p in &paths {
        if p.port == 0 || !p.path.starts_with('/') {
            return Err(format!("{}:{} is not a port and an absolute path", p.port, p.path));
        }
    }
    Ok(paths)
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LocalEndpoint {
    /// `ip:port` to connect to.
    pub address: String,
    /// Whether a Weir sidecar listens at `address` (traffic then rides the sidecars'
    /// multiplexed HTTP/2 hop). Default false: plain HTTP to the address.
    #[serde(default)]
    pub meshed: bool,
    /// The service port this endpoint serves; absent serves every port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Service account of the endpoint's workload (its mesh identity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Name of the workload (in the Service's namespace) whose sidecar serves this endpoint,
    /// as a Kubernetes EndpointSlice names its pod; that sidecar gets the Service's inbound
    /// policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    /// Relative share of traffic for weighted balancing (1–1000). Default 1.
    #[serde(default = "default_endpoint_weight")]
    pub weight: u32,
}

fn default_endpoint_weight() -> u32 {
    1
}

impl LocalServiceSpec {
    pub fn validate(&self) -> Result<(), FieldError> {
        let mut seen = std::collections::BTreeSet::new();
        for (i, p) in self.ports.iter().enumerate() {
            if p.port == 0 {
                return Err(FieldError::new(format!("spec.ports[{i}].port"), "0 is not a port"));
            }
            if !seen.insert(p.port) {
                return Err(FieldError::new(format!("spec.ports[{i}].port"), format!("port {} listed twice", p.port)));
            }
        }
        let mut ips = std::collections::BTreeSet::new();
        for (i, ip) in self.cluster_ips.iter().enumerate() {
            let parsed: std::net::IpAddr = ip.parse().map_err(|_| {
                FieldError::new(format!("spec.clusterIPs[{i}]"), format!("{ip:?} is not an IP address"))
            })?;
            if !ips.insert(parsed) {
                return Err(FieldError::new(format!("spec.clusterIPs[{i}]"), format!("{ip} listed twice")));
            }
        }
        let mut addrs = std::collections::BTreeSet::new();
        for (i, e) in self.endpoints.iter().enumerate() {
            let at = format!("spec.endpoints[{i}]");
            let addr: SocketAddr = e.address.parse().map_err(|_| {
                FieldError::new(format!("{at}.address"), format!("{:?} is not an ip:port address", e.address))
            })?;
            if addr.port() == 0 {
                return Err(FieldError::new(format!("{at}.address"), "port 0 cannot be connected to"));
            }
            if !addrs.insert((addr, e.port)) {
                return Err(FieldError::new(format!("{at}.address"), format!("{addr} listed twice")));
            }
            if let Some(p) = e.port
                && !self.ports.is_empty()
                && !self.ports.iter().any(|sp| sp.port == p)
            {
                return Err(FieldError::new(format!("{at}.port"), format!("{p} is not one of the service's ports")));
            }
            if !(1..=1000).contains(&e.weight) {
                return Err(FieldError::new(format!("{at}.weight"), "must be between 1 and 1000"));
            }
            if let Some(w) = &e.workload {
                dns_label(&format!("{at}.workload"), w)?;
            }
            if let Some(sa) = &e.service_account {
                dns_subdomain(&format!("{at}.serviceAccount"), sa)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod probe_path_tests {
    use super::*;

    #[test]
    fn probe_paths_parse_and_bad_ones_are_named() {
        let p = parse_probe_paths(r#"[{"port": 8080, "path": "/healthz"}]"#).unwrap();
        assert_eq!(p, [ProbePath { port: 8080, path: "/healthz".into() }]);
        assert!(parse_probe_paths("").unwrap().is_empty());
        assert!(parse_probe_paths(r#"[{"port": 8080, "path": "healthz"}]"#).unwrap_err().contains("absolute path"));
        assert!(parse_probe_paths("8080:/healthz").unwrap_err().contains("JSON list"));
    }
}

#[cfg(test)]
mod port_list_tests {
    use super::*;

    #[test]
    fn port_lists_take_ports_and_ranges_and_name_what_is_wrong() {
        assert_eq!(parse_port_list("5432, 6379-6381,5432").unwrap(), [5432, 6379, 6380, 6381]);
        assert_eq!(parse_port_list("").unwrap(), Vec::<u16>::new());
        assert!(parse_port_list("http").unwrap_err().contains("\"http\" is not a port"));
        assert!(parse_port_list("0").is_err());
        assert!(parse_port_list("70000").is_err());
        assert!(parse_port_list("90-80").unwrap_err().contains("runs backwards"));
        let p = |app: Option<&str>| ServicePort { name: None, port: 1, app_protocol: app.map(String::from) };
        assert!(p(Some("tcp")).is_opaque() && p(Some("TCP")).is_opaque());
        assert!(!p(Some("http")).is_opaque() && !p(None).is_opaque());
    }
}
