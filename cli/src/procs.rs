//! Child processes for the demo and the end-to-end tests: started with OS-chosen ports (each
//! prints its bound addresses as one JSON line), stopped by PID — SIGTERM, then SIGKILL after
//! a grace period — and killed on drop so nothing outlives its owner.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};

pub struct ChildProc {
    pub name: String,
    child: Child,
    pid: u32,
    addrs: serde_json::Value,
    pub log: PathBuf,
    _stdout: BufReader<ChildStdout>,
}

impl ChildProc {
    /// Starts `program args…`, its stderr going to `log`, and waits (up to 60 s) for the JSON
    /// line of listening addresses on its stdout.
    pub async fn spawn(name: &str, program: &Path, args: &[String], log: PathBuf) -> anyhow::Result<Self> {
        Self::spawn_cmd(name, Command::new(program), program, args, log).await
    }

    /// Like [`spawn`](Self::spawn), with `dir` as the working directory, `HOME` and `TMPDIR`:
    /// everything the process writes outside `log` lands there.
    pub async fn spawn_in(
        name: &str,
        program: &Path,
        args: &[String],
        log: PathBuf,
        dir: &Path,
    ) -> anyhow::Result<Self> {
        let mut cmd = Command::new(program);
        cmd.current_dir(dir).env("HOME", dir).env("TMPDIR", dir);
        Self::spawn_cmd(name, cmd, program, args, log).await
    }

    async fn spawn_cmd(
        name: &str,
        mut cmd: Command,
        program: &Path,
        args: &[String],
        log: PathBuf,
    ) -> anyhow::Result<Self> {
        let log_file = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut child = cmd
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {name} ({})", program.display()))?;
        let pid = child.id().ok_or_else(|| anyhow!("{name} exited at once"))?;
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        let read = tokio::time::timeout(Duration::from_secs(60), stdout.read_line(&mut line)).await;
        let addrs = match read {
            Ok(Ok(n)) if n > 0 => serde_json::from_str(line.trim())
                .with_context(|| format!("{name} printed {line:?} instead of its addresses"))?,
            _ => {
                let _ = child.start_kill();
                let tail = std::fs::read_to_string(&log).unwrap_or_default();
                bail!("{name} did not start; its log:\n{tail}");
            }
        };
        Ok(Self { name: name.into(), child, pid, addrs, log, _stdout: stdout })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// One of the addresses the process printed (`admin`, `grpc`, `inbound`, …).
    pub fn addr(&self, key: &str) -> SocketAddr {
        self.addrs[key]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{} has no {key} address", self.name))
    }

    /// Sends SIGTERM and waits up to `grace`, then SIGKILL. Returns whether it exited on its own.
    pub async fn stop(&mut self, grace: Duration) -> bool {
        if self.child.try_wait().ok().flatten().is_some() {
            return true;
        }
        let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGTERM);
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(_) => true,
            Err(_) => {
                self.kill().await;
                false
            }
        }
    }

    /// SIGKILL, and reap.
    pub async fn kill(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// Peak and current resident set size in KiB, from /proc.
    pub fn memory_kib(&self) -> Option<(u64, u64)> {
        memory_kib(self.pid)
    }
}

/// `(VmHWM, VmRSS)` of a process in KiB.
pub fn memory_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field =
        |name: &str| status.lines().find(|l| l.starts_with(name))?.split_whitespace().nth(1)?.parse::<u64>().ok();
    Some((field("VmHWM:")?, field("VmRSS:")?))
}

/// Writes a file atomically (temporary file + rename), so a watcher never reads half of it.
pub fn write_atomic(path: &Path, contents: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path)
}

/// Arguments for a controller in local mode over `config_dir`, on loopback with OS-chosen
/// ports unless `grpc` is given, printing its addresses.
pub fn loopback_controller_args(config_dir: &Path, grpc: Option<SocketAddr>, log_level: &str) -> Vec<String> {
    let grpc = grpc.map(|a| a.to_string()).unwrap_or_else(|| "127.0.0.1:0".into());
    let mut a: Vec<String> = ["--grpc-addr", &grpc, "--admin-addr", "127.0.0.1:0", "--print-listen-addrs"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    a.extend(["--log-level".into(), log_level.into(), "--config-dir".into(), config_dir.display().to_string()]);
    a
}

/// Arguments for a sidecar of `workload` on loopback with OS-chosen ports, printing its
/// addresses and reporting every second.
pub fn loopback_sidecar_args(
    controller: SocketAddr,
    workload: &str,
    app: Option<SocketAddr>,
    log_level: &str,
) -> Vec<String> {
    let controller = controller.to_string();
    let mut a: Vec<String> = [
        ["--controller", &controller, "--workload", workload],
        ["--outbound-addr", "127.0.0.1:0", "--inbound-addr", "127.0.0.1:0"],
        ["--admin-addr", "127.0.0.1:0", "--report-interval", "500ms"],
        ["--print-listen-addrs", "--log-level", log_level, "--service-account"],
    ]
    .concat()
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.push(workload.rsplit('/').next().unwrap_or("default").to_string());
    if let Some(app) = app {
        a.extend(["--app-addr".to_string(), app.to_string()]);
    }
    a
}
