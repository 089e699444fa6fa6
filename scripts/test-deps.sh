#!/usr/bin/env bash
# Installs what the production-condition tests drive besides PostgreSQL and Redis, from
# Debian's packages: pgbouncer (a real connection pooler in both pool modes), faketime (a
# worker process whose clock is shifted), openssl (certificates for the TLS tests); and from
# PyPI into .venv: schemathesis (scripts/api-schema-test.sh) and aiosmtpd (the scripted SMTP
# server of the email tests, tests/smtp/server.py), dkimpy (their DKIM verifier), moto (the
# backup tests' object storage); for scripts/deploy-check.sh, promtool (Debian's prometheus),
# kubernetes-validate and the compose specification's schema. Quick on a second run:
# nothing is fetched when every tool is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v pgbouncer >/dev/null 2>&1 || need+=(pgbouncer)
command -v faketime >/dev/null 2>&1 || need+=(faketime)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
# pg_dump for the backup tests (the server's major version or newer).
command -v pg_dump >/dev/null 2>&1 || need+=(postgresql-client-15)
command -v python3 >/dev/null 2>&1 || need+=(python3)
# promtool (scripts/deploy-check.sh: alert rules, their unit tests, dashboard queries).
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
# `python3 -m venv` needs ensurepip (Debian's python3-venv) unless the Python brings it.
if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then need+=(python3-venv); fi
if [ "${#need[@]}" -gt 0 ]; then
  echo "installing test tools: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# Debian starts a pgbouncer service on install; the tests start their own.
if pgrep -x pgbouncer >/dev/null 2>&1 && [ -x /etc/init.d/pgbouncer ]; then /etc/init.d/pgbouncer stop >/dev/null 2>&1 || true; fi
# Only promtool is wanted from the prometheus package, not its server.
if pgrep -x prometheus >/dev/null 2>&1 && [ -x /etc/init.d/prometheus ]; then /etc/init.d/prometheus stop >/dev/null 2>&1 || true; fi

# schemathesis, pinned to a major version, in the project's own venv.
SCHEMATHESIS='schemathesis>=4.32,<5'
if ! .venv/bin/python -c 'import schemathesis' >/dev/null 2>&1; then
  echo "installing $SCHEMATHESIS into .venv"
  rm -rf .venv
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check "$SCHEMATHESIS"
fi

# aiosmtpd, pinned to a major version, beside it (never rebuilding the venv for it).
AIOSMTPD='aiosmtpd>=1.4,<2'
if ! .venv/bin/python -c 'import aiosmtpd' >/dev/null 2>&1; then
  echo "installing $AIOSMTPD into .venv"
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check "$AIOSMTPD"
fi

# moto's S3-compatible server (the backup tests' object storage), pinned to a major version.
MOTO='moto[server]>=5,<6'
if ! .venv/bin/python -c 'import moto.server' >/dev/null 2>&1; then
  echo "installing $MOTO into .venv"
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check "$MOTO"
fi

# dkimpy (with PyNaCl for ed25519): the independent verifier of the email tests' DKIM
# signatures (tests/smtp/dkim_verify.py), pinned to a major version.
DKIMPY='dkimpy[ed25519]>=1.1,<2'
if ! .venv/bin/python -c 'import dkim, nacl' >/dev/null 2>&1; then
  echo "installing $DKIMPY into .venv"
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check "$DKIMPY"
fi

# scripts/deploy-check.sh: kubernetes-validate (the Kubernetes schemas, offline) and jsonschema,
# pinned to major versions; and the compose specification's JSON schema, as shipped in the
# docker-compose 1.29.2 wheel (Apache-2.0; only the schema file is kept, nothing installed).
K8S_VALIDATE='kubernetes-validate>=1.28,<2'
if ! .venv/bin/python -c 'import kubernetes_validate, jsonschema, yaml' >/dev/null 2>&1; then
  echo "installing $K8S_VALIDATE, jsonschema into .venv"
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check "$K8S_VALIDATE" 'jsonschema>=4,<5' 'PyYAML>=6,<7'
fi
if ! [ -s .venv/share/compose-spec/compose_spec.json ]; then
  echo "fetching the compose specification schema (docker-compose 1.29.2 wheel) into .venv/share"
  dl="$(mktemp -d)"
  .venv/bin/pip download --quiet --disable-pip-version-check --no-deps -d "$dl" 'docker-compose==1.29.2'
  mkdir -p .venv/share/compose-spec
  .venv/bin/python - "$dl"/docker_compose-1.29.2-*.whl <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    data = z.read("compose/config/compose_spec.json")
open(".venv/share/compose-spec/compose_spec.json", "wb").write(data)
PY
  rm -rf "$dl"
fi

# The dashboard's browser tests (tests/browser/): Debian's Chromium and its WebDriver, driven
# by Python's selenium (pinned to a major version) in .venv, and axe-core (the accessibility
# scan injected into each page) from npm into a cache folder outside the repository.
browser=()
command -v chromium >/dev/null 2>&1 || browser+=(chromium)
command -v chromedriver >/dev/null 2>&1 || browser+=(chromium-driver)
command -v npm >/dev/null 2>&1 || browser+=(npm)
if [ "${#browser[@]}" -gt 0 ]; then
  echo "installing the browser tests' browser: ${browser[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${browser[@]}" >/dev/null
fi
SELENIUM='selenium>=4.20,<5'
if ! .venv/bin/python -c 'import selenium' >/dev/null 2>&1; then
  echo "installing $SELENIUM into .venv"
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check "$SELENIUM"
fi
AXE_DIR="${CONVEYOR_AXE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/conveyor/axe}"
if [ ! -f "$AXE_DIR/node_modules/axe-core/axe.min.js" ]; then
  if command -v npm >/dev/null 2>&1; then
    echo "installing axe-core into $AXE_DIR"
    mkdir -p "$AXE_DIR"
    npm install --silent --no-audit --no-fund --prefix "$AXE_DIR" 'axe-core@^4.10' >/dev/null
  fi
fi
