//! Transparent interception for real: two "pods" (network namespaces on a bridge, each with
//! its own address), an application and a sidecar in each, the iptables rules written by
//! `weir-proxy init`. A plain HTTP client calls a Service's virtual address and the request
//! goes client → client sidecar → (mesh mTLS) → server sidecar → application, with neither application
//! knowing; skip-ports bypass the sidecars; the sidecar's own traffic is not redirected (no
//! loop); destinations outside the mesh pass through; `init` twice leaves the same rules.
//!
//! The perimeter too: another pod reaches neither the sidecar's own ports (`podIP:4140`) nor an
//! application port bound only on loopback, nor the admin endpoints that reveal or change
//! anything; under a strict MeshAuthorization nothing unauthenticated reaches the application
//! on any intercepted port (raw TCP, a client that sends `\r\n` first, a client that stays
//! silent past protocol detection), while a meshed TCP client rides mesh mTLS with its identity.
//!
//! Needs root, iproute2, iptables, curl, setpriv and python3 (the test command installs them).
//! Under `CI=true` a machine that cannot make network namespaces fails the test; elsewhere it
//! is skipped with a message.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use weir_tests::*;

/// Runs a command, panicking with its output when it fails.
fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace with one veth on the test's bridge; removed on drop.
struct Pod {
    ns: String,
    ip: String,
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// The bridge the pods hang off; removed on drop (after the pods).
struct Bridge {
    name: String,
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.name]).status();
    }
}

fn can_make_namespaces() -> bool {
    let probe = format!("weirprobe{}", std::process::id());
    let ok = Command::new("ip").args(["netns", "add", &probe]).status().is_ok_and(|s| s.success());
    if ok {
        let _ = Command::new("ip").args(["netns", "del", &probe]).status();
    }
    ok && Command::new("iptables").arg("--version").output().is_ok_and(|o| o.status.success())
}

