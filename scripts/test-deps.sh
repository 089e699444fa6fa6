#!/usr/bin/env bash
# Installs what the production-condition tests drive besides PostgreSQL and Redis, from
# Debian's packages: pgbouncer (a real connection pooler in both pool modes), faketime (a
# worker process whose clock is shifted), openssl (certificates for the TLS tests). Quick on
# a second run: nothing is fetched when every tool is already there.
set -euo pipefail

need=()
command -v pgbouncer >/dev/null 2>&1 || need+=(pgbouncer)
command -v faketime >/dev/null 2>&1 || need+=(faketime)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
if [ "${#need[@]}" -gt 0 ]; then
  echo "installing test tools: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# Debian starts a pgbouncer service on install; the tests start their own.
if pgrep -x pgbouncer >/dev/null 2>&1 && [ -x /etc/init.d/pgbouncer ]; then /etc/init.d/pgbouncer stop >/dev/null 2>&1 || true; fi
