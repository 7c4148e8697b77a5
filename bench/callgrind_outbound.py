#!/usr/bin/env python3
"""Instructions per request on the sidecar's outbound path, counted by callgrind: stable on a
noisy machine, so small changes to the hot path can be compared.

With --pair, both sidecars of bench/vs_envoy.py's mTLS pair run under callgrind instead
(client → outbound sidecar → mTLS, HTTP/2 → inbound sidecar → upstream), and --load picks what
the client sends: http1 (scenario 2), h2c or grpc (scenario 3); the counts are per sidecar.

Starts a release controller and backend, then the given `weir-proxy` binary under
`valgrind --tool=callgrind`, sends N1 and then N2 more requests (oha, one connection) through
its outbound listener, and reads the instruction counts after each batch through callgrind's
control (`callgrind_control --dump`, which zeroes the counters): the first batch absorbs
start-up and warm-up; the next two batches of N2 each give the per-request count (both are
printed: they agree to a fraction of a percent). Stops everything it started, by PID.

    python3 bench/callgrind_outbound.py [--proxy target/release/weir-proxy] [--n1 500] [--n2 2000]
    python3 bench/callgrind_outbound.py --pair [--load http1|h2c|grpc|websocket] [--keep DIR]
Needs valgrind (Debian package) and oha (`cargo install oha`); `--load websocket` needs the
`websockets` package from PyPI instead of oha: the upstream is a WebSocket echo server, the
client opens one WebSocket through the pair and each "request" is one 100-byte text message
and its echo.
"""
import argparse, glob, json, os, re, shutil, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from weirbench import BIN, get, start, start_backend, start_controller, stop, write_atomic  # noqa: E402


def total_instructions(outdir, pid):
    total = 0
    for f in glob.glob(os.path.join(outdir, f"callgrind.out.{pid}*")):
        with open(f) as fh:
            for line in fh:
                m = re.match(r"^(summary|totals):\s+(\d+)", line)
                if m:
                    total = max(total, int(m.group(2)))
                    break
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--proxy", default=os.path.join(BIN, "weir-proxy"))
    ap.add_argument("--n1", type=int, default=500)
    ap.add_argument("--n2", type=int, default=2000)
    ap.add_argument("--oha", default=shutil.which("oha") or "oha")
    ap.add_argument("--keep", help="copy the last batch's callgrind dump here (for callgrind_annotate)")
    ap.add_argument("--pair", action="store_true", help="both sidecars of the mTLS pair (bench/vs_envoy.py)")
    ap.add_argument("--load", default="http1", choices=["http1", "h2c", "grpc", "websocket"], help="with --pair")
    opts = ap.parse_args()
    if opts.pair:
        return pair(opts)
    for tool in ["valgrind", "callgrind_control", opts.oha]:
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not found")
    tmp = tempfile.mkdtemp(prefix="weir-callgrind-")
    procs = []
    try:
        cfg = os.path.join(tmp, "config")
        os.mkdir(cfg)
        be, ba = start_backend(os.path.join(tmp, "backend.log"))
        procs.append(be)
        write_atomic(os.path.join(cfg, "services.yaml"),
                     f"kind: Service\nmetadata: {{name: web, namespace: bench}}\nspec:\n  endpoints: [{{address: \"{ba['listen']}\"}}]\n")
        ctl, ca = start_controller(cfg, os.path.join(tmp, "controller.log"))
        procs.append(ctl)
        px, pa = start(["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/callgrind.out.%p", opts.proxy,
                        "--controller", ca["grpc"], "--workload", "bench/client", "--outbound-addr", "127.0.0.1:0",
                        "--inbound-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0", "--print-listen-addrs",
                        "--log-level", "warn", "--report-interval", "1h"], os.path.join(tmp, "proxy.log"))
        procs.append(px)
        deadline = time.time() + 60
        while not (json.loads(get(f"http://{pa['admin']}/config")).get("snapshot") or {}).get("services"):
            if time.time() > deadline:
                raise SystemExit("no config")
            time.sleep(0.1)
        url = f"http://{pa['outbound']}/"
        counts = []
        for n in [opts.n1, opts.n2, opts.n2]:
            subprocess.run([opts.oha, "-n", str(n), "-c", "1", "--no-tui", "-H", "Host: web.bench", url],
                           capture_output=True, check=True, timeout=600)
            counts.append(dump(px.pid, tmp))
            if opts.keep:
                for f in glob.glob(os.path.join(tmp, f"callgrind.out.{px.pid}*")):
                    shutil.copy(f, opts.keep)
        per_request = counts[2] / opts.n2
        print(f"  batches: {counts[1] / opts.n2:,.0f} and {counts[2] / opts.n2:,.0f} instructions per request")
        print(f"{opts.proxy}: {per_request:,.0f} instructions per request (outbound, HTTP/1.1, {opts.n2} requests)")
    finally:
        stop(procs)
        shutil.rmtree(tmp, ignore_errors=True)