fn pod(bridge: &Bridge, subnet: &str, host: u8, tag: &str) -> Pod {
    let ns = format!("weir-{tag}-{}", std::process::id());
    let veth = format!("w{tag}{}", std::process::id() % 100_000);
    let ip = format!("{subnet}.{host}");
    sh(&["ip", "netns", "add", &ns]);
    let p = Pod { ns: ns.clone(), ip: ip.clone() };
    sh(&["ip", "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns]);
    sh(&["ip", "link", "set", &veth, "master", &bridge.name, "up"]);
    sh(&["ip", "-n", &ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
    sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
    sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
    sh(&["ip", "-n", &ns, "route", "add", "default", "via", &format!("{subnet}.1")]);
    p
}

const PROXY_UID: &str = "2102";

/// `program args…` inside `pod`, as `uid` when given.
async fn spawn_in(
    scratch: &Scratch,
    pod: &Pod,
    name: &str,
    uid: Option<&str>,
    program: &str,
    args: &[String],
) -> ChildProc {
    let mut a: Vec<String> = vec!["netns".into(), "exec".into(), pod.ns.clone()];
    if let Some(uid) = uid {
        a.extend(["setpriv", "--reuid", uid, "--regid", uid, "--clear-groups", "--"].map(String::from));
    }
    a.push(program.into());
    a.extend(args.iter().cloned());
    ChildProc::spawn(name, std::path::Path::new("ip"), &a, scratch.log(name)).await.unwrap()
}

/// A TCP server in `pod` on every address at `port` (Python, a thread per connection): `serve`
/// is the body run with the accepted socket `c` (indented one level), which is closed after.
async fn tcp_server_in(scratch: &Scratch, pod: &Pod, name: &str, port: u16, serve: &str) -> ChildProc {
    let script = format!(
        "import socket, threading\n\
         s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('0.0.0.0', {port})); s.listen(16); print('{{\"{name}\": \"0.0.0.0:{port}\"}}', flush=True)\n\
         def serve(c):\n\
         \x20   {serve}\n\
         \x20   c.close()\n\
         while True:\n\
         \x20   c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()\n"
    );
    spawn_in(scratch, pod, name, None, "python3", &["-c".to_string(), script]).await
}

fn init(pod: &Pod, extra: &[&str]) {
    let proxy = bin("weir-proxy");
    let mut a = vec!["ip", "netns", "exec", &pod.ns, proxy.to_str().unwrap(), "init", "--proxy-uid", PROXY_UID];
    a.extend_from_slice(extra);
    sh(&a);
}

fn nat_rules(pod: &Pod) -> Vec<String> {
    sh(&["ip", "netns", "exec", &pod.ns, "iptables-save", "-t", "nat"])
        .lines()
        .filter(|l| l.starts_with("-A"))
        .map(String::from)
        .collect()
}

/// `curl` from inside `pod`: (status, x-weir-backend).
fn curl(pod: &Pod, url: &str) -> (u16, String) {
    curl_in(&pod.ns, url)
}

fn curl_in(ns: &str, url: &str) -> (u16, String) {
    curl_with(ns, &[], url)
}

/// `curl` from the test's own namespace: a host on the bridge with no sidecar.
fn curl_host(url: &str) -> (u16, String) {
    curl_with("", &[], url)
}

/// `curl` inside network namespace `ns` (the test's own when empty).
fn curl_with(ns: &str, extra: &[&str], url: &str) -> (u16, String) {
    let mut args = vec!["ip", "netns", "exec", ns];
    if ns.is_empty() {
        args.clear();
    }
    args.extend(["curl", "-s", "-m", "10", "-o", "/dev/null", "-D", "-", "-w", "%{http_code}"]);
    args.extend_from_slice(extra);
    args.push(url);
    let out = sh(&args);
    let status = out.lines().last().and_then(|l| l.trim().parse().ok()).unwrap_or(0);
    let backend = out
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("x-weir-backend:").map(|v| v.trim().to_string()))
        .unwrap_or_default();
    (status, backend)
}

/// GETs `path` from the sidecar admin port inside `ns` over the pod's loopback, as `kubectl
/// port-forward` would (only loopback clients may read `/config`).
async fn admin_in(ns: &str, path: &str) -> String {
    let (ns, url) = (ns.to_string(), format!("http://127.0.0.1:4191{path}"));
    tokio::task::spawn_blocking(move || {
        let out = Command::new("ip").args(["netns", "exec", &ns, "curl", "-s", "-m", "5", &url]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    })
    .await
    .unwrap()
}

/// Waits until the `/config` of the sidecar inside `ns` satisfies `ok`.
async fn wait_config_in(ns: &str, what: &str, ok: impl Fn(&serde_json::Value) -> bool) {
    wait_until(what, Duration::from_secs(20), || {
        let ok = &ok;
        async move { ok(&serde_json::from_str(&admin_in(ns, "/config").await).unwrap_or_default()) }
    })
    .await;
}

/// The sum of a metric's samples whose line contains every one of `having`.
async fn metric_sum(admin: SocketAddr, name: &str, having: &[&str]) -> f64 {
    let text = admin_text(admin, "/metrics").await;
    assert!(text.contains("# TYPE"), "no metrics from {admin}: is the sidecar alive?");
    text.lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with(['{', ' '])))
        .filter(|l| having.iter().all(|h| l.contains(h)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Connects from the test's own namespace (another host on the bridge, no sidecar), sends
/// `first` (nothing when empty; then closes its sending side when `half_close`), and returns
/// what came back before the other side closed (`None`: still open after 10 s).
async fn raw_exchange_with(addr: &str, first: &[u8], half_close: bool) -> Option<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    if !first.is_empty() {
        s.write_all(first).await.unwrap();
    }
    if half_close {
        s.shutdown().await.unwrap();
    }
    let mut got = Vec::new();
    match tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got)).await {
        Ok(_) => Some(got),
        Err(_) => None,
    }
}

async fn raw_exchange(addr: &str, first: &[u8]) -> Option<Vec<u8>> {
    raw_exchange_with(addr, first, false).await
}

async fn requests(admin: SocketAddr, direction: &str) -> f64 {
    admin_text(admin, "/metrics")
        .await
        .lines()
        .filter(|l| l.starts_with("weir_requests_total{") && l.contains(&format!("direction=\"{direction}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iptables_send_pod_traffic_through_the_sidecars() {
    if !can_make_namespaces() {
        let why = "cannot create network namespaces or run iptables here (needs root, iproute2, iptables)";
        // Any CI setting (CI=true, CI=1, ...) makes a missing capability a failure, not a skip.
        let in_ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
        assert!(!in_ci, "CI is set and {why}: this test must run in CI");
        eprintln!("skipped: {why}");
        return;
    }
    let scratch = Scratch::new();
    let id = std::process::id();
    let subnet = format!("10.{}.{}", 100 + id % 100, (id / 100) % 250);
    let bridge = Bridge { name: format!("wbr{}", id % 100_000) };
    sh(&["ip", "link", "add", &bridge.name, "type", "bridge"]);
    sh(&["ip", "addr", "add", &format!("{subnet}.1/24"), "dev", &bridge.name]);
    sh(&["ip", "link", "set", &bridge.name, "up"]);
    let a = pod(&bridge, &subnet, 2, "a");
    let b = pod(&bridge, &subnet, 3, "b");

    // The controller (root namespace, on the bridge) knows a virtual address for `web`, and
    // two for b's server-first app on 7100: `db` declares the port opaque, `db-plain` does not.
    let cluster_ip = format!("10.{}.200.10", 100 + id % 100);
    let (db_ip, db_plain_ip) = (format!("10.{}.200.11", 100 + id % 100), format!("10.{}.200.12", 100 + id % 100));
    let secure_ip = format!("10.{}.200.13", 100 + id % 100);
    let db = |name: &str, ip: &str, port: &str| {
        format!(
            "---\nkind: Service\nmetadata: {{ name: {name}, namespace: test }}\nspec:\n  ports: [{port}]\n  clusterIPs: [\"{ip}\"]\n  endpoints:\n  - {{ address: \"{}:7100\", port: 7100, meshed: true, workload: b, serviceAccount: b }}\n",
            b.ip
        )
    };
    scratch.write(
        "mesh.yaml",
        &format!(
            "kind: Service\nmetadata: {{ name: web, namespace: test }}\nspec:\n  ports: [{{ port: 80 }}]\n  clusterIPs: [\"{cluster_ip}\"]\n  endpoints:\n  - {{ address: \"{}:8080\", port: 80, meshed: true, workload: b, serviceAccount: b }}\n{}{}---\nkind: Service\nmetadata: {{ name: secure, namespace: test }}\nspec:\n  ports: [{{ port: 8443 }}]\n  clusterIPs: [\"{secure_ip}\"]\n  endpoints:\n  - {{ address: \"{}:8443\", port: 8443, meshed: true, workload: b, serviceAccount: b }}\n",
            b.ip,
            db("db", &db_ip, "{ port: 7100, appProtocol: tcp }"),
            db("db-plain", &db_plain_ip, "{ port: 7100 }"),
            b.ip,
        ),
    );
    let controller_args: Vec<String> = [
        "--grpc-addr",
        &format!("{subnet}.1:0"),
        "--admin-addr",
        "127.0.0.1:0",
        "--print-listen-addrs",
        "--log-level",
        "debug",
        "--config-dir",
        &scratch.config_dir().display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(scratch.identity_flags(&[("token-a", "test/a"), ("token-b", "test/b")], &[]))
    .collect();
    let controller =
        ChildProc::spawn("controller", &bin("weir-controller"), &controller_args, scratch.log("controller"))
            .await
            .unwrap();
    let grpc = controller.addr("grpc").to_string();

    // Each pod: its interception rules, its app, its sidecar (as the proxy UID).
    init(&a, &["--skip-inbound-ports", "4191", "--skip-outbound-ports", "9999"]);
    init(&b, &["--skip-inbound-ports", "4191,9999"]);
    let backend = bin("weir").display().to_string();
    let app = |name: &str, listen: &str| -> Vec<String> {
        ["demo-backend", "--name", name, "--listen", listen, "--print-listen-addrs"].map(String::from).to_vec()
    };
    let _b_app = spawn_in(&scratch, &b, "b-app", None, &backend, &app("b-app", "0.0.0.0:8080")).await;
    let _b_direct = spawn_in(&scratch, &b, "b-direct", None, &backend, &app("b-direct", "0.0.0.0:9999")).await;
    // The sidecars run as the proxy UID: let it read its token.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(scratch.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let sidecar = |workload: &str, sa: &str, opaque_ports: &str| -> Vec<String> {
        let token = scratch.token_flags(&format!("token-{sa}"));
        std::fs::set_permissions(&token[1], std::fs::Permissions::from_mode(0o644)).unwrap();
        [
            "--opaque-ports",
            opaque_ports,
            "--controller",
            &grpc,
            "--workload",
            workload,
            "--service-account",
            sa,
            "--token-file",
            &token[1],
            "--trust-anchors",
            &token[3],
            "--outbound-addr",
            "127.0.0.1:4140",
            "--inbound-addr",
            "0.0.0.0:4143",
            "--admin-addr",
            "0.0.0.0:4191",
            "--print-listen-addrs",
            "--log-level",
            "debug",
        ]
        .map(String::from)
        .to_vec()
    };
    let proxy = bin("weir-proxy").display().to_string();
    let _a_proxy = spawn_in(&scratch, &a, "a-proxy", Some(PROXY_UID), &proxy, &sidecar("test/a", "a", "")).await;
    let _b_proxy = spawn_in(&scratch, &b, "b-proxy", Some(PROXY_UID), &proxy, &sidecar("test/b", "b", "7100")).await;
    let a_admin: SocketAddr = format!("{}:4191", a.ip).parse().unwrap();
    let b_admin: SocketAddr = format!("{}:4191", b.ip).parse().unwrap();
    wait_config_in(&a.ns, "a's snapshot", |c| endpoint_count(c, "test", "web") == 1).await;
    wait_config_in(&b.ns, "b's snapshot", |c| !c["version"].is_null()).await;
    // Both hold a workload certificate before traffic flows.
    for admin in [a_admin, b_admin] {
        wait_ready(admin).await;
    }

    // The client calls the virtual address in plain HTTP: both sidecars carry it (the client
    // sidecar's own connection to b is not redirected back to itself).
    let (status, backend_name) = curl(&a, &format!("http://{cluster_ip}/"));
    assert_eq!((status, backend_name.as_str()), (200, "b-app"), "see {}", scratch.dir.path().display());
    assert!(requests(a_admin, "outbound").await >= 1.0, "a's sidecar saw no outbound request");
    assert!(requests(b_admin, "inbound").await >= 1.0, "b's sidecar saw no inbound request");
    // Between the sidecars, mesh mTLS with a's identity.
    let b_metrics = admin_text(b_admin, "/metrics").await;
    assert!(
        b_metrics.lines().any(|l| l.starts_with("weir_requests_total{")
            && l.contains("direction=\"inbound\"")
            && l.contains("tls=\"true\"")),
        "{b_metrics}"
    );
    assert!(b_metrics.contains("client_identity=\"spiffe://cluster.local/ns/test/sa/a\""), "{b_metrics}");
    // A meshed pod called by its own address rides the mesh hop (mTLS) too.
    let mtls_in = |m: &str| -> f64 {
        m.lines()
            .filter(|l| {
                l.starts_with("weir_requests_total{")
                    && l.contains("direction=\"inbound\"")
                    && l.contains("tls=\"true\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let before = mtls_in(&admin_text(b_admin, "/metrics").await);
    let (status, backend_name) = curl(&a, &format!("http://{}:8080/", b.ip));
    assert_eq!((status, backend_name.as_str()), (200, "b-app"));
    assert_eq!(mtls_in(&admin_text(b_admin, "/metrics").await), before + 1.0, "not over mesh mTLS");
    // By name too (cluster DNS would answer the ClusterIP; curl is told so).
    let (status, backend_name) = curl_with(
        &a.ns,
        &["--resolve", &format!("web.test.svc.cluster.local:80:{cluster_ip}")],
        "http://web.test.svc.cluster.local/",
    );
    assert_eq!((status, backend_name.as_str()), (200, "b-app"));

    // A skip-port reaches b's other app directly: neither sidecar sees it.
    let (a_out, b_in) = (requests(a_admin, "outbound").await, requests(b_admin, "inbound").await);
    let (status, backend_name) = curl(&a, &format!("http://{}:9999/", b.ip));
    assert_eq!((status, backend_name.as_str()), (200, "b-direct"));
    assert_eq!(requests(a_admin, "outbound").await, a_out);
    assert_eq!(requests(b_admin, "inbound").await, b_in);

    // A destination outside the mesh passes through a's sidecar untouched.
    let outside = tokio::net::TcpListener::bind(format!("{subnet}.1:0")).await.unwrap();
    let outside_addr = outside.local_addr().unwrap();
    let behaviour = Behaviour::new("outside", 0.0, Duration::ZERO);
    let outside_task = tokio::spawn(weir::backend::serve(outside, behaviour, std::future::pending()));
    // (curl blocks: off the runtime, so the in-process server keeps answering.)
    let a_ns = a.ns.clone();
    let (status, backend_name) =
        tokio::task::spawn_blocking(move || curl_in(&a_ns, &format!("http://{outside_addr}/"))).await.unwrap();
    assert_eq!((status, backend_name.as_str()), (200, "outside"));
    outside_task.abort();

    // Not HTTP: carried as opaque TCP. Outbound, to where the app sent it (an echo server
    // outside the mesh)…
    let echo = tokio::net::TcpListener::bind(format!("{subnet}.1:0")).await.unwrap();
    let echo_addr = echo.local_addr().unwrap();
    let echo_task = tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let tunnels = |admin: SocketAddr| async move {
        admin_text(admin, "/metrics")
            .await
            .lines()
            .find_map(|l| l.strip_prefix("weir_tunnels_total{result=\"ok\"} ").and_then(|v| v.parse::<f64>().ok()))
            .unwrap_or(0.0)
    };
    let a_ns = a.ns.clone();
    let script =
        format!("exec 3<>/dev/tcp/{}/{}; printf 'hello\\n' >&3; head -c 6 <&3", echo_addr.ip(), echo_addr.port());
    let echoed = tokio::task::spawn_blocking(move || {
        sh(&["ip", "netns", "exec", &a_ns, "timeout", "10", "bash", "-c", &script])
    })
    .await
    .unwrap();
    assert_eq!(echoed, "hello\n");
    assert!(tunnels(a_admin).await >= 1.0, "a's sidecar did not carry the opaque connection");
    echo_task.abort();
    // …and inbound, to the original port at the pod's own address (with no policy, plaintext
    // is admitted: the HTTP app answers the garbage).
    let mut raw = tokio::net::TcpStream::connect(format!("{}:8080", b.ip)).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut raw, b"hello\r\n\r\n").await.unwrap();
    let mut answer = vec![0u8; 12];
    tokio::time::timeout(Duration::from_secs(10), tokio::io::AsyncReadExt::read_exact(&mut raw, &mut answer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&answer, b"HTTP/1.1 400", "{}", String::from_utf8_lossy(&answer));
    assert!(tunnels(b_admin).await >= 1.0, "b's sidecar did not carry the opaque connection");

    // Declared opaque ports skip detection: a protocol where the server speaks first (b's
    // greeter on 7100) greets a's client at once through `db` (appProtocol tcp; b's sidecar
    // has --opaque-ports 7100), over mTLS; through `db-plain` the client's sidecar first waits
    // out the detection window for bytes that never come.
    let _greeter = tcp_server_in(&scratch, &b, "b-greeter", 7100, "c.sendall(b'220 weir\\r\\n'); c.recv(64)").await;
    wait_config_in(&a.ns, "the db Services", |c| {
        endpoint_count(c, "test", "db") == 1 && endpoint_count(c, "test", "db-plain") == 1
    })
    .await;
    let greeting = |ip: String| {
        let a_ns = a.ns.clone();
        async move {
            let script = format!("exec 3<>/dev/tcp/{ip}/7100; head -c 10 <&3");
            let started = std::time::Instant::now();
            let got = tokio::task::spawn_blocking(move || {
                sh(&["ip", "netns", "exec", &a_ns, "timeout", "10", "bash", "-c", &script])
            })
            .await
            .unwrap();
            (got, started.elapsed())
        }
    };
    let mtls_before = metric_sum(b_admin, "weir_tcp_connections_total", &["tls=\"true\"", "sa/a\""]).await;
    let (got, took) = greeting(db_ip.clone()).await;
    assert_eq!(got, "220 weir\r\n");
    assert!(
        took < weir_proxy::server::DETECT_TIMEOUT - Duration::from_millis(500),
        "the declared opaque port waited {took:?}"
    );
    let mtls = metric_sum(b_admin, "weir_tcp_connections_total", &["tls=\"true\"", "sa/a\""]).await;
    assert_eq!(mtls, mtls_before + 1.0, "the greeting did not ride mTLS from a's identity");
    let (got, took) = greeting(db_plain_ip.clone()).await;
    assert_eq!(got, "220 weir\r\n");
    assert!(
        took >= weir_proxy::server::DETECT_TIMEOUT - Duration::from_millis(100),
        "undeclared, yet no detection wait: {took:?}"
    );

    // An application that terminates TLS itself (its own certificate, for secure.test): a's
    // client, verifying that certificate, reaches it through both sidecars (the TLS rides
    // mesh mTLS between them); a client outside the mesh (a kubelet's HTTPS probe) reaches it
    // straight, its ClientHello told from the mesh's by ALPN and carried untouched.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "the app's own CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let ca = rcgen::Issuer::new(ca_params, ca_key);
    let app_key = rcgen::KeyPair::generate().unwrap();
    let mut app_params = rcgen::CertificateParams::new(vec!["secure.test".to_string()]).unwrap();
    app_params.distinguished_name.push(rcgen::DnType::CommonName, "secure.test");
    let app_cert = app_params.signed_by(&app_key, &ca).unwrap();
    let tls_dir = scratch.dir.path().join("app-tls");
    std::fs::create_dir_all(&tls_dir).unwrap();
    std::fs::write(tls_dir.join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(tls_dir.join("app.pem"), app_cert.pem()).unwrap();
    std::fs::write(tls_dir.join("app.key"), app_key.serialize_pem()).unwrap();
    let https_app = format!(
        "import http.server, ssl\n\
         class H(http.server.BaseHTTPRequestHandler):\n\
         \x20   def do_GET(self):\n\
         \x20       body = b'secret'\n\
         \x20       self.send_response(200); self.send_header('x-weir-backend', 'b-https')\n\
         \x20       self.send_header('content-length', str(len(body))); self.end_headers(); self.wfile.write(body)\n\
         srv = http.server.ThreadingHTTPServer(('0.0.0.0', 8443), H)\n\
         ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain('{0}/app.pem', '{0}/app.key')\n\
         srv.socket = ctx.wrap_socket(srv.socket, server_side=True)\n\
         print('{{\"b-https\": \"0.0.0.0:8443\"}}', flush=True)\n\
         srv.serve_forever()\n",
        tls_dir.display()
    );
    let _b_https = spawn_in(&scratch, &b, "b-https", None, "python3", &["-c".to_string(), https_app]).await;
    wait_config_in(&a.ns, "the secure Service", |c| endpoint_count(c, "test", "secure") == 1).await;
    let ca_file = tls_dir.join("ca.pem").display().to_string();
    let https = |ns: String, ip: String| {
        let ca_file = ca_file.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let resolve = format!("secure.test:8443:{ip}");
                curl_with(&ns, &["--cacert", &ca_file, "--resolve", &resolve], "https://secure.test:8443/")
            })
            .await
            .unwrap()
        }
    };
    let from_a = ["direction=\"inbound\"", "tls=\"true\"", "client_identity=\"spiffe://cluster.local/ns/test/sa/a\""];
    let mesh_tcp_before = metric_sum(b_admin, "weir_tcp_connections_total", &from_a).await;
    let (status, backend_name) = https(a.ns.clone(), secure_ip.clone()).await;
    assert_eq!((status, backend_name.as_str()), (200, "b-https"), "a's HTTPS to the app's own certificate");
    assert_eq!(
        metric_sum(b_admin, "weir_tcp_connections_total", &from_a).await,
        mesh_tcp_before + 1.0,
        "a's TLS did not ride mesh mTLS with a's identity"
    );
    let passthrough_before = metric_sum(b_admin, "weir_inbound_tls_passthrough_total", &[]).await;
    let (status, backend_name) = https(String::new(), b.ip.clone()).await;
    assert_eq!((status, backend_name.as_str()), (200, "b-https"), "HTTPS from outside the mesh, straight to b");
    assert_eq!(
        metric_sum(b_admin, "weir_inbound_tls_passthrough_total", &[]).await,
        passthrough_before + 1.0,
        "the application's TLS was not counted as passed through"
    );

    // The perimeter. The admin port answers other pods' probes and scrapes, but neither
    // shows the mesh's configuration nor changes anything for them.
    let client = http1();
    let from_outside = |path: &'static str, method: &'static str| {
        let client = client.clone();
        async move { send(&client, b_admin, method, &b_admin.to_string(), path, &[]).await.map(|r| r.status).unwrap_or(0) }
    };
    assert_eq!(from_outside("/config", "GET").await, 403, "another pod read the mesh snapshot");
    assert_eq!(from_outside("/log-level?level=trace", "POST").await, 403, "another pod changed the log level");
    assert_eq!(from_outside("/tap", "GET").await, 403, "another pod tapped b's traffic");
    assert_eq!(from_outside("/ready", "GET").await, 200);
    assert_eq!(from_outside("/live", "GET").await, 200);
    assert!(admin_in(&b.ns, "/config").await.contains("\"snapshot\""), "loopback reads /config");

    // The sidecar's own ports are not reachable through interception: another pod calling
    // podIP:4140 would otherwise use b's outbound listener with b's identity.
    let refused_before = metric_sum(b_admin, "weir_refused_connections_total", &["reason=\"sidecar_port\""]).await;
    let got = raw_exchange(&format!("{}:4140", b.ip), b"GET / HTTP/1.1\r\nHost: web.test\r\n\r\n").await;
    assert_eq!(got.as_deref(), Some(&b""[..]), "podIP:4140 answered another pod");
    let refused = metric_sum(b_admin, "weir_refused_connections_total", &["reason=\"sidecar_port\""]).await;
    assert_eq!(refused, refused_before + 1.0, "the refusal was not counted");

    // A port the application binds only on loopback stays private to the pod: inbound goes
    // to the pod's own address, never to 127.0.0.1.
    let _b_local = spawn_in(&scratch, &b, "b-local", None, &backend, &app("b-local", "127.0.0.1:7070")).await;
    let (status, backend_name) = curl_host(&format!("http://{}:7070/", b.ip));
    assert!(status != 200 && backend_name != "b-local", "a loopback-only port answered: {status} {backend_name}");
    let a_ns = a.ns.clone();
    let url = format!("http://{}:7070/", b.ip);
    let (status, backend_name) = tokio::task::spawn_blocking(move || curl_in(&a_ns, &url)).await.unwrap();
    assert!(status != 200 && backend_name != "b-local", "a loopback-only port answered a: {status} {backend_name}");

    // A TCP echo server in b, on every address.
    let _echo_b = tcp_server_in(
        &scratch,
        &b,
        "b-echo",
        7000,
        "d = c.recv(65536)\n\
         \x20   while d:\n\
         \x20       c.sendall(d); d = c.recv(65536)",
    )
    .await;

    // Strict: only a's identity may reach b, on any port.
    scratch.write(
        "authorization.yaml",
        "apiVersion: weir.io/v1alpha1\nkind: MeshAuthorization\nmetadata: { name: b-strict, namespace: test }\nspec:\n  targetRef: { workload: b }\n  mode: strict\n  allow:\n  - name: from-a\n    from: { serviceAccounts: [a] }\n",
    );
    wait_config_in(&b.ns, "b's strict policy", |c| c.to_string().contains("test/b-strict")).await;
    let unauthorized = || metric_sum(b_admin, "weir_refused_connections_total", &["reason=\"unauthorized\""]);
    let before = unauthorized().await;
    let app_addr = format!("{}:8080", b.ip);
    // Raw TCP, and HTTP behind a leading CRLF (not sniffed as HTTP): closed, nothing answered.
    for first in [&b"hello\r\n\r\n"[..], b"\r\nGET / HTTP/1.1\r\nHost: web\r\n\r\n"] {
        let got = raw_exchange(&app_addr, first).await;
        assert_eq!(
            got.as_deref(),
            Some(&b""[..]),
            "plaintext {:?} reached the app under strict mode",
            String::from_utf8_lossy(first)
        );
    }
    // A client that stays silent past detection is closed then, before it could send anything.
    let got = raw_exchange(&app_addr, b"").await;
    assert_eq!(got.as_deref(), Some(&b""[..]), "a silent client was not closed under strict mode");
    assert_eq!(unauthorized().await, before + 3.0, "the three refusals were not counted");
    // Plaintext HTTP gets its 403.
    let (status, _) = curl_host(&format!("http://{app_addr}/"));
    assert_eq!(status, 403);
    // a's HTTP is still served, and a's TCP to another port of b rides mesh mTLS with a's
    // identity (b is a meshed pod: its address is an endpoint of `web`).
    let (status, backend_name) = curl(&a, &format!("http://{cluster_ip}/"));
    assert_eq!((status, backend_name.as_str()), (200, "b-app"));
    let from_a = ["direction=\"inbound\"", "tls=\"true\"", "client_identity=\"spiffe://cluster.local/ns/test/sa/a\""];
    let tcp_from_a_before = metric_sum(b_admin, "weir_tcp_connections_total", &from_a).await;
    let tcp_out_before =
        metric_sum(a_admin, "weir_tcp_connections_total", &["direction=\"outbound\"", "tls=\"true\""]).await;
    let tcp_bytes_before = {
        let b_in = ["direction=\"inbound\"", "tls=\"true\"", "peer_identity=\"spiffe://cluster.local/ns/test/sa/a\""];
        let a_out = [
            "direction=\"outbound\"",
            "service=\"\"",
            "tls=\"true\"",
            "peer_identity=\"spiffe://cluster.local/ns/test/sa/b\"",
        ];
        let with = |labels: &[&str], f: &'static str| {
            [labels, &[f][..]].concat().into_iter().map(String::from).collect::<Vec<_>>()
        };
        let sum = |admin, labels: Vec<String>| async move {
            metric_sum(admin, "weir_tcp_bytes_total", &labels.iter().map(String::as_str).collect::<Vec<_>>()).await
        };
        (
            sum(b_admin, with(&b_in, "flow=\"sent\"")).await,
            sum(b_admin, with(&b_in, "flow=\"received\"")).await,
            sum(a_admin, with(&a_out, "flow=\"sent\"")).await,
            sum(a_admin, with(&a_out, "flow=\"received\"")).await,
            metric_sum(b_admin, "weir_tcp_connection_duration_seconds_count", &b_in[..2]).await,
        )
    };
    let a_ns = a.ns.clone();
    let script = format!("exec 3<>/dev/tcp/{}/7000; printf 'hello\\n' >&3; head -c 6 <&3", b.ip);
    let echoed = tokio::task::spawn_blocking(move || {
        sh(&["ip", "netns", "exec", &a_ns, "timeout", "10", "bash", "-c", &script])
    })
    .await
    .unwrap();
    assert_eq!(echoed, "hello\n");
    let tcp_from_a = metric_sum(b_admin, "weir_tcp_connections_total", &from_a).await;
    assert_eq!(tcp_from_a, tcp_from_a_before + 1.0, "a's TCP did not arrive over mesh mTLS with a's identity");
    assert_eq!(
        metric_sum(a_admin, "weir_tcp_connections_total", &["direction=\"outbound\"", "tls=\"true\""]).await,
        tcp_out_before + 1.0
    );
    // Counted like a request: its bytes each way with the peer's identity (and no Service: b
    // serves none at that port), and how long it stayed open once it closed.
    let b_in = ["direction=\"inbound\"", "tls=\"true\"", "peer_identity=\"spiffe://cluster.local/ns/test/sa/a\""];
    let a_out = [
        "direction=\"outbound\"",
        "service=\"\"",
        "tls=\"true\"",
        "peer_identity=\"spiffe://cluster.local/ns/test/sa/b\"",
    ];
    wait_until("the echo's bytes and duration counted on both sides", Duration::from_secs(10), || async move {
        let flow = |f: &'static str| move |labels: &[&'static str]| [labels, &[f][..]].concat();
        let (sent, received) = (flow("flow=\"sent\""), flow("flow=\"received\""));
        metric_sum(b_admin, "weir_tcp_bytes_total", &sent(&b_in)).await >= tcp_bytes_before.0 + 6.0
            && metric_sum(b_admin, "weir_tcp_bytes_total", &received(&b_in)).await >= tcp_bytes_before.1 + 6.0
            && metric_sum(a_admin, "weir_tcp_bytes_total", &sent(&a_out)).await >= tcp_bytes_before.2 + 6.0
            && metric_sum(a_admin, "weir_tcp_bytes_total", &received(&a_out)).await >= tcp_bytes_before.3 + 6.0
            && metric_sum(b_admin, "weir_tcp_connection_duration_seconds_count", &b_in[..2]).await
                >= tcp_bytes_before.4 + 1.0
    })
    .await;
    // From outside the mesh, the same port is closed.
    let echo_b = format!("{}:7000", b.ip);
    assert_eq!(raw_exchange_with(&echo_b, b"hello\n", true).await.as_deref(), Some(&b""[..]));

    // Permissive, with a rule for unauthenticated clients: plaintext TCP reaches the app.
    scratch.write(
        "authorization.yaml",
        "apiVersion: weir.io/v1alpha1\nkind: MeshAuthorization\nmetadata: { name: b-open, namespace: test }\nspec:\n  targetRef: { workload: b }\n  mode: permissive\n  allow:\n  - name: anyone\n    from: { unauthenticated: true }\n",
    );
    wait_config_in(&b.ns, "b's permissive policy", |c| c.to_string().contains("test/b-open")).await;
    let got = raw_exchange_with(&echo_b, b"hello\n", true).await;
    assert_eq!(got.as_deref(), Some(&b"hello\n"[..]), "plaintext TCP refused under a permissive policy that admits it");
    let got = raw_exchange(&app_addr, b"hello\r\n\r\n").await.unwrap_or_default();
    assert!(got.starts_with(b"HTTP/1.1 400"), "{}", String::from_utf8_lossy(&got));

    // `init` again: the same rules, once.
    let before = nat_rules(&b);
    init(&b, &["--skip-inbound-ports", "4191,9999"]);
    assert_eq!(nat_rules(&b), before);
    assert_eq!(before.iter().filter(|r| r.contains("-j WEIR_INBOUND")).count(), 1, "{before:?}");
    assert_eq!(before.iter().filter(|r| r.contains("-j WEIR_OUTBOUND")).count(), 1, "{before:?}");
}
