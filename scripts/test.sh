#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests and the end-to-end tests (real
# controller and sidecar processes on loopback). Installs what it needs when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo fmt --version >/dev/null 2>&1; then rustup component add rustfmt; fi
if ! cargo clippy --version >/dev/null 2>&1; then rustup component add clippy; fi

# Debian packages the end-to-end tests drive: openssl (s_client against a sidecar's inbound);
# iproute2, iptables, curl, setpriv (util-linux) and python3 (TCP servers in the pods) for
# transparent interception in network namespaces; pip and venv for scripts/tools.sh.
missing=()
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v iptables >/dev/null 2>&1 || missing+=(iptables)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v setpriv >/dev/null 2>&1 || missing+=(util-linux)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
if ((${#missing[@]})); then
  sudo=""
  if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
  # `env` carries the variable through sudo, and is a command when there is no sudo (a bare
  # `VAR=value` after an empty $sudo would be taken for a command name).
  $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

# helm and kubernetes-validate for the chart tests (tests/tests/chart.rs), into target/tools.
./scripts/tools.sh

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo build --workspace --bins --locked
cargo test --workspace --locked
