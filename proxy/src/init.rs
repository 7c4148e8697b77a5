//! `weir-proxy init`: the iptables NAT rules that send a pod's TCP traffic through its sidecar
//! (run once per pod, by the injector's init container, with NET_ADMIN).
//!
//! - Inbound: every TCP connection arriving at the pod (`PREROUTING`) is redirected to the
//!   sidecar's inbound port, except `--skip-inbound-ports`. The sidecar learns the original
//!   port (`SO_ORIGINAL_DST`) and forwards to the application on `127.0.0.1:<that port>`.
//! - Outbound: every TCP connection the pod opens (`OUTPUT`) is redirected to the outbound
//!   port, except the sidecar's own (by UID, `--proxy-uid`, so it never loops), loopback,
//!   `--skip-outbound-ports` and `--skip-outbound-cidrs`.
//!
//! The rules live in their own chains (`WEIR_INBOUND`, `WEIR_OUTBOUND`), which are flushed and
//! refilled on every run, with one jump each from the built-in chains: running `init` twice
//! leaves one set of rules. `--dry-run` prints the commands instead.

use std::net::IpAddr;
use std::process::Command;

use anyhow::{Context, bail};
use weir_api::service::{parse_ipv4_cidr as parse_cidr, parse_port_range as parse_ports};

pub const INBOUND_CHAIN: &str = "WEIR_INBOUND";
pub const OUTBOUND_CHAIN: &str = "WEIR_OUTBOUND";

#[derive(clap::Args, Debug, Clone)]
#[command(after_help = "Examples:
  weir-proxy init --dry-run
  weir-proxy init --inbound-port 4143 --outbound-port 4140 --proxy-uid 2102 --skip-inbound-ports 4191")]
pub struct InitArgs {
    /// The sidecar's inbound listener port.
    #[arg(long, env = "WEIR_INBOUND_PORT", default_value_t = 4143)]
    pub inbound_port: u16,
    /// The sidecar's outbound listener port.
    #[arg(long, env = "WEIR_OUTBOUND_PORT", default_value_t = 4140)]
    pub outbound_port: u16,
    /// The UID the sidecar runs as: its own connections are never redirected.
    #[arg(long, env = "WEIR_PROXY_UID", default_value_t = 2102)]
    pub proxy_uid: u32,
    /// Inbound ports (or `FROM-TO` ranges) that reach the application directly.
    #[arg(long, env = "WEIR_SKIP_INBOUND_PORTS", value_delimiter = ',', value_parser = parse_ports)]
    pub skip_inbound_ports: Vec<(u16, u16)>,
    /// Outbound ports (or ranges) that bypass the sidecar.
    #[arg(long, env = "WEIR_SKIP_OUTBOUND_PORTS", value_delimiter = ',', value_parser = parse_ports)]
    pub skip_outbound_ports: Vec<(u16, u16)>,
    /// Destination networks (`ADDR/BITS`) that bypass the sidecar.
    #[arg(long, env = "WEIR_SKIP_OUTBOUND_CIDRS", value_delimiter = ',', value_parser = parse_cidr)]
    pub skip_outbound_cidrs: Vec<(IpAddr, u8)>,
    /// Print the iptables commands instead of running them.
    #[arg(long)]
    pub dry_run: bool,
    /// The iptables program (e.g. `iptables-legacy`).
    #[arg(long, env = "WEIR_IPTABLES", default_value = "iptables")]
    pub iptables: String,
}

fn ports_arg((a, b): (u16, u16)) -> String {
    if a == b { a.to_string() } else { format!("{a}:{b}") }
}

/// One rule: the arguments after `iptables -t nat`.
pub type Rule = Vec<String>;

fn rule(parts: &[&str]) -> Rule {
    parts.iter().map(|s| s.to_string()).collect()
}

/// The rules of the two chains, in order.
pub fn chain_rules(args: &InitArgs) -> Vec<Rule> {
    let mut rules = Vec::new();
    for p in &args.skip_inbound_ports {
        rules.push(rule(&["-A", INBOUND_CHAIN, "-p", "tcp", "--dport", &ports_arg(*p), "-j", "RETURN"]));
    }
    let inbound = args.inbound_port.to_string();
    rules.push(rule(&["-A", INBOUND_CHAIN, "-p", "tcp", "-j", "REDIRECT", "--to-ports", &inbound]));

    let uid = args.proxy_uid.to_string();
    rules.push(rule(&["-A", OUTBOUND_CHAIN, "-m", "owner", "--uid-owner", &uid, "-j", "RETURN"]));
    rules.push(rule(&["-A", OUTBOUND_CHAIN, "-o", "lo", "-j", "RETURN"]));
    rules.push(rule(&["-A", OUTBOUND_CHAIN, "-d", "127.0.0.0/8", "-j", "RETURN"]));
    for p in &args.skip_outbound_ports {
        rules.push(rule(&["-A", OUTBOUND_CHAIN, "-p", "tcp", "--dport", &ports_arg(*p), "-j", "RETURN"]));
    }
    for (net, bits) in &args.skip_outbound_cidrs {
        rules.push(rule(&["-A", OUTBOUND_CHAIN, "-d", &format!("{net}/{bits}"), "-j", "RETURN"]));
    }
    let outbound = args.outbound_port.to_string();
    rules.push(rule(&["-A", OUTBOUND_CHAIN, "-p", "tcp", "-j", "REDIRECT", "--to-ports", &outbound]));
    rules
}

