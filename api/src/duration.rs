//! Durations as Gateway API writes them: one to four `<number><unit>` groups with units
//! `h`, `m`, `s`, `ms` (for example `250ms`, `2s`, `1m30s`).

use std::time::Duration;

/// The pattern CRD schemas use for duration strings.
pub const PATTERN: &str = r"^([0-9]{1,5}(h|m|s|ms)){1,4}$";

/// Why a duration string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: {reason} (expected e.g. \"250ms\", \"2s\", \"1m30s\")")]
pub struct ParseDurationError {
    input: String,
    reason: &'static str,
}

/// [`parse`] for a command-line flag (clap's `value_parser`), its error as text.
pub fn flag(input: &str) -> Result<Duration, String> {
    parse(input).map_err(|e| e.to_string())
}

/// Parses a Gateway-API duration string.
pub fn parse(input: &str) -> Result<Duration, ParseDurationError> {
    let err = |reason| ParseDurationError { input: input.to_string(), reason };
    if input.is_empty() {
        return Err(err("empty"));
    }
    let bytes = input.as_bytes();
    let mut total = Duration::ZERO;
    let mut i = 0;
    let mut groups = 0;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return Err(err("expected a number"));
        }
        if i - start > 5 {
            return Err(err("more than 5 digits in a number"));
        }
        let n: u64 = input[start..i].parse().map_err(|_| err("bad number"))?;
        let unit_start = i;
        while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
            i += 1;
        }
        let d = match &input[unit_start..i] {
            "h" => Duration::from_secs(n * 3600),
            "m" => Duration::from_secs(n * 60),
            "s" => Duration::from_secs(n),
            "ms" => Duration::from_millis(n),
            "" => return Err(err("missing unit")),
            _ => return Err(err("unknown unit (use h, m, s or ms)")),
        };
        total += d;
        groups += 1;
        if groups > 4 {
            return Err(err("more than 4 groups"));
        }
    }
    Ok(total)
}

/// Formats a duration in the same notation (`1m30s`, `250ms`).
pub fn format(d: Duration) -> String {
    let mut ms = d.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    for (unit, size) in [("h", 3_600_000u128), ("m", 60_000), ("s", 1000), ("ms", 1)] {
        if ms >= size {
            out.push_str(&format!("{}{unit}", ms / size));
            ms %= size;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_gateway_api_durations() {
        assert_eq!(parse("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse("1h1m1s1ms").unwrap(), Duration::from_millis(3_661_001));
        for bad in ["", "5", "s", "1.5s", "10us", "-1s", "1h1m1s1ms1ms", "123456s"] {
            assert!(parse(bad).is_err(), "{bad} should fail");
        }
        assert!(regex::Regex::new(PATTERN).unwrap().is_match("1m30s"));
    }

    #[test]
    fn formats_round_trip() {
        for s in ["250ms", "2s", "1m30s", "1h1ms"] {
            assert_eq!(format(parse(s).unwrap()), s);
        }
    }
}
