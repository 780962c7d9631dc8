#!/usr/bin/env bash
# Install the external programs the benchmarks drive, from Debian's archive: pgbench (in
# postgresql-client-NN, which the package postgresql-client pulls in) and PgBouncer (package
# pgbouncer). `nox -s bench` calls this.
#
#   bash tools/bench_tools.sh          # install what is missing (needs root and apt-get)
#
# Without root or apt-get it only says what is missing and exits 0: the benchmark then skips
# the rows that need a missing program and says why. The pgbouncer package's own service is
# left stopped; the benchmark starts its own PgBouncer with a generated configuration.
set -euo pipefail

missing=()
command -v pgbench >/dev/null 2>&1 || missing+=(postgresql-client)
command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ] || missing+=(pgbouncer)
if [ ${#missing[@]} -eq 0 ]; then
  echo "bench tools: pgbench and pgbouncer are installed"
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "bench tools: missing ${missing[*]} (install them with apt-get as root);" \
       "the rows that need them are skipped"
  exit 0
fi
echo "bench tools: installing ${missing[*]} with apt-get"
export DEBIAN_FRONTEND=noninteractive
# Do not let the packages start their services (Debian's policy-rc.d convention, exit 101).
created_policy=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
  created_policy=1
fi
trap 'if [ "$created_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi' EXIT
timeout 600 apt-get update -qq || true
timeout 600 apt-get install -y -qq --no-install-recommends "${missing[@]}"
