//! The Kubernetes source against a fake API server with real list/watch semantics: Services,
//! EndpointSlices, Pods and Weir's custom resources reach a connected sidecar; status
//! conditions say why a resource is not in force; a watch outage followed by `410 Gone`
//! relists and converges; leader election hands over between two controllers.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use weir_tests::fake_kube::FakeKube;
use weir_tests::*;

const SERVICES: &str = "api/v1/services";
const SLICES: &str = "apis/discovery.k8s.io/v1/endpointslices";
const PODS: &str = "api/v1/pods";
const ROUTES: &str = "apis/weir.io/v1alpha1/routes";
const LEASES: &str = "apis/coordination.k8s.io/v1/leases";

fn service(ns: &str, name: &str, cluster_ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"}]}
    })
}

/// One slice of `service` with one endpoint per `(address, pod, ready)`, all on the port of
/// the first address.
fn slice(ns: &str, name: &str, service: &str, endpoints: &[(SocketAddr, &str, bool)]) -> Value {
    let port = endpoints.first().map(|e| e.0.port()).unwrap_or(8080);
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": endpoints.iter().map(|(addr, pod, ready)| json!({
            "addresses": [addr.ip().to_string()],
            "conditions": {"ready": ready, "serving": ready, "terminating": false},
            "targetRef": {"kind": "Pod", "name": pod, "namespace": ns},
            "zone": "zone-a"
        })).collect::<Vec<_>>()
    })
}

fn pod(ns: &str, name: &str, service_account: &str, meshed: bool) -> Value {
    let init = if meshed {
        json!([{"name": "weir-proxy", "image": "weir-proxy:dev", "restartPolicy": "Always"}])
    } else {
        json!([])
    };
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
        "spec": {"serviceAccountName": service_account, "containers": [{"name": "app", "image": "app:1"}], "initContainers": init},
        "status": {"podIP": "127.0.0.1", "phase": "Running"}
    })
}

fn route(ns: &str, name: &str, service: &str, backends: &[(&str, u32)]) -> Value {
    json!({
        "apiVersion": "weir.io/v1alpha1", "kind": "Route",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"service": service, "rules": [{"backendRefs": backends.iter().map(|(n, w)| json!({"name": n, "weight": w})).collect::<Vec<_>>()}]}
    })
}

/// A controller in Kubernetes mode against `fake`, with a short lease for the election tests.
async fn kube_controller(scratch: &Scratch, fake: &FakeKube, name: &str, extra: &[&str]) -> ChildProc {
    let kubeconfig = fake.kubeconfig(scratch.dir.path());
    let mut flags = vec!["--lease-duration", "2s", "--lease-renew", "200ms", "--replica-name", name];
    flags.extend_from_slice(extra);
    let args = kube_controller_args(&kubeconfig, "debug", &flags);
    ChildProc::spawn(name, &bin("weir-controller"), &args, scratch.log(name)).await.unwrap()
}

