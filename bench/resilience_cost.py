#!/usr/bin/env python3
"""Cost of the resilience stack: the same sidecar pair with no policy and with a full one.

Starts, on loopback with OS-chosen ports, a release controller (local mode), a backend
(`weir demo-backend`), its sidecar, and a client sidecar; then for each configuration runs
wrk (HTTP/1.1, 16 connections, 2 threads) through the client sidecar, and reads the two
sidecars' CPU time from /proc. Prints latency percentiles, throughput and sidecar CPU
microseconds per request, then the full/none ratios. Stops every process it started, by PID.

    cargo build --release && python3 bench/resilience_cost.py [--seconds 10]
Needs wrk (Debian package `wrk`).
"""
import argparse, json, os, shutil, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from weirbench import cpu_seconds, get, start_backend, start_mesh, stop, wrk, write_atomic  # noqa: E402

FULL_POLICY = """apiVersion: weir.io/v1alpha1
kind: ResiliencePolicy
metadata: {name: web, namespace: bench}
spec:
  targetRef: {service: web}
  timeouts: {request: 5s, perTry: 2s}
  retries: {attempts: 2, retryOn: [gateway-error, connect-failure, reset]}
  circuitBreaker: {consecutiveFailures: 50}
  outlierDetection: {consecutiveFailures: 50}
  bulkhead: {maxInFlight: 10000}
  rateLimit: {requestsPerSecond: 10000000}
  faults: {abort: {httpStatus: 503, percent: 0}, headers: [{name: x-chaos, value: "yes"}]}
  healthCheck: {path: /, interval: 1s}
"""





def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    opts = ap.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk not found: apt-get install wrk")
    tmp = tempfile.mkdtemp(prefix="weir-bench-")
    procs = []
    try:
        cfg, sidecar = start_mesh(tmp, "kind: Service\nmetadata: {name: web, namespace: bench}\n", procs)
        be, ba = start_backend(os.path.join(tmp, "backend.log"))
        procs.append(be)
        server, sa = sidecar("web", ba["listen"])
        client, cla = sidecar("client", None)
        write_atomic(os.path.join(cfg, "services.yaml"),
                     "kind: Service\nmetadata: {name: web, namespace: bench}\nspec:\n"
                     f"  endpoints: [{{address: \"{sa['inbound']}\", meshed: true}}]\n")
        def wait_for(pred, what):
            deadline = time.time() + 20
            while not pred(json.loads(get(f"http://{cla['admin']}/config"))):
                if time.time() > deadline:
                    raise SystemExit(f"timed out waiting for {what}")
                time.sleep(0.02)
        svc = lambda c: ((c.get("snapshot") or {}).get("services") or [{}])[0]
        wait_for(lambda c: len(svc(c).get("endpoints", [])) == 1, "the endpoint")
        url = f"http://{cla['outbound']}/"
        results = {}
        for name in ["none", "full"]:
            if name == "full":
                write_atomic(os.path.join(cfg, "policy.yaml"), FULL_POLICY)
                wait_for(lambda c: len(svc(c).get("policies", [])) == 1, "the policy")
            wrk(url, 2)  # warm up connections and pools
            before = cpu_seconds(client.pid) + cpu_seconds(server.pid)
            lat, total, rps, errors = wrk(url, opts.seconds)
            cpu = cpu_seconds(client.pid) + cpu_seconds(server.pid) - before
            results[name] = dict(lat=lat, rps=rps, errors=errors, cpu_us_per_req=cpu / total * 1e6)
            print(f"{name:>4}: p50 {lat['50']:.3f} ms  p90 {lat['90']:.3f} ms  p99 {lat['99']:.3f} ms  "
                  f"{rps:,.0f} rps  errors {errors}  sidecar CPU {cpu / total * 1e6:.1f} µs/request (both sidecars)")
        n, f = results["none"], results["full"]
        print(f"full/none: p50 x{f['lat']['50'] / n['lat']['50']:.2f}, p99 x{f['lat']['99'] / n['lat']['99']:.2f}, "
              f"throughput x{f['rps'] / n['rps']:.2f}, CPU/request x{f['cpu_us_per_req'] / n['cpu_us_per_req']:.2f}")
    finally:
        stop(procs)
        shutil.rmtree(tmp, ignore_errors=True)

if __name__ == "__main__":
    main()