/// The jumps from the built-in chains (added once).
pub fn jumps() -> Vec<Rule> {
    vec![rule(&["PREROUTING", "-p", "tcp", "-j", INBOUND_CHAIN]), rule(&["OUTPUT", "-p", "tcp", "-j", OUTBOUND_CHAIN])]
}

pub fn run(args: &InitArgs) -> anyhow::Result<()> {
    if args.inbound_port == args.outbound_port {
        bail!("--inbound-port and --outbound-port must differ");
    }
    let show = |r: &[String]| format!("{} -t nat {}", args.iptables, r.join(" "));
    if args.dry_run {
        for chain in [INBOUND_CHAIN, OUTBOUND_CHAIN] {
            println!("{}", show(&rule(&["-N", chain])));
            println!("{}", show(&rule(&["-F", chain])));
        }
        for r in chain_rules(args) {
            println!("{}", show(&r));
        }
        for j in jumps() {
            let mut r = rule(&["-A"]);
            r.extend(j);
            println!("{}", show(&r));
        }
        return Ok(());
    }
    let iptables = |r: &[String]| -> anyhow::Result<std::process::Output> {
        Command::new(&args.iptables)
            .args(["-t", "nat"])
            .args(r)
            .output()
            .with_context(|| format!("running {} (is iptables installed?)", args.iptables))
    };
    let must = |r: &[String]| -> anyhow::Result<()> {
        let out = iptables(r)?;
        if !out.status.success() {
            bail!("{} failed: {}", show(r), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    };
    for chain in [INBOUND_CHAIN, OUTBOUND_CHAIN] {
        // Exists already on a second run: fine, it is flushed next.
        let created = iptables(&rule(&["-N", chain]))?;
        if !created.status.success() {
            let err = String::from_utf8_lossy(&created.stderr);
            if !err.contains("exists") {
                bail!("{} failed: {}", show(&rule(&["-N", chain])), err.trim());
            }
        }
        must(&rule(&["-F", chain]))?;
    }
    for r in chain_rules(args) {
        must(&r)?;
    }
    for j in jumps() {
        let mut check = rule(&["-C"]);
        check.extend(j.iter().cloned());
        if !iptables(&check)?.status.success() {
            let mut add = rule(&["-A"]);
            add.extend(j);
            must(&add)?;
        }
    }
    eprintln!(
        "weir-proxy init: inbound TCP → port {}, outbound TCP → port {} (UID {} exempt)",
        args.inbound_port, args.outbound_port, args.proxy_uid
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        init: InitArgs,
    }

    fn args(extra: &[&str]) -> InitArgs {
        Cli::try_parse_from(std::iter::once("init").chain(extra.iter().copied())).unwrap().init
    }

    #[test]
    fn rules_skip_what_they_are_told_and_the_proxy_itself() {
        let a = args(&[
            "--skip-inbound-ports",
            "4191,9000-9010",
            "--skip-outbound-ports",
            "5432",
            "--skip-outbound-cidrs",
            "10.1.0.0/16",
        ]);
        let rules: Vec<String> = chain_rules(&a).iter().map(|r| r.join(" ")).collect();
        assert_eq!(
            rules,
            [
                "-A WEIR_INBOUND -p tcp --dport 4191 -j RETURN",
                "-A WEIR_INBOUND -p tcp --dport 9000:9010 -j RETURN",
                "-A WEIR_INBOUND -p tcp -j REDIRECT --to-ports 4143",
                "-A WEIR_OUTBOUND -m owner --uid-owner 2102 -j RETURN",
                "-A WEIR_OUTBOUND -o lo -j RETURN",
                "-A WEIR_OUTBOUND -d 127.0.0.0/8 -j RETURN",
                "-A WEIR_OUTBOUND -p tcp --dport 5432 -j RETURN",
                "-A WEIR_OUTBOUND -d 10.1.0.0/16 -j RETURN",
                "-A WEIR_OUTBOUND -p tcp -j REDIRECT --to-ports 4140",
            ]
        );
    }

    #[test]
    fn bad_flags_say_what_is_wrong() {
        let err = |flags: &[&str]| {
            Cli::try_parse_from(std::iter::once("init").chain(flags.iter().copied())).err().unwrap().to_string()
        };
        assert!(err(&["--skip-inbound-ports", "0"]).contains("\"0\" is not a port"));
        assert!(err(&["--skip-inbound-ports", "90-80"]).contains("runs backwards"));
        assert!(err(&["--skip-outbound-cidrs", "10.0.0.0"]).contains("is not ADDR/BITS"));
        assert!(err(&["--skip-outbound-cidrs", "10.0.0.0/40"]).contains("at most 32 bits"));
        assert!(err(&["--skip-outbound-cidrs", "fd00::/8"]).contains("IPv6"));
        let same = args(&["--inbound-port", "4140"]);
        assert!(run(&same).unwrap_err().to_string().contains("must differ"));
    }
}
