#!/usr/bin/env bash
# A local PostgreSQL for flywheel's production profile (docs/deploying.md).
#
#   scripts/postgres.sh [start]   start it (initdb on first use) and print the FLYWHEEL_POSTGRES_URL to export
#   scripts/postgres.sh stop      stop it
#
# With FLYWHEEL_POSTGRES_URL already set, `start` only checks that its server answers. Otherwise the
# server keeps its data in $FLYWHEEL_POSTGRES_DATA (default $FLYWHEEL_HOME/postgres, the home
# .flywheel/ beside flywheel.yaml), listens on 127.0.0.1:$FLYWHEEL_POSTGRES_PORT (default 5433) and
# serves the database `flywheel` to the role `flywheel`, whose password is made on first use and kept
# in the data folder. It runs from Debian's postgresql package (installed with apt-get when missing
# and run as root); as root it runs as the `postgres` user, since initdb refuses root.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DATA=${FLYWHEEL_POSTGRES_DATA:-${FLYWHEEL_HOME:-$ROOT/.flywheel}/postgres}
PORT=${FLYWHEEL_POSTGRES_PORT:-5433}

say() { echo "postgres: $*" >&2; }

bin_dir() {
    local dir
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    if [[ -z $dir && $(id -u) == 0 ]]; then
        say "installing Debian's postgresql package"
        apt-get install -y -q postgresql >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q postgresql >/dev/null; }
        dir=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
    fi
    [[ -n $dir ]] || { say "no PostgreSQL binaries in /usr/lib/postgresql/*/bin: install Debian's postgresql package"; exit 1; }
    echo "$dir"
}

# Run a server binary as the data folder's owner: `postgres` when we are root.
as_owner() {
    if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

initialise() {
    local bin=$1
    mkdir -p "$DATA"
    chmod 700 "$DATA"
    [[ $(id -u) == 0 ]] && chown postgres: "$DATA"
    if ! as_owner test -x "$DATA"; then
        say "the postgres user cannot reach $DATA: choose a folder it can (FLYWHEEL_POSTGRES_DATA)"; exit 1
    fi
    umask 077
    python3 -c 'import secrets; print(secrets.token_hex(16))' > "$DATA/password"
    [[ $(id -u) == 0 ]] && chown postgres: "$DATA/password"
    as_owner "$bin/initdb" -D "$DATA/data" -U flywheel --pwfile="$DATA/password" \
        --auth-local=scram-sha-256 --auth-host=scram-sha-256 -E UTF8 >"$DATA/initdb.log"
}

start() {
    if [[ -n ${FLYWHEEL_POSTGRES_URL:-} ]]; then
        "$(bin_dir)/pg_isready" -q -d "${FLYWHEEL_POSTGRES_URL/+psycopg2/}" -t 10 \
            || { say "the server FLYWHEEL_POSTGRES_URL names does not answer"; exit 1; }
        say "using the server FLYWHEEL_POSTGRES_URL names"
        return
    fi
    local bin
    bin=$(bin_dir)
    [[ -f $DATA/data/PG_VERSION ]] || initialise "$bin"
    local url="postgresql+psycopg2://flywheel:$(cat "$DATA/password")@127.0.0.1:$PORT/flywheel"
    if ! as_owner "$bin/pg_ctl" -D "$DATA/data" status >/dev/null; then
        as_owner "$bin/pg_ctl" -D "$DATA/data" -l "$DATA/postgres.log" -w start \
            -o "-p $PORT -c listen_addresses=127.0.0.1 -c unix_socket_directories=''" >/dev/null \
            || { say "the server did not start; see $DATA/postgres.log"; exit 1; }
        PGPASSWORD=$(cat "$DATA/password") "$bin/psql" -q -h 127.0.0.1 -p "$PORT" -U flywheel -d postgres \
            -tAc "SELECT 1 FROM pg_database WHERE datname = 'flywheel'" | grep -q 1 \
            || PGPASSWORD=$(cat "$DATA/password") "$bin/createdb" -h 127.0.0.1 -p "$PORT" -U flywheel flywheel
    fi
    say "running on 127.0.0.1:$PORT, data in $DATA; for the production profile:"
    echo "export FLYWHEEL_PROFILE=production FLYWHEEL_POSTGRES_URL=$url"
}

stop() {
    [[ -f $DATA/data/PG_VERSION ]] || { say "no server in $DATA"; return; }
    as_owner "$(bin_dir)/pg_ctl" -D "$DATA/data" -m fast -w stop >/dev/null 2>&1 || true
    say "stopped"
}

case ${1:-start} in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 [start|stop]" >&2; exit 2 ;;
esac
