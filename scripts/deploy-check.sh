#!/usr/bin/env bash
# Checks deploy/ with the real tools, offline (run by .ci/run; tools from scripts/test-deps.sh):
# - promtool: the alert rules parse, their unit tests pass (every alert has a firing and a
#   silent case), the Prometheus config parses, every Grafana and KEDA query parses;
# - every alert links a runbook that exists, and every metric a rule or panel names is one
#   Conveyor exports;
# - the Kubernetes manifests against the Kubernetes schemas (kubernetes-validate --strict),
#   and what those schemas do not cover (kustomization, KEDA ScaledObject, Secret keys);
# - compose.yaml against the compose specification's JSON schema;
# - each validator refuses a broken copy;
# - the image's entrypoint, environment and healthcheck, and every role's command from the
#   Kubernetes and compose files, run with the real binary on a scratch Postgres database:
#   healthcheck, /readyz and /metrics (parsed by promtool) answer, SIGTERM exits 0.
# No container engine runs here; nothing is built into an image (deploy/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=.venv/bin/python
SCHEMA=.venv/share/compose-spec/compose_spec.json
for tool in promtool "$PY" .venv/bin/kubernetes-validate "$SCHEMA"; do
  if ! [ -e "$tool" ] && ! command -v "$tool" >/dev/null 2>&1; then
    echo "deploy-check: $tool is missing; run scripts/test-deps.sh" >&2
    exit 1
  fi
done
tmp="$(mktemp -d)"
db=""
cleanup() {
  if [ -n "$db" ]; then psql -h 127.0.0.1 -U postgres -q -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true; fi
  rm -rf "$tmp"
}
trap cleanup EXIT

echo "== Prometheus rules, their unit tests, the config"
promtool check rules deploy/prometheus/alerts.yml
(cd deploy/prometheus && promtool test rules alerts_test.yml)
# The config names the rule file where the container mounts it; check a copy pointing here.
sed "s#/etc/prometheus/alerts.yml#$PWD/deploy/prometheus/alerts.yml#" deploy/prometheus/prometheus.yml >"$tmp/prometheus.yml"
promtool check config "$tmp/prometheus.yml"

echo "== runbooks, metric names, dashboard and KEDA queries"
"$PY" scripts/deploy_check.py rules "$tmp"
promtool check rules "$tmp/queries.yml"

echo "== Kubernetes manifests"
# kustomization.yaml and the KEDA ScaledObject have no Kubernetes schema: checked below.
k8s_files=()
for f in deploy/k8s/*.yaml; do
  case "$(basename "$f")" in kustomization.yaml|worker-scaledobject.yaml) ;; *) k8s_files+=("$f") ;; esac
done
.venv/bin/kubernetes-validate --strict --quiet "${k8s_files[@]}"
echo "kubernetes-validate --strict: ${#k8s_files[@]} files valid"
"$PY" scripts/deploy_check.py k8s

echo "== compose file"
"$PY" scripts/deploy_check.py compose "$SCHEMA"

echo "== the validators refuse broken copies"
"$PY" scripts/deploy_check.py selftest "$SCHEMA" "$tmp"

echo "== the binary with the image's and the manifests' settings"
bin="${CONVEYOR_BIN:-target/debug/conveyor}"
if ! [ -x "$bin" ]; then
  CARGO_INCREMENTAL=0 cargo build --quiet --bin conveyor
  bin=target/debug/conveyor
fi
if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
  if [ "${CI:-}" = true ]; then echo "deploy-check: Postgres at 127.0.0.1:5432 is not reachable" >&2; exit 1; fi
  echo "deploy-check: skipping the binary checks: Postgres at 127.0.0.1:5432 is not reachable"
  exit 0
fi
db="conveyor_deploy_check_$$_$RANDOM"
psql -h 127.0.0.1 -U postgres -q -c "CREATE DATABASE $db" >/dev/null
TMPDIR="$tmp" "$PY" scripts/deploy_check.py run "$PWD/$bin" "postgres://postgres@127.0.0.1:5432/$db"
echo "deploy-check: all passed"
