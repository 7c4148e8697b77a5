//! MeshAuthorizations as the sidecar holds them, validated from the protocol message (the
//! inbound path judges requests against them: `inbound::authz`).

use std::sync::Arc;

use http::Method;
use weir_api::proto;

/// One MeshAuthorization, ready to judge requests.
#[derive(Debug, Clone)]
pub struct Authorization {
    /// `namespace/name` of the resource.
    pub name: Arc<str>,
    /// `None`: every port.
    pub port: Option<u16>,
    pub strict: bool,
    pub rules: Vec<AuthzRule>,
}

/// One rule of a MeshAuthorization: who (any client, plaintext clients, principals) may call
/// which paths with which methods.
#[derive(Debug, Clone)]
pub struct AuthzRule {
    pub name: Arc<str>,
    pub any_client: bool,
    pub unauthenticated: bool,
    /// (namespace, service account); `*` matches anything.
    pub principals: Vec<(String, String)>,
    pub path_prefixes: Vec<String>,
    pub methods: Vec<Method>,
}

impl TryFrom<&proto::Authorization> for Authorization {
    type Error = String;

    fn try_from(a: &proto::Authorization) -> Result<Self, String> {
        let port =
            u16::try_from(a.port).map_err(|_| format!("authorization {}: port {} is not a port", a.name, a.port))?;
        let mut rules = Vec::with_capacity(a.rules.len());
        for r in &a.rules {
            let bad = |what: String| format!("authorization {} rule {}: {what}", a.name, r.name);
            let methods = r
                .methods
                .iter()
                .map(|m| Method::from_bytes(m.as_bytes()).map_err(|_| bad(format!("{m:?} is not a method"))))
                .collect::<Result<Vec<_>, _>>()?;
            if let Some(p) = r.path_prefixes.iter().find(|p| !p.starts_with('/')) {
                return Err(bad(format!("path prefix {p:?} does not start with '/'")));
            }
            rules.push(AuthzRule {
                name: r.name.as_str().into(),
                any_client: r.any_client,
                unauthenticated: r.unauthenticated,
                principals: r.principals.iter().map(|p| (p.namespace.clone(), p.service_account.clone())).collect(),
                path_prefixes: r.path_prefixes.clone(),
                methods,
            });
        }
        Ok(Authorization { name: a.name.as_str().into(), port: (port != 0).then_some(port), strict: a.strict, rules })
    }
}
