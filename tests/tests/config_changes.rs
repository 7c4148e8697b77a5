//! Configuration changes: how fast a file edit reaches traffic, that changes under load fail
//! nothing, and that an invalid file is rejected without disturbing what works.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use weir_tests::*;

/// Closed-loop load through `via` until `stop`; returns (requests, failures).
fn start_load(
    via: std::net::SocketAddr,
    workers: usize,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(u64, u64, Vec<String>)> {
    tokio::spawn(async move {
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for _ in 0..workers {
            let (ok, failed, errors, stop) = (ok.clone(), failed.clone(), errors.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let client = http1();
                while !stop.load(Ordering::Relaxed) {
                    match send(&client, via, "GET", "web.test", "/", &[]).await {
                        Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                        Ok(r) => {
                            errors.lock().unwrap().push(format!("{} {}", r.status, r.body));
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                        Err(e) => {
                            errors.lock().unwrap().push(e.to_string());
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        let errors = errors.lock().unwrap().clone();
        (ok.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed), failed.load(Ordering::Relaxed), errors)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_change_reaches_traffic() {
    let mesh = TwoVersions::start(&split_route(1, 0)).await;
    let client = http1();
    let r = send(&client, mesh.outbound(), "GET", "web.test", "/", &[]).await.unwrap();
    assert_eq!(r.backend(), "v1");
    let mut worst = Duration::ZERO;
    for (w1, w2, want) in [(0, 1, "v2"), (1, 0, "v1"), (0, 1, "v2")] {
        let written = Instant::now();
        mesh.scratch.write("route.yaml", &split_route(w1, w2));
        // Observed as behaviour: the first request served by the other version.
        wait_until("traffic to switch", Duration::from_secs(5), || {
            let client = &client;
            let via = mesh.outbound();
            async move {
                send(client, via, "GET", "web.test", "/", &[])
                    .await
                    .map(|r| r.backend() == want)
                    .unwrap_or(false)
            }
        })
        .await;
        let took = written.elapsed();
        worst = worst.max(took);
    }
    // The behaviour is that every change reaches traffic (within wait_until's 5 s, where a lost
    // change would wait forever); how fast is measured in bench/ (control-plane convergence),
    // not asserted on a shared 2-core machine.
    println!("config propagation (file write -> traffic switched), worst of 3: {worst:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weight_changes_under_load_fail_nothing() {
    let mesh = TwoVersions::start(&split_route(100, 0)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let load = start_load(mesh.outbound(), 8, stop.clone());
    let admin = mesh.client.addr("admin");
    for (w1, w2) in [(90u64, 10u64), (50, 50), (0, 100), (100, 0), (50, 50)] {
        mesh.scratch.write("route.yaml", &split_route(w1 as u32, w2 as u32));
        wait_config(admin, "new weights", |c| weights(c, "test", "web") == [w1, w2]).await;
        // Let traffic run on the new split for a while before the next change.
        let before =
            mesh.v1.behaviour.served.load(Ordering::Relaxed) + mesh.v2.behaviour.served.load(Ordering::Relaxed);
        wait_until("200 requests on the new split", Duration::from_secs(10), || {
            let n = mesh.v1.behaviour.served.load(Ordering::Relaxed) + mesh.v2.behaviour.served.load(Ordering::Relaxed);
            async move { n >= before + 200 }
        })
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    let (total, failed, errors) = load.await.unwrap();
    let rps = total as f64 / started.elapsed().as_secs_f64();
    println!("{total} requests at {rps:.0} rps, {failed} failed");
    assert_eq!(failed, 0, "failures during weight changes: {errors:?}");
    // Real load ran across every change: each split served 200 requests before the next.
    assert!(total >= 1000, "only {total} requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_file_is_rejected_and_the_old_config_keeps_serving() {
    let mesh = TwoVersions::start(&split_route(0, 1)).await;
    let client = http1();
    let admin = mesh.controller.addr("admin");

    // A negative weight: rejected with file, resource and field; v2 keeps serving.
    mesh.scratch.write(
        "route.yaml",
        "apiVersion: weir.io/v1alpha1\nkind: Route\nmetadata: { name: web, namespace: test }\nspec:\n  service: web\n  rules:\n  - backendRefs: [{ name: web-v1, weight: -5 }]\n",
    );
    let rejection = wait_for_rejection(admin).await;
    assert_eq!(rejection["origin"], "route.yaml");
    assert_eq!(rejection["resource"], "Route test/web");
    assert_eq!(rejection["field"], "spec.rules[0].backendRefs[0].weight");
    assert_eq!(rejection["previousVersionInForce"], true);
    let resources = admin_json(admin, "/resources").await;
    let route = resource(&resources, "Route", "web");
    assert_eq!(route["accepted"], false);
    assert!(
        route["rejection"]
            .as_str()
            .unwrap()
            .contains("route.yaml: Route test/web: field spec.rules[0].backendRefs[0].weight")
    );
    for _ in 0..20 {
        let r = send(&client, mesh.outbound(), "GET", "web.test", "/", &[]).await.unwrap();
        assert_eq!(r.backend(), "v2");
    }

    // Bad YAML, an unknown field, a route to a missing Service, a duplicate: each rejected
    // with its reason, the rest keeps working.
    for (file, yaml, field, needle) in [
        ("route.yaml", "kind: Route\nmetadata: { name: web\n", None, "invalid YAML"),
        (
            "route.yaml",
            &split_route(1, 0).replace("service: web", "service: web\n  colour: red"),
            Some("spec.colour"),
            "unknown field",
        ),
        (
            "route.yaml",
            &split_route(1, 0).replace("web-v1", "ghost"),
            Some("spec.rules[0].backendRefs[0].name"),
            "test/ghost not found",
        ),
        ("zz-dup.yaml", &split_route(1, 0), Some("metadata.name"), "already defined in route.yaml"),
    ] {
        if file == "zz-dup.yaml" {
            mesh.scratch.write("route.yaml", &split_route(0, 1));
        }
        mesh.scratch.write(file, yaml);
        wait_until(needle, Duration::from_secs(5), || async move {
            let v = admin_json(admin, "/resources").await;
            v["rejected"]
                .as_array()
                .is_some_and(|r| r.iter().any(|r| r["message"].as_str().unwrap_or("").contains(needle)))
        })
        .await;
        let v = admin_json(admin, "/resources").await;
        let r = v["rejected"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["message"].as_str().unwrap().contains(needle))
            .unwrap()
            .clone();
        assert_eq!(r["origin"], file, "{r}");
        if let Some(field) = field {
            assert_eq!(r["field"], field, "{r}");
        }
        for _ in 0..10 {
            let r = send(&client, mesh.outbound(), "GET", "web.test", "/", &[]).await.unwrap();
            assert_eq!((r.status, r.backend()), (200, "v2"), "after {needle}");
        }
    }
    let metrics = admin_text(admin, "/metrics").await;
    assert!(metrics.contains("weir_controller_rejected_resources 1"), "{metrics}");
}

async fn wait_for_rejection(admin: std::net::SocketAddr) -> serde_json::Value {
    wait_until("a rejection", Duration::from_secs(5), || async move {
        admin_json(admin, "/resources").await["rejected"].as_array().is_some_and(|r| !r.is_empty())
    })
    .await;
    admin_json(admin, "/resources").await["rejected"][0].clone()
}

fn resource<'a>(v: &'a serde_json::Value, kind: &str, name: &str) -> &'a serde_json::Value {
    v["resources"].as_array().unwrap().iter().find(|r| r["kind"] == kind && r["name"] == name).unwrap()
}

/// Sidecars that never answer hold at most their place among the snapshots in flight, and only
/// for a while: with more silent sidecars than places, a real one still gets its configuration
/// (once the silent ones' places are given back), and so do they.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sidecars_do_not_starve_the_others() {
    let scratch = Scratch::new();
    scratch.write("services.yaml", &service("test", "web", &[]));
    let controller = scratch.controller(None).await;
    let (grpc, admin) = (controller.addr("grpc"), controller.addr("admin"));
    let silent = weir_controller::grpc::discovery::MAX_IN_FLIGHT + 8;
    let mut fakes = Vec::new();
    for i in 0..silent {
        fakes.push(fake_sidecar(grpc, &format!("silent-{i}"), None).await);
    }
    // Every silent one was sent a snapshot: the first ones at once, the rest as places came back.
    wait_until("a snapshot sent to every silent sidecar", Duration::from_secs(30), || async move {
        let r = admin_json(admin, "/resources").await;
        r["proxies"].as_array().is_some_and(|p| {
            p.len() == silent && p.iter().all(|p| p["sentVersion"].as_str().is_some_and(|v| !v.is_empty()))
        })
    })
    .await;
    let real = scratch.proxy(grpc, "test/real", None).await;
    wait_config(real.addr("admin"), "a snapshot despite the silent ones", |c| !c["version"].is_null()).await;
    for f in fakes {
        f.abort();
    }
}
