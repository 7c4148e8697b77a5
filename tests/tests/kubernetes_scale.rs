//! A measurement, not a check (ignored by default; numbers only mean something in release):
//! a synthetic cluster of 1,000 Services with 10,000 endpoints (and their pods) served by the
//! fake API server; reports the controller's time to first serve, the time a change takes to
//! reach a sidecar, and the controller's memory.
//!
//! ```sh
//! cargo test --release -p weir-tests --test kubernetes_scale -- --ignored --nocapture
//! ```

use std::time::{Duration, Instant};

use serde_json::json;
use weir_tests::fake_kube::FakeKube;
use weir_tests::*;

const SERVICES: usize = 1_000;
const ENDPOINTS_PER_SERVICE: usize = 10;

fn slice(ns: &str, svc: usize, endpoints: usize) -> serde_json::Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("svc-{svc}-abcde"), "namespace": ns, "labels": {"kubernetes.io/service-name": format!("svc-{svc}")}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": (0..endpoints).map(|e| json!({
            "addresses": [format!("10.{}.{}.{}", 1 + svc / 250, svc % 250, 1 + e)],
            "conditions": {"ready": true, "serving": true, "terminating": false},
            "targetRef": {"kind": "Pod", "name": format!("svc-{svc}-{e}"), "namespace": ns},
            "zone": format!("zone-{}", e % 3)
        })).collect::<Vec<_>>()
    })
}

fn pod(ns: &str, svc: usize, e: usize) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Pod",
                       "metadata": {"name": format!("svc-{svc}-{e}"), "namespace": ns,
                                    "labels": {"app": format!("svc-{svc}"), "pod-template-hash": "7d9f8c6b5"},
                                    "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "x".repeat(512)}},
                       "spec": {"serviceAccountName": format!("svc-{svc}"),
                                "containers": [{"name": "app", "image": "registry.example/app:1.2.3",
                                                "env": [{"name": "A", "value": "1"}], "ports": [{"containerPort": 8080}]}],
                                "initContainers": [{"name": "weir-proxy", "image": "weir-proxy:dev", "restartPolicy": "Always"}]},
                       "status": {"phase": "Running", "podIP": format!("10.{}.{}.{}", 1 + svc / 250, svc % 250, 1 + e)}})
}

async fn applied(admin: std::net::SocketAddr) -> f64 {
    admin_text(admin, "/metrics")
        .await
        .lines()
        .find_map(|l| l.strip_prefix("weir_snapshots_applied_total ").and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run explicitly, in release"]
async fn thousand_services_ten_thousand_endpoints() {
    let fake = FakeKube::start().await;
    let scratch = Scratch::new();
    let ns = "scale";
    for svc in 0..SERVICES {
        fake.create(
            "api/v1/services",
            json!({"apiVersion": "v1", "kind": "Service",
                   "metadata": {"name": format!("svc-{svc}"), "namespace": ns, "labels": {"app": format!("svc-{svc}")}},
                   "spec": {"clusterIP": format!("10.96.{}.{}", svc / 250, 1 + svc % 250),
                            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}}),
        );
        for e in 0..ENDPOINTS_PER_SERVICE {
            fake.create("api/v1/pods", pod(ns, svc, e));
        }
        fake.create("apis/discovery.k8s.io/v1/endpointslices", slice(ns, svc, ENDPOINTS_PER_SERVICE));
    }
    let kubeconfig = fake.kubeconfig(scratch.dir.path());
    let args = kube_controller_args(&kubeconfig, "debug,kube=info,tower=info,hyper=info,h2=info", &[]);
    let program = bin("weir-controller");
    let started = Instant::now();
    let controller = ChildProc::spawn("controller", &program, &args, scratch.log("controller")).await.unwrap();
    let serving = started.elapsed();

    let sidecar = scratch.proxy(controller.addr("grpc"), "scale/client", None).await;
    let admin = sidecar.addr("admin");
    wait_until("the first snapshot", Duration::from_secs(120), || async { applied(admin).await >= 1.0 }).await;
    let first_snapshot = started.elapsed();
    let (_, rss_synced) = controller.memory_kib().unwrap();
    let config = admin_json(admin, "/config").await;
    let services = config["snapshot"]["services"].as_array().map(|s| s.len()).unwrap_or(0);
    let endpoints: usize = config["snapshot"]["services"]
        .as_array()
        .map(|s| s.iter().map(|s| s["endpoints"].as_array().map(|e| e.len()).unwrap_or(0)).sum())
        .unwrap_or(0);
    assert_eq!((services, endpoints), (SERVICES, SERVICES * ENDPOINTS_PER_SERVICE));

    // With WEIR_PERF=FILE, the change phase runs under `perf record` of the controller.
    let perf = std::env::var("WEIR_PERF").ok().map(|out| {
        std::process::Command::new("perf")
            .args(["record", "-F", "2000", "-g", "-o", &out, "-p", &controller.pid().to_string()])
            .spawn()
            .expect("perf")
    });
    let rounds: usize = std::env::var("WEIR_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(10);
    // One Service scales up: API write → sidecar applied, `rounds` times.
    let mut changes = Vec::new();
    for round in 0..rounds {
        let before = applied(admin).await;
        // The new endpoint's pod exists first, as in a real scale-up.
        fake.create("api/v1/pods", pod(ns, round, ENDPOINTS_PER_SERVICE));
        let t = Instant::now();
        fake.update("apis/discovery.k8s.io/v1/endpointslices", slice(ns, round, ENDPOINTS_PER_SERVICE + 1));
        wait_until("the change applied", Duration::from_secs(30), || async { applied(admin).await > before }).await;
        changes.push(t.elapsed());
    }
    if let Some(mut perf) = perf {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(perf.id() as i32), nix::sys::signal::Signal::SIGINT);
        let _ = perf.wait();
    }
    changes.sort();
    let keep = std::env::temp_dir().join("weir-kube-scale");
    let _ = std::fs::create_dir_all(&keep);
    let _ = std::fs::copy(&controller.log, keep.join("controller.log"));
    let _ = std::fs::copy(&sidecar.log, keep.join("sidecar.log"));
    let (hwm, rss) = controller.memory_kib().unwrap();
    println!(
        "synthetic cluster: {SERVICES} Services, {} endpoints, {} pods\n\
         controller serving (all lists done, first view built): {serving:?}\n\
         first snapshot applied by a sidecar: {first_snapshot:?}\n\
         one EndpointSlice change → sidecar applied: median {:?}, max {:?} ({} changes)\n\
         controller memory: RSS {:.1} MiB once synced, {:.1} MiB after the changes, peak {:.1} MiB",
        SERVICES * ENDPOINTS_PER_SERVICE,
        SERVICES * ENDPOINTS_PER_SERVICE,
        changes[changes.len() / 2],
        changes[changes.len() - 1],
        changes.len(),
        rss_synced as f64 / 1024.0,
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0,
    );
}
