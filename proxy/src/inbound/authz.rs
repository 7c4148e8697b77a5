//! Inbound authorization: the MeshAuthorizations the controller says select this workload,
//! applied to each request by client identity, transport, port, path and method.
//!
//! No policy for a port: every client is allowed. One or more: a request is served only when
//! a rule of one of them allows it; a strict policy also refuses every client without a mesh
//! identity. Paths are judged (and forwarded) in normalised form, so `/public/../admin` is
//! judged as `/admin`.

use std::borrow::Cow;
use std::sync::Arc;

use http::Method;

use crate::config::{Authorization, AuthzRule};

/// The client as authorization sees it.
#[derive(Debug, Clone, Copy)]
pub enum Client<'a> {
    /// Plaintext: no mesh identity.
    Unauthenticated,
    /// Mesh mTLS with this namespace and service account.
    Mesh { namespace: &'a str, service_account: &'a str },
    /// Mesh mTLS with a certificate whose SPIFFE ID is not `spiffe://<trust domain>/ns/N/sa/S`.
    Unrecognised,
}

impl<'a> Client<'a> {
    /// Reads a verified SPIFFE ID (`None` for plaintext clients).
    pub fn from_spiffe(id: Option<&'a str>, trust_domain: &str) -> Self {
        let Some(id) = id else { return Client::Unauthenticated };
        match weir_api::spiffe::parse(id, trust_domain) {
            Some((namespace, service_account)) => Client::Mesh { namespace, service_account },
            None => Client::Unrecognised,
        }
    }
}

/// What authorization decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// No policy applies to the port: the default, allow all.
    Default,
    Allow {
        policy: Arc<str>,
        rule: Arc<str>,
    },
    Deny {
        policy: Arc<str>,
        reason: String,
    },
}

impl AuthzRule {
    fn admits(&self, client: Client<'_>) -> bool {
        if self.any_client {
            return true;
        }
        match client {
            Client::Unauthenticated => self.unauthenticated,
            Client::Mesh { namespace, service_account } => self
                .principals
                .iter()
                .any(|(ns, sa)| (ns == "*" || ns == namespace) && (sa == "*" || sa == service_account)),
            Client::Unrecognised => false,
        }
    }

    /// `path` is `None` when it cannot be judged (see [`normalise`]): only rules that do not
    /// look at paths cover it.
    fn covers(&self, method: &Method, path: Option<&str>) -> bool {
        (self.methods.is_empty() || self.methods.contains(method))
            && (self.path_prefixes.is_empty()
                || path.is_some_and(|path| {
                    self.path_prefixes.iter().any(|p| weir_api::route::path_prefix_matches(p, path))
                }))
    }
}

/// Whether any policy applies to requests for `port`.
pub fn applies(policies: &[Authorization], port: u16) -> bool {
    policies.iter().any(|a| a.port.is_none_or(|p| p == port))
}

/// Judges a request to `port` from `client` for `method` and `path` (normalised; `None` when it
/// cannot be judged, which only path-agnostic rules allow).
pub fn decide(
    policies: &[Authorization],
    port: u16,
    client: Client<'_>,
    method: &Method,
    path: Option<&str>,
) -> Decision {
    let applicable = match judge(policies, port, client, "plaintext", |r| r.covers(method, path)) {
        Ok(decision) => return decision,
        Err(applicable) => applicable,
    };
    let who = match client {
        Client::Unauthenticated => "an unauthenticated client".to_string(),
        Client::Mesh { namespace, service_account } => format!("{namespace}/{service_account}"),
        Client::Unrecognised => "a client with an unrecognised identity".to_string(),
    };
    let names: Vec<&str> = applicable.iter().map(|a| &*a.name).collect();
    let reason = match path {
        Some(path) => format!("{} does not allow {who} to {method} {path}", names.join(", ")),
        None => format!(
            "{} does not allow {who} to {method} a path with a hidden separator or parameter (%2F, %5C, '\\', ';'); only rules without paths could",
            names.join(", ")
        ),
    };
    Decision::Deny { policy: applicable[0].name.clone(), reason }
}

/// What requests and connections are judged alike by: the policies for `port` (none: the
/// default), the strict refusal of plaintext (`what` names it in the reason), and the first
/// rule that admits `client` and `covers` it. `Err` with the policies that applied when none
/// allowed it.
fn judge<'p>(
    policies: &'p [Authorization],
    port: u16,
    client: Client<'_>,
    what: &str,
    covers: impl Fn(&AuthzRule) -> bool,
) -> Result<Decision, Vec<&'p Authorization>> {
    let applicable: Vec<&Authorization> = policies.iter().filter(|a| a.port.is_none_or(|p| p == port)).collect();
    if applicable.is_empty() {
        return Ok(Decision::Default);
    }
    if matches!(client, Client::Unauthenticated)
        && let Some(strict) = applicable.iter().find(|a| a.strict)
    {
        return Ok(Decision::Deny {
            policy: strict.name.clone(),
            reason: format!("{what} refused: {} requires mesh mTLS", strict.name),
        });
    }
    for a in &applicable {
        if let Some(rule) = a.rules.iter().find(|r| r.admits(client) && covers(r)) {
            return Ok(Decision::Allow { policy: a.name.clone(), rule: rule.name.clone() });
        }
    }
    Err(applicable)
}

