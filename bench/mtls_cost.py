#!/usr/bin/env python3
"""Cost of mTLS between sidecars: the same pair with and without workload certificates.

For each mode it starts, on loopback with OS-chosen ports, a release controller (local mode;
with a CA and token table for "mtls"), a backend (`weir demo-backend`), its sidecar and a
client sidecar; then through the client sidecar
  - oha at a fixed rate (default 1,000 rps, 15 s, 16 connections, latency-corrected), reading
    both sidecars' CPU time from /proc over that run: latency at the same offered load and CPU
    per request at the same load;
  - wrk closed loop (16 connections, 2 threads): throughput.
Prints each mode's figures, then the mtls/plaintext ratios. Stops every process it started, by PID.

    cargo build --release && python3 bench/mtls_cost.py [--seconds 10] [--rate 1000] [--fixed-seconds 15]
Needs wrk (Debian package `wrk`) and oha (`cargo install oha`, or --oha PATH).
"""
import argparse, json, os, shutil, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from weirbench import (cpu_seconds, get, oha_fixed, start_backend, start_mesh, stop,  # noqa: E402
                       wrk, write_atomic)



def run_mode(mtls, opts):
    tmp = tempfile.mkdtemp(prefix="weir-bench-")
    procs = []
    try:
        cfg, sidecar = start_mesh(tmp, "kind: Service\nmetadata: {name: web, namespace: bench}\n", procs,
                                  identities=mtls)
        be, ba = start_backend(os.path.join(tmp, "backend.log"))
        procs.append(be)
        server, sa = sidecar("web", ba["listen"])
        client, cla = sidecar("client", None)
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
        cpu = lambda: cpu_seconds(client.pid) + cpu_seconds(server.pid)
        before = cpu()
        flat, ftotal, frps, ferrors = oha_fixed(url, opts.rate, opts.fixed_seconds, 16, opts.oha)
        fcpu = cpu() - before
        before = cpu()
        lat, total, rps, errors = wrk(url, opts.seconds)
        ccpu = cpu() - before
        metrics = get(f"http://{sa['admin']}/metrics")
        # Inbound request metrics say which transport the requests came over.
        tls_seen = 'direction="inbound"' in metrics and 'tls="true"' in metrics
        return dict(fixed=dict(lat=flat, rps=frps, errors=ferrors, cpu_us=fcpu / max(ftotal, 1) * 1e6),
                    closed=dict(lat=lat, rps=rps, errors=errors, cpu_us=ccpu / max(total, 1) * 1e6),
                    tls_seen=tls_seen)
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
    ap.add_argument("--seconds", type=int, default=10, help="closed-loop wrk run")
    ap.add_argument("--rate", type=int, default=1000, help="fixed-rate requests per second")
    ap.add_argument("--fixed-seconds", type=int, default=15)
    ap.add_argument("--oha", default=shutil.which("oha") or "oha")
    opts = ap.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk not found: apt-get install wrk")
    if not shutil.which(opts.oha):
        raise SystemExit("oha not found: cargo install oha (or --oha PATH)")
    results = {}
    for mode in ["plaintext", "mtls"]:
        r = results[mode] = run_mode(mode == "mtls", opts)
        if (mode == "mtls") != r["tls_seen"]:
            raise SystemExit(f"{mode}: the server saw tls={r['tls_seen']}")
        f, c = r["fixed"], r["closed"]
        print(f"{mode:>9} at {opts.rate} rps: p50 {f['lat']['50']:.3f} ms  p90 {f['lat']['90']:.3f} ms  "
              f"p99 {f['lat']['99']:.3f} ms  p99.9 {f['lat']['99.9']:.3f} ms  ({f['rps']:,.0f} rps, errors {f['errors']})  "
              f"sidecar CPU {f['cpu_us']:.1f} µs/request (both)")
        print(f"{mode:>9} closed loop: {c['rps']:,.0f} rps  p50 {c['lat']['50']:.3f} ms  p99 {c['lat']['99']:.3f} ms  "
              f"errors {c['errors']}  sidecar CPU {c['cpu_us']:.1f} µs/request (both)")
    p, m = results["plaintext"], results["mtls"]
    pf, mf = p["fixed"], m["fixed"]
    print(f"mtls/plaintext at {opts.rate} rps: p50 x{mf['lat']['50'] / pf['lat']['50']:.2f}, "
          f"p99 x{mf['lat']['99'] / pf['lat']['99']:.2f}, p99.9 x{mf['lat']['99.9'] / pf['lat']['99.9']:.2f}, "
          f"CPU/request x{mf['cpu_us'] / pf['cpu_us']:.2f}")
    pc, mc = p["closed"], m["closed"]
    print(f"mtls/plaintext closed loop: throughput x{mc['rps'] / pc['rps']:.2f}, CPU/request x{mc['cpu_us'] / pc['cpu_us']:.2f}")


if __name__ == "__main__":
    main()
