//! The registry of connected sidecars: who they are and which snapshot each has acked.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::index::ResourceKey;

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyInfo {
    pub workload: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub proxy_version: String,
    /// Where the sidecar's admin endpoints answer (`/config`), when it said.
    pub admin: Option<String>,
    pub connected_at_unix_ms: u64,
    pub sent_version: Option<String>,
    pub acked_version: Option<String>,
    pub nack: Option<NackInfo>,
    #[serde(skip)]
    pub acked_resources: Arc<BTreeMap<ResourceKey, u64>>,
}

#[derive(Clone, Debug, Serialize)]
pub struct NackInfo {
    pub version: String,
    pub reason: String,
}

#[derive(Default, Clone)]
pub struct Proxies {
    inner: Arc<Mutex<(u64, BTreeMap<u64, ProxyInfo>)>>,
}

impl Proxies {
    pub fn register(&self, info: ProxyInfo) -> u64 {
        let mut g = self.inner.lock().unwrap();
        g.0 += 1;
        let id = g.0;
        g.1.insert(id, info);
        id
    }

    pub fn unregister(&self, id: u64) {
        self.inner.lock().unwrap().1.remove(&id);
    }

    pub fn update(&self, id: u64, f: impl FnOnce(&mut ProxyInfo)) {
        if let Some(p) = self.inner.lock().unwrap().1.get_mut(&id) {
            f(p);
        }
    }

    pub fn list(&self) -> Vec<ProxyInfo> {
        self.inner.lock().unwrap().1.values().cloned().collect()
    }
}