/// Judges an opaque TCP connection to `port` from `client`. A connection is not a request:
/// only rules that name no paths and no methods cover it (as with Linkerd's server
/// authorizations, HTTP-level rules never admit raw TCP). Strict policies refuse plaintext.
pub fn decide_tcp(policies: &[Authorization], port: u16, client: Client<'_>) -> Decision {
    let covers = |r: &AuthzRule| r.methods.is_empty() && r.path_prefixes.is_empty();
    let applicable = match judge(policies, port, client, "plaintext TCP", covers) {
        Ok(decision) => return decision,
        Err(applicable) => applicable,
    };
    let names: Vec<&str> = applicable.iter().map(|a| &*a.name).collect();
    Decision::Deny {
        policy: applicable[0].name.clone(),
        reason: format!("{} has no rule without paths or methods admitting this TCP client", names.join(", ")),
    }
}

/// RFC 3986 dot-segment removal plus merged slashes, after decoding `%2E` (a dot); `None` when
/// the path hides a separator (`%2F`, `%5C`, a backslash) or carries segment parameters (`;`,
/// `%3B`: servers that strip them would see `/a/..;/b` as `/b`), which cannot be judged safely.
pub fn normalise(path: &str) -> Option<Cow<'_, str>> {
    let lower = path.to_ascii_lowercase();
    if lower.contains("%2f") || lower.contains("%5c") || lower.contains("%3b") || path.contains(['\\', ';']) {
        return None;
    }
    let needs_work = lower.contains("%2e") || path.contains("//") || path.split('/').any(|s| s == "." || s == "..");
    if !needs_work {
        return Some(Cow::Borrowed(path));
    }
    let decoded = replace_ci(path, "%2e", ".");
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            "." => {}
            ".." => {
                out.pop();
            }
            "" if i != last => {}
            s => out.push(s),
        }
    }
    // A trailing `.` or `..` leaves a directory: keep the trailing slash.
    let trailing = matches!(segments.last(), Some(&"." | &".."));
    let mut s = String::with_capacity(decoded.len());
    for seg in &out {
        s.push('/');
        s.push_str(seg);
    }
    if s.is_empty() || trailing {
        s.push('/');
    }
    Some(Cow::Owned(s))
}

