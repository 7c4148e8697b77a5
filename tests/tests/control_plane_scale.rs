//! A measurement, not a check (ignored by default; numbers only mean something in release):
//! one controller (local mode) with 1,000 Services and 10,000 endpoints, and N simulated
//! sidecars (lightweight gRPC clients that say Hello and ack every snapshot as a real sidecar
//! does, without building the configuration). Each round changes one Service's endpoints and
//! times the write to the last sidecar's ack; the controller's CPU per push and its memory are
//! read from /proc.
//!
//! ```sh
//! WEIR_SIDECARS=1000 cargo test --release -p weir-tests --test control_plane_scale -- --ignored --nocapture
//! ```
//!
//! The simulated sidecars take incremental snapshots, as real ones do; with `WEIR_WHOLE=1`
//! they ask for whole ones instead. With `WEIR_TLS=1` the controller serves identities and the
//! control plane is mutual TLS, as in production: each simulated sidecar opens its own TLS
//! connection with a workload certificate (one certificate, certified once, shared by all:
//! Certify is rate-limited per address and every simulated sidecar is on 127.0.0.1).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use weir_api::proto::{self, proxy_message};
use weir_tests::*;

const SERVICES: usize = 1_000;
const ENDPOINTS_PER_SERVICE: usize = 10;

/// What a simulated sidecar decodes of a ControllerMessage: the snapshot's version only
/// (protobuf skips the services and inbound policy without building them).
#[derive(Clone, PartialEq, prost::Message)]
struct LightMessage {
    #[prost(message, optional, tag = "1")]
    snapshot: Option<LightSnapshot>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct LightSnapshot {
    #[prost(string, tag = "1")]
    version: String,
}

/// Per sidecar: the newest version acked and when.
type Acks = Arc<Mutex<Vec<(u64, Instant)>>>;

/// How simulated sidecars reach the controller: plaintext, or TLS with a certificate.
#[derive(Clone)]
enum Control {
    Plain(std::net::SocketAddr),
    Tls(weir_proxy::channel::ControlEndpoint, Arc<weir_proxy::tls::Credentials>),
}

async fn simulated_sidecar(control: Control, i: usize, acks: Acks) -> anyhow::Result<()> {
    let channel = match control {
        Control::Plain(grpc) => tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))?.connect().await?,
        Control::Tls(endpoint, creds) => endpoint.channel(Some(creds), None).await?,
    };
    let mut client = tonic::client::Grpc::new(channel);
    client.ready().await?;
    let (tx, rx) = mpsc::channel(4);
    let hello = proto::Hello {
        namespace: "scale".into(),
        name: format!("client-{i}"),
        service_account: "client".into(),
        proxy_version: "sim".into(),
        // As real sidecars do, unless WEIR_WHOLE asks for whole snapshots (for comparison).
        incremental: std::env::var_os("WEIR_WHOLE").is_none(),
        ..Default::default()
    };
    tx.send(proto::ProxyMessage { msg: Some(proxy_message::Msg::Hello(hello)) }).await?;
    let codec = tonic_prost::ProstCodec::<proto::ProxyMessage, LightMessage>::default();
    let path = http::uri::PathAndQuery::from_static("/weir.v1.Discovery/Stream");
    let mut stream = client.streaming(tonic::Request::new(ReceiverStream::new(rx)), path, codec).await?.into_inner();
    while let Some(m) = stream.message().await? {
        if let Some(s) = m.snapshot {
            let n: u64 = s.version.parse().unwrap_or(0);
            acks.lock().unwrap()[i] = (n, Instant::now());
            let ack = proxy_message::Msg::Ack(proto::Ack { version: s.version });
            tx.send(proto::ProxyMessage { msg: Some(ack) }).await?;
        }
    }
    Ok(())
}

