//! Route matching and the weighted backend choice.

use std::sync::Arc;

use http::request::Parts;

use crate::config::{Backend, Match, Rule, Service};

/// Where a request goes: the rule that matched (if any) and the backend chosen by weight.
#[derive(Debug, Clone)]
pub struct Target {
    /// Label values: `""` for the default route.
    pub route: Arc<str>,
    pub rule: Arc<str>,
    /// The metrics `route` label: `""` for the default route, else `namespace/route:rule`.
    pub label: Arc<str>,
    pub backend: Arc<str>,
    pub backend_port: Option<u16>,
    pub timeout: Option<std::time::Duration>,
}

/// Picks the first matching rule and a backend by weight. Requests that match no rule (or a
/// Service with no rules) go to the Service itself. `None` when every weight is 0.
pub fn select(svc: &Service, req: &Parts, random: impl FnOnce(u64) -> u64) -> Option<Target> {
    let Some(rule) = svc.rules.iter().find(|r| rule_matches(r, req)) else {
        let none: Arc<str> = EMPTY.with(Arc::clone);
        return Some(Target {
            route: none.clone(),
            rule: none.clone(),
            label: none,
            backend: svc.key.clone(),
            backend_port: None,
            timeout: None,
        });
    };
    let backend = pick_weighted(&rule.backends, random)?;
    Some(Target {
        route: rule.route.clone(),
        rule: rule.name.clone(),
        label: rule.label.clone(),
        backend: backend.service.clone(),
        backend_port: backend.port,
        timeout: rule.timeout,
    })
}

thread_local! {
    /// One shared empty label, so the default route allocates nothing per request.
    static EMPTY: Arc<str> = Arc::from("");
}

fn pick_weighted(backends: &[Backend], random: impl FnOnce(u64) -> u64) -> Option<&Backend> {
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut n = random(total);
    for b in backends {
        let w = u64::from(b.weight);
        if n < w {
            return Some(b);
        }
        n -= w;
    }
    None
}

fn rule_matches(rule: &Rule, req: &Parts) -> bool {
    rule.matches.is_empty() || rule.matches.iter().any(|m| match_one(m, req))
}

fn match_one(m: &Match, req: &Parts) -> bool {
    if let Some(method) = &m.method
        && req.method != method
    {
        return false;
    }
    if let Some(p) = &m.path
        && !p.matches(req.uri.path())
    {
        return false;
    }
    for (name, want) in &m.headers {
        // Several values for one header are matched as their comma-joined list.
        let values: Vec<&str> = req.headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).collect();
        if values.is_empty() || !want.matches(&values.join(",")) {
            return false;
        }
    }
    if !m.query.is_empty() {
        let query = req.uri.query().unwrap_or("");
        for (name, want) in &m.query {
            let found =
                query.split('&').filter_map(|kv| kv.split_once('=').or(Some((kv, "")))).find(|(k, _)| k == name);
            match found {
                Some((_, v)) if want.matches(&percent_decode(v)) => {}
                _ => return false,
            }
        }
    }
    true
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StrMatch;

    fn backend(name: &str, weight: u32) -> Backend {
        Backend { service: name.into(), port: None, weight }
    }

    fn parts(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn svc(rules: Vec<Rule>) -> Service {
        Service {
            key: "ns/web".into(),
            ports: vec![],
            opaque_ports: vec![],
            endpoints: vec![],
            rules,
            policies: vec![],
            mtls: false,
        }
    }

    fn rule(name: &str, m: Vec<Match>, backends: Vec<Backend>) -> Rule {
        Rule {
            route: "ns/r".into(),
            name: name.into(),
            label: format!("ns/r:{name}").into(),
            matches: m,
            backends,
            timeout: None,
        }
    }

    #[test]
    fn weights_partition_the_range() {
        let bs = [backend("a", 80), backend("b", 20), backend("c", 0)];
        assert_eq!(&*pick_weighted(&bs, |_| 0).unwrap().service, "a");
        assert_eq!(&*pick_weighted(&bs, |_| 79).unwrap().service, "a");
        assert_eq!(&*pick_weighted(&bs, |_| 80).unwrap().service, "b");
        assert_eq!(&*pick_weighted(&bs, |_| 99).unwrap().service, "b");
        assert!(pick_weighted(&[backend("z", 0)], |_| 0).is_none());
    }

    #[test]
    fn first_matching_rule_wins() {
        let s = svc(vec![
            rule(
                "hdr",
                vec![Match {
                    headers: vec![("x-user".parse().unwrap(), StrMatch::Exact("jason".into()))],
                    ..Default::default()
                }],
                vec![backend("v2", 1)],
            ),
            rule(
                "api",
                vec![Match {
                    path: Some(StrMatch::Prefix("/api".into())),
                    method: Some(http::Method::POST),
                    query: vec![("q".into(), StrMatch::Exact("a b".into()))],
                    ..Default::default()
                }],
                vec![backend("v3", 1)],
            ),
            rule("all", vec![], vec![backend("v1", 1)]),
        ]);
        let pick = |p: Parts| select(&s, &p, |_| 0).unwrap();
        assert_eq!(&*pick(parts("GET", "/api", &[("x-user", "jason")])).rule, "hdr");
        assert_eq!(&*pick(parts("POST", "/api/x?q=a%20b", &[])).backend, "v3");
        assert_eq!(&*pick(parts("POST", "/api/x?q=a+b&z=1", &[])).backend, "v3");
        assert_eq!(&*pick(parts("GET", "/api/x?q=a+b", &[])).backend, "v1");
        assert_eq!(&*pick(parts("POST", "/apix?q=a+b", &[])).backend, "v1");
    }

    #[test]
    fn no_rules_go_to_the_service() {
        let s = svc(vec![]);
        let t = select(&s, &parts("GET", "/", &[]), |_| 0).unwrap();
        assert_eq!(&*t.backend, "ns/web");
        assert_eq!(&*t.route, "");
    }

    #[test]
    fn decodes_percent_escapes() {
        assert_eq!(percent_decode("a%20b+c%zz%4"), "a b c%zz%4");
    }
}
