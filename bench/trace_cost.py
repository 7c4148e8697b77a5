#!/usr/bin/env python3
"""Per-request cost of span export, in instructions counted by callgrind (repeatable on a
noisy machine): the mTLS pair of bench/vs_envoy.py, both sidecars under callgrind, HTTP/1.1
requests sent one at a time on one keep-alive connection, with span export off, at 1 % and at
100 % sampling. The sampled spans go over OTLP/HTTP to a sink on loopback (it answers 200, as
a collector does), so the count includes recording, batching, encoding and sending them.

For each setting: N1 requests warm up, then two batches of N2 are counted (callgrind_control
--dump zeroes the counters; both batches are printed and agree closely). Each batch is
followed by a pause longer than the exporter's batch interval, in every setting alike, so a
batch's spans are exported inside its own count. Prints instructions per request for each
sidecar and the difference from "off". Stops everything it started, by PID.

    python3 bench/trace_cost.py [--proxy target/release/weir-proxy] [--n1 300] [--n2 1000] [--ratios off,0.01,1]
Needs valgrind (Debian package) and a release build (`cargo build --release`).
"""
import argparse, glob, http.client, http.server, os, shutil, sys, tempfile, threading, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vs_envoy  # noqa: E402
import weirbench  # noqa: E402
from callgrind_outbound import dump  # noqa: E402
from weirbench import BIN, start, start_backend, stop  # noqa: E402

# The exporter sends a batch at least once a second; this pause lets the last spans go out.
EXPORT_PAUSE = 1.6


class Sink(http.server.ThreadingHTTPServer):
    """An OTLP/HTTP collector that takes every batch and keeps only counts."""

    def __init__(self):
        self.exports = 0
        self.bytes = 0
        sink = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                ok = self.path == "/v1/traces" and self.headers.get("content-type") == "application/x-protobuf"
                if ok:
                    sink.exports += 1
                    sink.bytes += len(body)
                self.send_response(200 if ok else 400)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.server_address[1]


def send(target, n):
    host, port = target.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    for _ in range(n):
        conn.request("GET", "/", headers={"Host": "web.bench"})
        rsp = conn.getresponse()
        rsp.read()
        if rsp.status != 200:
            raise SystemExit(f"the pair answered {rsp.status}")
    conn.close()


def measure(opts, sampling, sink):
    tmp = tempfile.mkdtemp(prefix="weir-tracecost-")
    procs = []
    trace = [] if sampling is None else ["--trace-collector", sink.url, "--trace-protocol", "http",
                                         "--trace-sampling", str(sampling)]

    def sidecar(controller_grpc, workload, log, app=None, extra=(), prefix=()):
        return start(["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/callgrind.out.%p", opts.proxy,
                      "--controller", controller_grpc, "--workload", workload, "--service-account",
                      workload.split("/")[-1], "--outbound-addr", "127.0.0.1:0", "--inbound-addr", "127.0.0.1:0",
                      "--admin-addr", "127.0.0.1:0", "--print-listen-addrs", "--report-interval", "1h",
                      "--log-level", "warn", *(["--app-addr", app] if app else []), *extra, *trace], log)
    weirbench.start_sidecar = sidecar
    wait = vs_envoy.wait_for
    vs_envoy.wait_for = lambda check, what, limit=20.0, every=0.02: wait(check, what, limit=120, every=0.2)
    try:
        be, ba = start_backend(os.path.join(tmp, "backend.log"))
        procs.append(be)
        measured, url, _ = vs_envoy.start_weir_pair(tmp, ba["listen"], procs, 2)
        target = url.split("//", 1)[1].rstrip("/")
        exports_before = sink.exports
        per_batch = []
        for batch, n in enumerate([opts.n1, opts.n2, opts.n2]):
            send(target, n)
            time.sleep(EXPORT_PAUSE)
            counts = [dump(p.pid, tmp) for p in measured]
            if opts.keep and batch == 2:
                for p, name in zip(measured, ["outbound", "inbound"]):
                    for f in glob.glob(os.path.join(tmp, f"callgrind.out.{p.pid}*")):
                        part = os.path.basename(f).split(str(p.pid), 1)[1]  # one file per thread
                        shutil.copy(f, os.path.join(opts.keep, f"callgrind.{name}{part}"))
            if batch:
                per_batch.append([c / n for c in counts])
        label = "off" if sampling is None else f"{sampling:.0%}"
        for i, (o, inb) in enumerate(per_batch, 1):
            print(f"  {label}, batch {i}: outbound {o:,.0f}, inbound {inb:,.0f} instructions per request", flush=True)
        if sampling and sink.exports == exports_before:
            raise SystemExit(f"no span reached the sink at sampling {sampling}")
        return per_batch[-1]
    finally:
        vs_envoy.wait_for = wait
        stop(procs)
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--proxy", default=os.path.join(BIN, "weir-proxy"))
    ap.add_argument("--n1", type=int, default=300)
    ap.add_argument("--n2", type=int, default=1000)
    ap.add_argument("--keep", help="copy the last batch's callgrind dumps of each setting here, the last setting's kept (for callgrind_annotate)")
    ap.add_argument("--ratios", default="off,0.01,1",
                    help="the settings measured, comma-separated: off, or a sampling ratio (off alone measures a "
                         "sidecar built before span export, for the cost of having it)")
    opts = ap.parse_args()
    for tool in ["valgrind", "callgrind_control"]:
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not found")
    sink = Sink()
    try:
        ratios = [None if r == "off" else float(r) for r in opts.ratios.split(",")]
        results = {s: measure(opts, s, sink) for s in ratios}
    finally:
        sink.shutdown()
    off = results.get(None) or next(iter(results.values()))
    print(f"{opts.proxy}: instructions per request, mTLS pair, HTTP/1.1, {opts.n2} requests; "
          f"{sink.exports} exports, {sink.bytes:,} bytes of spans")
    for s, (o, i) in results.items():
        label = "off" if s is None else f"{s:.0%} sampled"
        print(f"  {label:>13}: outbound {o:,.0f} ({o - off[0]:+,.0f}, {o / off[0]:.3f}x), "
              f"inbound {i:,.0f} ({i - off[1]:+,.0f}, {i / off[1]:.3f}x)")


if __name__ == "__main__":
    main()
