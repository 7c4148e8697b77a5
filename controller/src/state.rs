//! The published view of the mesh: what the translator made of the index, shared through a
//! `watch` channel so every sidecar session (and the admin server) sees the newest one.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use weir_api::proto;

use crate::index::{Index, Rejection, ResourceKey};

#[derive(Debug)]
pub struct MeshState {
    /// Bumped on every publication.
    pub generation: u64,
    /// When the change that led to this state was first observed.
    pub changed_at: Instant,
    pub services: Arc<Vec<proto::Service>>,
    /// `services` encoded for the wire, made on first use and shared with the next state
    /// while the services stay the same.
    services_wire: Arc<std::sync::OnceLock<bytes::Bytes>>,
    pub authorizations: Arc<Vec<crate::translator::SelectedAuthorization>>,
    /// Canaries in force (the reconciler reads them from here).
    pub canaries: Arc<Vec<crate::canary::CanaryDef>>,
    /// Resources in force: key → (origin, version).
    pub resources: Arc<BTreeMap<ResourceKey, (String, u64)>>,
    pub rejections: Arc<Vec<Rejection>>,
    /// [`Self::resource_versions`], made once and shared by every session.
    resource_versions: std::sync::OnceLock<Arc<BTreeMap<ResourceKey, u64>>>,
}

impl MeshState {
    pub fn build(
        index: &Index,
        routing: &[crate::canary::CanaryRouting],
        generation: u64,
        changed_at: Instant,
        previous: Option<&MeshState>,
    ) -> Self {
        let canaries = crate::canary::definitions(index);
        // Routing for Canaries that no longer exist waits for the reconciler to drop it.
        let routing: Vec<_> = routing
            .iter()
            .filter(|r| canaries.iter().any(|c| c.namespace == r.namespace && c.name == r.name))
            .cloned()
            .collect();
        let services = crate::translator::services(index, &routing);
        // Keep the same Arc when nothing changed so sessions can skip the comparison.
        let (services, services_wire) = match previous {
            Some(p) if *p.services == services => (p.services.clone(), p.services_wire.clone()),
            _ => (Arc::new(services), Arc::default()),
        };
        let authorizations = crate::translator::authorizations(index);
        let authorizations = match previous {
            Some(p) if *p.authorizations == authorizations => p.authorizations.clone(),
            _ => Arc::new(authorizations),
        };
        let canaries = match previous {
            Some(p) if *p.canaries == canaries => p.canaries.clone(),
            _ => Arc::new(canaries),
        };
        MeshState {
            generation,
            changed_at,
            services,
            services_wire,
            authorizations,
            canaries,
            resources: Arc::new(
                index.entries().iter().map(|(k, e)| (k.clone(), (e.origin.clone(), e.version))).collect(),
            ),
            rejections: Arc::new(index.rejections().to_vec()),
            resource_versions: std::sync::OnceLock::new(),
        }
    }

    /// The services as `Snapshot.services` entries on the wire (encoded once, then shared).
    pub fn services_wire(&self) -> bytes::Bytes {
        self.services_wire.get_or_init(|| crate::grpc::wire::encode_services(&self.services)).clone()
    }

    /// Version of each resource in force (what a sidecar that acks this state has applied).
    pub fn resource_versions(&self) -> Arc<BTreeMap<ResourceKey, u64>> {
        self.resource_versions
            .get_or_init(|| Arc::new(self.resources.iter().map(|(k, (_, v))| (k.clone(), *v)).collect()))
            .clone()
    }
}
