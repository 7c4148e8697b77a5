"""Helpers the bench scripts share: start Weir processes that print their listening
addresses, write config files atomically, and stop what was started, by PID."""
import json, os, signal, subprocess, urllib.request

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
