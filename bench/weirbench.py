"""Helpers the bench scripts share: start Weir processes that print their listening
addresses, write config files atomically, and stop what was started, by PID."""
import json, os, re, signal, subprocess, time, urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")


def write_atomic(path, text):
    with open(path + ".tmp~", "w") as f:
        f.write(text)
    os.rename(path + ".tmp~", path)


def start(args, log):
    """Starts a process with --print-listen-addrs and returns it with its addresses."""
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
    line = p.stdout.readline()
    if not line:
        raise SystemExit(f"{args[0]} did not start; see {log}")
    return p, json.loads(line)


def get(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def stop(procs):
    """SIGTERM in reverse start order, SIGKILL after 15 s."""
    for p in reversed(procs):
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def start_controller(config_dir, log, extra=()):
    """A release controller in local mode over `config_dir`, on OS-chosen ports."""
    return start([os.path.join(BIN, "weir-controller"), "--config-dir", config_dir, "--grpc-addr", "127.0.0.1:0",
                  "--admin-addr", "127.0.0.1:0", "--print-listen-addrs", "--log-level", "warn", *extra], log)


def start_backend(log, name="web"):
    """A `weir demo-backend` on an OS-chosen port."""
    return start([os.path.join(BIN, "weir"), "demo-backend", "--listen", "127.0.0.1:0", "--print-listen-addrs",
                  "--name", name], log)


def start_sidecar(controller_grpc, workload, log, app=None, extra=(), prefix=()):
    """A release sidecar of `workload` (NS/NAME; its service account is NAME) on OS-chosen ports;
    `prefix` wraps the command (e.g. `taskset -c 1`)."""
    return start([*prefix, os.path.join(BIN, "weir-proxy"), "--controller", controller_grpc, "--workload", workload,
                  "--service-account", workload.split("/")[-1], "--outbound-addr", "127.0.0.1:0",
                  "--inbound-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0", "--print-listen-addrs",
                  "--log-level", "warn", *(["--app-addr", app] if app else []), *extra], log)


TICK = os.sysconf("SC_CLK_TCK")



def start_mesh(tmp, services_yaml, procs, identities=False, prefix=()):
    """A controller in local mode on `tmp/config` (its services.yaml first `services_yaml`),
    with a mesh CA and tokens for `bench/web` and `bench/client` when `identities`. Returns the
    config directory and `sidecar(name, app)`, which starts the sidecar of workload
    `bench/NAME` in front of `app` (None: a client only), each process added to `procs`."""
    cfg = os.path.join(tmp, "config")
    os.makedirs(cfg, exist_ok=True)
    write_atomic(os.path.join(cfg, "services.yaml"), services_yaml)
    extra = []
    if identities:
        with open(os.path.join(tmp, "tokens"), "w") as f:
            f.write("t-web bench/web\nt-client bench/client\n")
        extra = ["--identity-dir", os.path.join(tmp, "identity"), "--tokens", os.path.join(tmp, "tokens")]
    ctl, ca = start_controller(cfg, os.path.join(tmp, "controller.log"), extra)
    procs.append(ctl)

    def sidecar(name, app):
        flags = []
        if identities:
            token = os.path.join(tmp, f"{name}.token")
            with open(token, "w") as f:
                f.write(f"t-{name}")
            flags = ["--token-file", token, "--trust-anchors", os.path.join(tmp, "identity", "root.crt")]
        p, a = start_sidecar(ca["grpc"], f"bench/{name}", os.path.join(tmp, f"{name}.log"), app, flags, prefix=prefix)
        procs.append(p)
        return p, a

    return cfg, sidecar


def cpu_split(pid):
    """(user, system) CPU seconds of a process, from /proc."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def cpu_seconds(pid):
    """User + system CPU time of a process, from /proc."""
    return sum(cpu_split(pid))


def _to_ms(v):
    m = re.match(r"([\d.]+)(us|ms|s)", v)
    n, unit = float(m.group(1)), m.group(2)
    return n / 1000 if unit == "us" else n * 1000 if unit == "s" else n


def wrk(url, seconds):
    """wrk, 2 threads, 16 connections, Host web.bench: (latency ms by percentile, total, rps, non-2xx)."""
    out = subprocess.run(["wrk", "-t2", "-c16", f"-d{seconds}s", "--latency", "-H", "Host: web.bench", url],
                         capture_output=True, text=True, timeout=seconds + 30).stdout
    lat = {p: _to_ms(v) for p, v in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", out, re.M)}
    total = int(re.search(r"(\d+) requests in", out).group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return lat, total, rps, int(non2xx.group(1)) if non2xx else 0


def oha_fixed(url, rate, seconds, conns=16, oha="oha"):
    """oha at a fixed request rate with latency correction (coordinated omission accounted for),
    Host web.bench: (latency ms by percentile, total, achieved rps, non-2xx + errors)."""
    out = subprocess.run([oha, "-z", f"{seconds}s", "-q", str(rate), "-c", str(conns), "--no-tui",
                          "--output-format", "json", "--latency-correction", "-H", "Host: web.bench", url],
                         capture_output=True, text=True, timeout=seconds + 30).stdout
    d = json.loads(out)
    lat = {k[1:]: v * 1000 for k, v in d["latencyPercentiles"].items()}
    codes = d.get("statusCodeDistribution") or {}
    total = sum(codes.values()) + sum((d.get("errorDistribution") or {}).values())
    bad = total - codes.get("200", 0)
    if bad:
        print(f"  oha: status codes {codes}, errors {d.get('errorDistribution')}")
    return lat, total, d["summary"]["requestsPerSec"], bad


def wait_for(check, what, limit=20.0, every=0.02):
    """Polls `check()` (exceptions count as not yet) until it is true, or exits after `limit` s."""
    deadline = time.time() + limit
    while True:
        try:
            if check():
                return
        except Exception:
            pass
        if time.time() > deadline:
            raise SystemExit(f"timed out after {limit}s waiting for {what}")
        time.sleep(every)