/// The `type` condition of an object's status: (status, reason, message, observedGeneration).
fn condition(obj: &Value, type_: &str) -> Option<(String, String, String, i64)> {
    let c = obj["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == type_)?;
    Some((
        c["status"].as_str()?.to_string(),
        c["reason"].as_str()?.to_string(),
        c["message"].as_str()?.to_string(),
        c["observedGeneration"].as_i64()?,
    ))
}

async fn wait_condition(
    fake: &FakeKube,
    collection: &str,
    ns: &str,
    name: &str,
    type_: &str,
    ok: impl Fn(&(String, String, String, i64)) -> bool,
) -> (String, String, String, i64) {
    let mut last = None;
    // Generous: a watch retrying with kube's default back-off may wait up to 30 s between tries.
    let limit = Duration::from_secs(60);
    let start = Instant::now();
    loop {
        let c = fake.get(collection, ns, name).and_then(|o| condition(&o, type_));
        if let Some(c) = &c
            && ok(c)
        {
            return c.clone();
        }
        last = c.or(last);
        assert!(
            start.elapsed() < limit,
            "{collection} {ns}/{name}: condition {type_} never as expected; last {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn endpoint_addresses(config: &Value, ns: &str, name: &str) -> Vec<String> {
    let mut out: Vec<String> = config["snapshot"]["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["namespace"] == ns && s["name"] == name))
        .and_then(|s| s["endpoints"].as_array())
        .map(|e| e.iter().map(|e| e["address"].as_str().unwrap_or_default().to_string()).collect())
        .unwrap_or_default();
    out.sort();
    out
}

fn has_service(config: &Value, ns: &str, name: &str) -> bool {
    config["snapshot"]["services"]
        .as_array()
        .is_some_and(|s| s.iter().any(|s| s["namespace"] == ns && s["name"] == name))
}

async fn metric(admin: SocketAddr, series: &str) -> f64 {
    admin_text(admin, "/metrics")
        .await
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

fn log_count(path: &Path, needle: &str) -> usize {
    std::fs::read_to_string(path).unwrap_or_default().matches(needle).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_changes_reach_sidecars_and_status_says_why() {
    let fake = FakeKube::start().await;
    let scratch = Scratch::new();
    let web1 = Backend::start("web-1").await;
    let web2 = Backend::start("web-2").await;
    fake.create(SERVICES, service("shop", "web", "10.96.0.10"));
    fake.create(PODS, pod("shop", "web-1", "web", false));
    fake.create(PODS, pod("shop", "web-2", "web", false));
    fake.create(SLICES, slice("shop", "web-a", "web", &[(web1.addr, "web-1", true)]));
    // Another namespace than the one watched never shows.
    fake.create(SERVICES, service("elsewhere", "hidden", "10.96.0.99"));

    let controller = kube_controller(&scratch, &fake, "controller", &["--namespace", "shop"]).await;
    let sidecar = scratch.proxy(controller.addr("grpc"), "shop/client", None).await;
    let admin = sidecar.addr("admin");
    wait_config(admin, "web with one endpoint", |c| endpoint_count(c, "shop", "web") == 1).await;
    let client = http1();
    let out = sidecar.addr("outbound");
    let reply = send(&client, out, "GET", "web.shop", "/", &[]).await.unwrap();
    assert_eq!((reply.status, reply.backend()), (200, "web-1"));
    // The ClusterIP names the Service too.
    let reply = send(&client, out, "GET", "10.96.0.10:80", "/", &[]).await.unwrap();
    assert_eq!((reply.status, reply.backend()), (200, "web-1"));
    let config = admin_json(admin, "/config").await;
    assert!(!has_service(&config, "elsewhere", "hidden"));
    let web = config["snapshot"]["services"].as_array().unwrap().iter().find(|s| s["name"] == "web").unwrap().clone();
    assert_eq!(web["cluster_ips"], json!(["10.96.0.10"]), "{web}");
    assert_eq!(web["endpoints"][0]["workload"], "web-1");
    assert_eq!(web["endpoints"][0]["identity"], "web");
    assert_eq!(web["endpoints"][0]["labels"]["topology.kubernetes.io/zone"], "zone-a");

    // A second slice whose endpoint is not ready adds nothing; once ready, it serves.
    fake.create(SLICES, slice("shop", "web-b", "web", &[(web2.addr, "web-2", false)]));
    fake.create(SERVICES, service("shop", "marker", "10.96.0.11"));
    wait_config(admin, "marker service", |c| has_service(c, "shop", "marker")).await;
    assert_eq!(endpoint_count(&admin_json(admin, "/config").await, "shop", "web"), 1, "a not-ready endpoint was added");
    fake.update(SLICES, slice("shop", "web-b", "web", &[(web2.addr, "web-2", true)]));
    wait_config(admin, "second endpoint ready", |c| endpoint_count(c, "shop", "web") == 2).await;
    fake.delete(SLICES, "shop", "web-a");
    wait_config(admin, "first slice gone", |c| endpoint_addresses(c, "shop", "web") == [web2.addr.to_string()]).await;
    let reply = send(&client, out, "GET", "web.shop", "/", &[]).await.unwrap();
    assert_eq!((reply.status, reply.backend()), (200, "web-2"));

    // A meshed pod's endpoint carries its identity and rides the sidecar hop.
    fake.create(SERVICES, service("shop", "reviews", "10.96.0.12"));
    fake.create(PODS, pod("shop", "reviews-1", "reviews", true));
    fake.create(
        SLICES,
        slice("shop", "reviews-a", "reviews", &[("127.0.0.1:4143".parse().unwrap(), "reviews-1", true)]),
    );
    wait_config(admin, "reviews endpoint", |c| endpoint_count(c, "shop", "reviews") == 1).await;
    let config = admin_json(admin, "/config").await;
    let reviews =
        config["snapshot"]["services"].as_array().unwrap().iter().find(|s| s["name"] == "reviews").unwrap().clone();
    assert_eq!(reviews["endpoints"][0]["meshed"], true, "{reviews}");
    assert_eq!(reviews["endpoints"][0]["identity"], "reviews");

    // A Route to a missing backend is not in force, and its status says why.
    fake.create(ROUTES, route("shop", "split", "web", &[("web", 90), ("web-v2", 10)]));
    let (status, reason, message, generation) =
        wait_condition(&fake, ROUTES, "shop", "split", "ResolvedRefs", |c| c.0 == "False").await;
    assert_eq!((status.as_str(), reason.as_str(), generation), ("False", "BackendNotFound", 1));
    assert!(message.contains("backend Service shop/web-v2 not found"), "{message}");
    let accepted = condition(&fake.get(ROUTES, "shop", "split").unwrap(), "Accepted").unwrap();
    assert_eq!((accepted.0.as_str(), accepted.1.as_str()), ("False", "BackendNotFound"));
    // Once the backend exists, the Route is accepted and reaches the sidecar.
    fake.create(SERVICES, service("shop", "web-v2", "10.96.0.13"));
    wait_condition(&fake, ROUTES, "shop", "split", "Accepted", |c| c.0 == "True").await;
    let route_obj = fake.get(ROUTES, "shop", "split").unwrap();
    assert_eq!(route_obj["status"]["ruleCount"], 1);
    assert_eq!(condition(&route_obj, "ResolvedRefs").unwrap().0, "True");
    wait_config(admin, "route rules", |c| weights(c, "shop", "web") == [90, 10]).await;

    // An invalid edit is refused with the field at fault; the previous version keeps serving.
    let mut bad = route("shop", "split", "web", &[("web", 0), ("web-v2", 0)]);
    bad["metadata"]["resourceVersion"] = route_obj["metadata"]["resourceVersion"].clone();
    fake.update(ROUTES, bad);
    let (_, reason, message, generation) =
        wait_condition(&fake, ROUTES, "shop", "split", "Accepted", |c| c.3 == 2).await;
    assert_eq!(reason, "Invalid");
    assert!(message.contains("spec.rules[0].backendRefs: all weights are 0"), "{message}");
    assert!(message.contains("previous version stays in force"), "{message}");
    assert_eq!(generation, 2);
    assert_eq!(weights(&admin_json(admin, "/config").await, "shop", "web"), [90, 10]);

    // Deleting the Service removes it from the sidecar.
    fake.delete(SERVICES, "shop", "marker");
    wait_config(admin, "marker removed", |c| !has_service(c, "shop", "marker")).await;

    // One replica, so it leads; the Lease names it.
    let cadmin = controller.addr("admin");
    assert_eq!(metric(cadmin, "weir_controller_leader ").await, 1.0);
    let lease = fake.get(LEASES, "weir-system", "weir-controller").expect("the lease");
    assert_eq!(lease["spec"]["holderIdentity"], "controller");
    wait_until("three status writes counted", Duration::from_secs(20), || async {
        metric(cadmin, "weir_controller_status_writes_total{result=\"ok\"} ").await >= 3.0
    })
    .await;
    let made = chart_rbac_allows_every_request(&fake);
    assert!(made.iter().any(|r| r.resource == "routes/status" && r.verb == "patch"), "{made:?}");
    assert!(made.iter().any(|r| r.resource == "leases" && r.verb == "create"), "{made:?}");
}

/// Everything the controller asked the API server for, the Helm chart's RBAC grants its
/// ServiceAccount (the requests are returned, to check they are not trivially few).
fn chart_rbac_allows_every_request(fake: &FakeKube) -> BTreeSet<chart::Request> {
    let docs = chart::render(None, &[]).unwrap();
    let sa = format!("{}/weir-controller", chart::NAMESPACE);
    let made: BTreeSet<chart::Request> =
        fake.request_log().iter().filter_map(|(m, p)| chart::request(m.as_str(), p)).collect();
    let denied: Vec<&chart::Request> = made.iter().filter(|r| !chart::allows(&docs, &sa, r)).collect();
    assert!(denied.is_empty(), "the chart's RBAC denies {denied:#?}");
    made
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_outage_then_410_relists_and_converges() {
    let fake = FakeKube::start().await;
    let scratch = Scratch::new();
    let addr = |i: u16| -> SocketAddr { format!("127.0.0.{i}:8080").parse().unwrap() };
    fake.create(SERVICES, service("shop", "web", "10.96.0.10"));
    for i in 1..=5u16 {
        fake.create(PODS, pod("shop", &format!("web-{i}"), "web", false));
    }
    for i in 1..=3u16 {
        fake.create(SLICES, slice("shop", &format!("web-{i}"), "web", &[(addr(i), &format!("web-{i}"), true)]));
    }
    let controller = kube_controller(&scratch, &fake, "controller", &[]).await;
    let cadmin = controller.addr("admin");
    let sidecar = scratch.proxy(controller.addr("grpc"), "shop/client", None).await;
    let admin = sidecar.addr("admin");
    wait_config(admin, "three endpoints", |c| endpoint_count(c, "shop", "web") == 3).await;
    let lists_before = fake
        .request_log()
        .iter()
        .filter(|(m, p)| m == "GET" && p.contains("endpointslices") && !p.contains("watch="))
        .count();

    // RBAC takes EndpointSlices away and the watch drops: the controller keeps its view.
    fake.set_forbidden(SLICES, true);
    fake.break_watches();
    wait_until("the slice watch to fail", Duration::from_secs(20), || async {
        metric(cadmin, "weir_controller_watch_restarts_total{kind=\"EndpointSlice\"} ").await >= 1.0
    })
    .await;
    // Meanwhile the cluster moves on, and the history the watch would resume from is gone.
    fake.delete(SLICES, "shop", "web-1");
    fake.update(SLICES, slice("shop", "web-2", "web", &[(addr(2), "web-2", false)]));
    fake.create(SLICES, slice("shop", "web-4", "web", &[(addr(4), "web-4", true)]));
    fake.update(SLICES, slice("shop", "web-3", "web", &[(addr(3), "web-3", true), (addr(5), "web-5", true)]));
    fake.compact();
    assert_eq!(endpoint_count(&admin_json(admin, "/config").await, "shop", "web"), 3, "the last good view stays");

    // Access returns: the resumed watch gets 410 Gone, the controller relists and converges on
    // exactly the cluster's endpoints.
    fake.set_forbidden(SLICES, false);
    let want: Vec<String> = [3, 4, 5].iter().map(|i| addr(*i).to_string()).collect();
    wait_config(admin, "converged endpoints", |c| endpoint_addresses(c, "shop", "web") == want).await;
    let lists_after = fake
        .request_log()
        .iter()
        .filter(|(m, p)| m == "GET" && p.contains("endpointslices") && !p.contains("watch="))
        .count();
    assert!(lists_after > lists_before, "no relist after 410 ({lists_before} -> {lists_after})");
    let config = admin_json(admin, "/config").await;
    let unique: BTreeSet<String> = endpoint_addresses(&config, "shop", "web").into_iter().collect();
    assert_eq!(unique.len(), endpoint_count(&config, "shop", "web"), "duplicate endpoints");
    // The outage was logged once with its cause, not once per retry.
    assert_eq!(log_count(&controller.log, "watch failed"), 1, "{}", std::fs::read_to_string(&controller.log).unwrap());
    assert!(std::fs::read_to_string(&controller.log).unwrap().contains("403"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_election_hands_over() {
    let fake = FakeKube::start().await;
    let scratch = Scratch::new();
    fake.create(SERVICES, service("shop", "web", "10.96.0.10"));
    let mut a = kube_controller(&scratch, &fake, "replica-a", &[]).await;
    let mut b = kube_controller(&scratch, &fake, "replica-b", &[]).await;
    let leader_of = |fake: &FakeKube| -> String {
        fake.get(LEASES, "weir-system", "weir-controller")
            .and_then(|l| l["spec"]["holderIdentity"].as_str().map(String::from))
            .unwrap_or_default()
    };
    wait_until("a leader", Duration::from_secs(20), || async { !leader_of(&fake).is_empty() }).await;
    let (leader, follower) = if leader_of(&fake) == "replica-a" { (&mut a, &mut b) } else { (&mut b, &mut a) };
    let (ladmin, fadmin) = (leader.addr("admin"), follower.addr("admin"));
    wait_until("leader gauge", Duration::from_secs(20), || async {
        metric(ladmin, "weir_controller_leader ").await == 1.0
    })
    .await;
    assert_eq!(metric(fadmin, "weir_controller_leader ").await, 0.0);

    // Both serve sidecars.
    for admin_grpc in [leader.addr("grpc"), follower.addr("grpc")] {
        let sidecar = scratch.proxy(admin_grpc, "shop/client", None).await;
        wait_config(sidecar.addr("admin"), "web", |c| has_service(c, "shop", "web")).await;
    }

    // Only the leader writes status.
    fake.create(ROUTES, route("shop", "r1", "ghost", &[("web", 1)]));
    wait_condition(&fake, ROUTES, "shop", "r1", "Accepted", |c| c.1 == "BackendNotFound").await;
    // The fake answers the write before the leader counts it: wait for the count, don't race it.
    wait_until("the leader to count its status write", Duration::from_secs(20), || async {
        metric(ladmin, "weir_controller_status_writes_total{result=\"ok\"} ").await >= 1.0
    })
    .await;
    assert_eq!(metric(fadmin, "weir_controller_status_writes_total{result=\"ok\"} ").await, 0.0);

    // The leader dies without releasing the lease: the follower takes over once it expires.
    let started = Instant::now();
    leader.kill().await;
    let follower_name = if leader_of(&fake) == "replica-a" { "replica-b" } else { "replica-a" };
    wait_until("the follower to take over", Duration::from_secs(20), || async { leader_of(&fake) == follower_name })
        .await;
    let took = started.elapsed();
    wait_until("new leader gauge", Duration::from_secs(20), || async {
        metric(fadmin, "weir_controller_leader ").await == 1.0
    })
    .await;
    // Within the lease duration plus a renew period and scheduling slack.
    assert!(took < Duration::from_secs(10), "hand-over took {took:?}");
    // The new leader writes status.
    fake.create(ROUTES, route("shop", "r2", "ghost", &[("web", 1)]));
    wait_condition(&fake, ROUTES, "shop", "r2", "Accepted", |c| c.1 == "BackendNotFound").await;
    wait_until("the new leader to count its status write", Duration::from_secs(20), || async {
        metric(fadmin, "weir_controller_status_writes_total{result=\"ok\"} ").await >= 1.0
    })
    .await;

    // A graceful stop releases the lease at once.
    let mut third = kube_controller(&scratch, &fake, "replica-c", &[]).await;
    assert!(follower.stop(Duration::from_secs(10)).await);
    wait_until("the lease released", Duration::from_secs(20), || async {
        let holder = leader_of(&fake);
        holder.is_empty() || holder == "replica-c"
    })
    .await;
    wait_until("replica-c leads", Duration::from_secs(20), || async { leader_of(&fake) == "replica-c" }).await;
    assert!(third.stop(Duration::from_secs(10)).await);
}

fn policies(config: &Value, ns: &str, name: &str) -> Vec<Value> {
    config["snapshot"]["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["namespace"] == ns && s["name"] == name))
        .and_then(|s| s["policies"].as_array().cloned())
        .unwrap_or_default()
}

fn authorization_names(config: &Value) -> Vec<String> {
    config["snapshot"]["inbound"]["authorizations"]
        .as_array()
        .map(|a| a.iter().map(|a| a["name"].as_str().unwrap_or_default().to_string()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_weir_kind_and_pod_changes_reach_the_sidecar() {
    let fake = FakeKube::start().await;
    let scratch = Scratch::new();
    let ep: SocketAddr = "127.0.0.1:4143".parse().unwrap();
    for name in ["web", "web-v2"] {
        fake.create(SERVICES, service("shop", name, if name == "web" { "10.96.0.10" } else { "10.96.0.11" }));
    }
    fake.create(PODS, pod("shop", "web-1", "web", true));
    fake.create(SLICES, slice("shop", "web-a", "web", &[(ep, "web-1", true)]));
    let controller = kube_controller(&scratch, &fake, "controller", &[]).await;
    // The sidecar of workload shop/client, labelled app=client.
    let sidecar = scratch
        .proxy_with(controller.addr("grpc"), "shop/client", None, &["--label".into(), "app=client".into()])
        .await;
    let admin = sidecar.addr("admin");
    wait_config(admin, "web", |c| endpoint_count(c, "shop", "web") == 1).await;

    // ResiliencePolicy: create, update, delete.
    let policy = |request: &str| {
        json!({"apiVersion": "weir.io/v1alpha1", "kind": "ResiliencePolicy",
               "metadata": {"name": "web", "namespace": "shop"},
               "spec": {"targetRef": {"service": "web"}, "timeouts": {"request": request}}})
    };
    const POLICIES: &str = "apis/weir.io/v1alpha1/resiliencepolicies";
    fake.create(POLICIES, policy("2s"));
    wait_config(admin, "policy", |c| {
        policies(c, "shop", "web").first().is_some_and(|p| p["request_timeout_ms"] == 2000)
    })
    .await;
    fake.update(POLICIES, policy("3s"));
    wait_config(admin, "policy updated", |c| {
        policies(c, "shop", "web").first().is_some_and(|p| p["request_timeout_ms"] == 3000)
    })
    .await;
    wait_condition(&fake, POLICIES, "shop", "web", "Accepted", |c| c.0 == "True" && c.3 == 2).await;
    fake.delete(POLICIES, "shop", "web");
    wait_config(admin, "policy deleted", |c| policies(c, "shop", "web").is_empty()).await;

    // MeshAuthorization: only those selecting this workload reach it.
    const AUTHZ: &str = "apis/weir.io/v1alpha1/meshauthorizations";
    let authz = |name: &str, app: &str| {
        json!({"apiVersion": "weir.io/v1alpha1", "kind": "MeshAuthorization",
               "metadata": {"name": name, "namespace": "shop"},
               "spec": {"targetRef": {"selector": {"matchLabels": {"app": app}}}, "mode": "strict",
                        "allow": [{"name": "web", "from": {"serviceAccounts": ["web"]}}]}})
    };
    fake.create(AUTHZ, authz("others", "reviews"));
    fake.create(AUTHZ, authz("mine", "client"));
    wait_config(admin, "own authorization", |c| authorization_names(c) == ["shop/mine"]).await;
    fake.delete(AUTHZ, "shop", "mine");
    wait_config(admin, "authorization deleted", |c| authorization_names(c).is_empty()).await;

    // Canary: its rules lead the Service's.
    fake.create(
        CANARIES,
        json!({"apiVersion": "weir.io/v1alpha1", "kind": "Canary",
               "metadata": {"name": "web", "namespace": "shop"},
               "spec": {"service": "web", "stable": "web", "canary": "web-v2", "steps": [10, 50], "interval": "1h"}}),
    );
    wait_config(admin, "canary rules", |c| {
        c["snapshot"]["services"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["name"] == "web"))
            .and_then(|s| s["rules"].as_array())
            .is_some_and(|r| r.iter().any(|r| r["route"].as_str().is_some_and(|n| n.contains("canary"))))
    })
    .await;
    wait_condition(&fake, CANARIES, "shop", "web", "Accepted", |c| c.0 == "True").await;
    fake.delete(CANARIES, "shop", "web");
    wait_config(admin, "canary rules gone", |c| weights(c, "shop", "web").is_empty()).await;

    // Pods: the endpoint follows its pod's service account and mesh membership.
    let identity = |c: &Value| {
        c["snapshot"]["services"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["name"] == "web"))
            .map(|s| (s["endpoints"][0]["identity"].clone(), s["endpoints"][0]["meshed"].clone()))
    };
    wait_config(admin, "meshed identity", |c| identity(c) == Some((json!("web"), json!(true)))).await;
    fake.update(PODS, pod("shop", "web-1", "web-sa2", false));
    wait_config(admin, "pod changed", |c| identity(c) == Some((json!("web-sa2"), json!(false)))).await;
    // An endpoint whose pod is gone (the slice not yet updated) is left out rather than routed
    // to without its identity.
    fake.delete(PODS, "shop", "web-1");
    wait_config(admin, "pod gone", |c| endpoint_count(c, "shop", "web") == 0).await;
    let made = chart_rbac_allows_every_request(&fake);
    for status in ["resiliencepolicies/status", "canaries/status"] {
        assert!(made.iter().any(|r| r.resource == status), "{made:?}");
    }
    assert!(made.iter().any(|r| r.resource == "pods" && r.verb == "watch"), "{made:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_crd_does_not_hold_the_mesh_back() {
    let fake = FakeKube::start().await;
    let scratch = Scratch::new();
    fake.set_unserved(CANARIES, true);
    fake.create(SERVICES, service("shop", "web", "10.96.0.10"));
    let controller = kube_controller(&scratch, &fake, "controller", &[]).await;
    let sidecar = scratch.proxy(controller.addr("grpc"), "shop/client", None).await;
    wait_config(sidecar.addr("admin"), "web", |c| has_service(c, "shop", "web")).await;
    let log = std::fs::read_to_string(&controller.log).unwrap();
    assert!(log.contains("are Weir's CRDs installed?"), "{log}");
    // Once the CRD is installed, its resources are picked up.
    fake.set_unserved(CANARIES, false);
    fake.create(SERVICES, service("shop", "web-v2", "10.96.0.11"));
    fake.create(
        CANARIES,
        json!({"apiVersion": "weir.io/v1alpha1", "kind": "Canary",
               "metadata": {"name": "web", "namespace": "shop"},
               "spec": {"service": "web", "stable": "web", "canary": "web-v2", "steps": [10], "interval": "1h"}}),
    );
    wait_condition(&fake, CANARIES, "shop", "web", "Accepted", |c| c.0 == "True").await;
}

const CANARIES: &str = "apis/weir.io/v1alpha1/canaries";

/// Services `web`, `web-v1` and `web-v2` in `shop`, each with a ClusterIP.
fn create_web_versions(fake: &FakeKube) {
    for (i, name) in ["web", "web-v1", "web-v2"].iter().enumerate() {
        fake.create(SERVICES, service("shop", name, &format!("10.96.0.{}", 10 + i)));
    }
}

/// A Canary `shop/web` from `web-v1` to `web-v2` in steps of 20 and 60 %, unjudged.
fn web_canary(interval: &str) -> Value {
    json!({"apiVersion": "weir.io/v1alpha1", "kind": "Canary",
           "metadata": {"name": "web", "namespace": "shop"},
           "spec": {"service": "web", "stable": "web-v1", "canary": "web-v2", "steps": [20, 60],
                    "interval": interval, "skipAnalysis": true}})
}

/// `[stable, canary]` weights of the canary's split rule in a sidecar's `/config`.
fn canary_split(config: &Value) -> Option<Vec<u64>> {
    let rules =
        config["snapshot"]["services"].as_array()?.iter().find(|s| s["name"] == "web")?["rules"].as_array()?.clone();
    let split = rules.iter().find(|r| {
        r["route"].as_str().is_some_and(|n| n.starts_with("canary/"))
            && r["matches"].as_array().is_none_or(|m| m.is_empty())
    })?;
    Some(split["backends"].as_array()?.iter().filter_map(|b| b["weight"].as_u64()).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_drives_canaries_and_followers_route_as_its_status_says() {
    let fake = FakeKube::start().await;
    let scratch = Scratch::new();
    create_web_versions(&fake);
    let mut a = kube_controller(&scratch, &fake, "replica-a", &[]).await;
    let mut b = kube_controller(&scratch, &fake, "replica-b", &[]).await;
    let holder = || {
        fake.get(LEASES, "weir-system", "weir-controller")
            .and_then(|l| l["spec"]["holderIdentity"].as_str().map(String::from))
            .unwrap_or_default()
    };
    wait_until("a leader", Duration::from_secs(20), || async { !holder().is_empty() }).await;
    let (leader, follower) = if holder() == "replica-a" { (&mut a, &mut b) } else { (&mut b, &mut a) };
    let on_leader = scratch.proxy(leader.addr("grpc"), "shop/client-a", None).await;
    let on_follower = scratch.proxy(follower.addr("grpc"), "shop/client-b", None).await;

    fake.create(CANARIES, web_canary("3s"));
    // The leader's rollout lands in the Canary's status, step by step, and the follower's
    // sidecar routes as that status says (each step holds for the 3 s interval).
    let fadmin_sidecar = on_follower.addr("admin");
    let weight = || fake.get(CANARIES, "shop", "web").and_then(|o| o["status"]["weight"].as_u64());
    wait_until("the first step written", Duration::from_secs(30), || async { weight() == Some(20) }).await;
    wait_config(fadmin_sidecar, "the follower's sidecar at 20%", |c| canary_split(c) == Some(vec![80, 20])).await;
    let mut seen = BTreeSet::from([20]);
    wait_until("the rollout to finish", Duration::from_secs(60), || {
        seen.extend(weight());
        async { fake.get(CANARIES, "shop", "web").is_some_and(|o| o["status"]["phase"] == "Succeeded") }
    })
    .await;
    let (l, f) = (on_leader.addr("admin"), fadmin_sidecar);
    wait_until("both sidecars route alike", Duration::from_secs(20), || async {
        let split = canary_split(&admin_json(l, "/config").await);
        split.is_some() && split == canary_split(&admin_json(f, "/config").await)
    })
    .await;
    assert!(seen.contains(&20) && seen.contains(&60), "weights written along the way: {seen:?}");
    let status = fake.get(CANARIES, "shop", "web").unwrap()["status"].clone();
    assert_eq!(status["phase"], "Succeeded", "{status}");
    assert_eq!(condition(&fake.get(CANARIES, "shop", "web").unwrap(), "Accepted").unwrap().0, "True");
    // The follower mirrors the leader's status.
    let fadmin = follower.addr("admin");
    wait_until("the follower mirrors the final status", Duration::from_secs(20), || async {
        admin_json(fadmin, "/canaries").await["canaries"][0]["status"]["phase"] == "Succeeded"
    })
    .await;
}

/// In Kubernetes mode `weir canary promote|abort|pause|resume` goes through the API server (an
/// annotation on the Canary the leader acts on once), so RBAC decides who may; the
/// controller's admin port refuses controls even from loopback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_controls_go_through_the_api_server_and_rbac() {
    let fake = FakeKube::start().await;
    let scratch = Scratch::new();
    create_web_versions(&fake);
    let controller = kube_controller(&scratch, &fake, "controller", &[]).await;
    let cadmin = controller.addr("admin");
    wait_until("leading", Duration::from_secs(20), || async { metric(cadmin, "weir_controller_leader ").await == 1.0 })
        .await;
    fake.create(CANARIES, web_canary("1h"));
    let status = || fake.get(CANARIES, "shop", "web").map(|o| o["status"].clone()).unwrap_or_default();
    wait_until("the first step", Duration::from_secs(30), || async { status()["weight"] == 20 }).await;
    let kubeconfig = fake.kubeconfig(scratch.dir.path());
    let k = kubeconfig.to_str().unwrap();

    // Pause, then resume: each handled once by the leader, the status saying so.
    let (code, out, err) = run_weir(&["canary", "pause", "shop/web", "--kubeconfig", k]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("shop/web: Paused at 20%"), "{out}");
    let s = status();
    assert_eq!((s["phase"].as_str(), s["requestResult"].as_str()), (Some("Paused"), Some("applied")), "{s}");
    let annotation = fake.get(CANARIES, "shop", "web").unwrap()["metadata"]["annotations"]["weir.io/request"].clone();
    assert_eq!(annotation, s["handledRequest"], "{s}");
    let (code, out, err) = run_weir(&["canary", "resume", "web", "-n", "shop", "--kubeconfig", k]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(status()["phase"], "Progressing");
    // A control the rollout's state refuses: the reason, and a failed exit.
    let (code, _, err) = run_weir(&["canary", "resume", "shop/web", "--kubeconfig", k]).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("resume shop/web: refused: not paused (phase Progressing)"), "{err}");

    // A user RBAC does not let patch canaries: Forbidden, and nothing changes.
    fake.deny("alice", CANARIES, "patch");
    let alice = fake.kubeconfig_as(scratch.dir.path(), "alice");
    let (code, _, err) = run_weir(&["canary", "promote", "shop/web", "--kubeconfig", alice.to_str().unwrap()]).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("Forbidden") && err.contains("User \"alice\" cannot patch"), "{err}");
    assert_eq!((status()["phase"].as_str(), status()["weight"].as_u64()), (Some("Progressing"), Some(20)));

    // The admin port takes no control in Kubernetes mode, even from loopback.
    let reply = send(&http1(), cadmin, "POST", &cadmin.to_string(), "/canaries/shop/web/promote", &[]).await.unwrap();
    assert_eq!(reply.status, 403, "{}", reply.body);
    assert!(reply.body.contains("through the API server"), "{}", reply.body);
    assert_eq!(status()["phase"], "Progressing");

    // Someone RBAC lets: promoted.
    let (code, out, err) = run_weir(&["canary", "promote", "shop/web", "--kubeconfig", k]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("shop/web: Succeeded at 100%"), "{out}");
    assert_eq!(status()["weight"], 100);
}

const CRDS: &str = "apis/apiextensions.k8s.io/v1/customresourcedefinitions";
const WEBHOOKS: &str = "apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations";
const CONTROLLER_PODS: [&str; 2] = ["weir-controller-a", "weir-controller-b"];

/// The `weir` command against a cluster: every controller replica (the chart's pods) is asked
/// through the API server's proxy subresource, each for the sidecars connected to it, and the
/// answers merged; a sidecar's own admin port is reached through its pod; canaries through the
/// Lease holder; `weir check` also judges the CRDs and the chart's webhook configuration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_weir_command_asks_every_replica_through_the_api_server() {
    let fake = FakeKube::start().await;
    let scratch = Scratch::new();
    let backend = Backend::start("v1").await;
    fake.create(SERVICES, service("shop", "web", "10.96.0.10"));
    fake.create(PODS, pod("shop", "web-1", "web", false));
    fake.create(SLICES, slice("shop", "web-a", "web", &[(backend.addr, "web-1", true)]));
    for crd in weir_api::crds() {
        fake.create_cluster_scoped(CRDS, serde_json::to_value(crd).unwrap());
    }
    let docs = chart::render(None, &[]).unwrap();
    let hooks = chart::find(&docs, "MutatingWebhookConfiguration", "weir-sidecar-injector").clone();
    fake.create_cluster_scoped(WEBHOOKS, hooks);
    let a = kube_controller(&scratch, &fake, CONTROLLER_PODS[0], &[]).await;
    let b = kube_controller(&scratch, &fake, CONTROLLER_PODS[1], &[]).await;
    for (name, c) in CONTROLLER_PODS.iter().zip([&a, &b]) {
        fake.create(
            PODS,
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": name, "namespace": "weir-system",
                                "labels": {"app.kubernetes.io/name": "weir", "app.kubernetes.io/component": "controller"}},
                   "spec": {"containers": [{"name": "controller", "image": "weir-controller:dev"}]},
                   "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}),
        );
        fake.set_pod_proxy("weir-system", name, 9990, c.addr("admin"));
    }
    // One sidecar on each replica, its pod's admin port reachable through the API server too.
    let client_a = scratch.proxy(a.addr("grpc"), "shop/client-a", None).await;
    let client_b = scratch.proxy(b.addr("grpc"), "shop/client-b", None).await;
    for (pod, (sidecar, requests)) in ["client-a", "client-b"].into_iter().zip([(&client_a, 6u64), (&client_b, 4)]) {
        let admin = sidecar.addr("admin");
        fake.set_pod_proxy("shop", pod, admin.port(), admin);
        wait_config(admin, "web", |c| endpoint_count(c, "shop", "web") == 1).await;
        for _ in 0..requests {
            let r = send(&http1(), sidecar.addr("outbound"), "GET", "web.shop", "/", &[]).await.unwrap();
            assert_eq!(r.status, 200, "{}", r.body);
        }
    }
    for (c, n) in [(&a, 6), (&b, 4)] {
        let admin = c.addr("admin");
        wait_until("the reports", Duration::from_secs(20), || async move {
            admin_json(admin, "/stats").await["series"]
                .as_array()
                .is_some_and(|s| s.iter().any(|s| s["direction"] == "outbound" && s["requests"] == n))
        })
        .await;
    }
    let kubeconfig = fake.kubeconfig(scratch.dir.path());
    let k = kubeconfig.to_str().unwrap();

    let (code, table, err) = run_weir(&["proxy-status", "--kubeconfig", k]).await;
    assert_eq!(code, Some(0), "{table}{err}");
    let line = |w: &str| table.lines().find(|l| l.starts_with(w)).unwrap_or_else(|| panic!("{w}: {table}")).to_string();
    assert!(line("shop/client-a").contains("weir-controller-a") && line("shop/client-a").contains("SYNCED"), "{table}");
    assert!(line("shop/client-b").contains("weir-controller-b") && line("shop/client-b").contains("SYNCED"), "{table}");

    // Traffic reported to both replicas, summed.
    let (code, json, err) =
        run_weir(&["stat", "web", "-n", "shop", "--kubeconfig", k, "--window", "100ms", "-o", "json"]).await;
    assert_eq!(code, Some(0), "{err}");
    let rows: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 1, "{rows:#}");
    assert_eq!((rows[0]["requests"].as_u64(), rows[0]["successRate"].as_f64()), (Some(10), Some(100.0)), "{rows:#}");
    assert!(rows[0]["p99Ms"].as_f64().is_some_and(|p| p > 0.0), "{rows:#}");

    let (code, out, err) = run_weir(&["proxy-config", "shop/client-b", "endpoints", "--kubeconfig", k]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("shop/web") && out.contains(&backend.addr.to_string()), "{out}");
    // The sidecar's configuration came through a port-forward (a sidecar shows it only to its
    // pod's loopback), never through the API server's proxy.
    let log = fake.request_log();
    assert!(log.iter().any(|(_, p)| p.contains("/pods/client-b/portforward?") && p.contains("ports=")), "{log:?}");
    assert!(!log.iter().any(|(_, p)| p.contains("/proxy/config")), "{log:?}");

    let (code, out, err) = run_weir(&["canary", "status", "--kubeconfig", k, "-o", "json"]).await;
    assert_eq!((code, out.trim()), (Some(0), "[]"), "{err}");

    let (code, out, _) = run_weir(&["check", "--kubeconfig", k]).await;
    assert_eq!(code, Some(0), "{out}");
    for want in [
        "✔ CRD routes.weir.io: installed",
        "✔ injection webhook: 2 entries, CA bundle valid for",
        "✔ controller weir-controller-a: ready",
        "✔ controller weir-controller-b: ready",
        "✔ sidecars: 2 connected, all in sync",
    ] {
        assert!(out.contains(want), "{want}:\n{out}");
    }
    // The webhook configuration gone: ✘ with the fix.
    fake.delete(WEBHOOKS, "", "weir-sidecar-injector");
    let (code, out, _) = run_weir(&["check", "--kubeconfig", k]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("✘ injection webhook: no MutatingWebhookConfiguration weir-sidecar-injector")
            && out.contains("fix: install the chart with webhook.enabled=true"),
        "{out}"
    );
    // No ready controller pod: the error says so and how to install.
    for name in CONTROLLER_PODS {
        fake.patch_status(PODS, "weir-system", name, json!({"conditions": [{"type": "Ready", "status": "False"}]}));
    }
    let (code, _, err) = run_weir(&["proxy-status", "--kubeconfig", k]).await;
    assert_eq!(code, Some(1));
    assert!(err.contains("no ready controller pod in weir-system (2 found"), "{err}");
}

/// `weir analyze --kube` reads the cluster as the controller does: a Route with a field its
/// schema lacks is an error with its field, and a MeshAuthorization for a port none of the pods
/// it selects serves is a warning naming the ports they do serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_analyze_reads_the_cluster() {
    let fake = FakeKube::start().await;
    let scratch = Scratch::new();
    let ep: SocketAddr = "127.0.0.1:8080".parse().unwrap();
    fake.create(SERVICES, service("shop", "web", "10.96.0.10"));
    fake.create(PODS, pod("shop", "web-1", "web", true));
    fake.create(SLICES, slice("shop", "web-a", "web", &[(ep, "web-1", true)]));
    let mut bad = route("shop", "typo", "web", &[("web", 1)]);
    bad["spec"]["rules"][0]["backendRefs"][0]["wieght"] = json!(10);
    fake.create(ROUTES, bad);
    let authz = |name: &str, port: u16| {
        json!({"apiVersion": "weir.io/v1alpha1", "kind": "MeshAuthorization",
               "metadata": {"name": name, "namespace": "shop"},
               "spec": {"targetRef": {"selector": {"matchLabels": {"app": "web-1"}}, "port": port},
                        "allow": [{"from": {"namespaces": ["shop"]}}]}})
    };
    const AUTHZ: &str = "apis/weir.io/v1alpha1/meshauthorizations";
    fake.create(AUTHZ, authz("served", 8080));
    fake.create(AUTHZ, authz("unserved", 9090));
    let kubeconfig = fake.kubeconfig(scratch.dir.path()).display().to_string();
    let (code, out, err) = run_weir(&["analyze", "--kube", "--kubeconfig", &kubeconfig]).await;
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        out.lines().any(|l| l.contains("Route shop/typo: spec.rules[0].backendRefs[0].wieght: error: unknown field")),
        "{out}"
    );
    assert!(
        out.lines().any(|l| l.contains(
            "MeshAuthorization shop/unserved: spec.targetRef.port: warning: none of the pods it selects serves port 9090 (they serve 8080)"
        )),
        "{out}"
    );
    assert!(!out.contains("shop/served"), "{out}");
    assert!(out.trim_end().ends_with("1 errors, 1 warnings"), "{out}");
}
