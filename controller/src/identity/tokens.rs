//! Local mode's token table: a file of `TOKEN NAMESPACE/SERVICEACCOUNT` lines (`#` comments),
//! read on every request so edits apply at once.

use std::path::{Path, PathBuf};

/// The workload a token proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proven {
    pub namespace: String,
    pub service_account: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("unknown token")]
    Unknown,
    #[error("token table {path}: {message}")]
    Table { path: PathBuf, message: String },
}

/// Looks `token` up in the table at `path`.
pub fn verify(path: &Path, token: &str) -> Result<Proven, TokenError> {
    let table = |message: String| TokenError::Table { path: path.to_path_buf(), message };
    let text = std::fs::read_to_string(path).map_err(|e| table(e.to_string()))?;
    if token.is_empty() {
        return Err(TokenError::Unknown);
    }
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.split_whitespace();
        let (Some(t), Some(who), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(table(format!("line {}: expected `TOKEN NAMESPACE/SERVICEACCOUNT`", i + 1)));
        };
        let Some((ns, sa)) = who.split_once('/') else {
            return Err(table(format!("line {}: {who:?} is not NAMESPACE/SERVICEACCOUNT", i + 1)));
        };
        if constant_time_eq(t.as_bytes(), token.as_bytes()) {
            return Ok(Proven { namespace: ns.to_string(), service_account: sa.to_string() });
        }
    }
    Err(TokenError::Unknown)
}

/// Compares without an early exit on the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_map_to_service_accounts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "# comment\nabc shop/reviews\n\ndef shop/web\n").unwrap();
        assert_eq!(verify(&path, "def").unwrap(), Proven { namespace: "shop".into(), service_account: "web".into() });
        assert_eq!(verify(&path, "nope"), Err(TokenError::Unknown));
        assert_eq!(verify(&path, ""), Err(TokenError::Unknown));
        std::fs::write(&path, "abc\n").unwrap();
        assert!(matches!(verify(&path, "abc"), Err(TokenError::Table { .. })));
    }
}
