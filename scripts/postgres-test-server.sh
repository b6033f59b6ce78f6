#!/usr/bin/env bash
# A throwaway PostgreSQL server for vfdirect's tests (the inventory's PostgreSQL variant).
#
#   scripts/postgres-test-server.sh start   install PostgreSQL if missing, create a cluster,
#                                           start it, create the test database, print its URL
#   scripts/postgres-test-server.sh url     print the URL of the running server
#   scripts/postgres-test-server.sh stop    stop the server and remove the cluster
#
# The URL is a SQLAlchemy URL, postgresql+psycopg://postgres@127.0.0.1:PORT/vfdirect_test;
# export it as VFDIRECT_TEST_PG_URL to run the PostgreSQL variants of the tests:
#
#   export VFDIRECT_TEST_PG_URL="$(scripts/postgres-test-server.sh start)"
#
# Environment:
#   VFDIRECT_PG_DIR   where the cluster lives (default /tmp/vfdirect-pg-test); it must be
#                     reachable by the postgres user when run as root
#   VFDIRECT_PG_PORT  TCP port on 127.0.0.1 (default: a free one)
#   VFDIRECT_PG_DB    database name (default vfdirect_test)
#
# PostgreSQL refuses to run as root: as root, the cluster belongs to the "postgres" user
# (created by Debian's package) and every server command runs as that user. The server is
# for tests only: trust authentication, listening on 127.0.0.1 and a private Unix socket
# directory, with durability switched off (fsync=off) for speed.
set -euo pipefail

dir="${VFDIRECT_PG_DIR:-/tmp/vfdirect-pg-test}"
db="${VFDIRECT_PG_DB:-vfdirect_test}"
data="$dir/data"
sock="$dir/sock"
logfile="$dir/server.log"
portfile="$dir/port"

log() { printf '[postgres-test-server] %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

pg_bindir() {
    local d
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k4 -V -r); do
        if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then echo "$d"; return 0; fi
    done
    local initdb
    initdb="$(command -v initdb 2>/dev/null || true)"
    if [ -n "$initdb" ]; then dirname "$(readlink -f "$initdb")"; return 0; fi
    return 1
}

ensure_installed() {
    if pg_bindir >/dev/null; then return; fi
    [ "$(id -u)" -eq 0 ] || die "PostgreSQL is not installed; as root, this script installs it (apt-get install postgresql)"
    command -v apt-get >/dev/null 2>&1 || die "PostgreSQL is not installed and this is not a Debian system"
    log "apt-get install postgresql"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends postgresql >/dev/null
    pg_bindir >/dev/null || die "postgresql installed, but no initdb found under /usr/lib/postgresql"
}

# Run a PostgreSQL program as the cluster's owner.
as_owner() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

free_port() {
    python3 - <<'PY'
import socket
with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1])
PY
}

url() {
    local port
    port="$(cat "$portfile")"
    echo "postgresql+psycopg://postgres@127.0.0.1:${port}/${db}"
}

running() {
    local bin
    [ -f "$portfile" ] && [ -f "$data/postmaster.pid" ] || return 1
    bin="$(pg_bindir)" || return 1
    as_owner "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1
}

start() {
    ensure_installed
    local bin port
    bin="$(pg_bindir)"
    if running; then
        url
        return
    fi
    if [ -d "$data" ] && [ -f "$data/PG_VERSION" ]; then
        log "reusing the cluster in $data"
    else
        rm -rf "$dir"
        mkdir -p "$data" "$sock"
        if [ "$(id -u)" -eq 0 ]; then
            id postgres >/dev/null 2>&1 || die "no postgres user (install Debian's postgresql package)"
            chown -R postgres: "$dir"
            runuser -u postgres -- test -w "$data" \
                || die "$dir is not reachable by the postgres user; choose VFDIRECT_PG_DIR elsewhere"
        fi
        chmod 700 "$data"
        log "initdb $data"
        as_owner "$bin/initdb" -D "$data" --username=postgres --auth=trust --encoding=UTF8 \
            --locale=C --no-sync >"$dir/initdb.log" 2>&1 \
            || { cat "$dir/initdb.log" >&2; die "initdb failed"; }
    fi
    mkdir -p "$sock"
    [ "$(id -u)" -eq 0 ] && chown postgres: "$sock"
    port="${VFDIRECT_PG_PORT:-$(free_port)}"
    echo "$port" >"$portfile"
    log "starting PostgreSQL on 127.0.0.1:$port (socket dir $sock)"
    as_owner "$bin/pg_ctl" -D "$data" -l "$logfile" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $sock -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=100" \
        start >/dev/null \
        || { tail -n 20 "$logfile" >&2 || true; die "the server did not start"; }
    if ! as_owner "$bin/psql" -h "$sock" -p "$port" -U postgres -d postgres -tAc \
            "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1; then
        as_owner "$bin/createdb" -h "$sock" -p "$port" -U postgres "$db"
    fi
    url
}

stop() {
    local bin
    if bin="$(pg_bindir)" && [ -f "$data/postmaster.pid" ]; then
        as_owner "$bin/pg_ctl" -D "$data" -m fast -w stop >/dev/null 2>&1 || true
    fi
    rm -rf "$dir"
    log "stopped; removed $dir"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    url) running || die "no server running in $dir (run: $0 start)"; url ;;
    *) echo "usage: $0 start|stop|url" >&2; exit 2 ;;
esac