fn endpoints(svc: usize, extra: usize) -> Vec<String> {
    (0..ENDPOINTS_PER_SERVICE + extra)
        .map(|e| {
            format!(
                "{{ address: \"10.{}.{}.{}:8080\", meshed: true, serviceAccount: svc-{svc}, labels: {{ app: svc-{svc}, zone: zone-{} }} }}",
                1 + svc / 250,
                svc % 250,
                1 + e,
                e % 3
            )
        })
        .collect()
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1]
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement: run explicitly, in release"]
async fn sidecars_acking_config_changes() {
    let sidecars: usize = std::env::var("WEIR_SIDECARS").ok().and_then(|v| v.parse().ok()).unwrap_or(100);
    let rounds: usize = std::env::var("WEIR_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let scratch = Scratch::new();
    let all: String = (1..SERVICES).map(|s| service("scale", &format!("svc-{s}"), &endpoints(s, 0))).collect();
    scratch.write("services.yaml", &all);
    scratch.write("svc-0.yaml", &service("scale", "svc-0", &endpoints(0, 0)));
    let tls = std::env::var_os("WEIR_TLS").is_some();
    let mut args = loopback_controller_args(&scratch.config_dir(), None, "warn");
    if tls {
        args.extend(scratch.identity_flags(&[("t-client", "scale/client")], &[]));
    }
    let controller =
        ChildProc::spawn("controller", &bin("weir-controller"), &args, scratch.log("controller")).await.unwrap();
    let (grpc, pid) = (controller.addr("grpc"), controller.pid());
    let control = if tls {
        let endpoint = scratch.control(grpc, "cluster.local");
        let id = "spiffe://cluster.local/ns/scale/sa/client";
        let (key, csr_der) = keyed_csr(id);
        let issued = certify(&endpoint, "t-client", csr_der).await.unwrap();
        let mut chain = vec![issued.leaf_der];
        chain.extend(issued.intermediates_der);
        let creds = weir_proxy::tls::Credentials {
            identity: issued.identity,
            chain,
            key_pkcs8: key.serialize_der(),
            roots: issued.trust_anchors_der,
            not_after_unix: issued.not_after_unix,
        };
        Control::Tls(endpoint, Arc::new(creds))
    } else {
        Control::Plain(grpc)
    };

    let acks: Acks = Arc::new(Mutex::new(vec![(0, Instant::now()); sidecars]));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..sidecars {
        let (acks, control) = (acks.clone(), control.clone());
        tasks.spawn(async move {
            if let Err(e) = simulated_sidecar(control, i, acks).await {
                eprintln!("sidecar {i}: {e:#}");
            }
        });
    }
    let newest = |acks: &Acks| acks.lock().unwrap().iter().map(|a| a.0).min().unwrap_or(0);
    let a = acks.clone();
    wait_until("every sidecar's first ack", Duration::from_secs(300), || {
        let a = a.clone();
        async move { newest(&a) > 0 }
    })
    .await;
    let connected = start.elapsed();
    let (_, rss_connected) = memory_kib(pid).unwrap();

    let cpu_before = cpu_seconds(pid);
    let mut last_ack = Vec::new();
    for round in 0..rounds {
        let before = acks.lock().unwrap().iter().map(|a| a.0).max().unwrap_or(0);
        let t0 = Instant::now();
        write_atomic(
            &scratch.config_dir().join("svc-0.yaml"),
            &service("scale", "svc-0", &endpoints(0, 1 + round % 2)),
        )
        .unwrap();
        let a = acks.clone();
        wait_until("every sidecar's ack of the change", Duration::from_secs(120), || {
            let a = a.clone();
            async move { newest(&a) > before }
        })
        .await;
        let latest = acks.lock().unwrap().iter().map(|a| a.1).max().unwrap();
        last_ack.push(latest.duration_since(t0).as_secs_f64() * 1000.0);
    }
    let cpu = cpu_seconds(pid) - cpu_before;
    let (peak, rss) = memory_kib(pid).unwrap();
    last_ack.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let push_latency = admin_text(controller.addr("admin"), "/metrics").await;
    let sum_count = |suffix: &str| {
        push_latency
            .lines()
            .find_map(|l| l.strip_prefix(&format!("weir_controller_push_latency_seconds_{suffix} ")))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    println!(
        "{sidecars} sidecars ({}), {SERVICES} Services, {} endpoints: all connected and acked in {:.2} s",
        if tls { "mutual TLS" } else { "plaintext" },
        SERVICES * ENDPOINTS_PER_SERVICE,
        connected.as_secs_f64()
    );
    println!(
        "change -> last ack over {rounds} changes: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        quantile(&last_ack, 0.5),
        quantile(&last_ack, 0.99),
        last_ack.last().unwrap()
    );
    println!(
        "controller CPU per push: {:.0} µs ({cpu:.2} s for {} pushes); push latency mean {:.1} ms",
        cpu / (rounds * sidecars) as f64 * 1e6,
        rounds * sidecars,
        sum_count("sum") / sum_count("count").max(1.0) * 1000.0
    );
    let counter = |name: &str| {
        push_latency.lines().find_map(|l| l.strip_prefix(&format!("{name} "))).map(str::trim).unwrap_or("?").to_string()
    };
    println!(
        "snapshots pushed: {}, of which incremental: {}",
        counter("weir_controller_snapshots_pushed_total"),
        counter("weir_controller_snapshots_incremental_total")
    );
    println!(
        "controller RSS: {:.1} MiB connected, {:.1} MiB after the changes, peak {:.1} MiB",
        rss_connected as f64 / 1024.0,
        rss as f64 / 1024.0,
        peak as f64 / 1024.0
    );
    tasks.abort_all();
}
