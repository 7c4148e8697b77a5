//! The data plane outlives the control plane: traffic flows while the controller is dead,
//! and sidecars resync when it comes back, without failing a request.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use weir_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_kill_and_restart_fail_no_request() {
    let mut mesh = TwoVersions::start(&split_route(50, 50)).await;
    let grpc = mesh.controller.addr("grpc");
    let via = mesh.outbound();
    let stop = Arc::new(AtomicBool::new(false));
    let (total, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let errors = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (stop, total, failed, errors) = (stop.clone(), total.clone(), failed.clone(), errors.clone());
        workers.push(tokio::spawn(async move {
            let client = http1();
            while !stop.load(Ordering::Relaxed) {
                total.fetch_add(1, Ordering::Relaxed);
                match send(&client, via, "GET", "web.test", "/", &[]).await {
                    Ok(r) if r.status == 200 => {}
                    other => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        errors.lock().unwrap().push(format!("{:?}", other.map(|r| (r.status, r.body))));
                    }
                }
            }
        }));
    }
    let progress = |n: u64| {
        let total = total.clone();
        async move {
            let start = total.load(Ordering::Relaxed);
            wait_until("traffic to flow", Duration::from_secs(10), || {
                let total = total.clone();
                async move { total.load(Ordering::Relaxed) >= start + n }
            })
            .await;
        }
    };
    progress(200).await;

    // Kill the controller outright: sidecars keep serving their last snapshot.
    mesh.controller.kill().await;
    progress(500).await;
    let metrics = admin_text(mesh.client.addr("admin"), "/metrics").await;
    assert!(metrics.contains("weir_control_plane_connected 0"), "the sidecar should notice the controller is gone");

    // Change the config while the controller is down, then restart it on the same address.
    mesh.scratch.write("route.yaml", &split_route(0, 100));
    mesh.controller = mesh.scratch.controller(Some(grpc)).await;
    let admin = mesh.client.addr("admin");
    wait_config(admin, "resync after restart", |c| weights(c, "test", "web") == [0, 100]).await;
    let ctl_admin = mesh.controller.addr("admin");
    wait_until("all three sidecars to reconnect", Duration::from_secs(20), || async move {
        admin_json(ctl_admin, "/resources").await["proxies"].as_array().map(|p| p.len()) == Some(3)
    })
    .await;
    let v2_before = mesh.v2.behaviour.served.load(Ordering::Relaxed);
    progress(300).await;
    assert!(mesh.v2.behaviour.served.load(Ordering::Relaxed) >= v2_before + 250);

    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let errors = errors.lock().unwrap();
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "{} of {} requests failed: {:?}",
        errors.len(),
        total.load(Ordering::Relaxed),
        &errors[..errors.len().min(5)]
    );
}