fn replace_ci(s: &str, needle: &str, with: &str) -> String {
    let lower = s.to_ascii_lowercase();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while let Some(at) = lower[i..].find(needle) {
        out.push_str(&s[i..i + at]);
        out.push_str(with);
        i += at + needle.len();
    }
    out.push_str(&s[i..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(strict: bool, rules: Vec<AuthzRule>) -> Authorization {
        Authorization { name: "shop/reviews".into(), port: None, strict, rules }
    }

    fn rule(principals: &[(&str, &str)], paths: &[&str], methods: &[Method]) -> AuthzRule {
        AuthzRule {
            name: "r".into(),
            any_client: false,
            unauthenticated: false,
            principals: principals.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect(),
            path_prefixes: paths.iter().map(|p| p.to_string()).collect(),
            methods: methods.to_vec(),
        }
    }

    const FRONTEND: Client<'static> = Client::Mesh { namespace: "shop", service_account: "frontend" };
    const OTHER: Client<'static> = Client::Mesh { namespace: "other", service_account: "frontend" };

    #[test]
    fn tcp_is_judged_by_rules_without_paths_or_methods() {
        assert_eq!(decide_tcp(&[], 5432, Client::Unauthenticated), Decision::Default);
        let mut open = rule(&[], &[], &[]);
        open.unauthenticated = true;
        let permissive = policy(false, vec![open.clone()]);
        assert!(matches!(decide_tcp(&[permissive], 5432, Client::Unauthenticated), Decision::Allow { .. }));
        // Strict: plaintext never, whatever the rules.
        let strict = policy(true, vec![open, rule(&[("shop", "frontend")], &[], &[])]);
        let Decision::Deny { reason, .. } = decide_tcp(std::slice::from_ref(&strict), 5432, Client::Unauthenticated)
        else {
            panic!("plaintext TCP admitted by a strict policy")
        };
        assert!(reason.contains("plaintext TCP refused"), "{reason}");
        assert!(matches!(decide_tcp(std::slice::from_ref(&strict), 5432, FRONTEND), Decision::Allow { .. }));
        assert!(matches!(decide_tcp(&[strict], 5432, OTHER), Decision::Deny { .. }));
        // A rule about paths or methods admits requests, not connections.
        let http_only = policy(
            true,
            vec![rule(&[("shop", "frontend")], &["/api"], &[]), rule(&[("shop", "frontend")], &[], &[Method::GET])],
        );
        assert!(matches!(decide_tcp(&[http_only], 5432, FRONTEND), Decision::Deny { .. }));
        // Another port's policy does not apply.
        let mut elsewhere = policy(true, vec![]);
        elsewhere.port = Some(80);
        assert_eq!(decide_tcp(&[elsewhere], 5432, Client::Unauthenticated), Decision::Default);
    }

    #[test]
    fn no_policy_allows_everyone() {
        assert_eq!(decide(&[], 80, Client::Unauthenticated, &Method::POST, Some("/")), Decision::Default);
        let mut p = policy(true, vec![]);
        p.port = Some(81);
        assert_eq!(decide(&[p], 80, Client::Unauthenticated, &Method::GET, Some("/")), Decision::Default);
    }

    #[test]
    fn rules_narrow_by_identity_path_and_method() {
        let p = [policy(false, vec![rule(&[("shop", "frontend")], &["/api"], &[Method::GET])])];
        assert!(matches!(decide(&p, 80, FRONTEND, &Method::GET, Some("/api/x")), Decision::Allow { .. }));
        assert!(matches!(decide(&p, 80, FRONTEND, &Method::GET, Some("/apix")), Decision::Deny { .. }));
        assert!(matches!(decide(&p, 80, FRONTEND, &Method::POST, Some("/api")), Decision::Deny { .. }));
        let Decision::Deny { reason, .. } = decide(&p, 80, OTHER, &Method::GET, Some("/api")) else { panic!() };
        assert_eq!(reason, "shop/reviews does not allow other/frontend to GET /api");
        assert!(matches!(decide(&p, 80, Client::Unrecognised, &Method::GET, Some("/api")), Decision::Deny { .. }));
        // Namespace wildcard.
        let p = [policy(false, vec![rule(&[("other", "*")], &[], &[])])];
        assert!(matches!(decide(&p, 80, OTHER, &Method::DELETE, Some("/")), Decision::Allow { .. }));
        assert!(matches!(decide(&p, 80, FRONTEND, &Method::DELETE, Some("/")), Decision::Deny { .. }));
    }

    #[test]
    fn strict_refuses_plaintext_even_when_a_rule_would_allow_it() {
        let mut any = rule(&[], &[], &[]);
        any.any_client = true;
        let p = [policy(true, vec![any.clone()])];
        let Decision::Deny { reason, .. } = decide(&p, 80, Client::Unauthenticated, &Method::GET, Some("/")) else {
            panic!()
        };
        assert!(reason.starts_with("plaintext refused"), "{reason}");
        assert!(matches!(decide(&p, 80, FRONTEND, &Method::GET, Some("/")), Decision::Allow { .. }));
        let p = [policy(false, vec![any])];
        assert!(matches!(decide(&p, 80, Client::Unauthenticated, &Method::GET, Some("/")), Decision::Allow { .. }));
    }

    #[test]
    fn spiffe_ids_parse_only_in_our_trust_domain() {
        let c = Client::from_spiffe(Some("spiffe://td/ns/shop/sa/frontend"), "td");
        assert!(matches!(c, Client::Mesh { namespace: "shop", service_account: "frontend" }));
        assert!(matches!(Client::from_spiffe(Some("spiffe://tdx/ns/shop/sa/f"), "td"), Client::Unrecognised));
        assert!(matches!(Client::from_spiffe(Some("spiffe://td/ns/a/b/sa/f"), "td"), Client::Unrecognised));
        assert!(matches!(Client::from_spiffe(None, "td"), Client::Unauthenticated));
    }

    #[test]
    fn paths_are_normalised_before_judging() {
        assert_eq!(normalise("/api/x").unwrap(), "/api/x");
        assert_eq!(normalise("/public/../admin").unwrap(), "/admin");
        assert_eq!(normalise("/public/%2e%2E/admin").unwrap(), "/admin");
        assert_eq!(normalise("//admin//x").unwrap(), "/admin/x");
        assert_eq!(normalise("/a/./b/").unwrap(), "/a/b/");
        assert_eq!(normalise("/../..").unwrap(), "/");
        assert_eq!(normalise("/a/b/..").unwrap(), "/a/");
        assert!(normalise("/public%2F..%2Fadmin").is_none());
        assert!(normalise("/public\\..\\admin").is_none());
        assert!(normalise("/public/..;/admin").is_none());
        assert!(normalise("/public/%2e%2e%3B/admin").is_none());
    }

    #[test]
    fn unjudgeable_paths_pass_only_path_agnostic_rules() {
        let paths = [policy(false, vec![rule(&[("shop", "frontend")], &["/public"], &[])])];
        assert!(matches!(decide(&paths, 80, FRONTEND, &Method::GET, None), Decision::Deny { .. }));
        let any_path = [policy(false, vec![rule(&[("shop", "frontend")], &[], &[Method::GET])])];
        assert!(matches!(decide(&any_path, 80, FRONTEND, &Method::GET, None), Decision::Allow { .. }));
    }
}
