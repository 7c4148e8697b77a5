//! SPIFFE IDs of the mesh: `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`. The
//! one place they are formatted and read, by the controller's CA and the sidecars alike.

/// The SPIFFE ID of a workload running as `service_account` in `namespace`.
pub fn id(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
}

/// `(namespace, service account)` of a SPIFFE ID in `trust_domain`; `None` for any other
/// shape or trust domain.
pub fn parse<'a>(id: &'a str, trust_domain: &str) -> Option<(&'a str, &'a str)> {
    id.strip_prefix("spiffe://")
        .and_then(|rest| rest.strip_prefix(trust_domain))
        .and_then(|rest| rest.strip_prefix("/ns/"))
        .and_then(|rest| rest.split_once("/sa/"))
        .filter(|(ns, sa)| !ns.is_empty() && !sa.is_empty() && !ns.contains('/') && !sa.contains('/'))
}

/// The URI SANs of a DER certificate (a mesh certificate has exactly one, its SPIFFE ID);
/// empty when the certificate cannot be read.
pub fn ids_in_cert(cert: &[u8]) -> Vec<String> {
    use x509_parser::prelude::*;
    let Ok((_, x)) = X509Certificate::from_der(cert) else { return vec![] };
    let Ok(Some(san)) = x.subject_alternative_name() else { return vec![] };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .collect()
}

/// Reads `NAMESPACE/SERVICEACCOUNT` (a flag's value) into its two parts.
pub fn parse_account(s: &str) -> Result<(String, String), String> {
    let (ns, sa) = s.split_once('/').ok_or_else(|| format!("{s:?}: expected NAMESPACE/SERVICEACCOUNT"))?;
    for part in [ns, sa] {
        if part.is_empty() || part.contains('/') {
            return Err(format!("{s:?}: expected NAMESPACE/SERVICEACCOUNT"));
        }
    }
    Ok((ns.to_string(), sa.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_reads_back() {
        let s = id("cluster.local", "shop", "web");
        assert_eq!(s, "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(parse(&s, "cluster.local"), Some(("shop", "web")));
        assert_eq!(parse(&s, "cluster"), None, "another trust domain (a prefix of it)");
        assert_eq!(parse("spiffe://cluster.local/ns/a/b/sa/web", "cluster.local"), None);
        assert_eq!(parse("spiffe://cluster.local/ns//sa/web", "cluster.local"), None);
        assert_eq!(parse("https://cluster.local/ns/a/sa/b", "cluster.local"), None);
        assert_eq!(
            parse_account("weir-system/weir-controller").unwrap(),
            ("weir-system".into(), "weir-controller".into())
        );
        assert!(parse_account("weir-controller").is_err());
        assert!(parse_account("a/b/c").is_err());
    }
}
