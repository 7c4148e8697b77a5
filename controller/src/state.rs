//! The published view of the mesh: what the translator made of the index, shared through a
//! `watch` channel so every sidecar session (and the admin server) sees the newest one.
//! Its Services are encoded for the wire once ([`MeshState::services_wire`]), and so are the
//! changes from an earlier state ([`MeshState::delta_from`]) for incremental snapshots.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use weir_api::proto;

use crate::index::{Index, Rejection, ResourceKey};
use crate::wire::{Delta, Entry};

/// How many bases a state keeps computed deltas for.
const DELTAS_KEPT: usize = 4;

/// A delta to a state's Services, and the earlier Services it is from.
type DeltaFrom = (Arc<Vec<Entry>>, Arc<Delta>);

/// The Services of a state on the wire.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// Every Service, as `Snapshot.services` entries.
    pub whole: bytes::Bytes,
    /// Each Service's entry (slices of `whole`), sorted by namespace and name.
    pub entries: Arc<Vec<Entry>>,
}

#[derive(Debug)]
pub struct MeshState {
    /// Bumped on every publication.
    pub generation: u64,
    /// When the change that led to this state was first observed.
    pub changed_at: Instant,
    pub services: Arc<Vec<proto::Service>>,
    /// `services` encoded for the wire (whole, and each Service's entry within it), made on
    /// first use and shared with the next state while the services stay the same.
    services_wire: Arc<std::sync::OnceLock<Encoded>>,
    /// Incremental snapshots from earlier states' Services to these, by base (at most
    /// [`DELTAS_KEPT`]; sessions sent the same base mostly share one).
    deltas: std::sync::Mutex<Vec<DeltaFrom>>,
    pub authorizations: Arc<Vec<crate::translator::SelectedAuthorization>>,
    /// Canaries in force (the reconciler reads them from here).
    pub canaries: Arc<Vec<crate::translator::CanaryDef>>,
    /// Resources in force: key → (origin, version).
    pub resources: Arc<BTreeMap<ResourceKey, (String, u64)>>,
    pub rejections: Arc<Vec<Rejection>>,
    /// What `weir analyze` would warn about in the resources in force.
    pub warnings: Arc<Vec<crate::analyze::Finding>>,
    /// [`Self::resource_versions`], made once and shared by every session.
    resource_versions: std::sync::OnceLock<Arc<BTreeMap<ResourceKey, u64>>>,
    /// [`Self::inbound_limits`], made once and shared by every session.
    inbound_limits: std::sync::OnceLock<crate::translator::InboundLimits>,
}

impl MeshState {
    pub fn build(
        index: &Index,
        routing: &[crate::translator::CanaryRouting],
        generation: u64,
        changed_at: Instant,
        previous: Option<&MeshState>,
    ) -> Self {
        let canaries = crate::translator::definitions(index);
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
        let resources: BTreeMap<ResourceKey, (String, u64)> =
            index.entries().iter().map(|(k, e)| (k.clone(), (e.origin.clone(), e.version))).collect();
        // Warnings are about the resources in force: judged again only when they changed (a
        // canary step republishes the same resources).
        let warnings = match previous {
            Some(p) if *p.resources == resources => p.warnings.clone(),
            _ => Arc::new(crate::analyze::warnings(index)),
        };
        MeshState {
            generation,
            changed_at,
            services,
            services_wire,
            authorizations,
            canaries,
            resources: Arc::new(resources),
            rejections: Arc::new(index.rejections().to_vec()),
            warnings,
            resource_versions: std::sync::OnceLock::new(),
            inbound_limits: std::sync::OnceLock::new(),
            deltas: std::sync::Mutex::default(),
        }
    }

    /// The services as `Snapshot.services` entries on the wire (encoded once, then shared).
    pub fn services_wire(&self) -> Encoded {
        self.services_wire
            .get_or_init(|| {
                let (whole, entries) = crate::wire::encode_entries(&self.services);
                Encoded { whole, entries: Arc::new(entries) }
            })
            .clone()
    }

    /// What changed from `base` (an earlier state's entries) to this state's Services,
    /// computed once per base and shared by the sessions that sent that base.
    pub fn delta_from(&self, base: &Arc<Vec<Entry>>) -> Arc<Delta> {
        let mut deltas = self.deltas.lock().unwrap();
        if let Some((_, d)) = deltas.iter().find(|(b, _)| Arc::ptr_eq(b, base)) {
            return d.clone();
        }
        let d = Arc::new(Delta::between(base, &self.services_wire().entries));
        if deltas.len() >= DELTAS_KEPT {
            deltas.remove(0);
        }
        deltas.push((base.clone(), d.clone()));
        d
    }

    /// Inbound rate limits by the workload that serves them.
    pub fn inbound_limits(&self) -> &crate::translator::InboundLimits {
        self.inbound_limits.get_or_init(|| crate::translator::inbound_limits(&self.services))
    }

    /// Version of each resource in force (what a sidecar that acks this state has applied).
    pub fn resource_versions(&self) -> Arc<BTreeMap<ResourceKey, u64>> {
        self.resource_versions
            .get_or_init(|| Arc::new(self.resources.iter().map(|(k, (_, v))| (k.clone(), *v)).collect()))
            .clone()
    }
}
