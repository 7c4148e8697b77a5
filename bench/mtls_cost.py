#!/usr/bin/env python3
"""Cost of mTLS between sidecars: the same pair with and without workload certificates.

For each mode it starts, on loopback with OS-chosen ports, a release controller (local mode;
with a CA and token table for "mtls"), a backend (`weir demo-backend`), its sidecar and a
client sidecar; runs wrk (HTTP/1.1, 16 connections, 2 threads) through the client sidecar and
reads both sidecars' CPU time from /proc. Prints latency percentiles, throughput and sidecar
CPU per request, then the mtls/plaintext ratios. Stops every process it started, by PID.

    cargo build --release && python3 bench/mtls_cost.py [--seconds 10]
Needs wrk (Debian package `wrk`).
"""
import argparse, json, os, shutil, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from weirbench import cpu_seconds, get, start_backend, start_controller, start_sidecar, stop, wrk, write_atomic  # noqa: E402



def run_mode(mtls, seconds):
    tmp = tempfile.mkdtemp(prefix="weir-bench-")
    cfg = os.path.join(tmp, "config")
    os.mkdir(cfg)
    write_atomic(os.path.join(cfg, "services.yaml"), "kind: Service\nmetadata: {name: web, namespace: bench}\n")
    procs = []
    try:
        extra = []
        token = lambda name: []
        if mtls:
            with open(os.path.join(tmp, "tokens"), "w") as f:
                f.write("t-web bench/web\nt-client bench/client\n")
            extra = ["--identity-dir", os.path.join(tmp, "identity"), "--tokens", os.path.join(tmp, "tokens")]

            def token(name):
                path = os.path.join(tmp, f"{name}.token")
                with open(path, "w") as f:
                    f.write(f"t-{name}")
                return ["--token-file", path]
        ctl, ca = start_controller(cfg, os.path.join(tmp, "controller.log"), extra)
        procs.append(ctl)
        be, ba = start_backend(os.path.join(tmp, "backend.log"))
        procs.append(be)
        sidecar = lambda name, app: start_sidecar(
            ca["grpc"], f"bench/{name}", os.path.join(tmp, f"{name}.log"), app, token(name))
        server, sa = sidecar("web", ba["listen"])
        procs.append(server)
        client, cla = sidecar("client", None)
        procs.append(client)
        write_atomic(os.path.join(cfg, "services.yaml"),
                     "kind: Service\nmetadata: {name: web, namespace: bench}\nspec:\n"
                     f"  endpoints: [{{address: \"{sa['inbound']}\", meshed: true, serviceAccount: web}}]\n")
        deadline = time.time() + 20
        while True:
            c = json.loads(get(f"http://{cla['admin']}/config"))
            svcs = (c.get("snapshot") or {}).get("services") or [{}]
            ready = all(_ready(a) for a in (sa["admin"], cla["admin"]))
            if len(svcs[0].get("endpoints", [])) == 1 and ready:
                break
            if time.time() > deadline:
                raise SystemExit("the pair never became ready")
            time.sleep(0.02)
        url = f"http://{cla['outbound']}/"
        wrk(url, 2)
        before = cpu_seconds(client.pid) + cpu_seconds(server.pid)
        lat, total, rps, errors = wrk(url, seconds)
        cpu = cpu_seconds(client.pid) + cpu_seconds(server.pid) - before
        metrics = get(f"http://{sa['admin']}/metrics")
        tls_seen = 'tls="true"' in metrics
        return dict(lat=lat, rps=rps, errors=errors, cpu_us=cpu / total * 1e6, tls_seen=tls_seen)
    finally:
        stop(procs)
        shutil.rmtree(tmp, ignore_errors=True)


def _ready(admin):
    try:
        get(f"http://{admin}/ready")
        return True
    except Exception:
        return False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    opts = ap.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk not found: apt-get install wrk")
    results = {}
    for mode in ["plaintext", "mtls"]:
        r = results[mode] = run_mode(mode == "mtls", opts.seconds)
        if (mode == "mtls") != r["tls_seen"]:
            raise SystemExit(f"{mode}: the server saw tls={r['tls_seen']}")
        print(f"{mode:>9}: p50 {r['lat']['50']:.3f} ms  p90 {r['lat']['90']:.3f} ms  p99 {r['lat']['99']:.3f} ms  "
              f"{r['rps']:,.0f} rps  errors {r['errors']}  sidecar CPU {r['cpu_us']:.1f} µs/request (both sidecars)")
    p, m = results["plaintext"], results["mtls"]
    print(f"mtls/plaintext: p50 x{m['lat']['50'] / p['lat']['50']:.2f}, p99 x{m['lat']['99'] / p['lat']['99']:.2f}, "
          f"throughput x{m['rps'] / p['rps']:.2f}, CPU/request x{m['cpu_us'] / p['cpu_us']:.2f}")


if __name__ == "__main__":
    main()