def dump(pid, tmp):
    """Dumps (and zeroes) `pid`'s counters; returns the instructions since the last dump."""
    for f in glob.glob(os.path.join(tmp, f"callgrind.out.{pid}*")):
        os.remove(f)
    subprocess.run(["callgrind_control", "--dump", str(pid)], capture_output=True, check=True, timeout=120)
    deadline = time.time() + 60
    while not (total := total_instructions(tmp, pid)):
        if time.time() > deadline:
            raise SystemExit("no callgrind dump")
        time.sleep(0.2)
    return total


def pair(opts):
    import vs_envoy
    import weirbench
    tmp = tempfile.mkdtemp(prefix="weir-callgrind-")
    procs = []

    def sidecar(controller_grpc, workload, log, app=None, extra=(), prefix=()):
        return start(["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/callgrind.out.%p", opts.proxy,
                      "--controller", controller_grpc, "--workload", workload, "--service-account",
                      workload.split("/")[-1], "--outbound-addr", "127.0.0.1:0", "--inbound-addr", "127.0.0.1:0",
                      "--admin-addr", "127.0.0.1:0", "--print-listen-addrs", "--report-interval", "1h",
                      "--log-level", "warn", *(["--app-addr", app] if app else []), *extra], log)
    weirbench.start_sidecar = sidecar  # the pair as vs_envoy.py starts it, each sidecar under callgrind
    wait = vs_envoy.wait_for
    vs_envoy.wait_for = lambda check, what, limit=20.0, every=0.02: wait(check, what, limit=120, every=0.2)
    ws = None
    try:
        if opts.load == "websocket":
            ws = WebSocketLoad()
            upstream = ws.upstream
        else:
            be, ba = start_backend(os.path.join(tmp, "backend.log"))
            procs.append(be)
            upstream = ba["listen"]
        measured, url, _ = vs_envoy.start_weir_pair(tmp, upstream, procs, 3 if opts.load in ("h2c", "grpc") else 2)
        load = dict(vs_envoy.loads(3, tmp))[opts.load] if opts.load in ("h2c", "grpc") else []
        target = url.split("//", 1)[1].rstrip("/")
        for batch, n in enumerate([opts.n1, opts.n2, opts.n2]):
            if ws:
                ws.exchange(target, n)
            else:
                subprocess.run([opts.oha, "-n", str(n), "-c", "1", "--no-tui", "--connect-to", f"web.bench:80:{target}",
                                *load, "http://web.bench/"], capture_output=True, check=True, timeout=900)
            counts = [dump(p.pid, tmp) for p in measured]
            if batch:
                print(f"  batch {batch}: outbound sidecar {counts[0] / n:,.0f}, inbound sidecar {counts[1] / n:,.0f} "
                      "instructions per request", flush=True)
            if opts.keep and batch == 2:
                for p, name in zip(measured, ["outbound", "inbound"]):
                    for f in glob.glob(os.path.join(tmp, f"callgrind.out.{p.pid}*")):
                        shutil.copy(f, os.path.join(opts.keep, f"callgrind.{name}"))
        print(f"{opts.proxy}: {counts[0] / opts.n2:,.0f} (outbound) and {counts[1] / opts.n2:,.0f} (inbound) instructions "
              f"per request, mTLS pair, {opts.load}, {opts.n2} requests (websocket: messages echoed)")
    finally:
        if ws:
            ws.close()
        stop(procs)
        shutil.rmtree(tmp, ignore_errors=True)


class WebSocketLoad:
    """A WebSocket echo server (the upstream) and one client connection through the pair,
    opened on the first exchange and kept across batches."""

    def __init__(self):
        import threading
        from websockets.sync.server import serve

        def echo(conn):
            for message in conn:
                conn.send(message)
        self.server = serve(echo, "127.0.0.1", 0)
        self.upstream = "127.0.0.1:%d" % self.server.socket.getsockname()[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.client = None

    def exchange(self, target, n):
        import socket
        from websockets.sync.client import connect
        if self.client is None:
            host, port = target.rsplit(":", 1)
            self.client = connect("ws://web.bench/", sock=socket.create_connection((host, int(port))),
                                  open_timeout=120, close_timeout=10)
        message = "x" * 100
        for _ in range(n):
            self.client.send(message)
            if self.client.recv(timeout=120) != message:
                raise SystemExit("the echo came back changed")

    def close(self):
        if self.client is not None:
            self.client.close()
        self.server.shutdown()


if __name__ == "__main__":
    main()
