//! Span export settings as flags, chart values and pod annotations give them: parsed and
//! checked in one place for the sidecar (which exports) and the injector (which passes them on).

use std::fmt;
use std::str::FromStr;

/// How spans travel to the collector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// OTLP/gRPC (`TraceService/Export`, usually port 4317).
    Grpc,
    /// OTLP/HTTP with a protobuf body (`POST /v1/traces`, usually port 4318).
    Http,
}

impl FromStr for Protocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "grpc" => Ok(Protocol::Grpc),
            "http" => Ok(Protocol::Http),
            _ => Err(format!("{s:?} is not an OTLP protocol: expected grpc or http")),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Grpc => "grpc",
            Protocol::Http => "http",
        })
    }
}

/// A collector address: `http://host:port[/path]` (its plaintext OTLP receiver).
pub fn parse_collector(s: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = s.parse().map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(format!(
                "{s:?}: TLS to the collector is not supported; give its plaintext OTLP receiver (http://), reached over the cluster network"
            ));
        }
        _ => return Err(format!("{s:?}: expected http://HOST:PORT")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{s:?}: no host"));
    }
    Ok(uri)
}

/// A sampling ratio: a number from 0 to 1.
pub fn parse_sampling(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("{s:?} is not a sampling ratio: expected a number from 0 to 1")),
    }
}

/// A resource attribute, `key=value`.
pub fn parse_attribute(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("{s:?}: expected key=value")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_checked() {
        assert!(parse_collector("http://otel-collector.observability:4317").is_ok());
        assert!(parse_collector("https://c:4317").unwrap_err().contains("TLS"));
        assert!(parse_collector("c:4317").unwrap_err().contains("expected http://"));
        assert!(parse_collector("http://").is_err());
        assert_eq!(parse_sampling("0.25"), Ok(0.25));
        assert!(parse_sampling("1.5").unwrap_err().contains("from 0 to 1"));
        assert!(parse_sampling("all").is_err());
        assert_eq!("http".parse(), Ok(Protocol::Http));
        assert!("zipkin".parse::<Protocol>().unwrap_err().contains("grpc or http"));
        assert_eq!(parse_attribute("team=payments"), Ok(("team".into(), "payments".into())));
        assert!(parse_attribute("=x").is_err());
    }
}
