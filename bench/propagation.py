#!/usr/bin/env python3
"""Config propagation: time from a Route file write to a sidecar having applied it.

Starts a release controller (local mode) and one idle sidecar on loopback, rewrites a Route's
weights N times, and for each write polls the sidecar's /config (every 0.5 ms) until the new
weights show. Prints p50/p90/max and the controller's own push-latency histogram
(change observed -> sidecar ack). Stops every process it started, by PID.

    cargo build --release && python3 bench/propagation.py [--writes 50]
"""
import argparse, json, os, shutil, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from weirbench import get, start_controller, start_sidecar, stop, write_atomic  # noqa: E402


SERVICES = """kind: Service
metadata: {name: web, namespace: bench}
---
kind: Service
metadata: {name: web-v1, namespace: bench}
spec: {endpoints: [{address: "127.0.0.1:9", meshed: true}]}
---
kind: Service
metadata: {name: web-v2, namespace: bench}
spec: {endpoints: [{address: "127.0.0.1:10", meshed: true}]}
"""

def route(w1, w2):
    return f"""apiVersion: weir.io/v1alpha1
kind: Route
metadata: {{name: web, namespace: bench}}
spec:
  service: web
  rules:
  - backendRefs: [{{name: web-v1, weight: {w1}}}, {{name: web-v2, weight: {w2}}}]
"""




def weights(admin):
    cfg = json.loads(get(f"http://{admin}/config"))
    for s in (cfg.get("snapshot") or {}).get("services", []):
        if s["name"] == "web" and s.get("rules"):
            return [b["weight"] for b in s["rules"][0]["backends"]]
    return None

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--writes", type=int, default=50)
    opts = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="weir-bench-")
    cfg = os.path.join(tmp, "config")
    os.mkdir(cfg)
    write_atomic(os.path.join(cfg, "services.yaml"), SERVICES)
    write_atomic(os.path.join(cfg, "route.yaml"), route(1, 0))
    procs = []
    try:
        ctl, ca = start_controller(cfg, os.path.join(tmp, "controller.log"))
        procs.append(ctl)
        px, pa = start_sidecar(ca["grpc"], "bench/client", os.path.join(tmp, "proxy.log"))
        procs.append(px)
        deadline = time.time() + 10
        while weights(pa["admin"]) != [1, 0]:
            if time.time() > deadline:
                raise SystemExit("sidecar never got the first snapshot")
            time.sleep(0.01)
        samples = []
        for i in range(opts.writes):
            want = [i + 2, 1]
            t0 = time.perf_counter()
            write_atomic(os.path.join(cfg, "route.yaml"), route(*want))
            while weights(pa["admin"]) != want:
                if time.perf_counter() - t0 > 5:
                    raise SystemExit("a change did not arrive within 5 s")
                time.sleep(0.0005)
            samples.append((time.perf_counter() - t0) * 1000)
            time.sleep(0.05)  # let the watcher settle so writes are not coalesced
        samples.sort()
        pick = lambda q: samples[min(len(samples) - 1, int(q * len(samples)))]
        print(f"file write -> sidecar applied, {len(samples)} writes: "
              f"p50 {pick(0.5):.1f} ms, p90 {pick(0.9):.1f} ms, max {samples[-1]:.1f} ms")
        metrics = get(f"http://{ca['admin']}/metrics")
        for line in metrics.splitlines():
            if line.startswith("weir_controller_push_latency_seconds_sum") or line.startswith("weir_controller_push_latency_seconds_count"):
                print(line)
    finally:
        stop(procs)
        shutil.rmtree(tmp, ignore_errors=True)

if __name__ == "__main__":
    main()
