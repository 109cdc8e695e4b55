#!/bin/sh
# Run a command with the clock moved, for it and every process it starts (PostgreSQL, DuckDB, the
# Dagster daemon): scripts/on_date.sh +45d make test. OFFSET is libfaketime's: +45d, -2h, or
# "@2027-03-01 00:00:00" (starts there and ticks). Needs Debian's faketime (apt-get install faketime)
# and a C compiler for the timed-wait wrapper (scripts/faketime/sem_clockwait.c).
set -eu
[ $# -ge 2 ] || { echo "usage: $0 OFFSET COMMAND..." >&2; exit 2; }
offset=$1; shift
here=$(cd "$(dirname "$0")" && pwd)
libfaketime=$(ls /usr/lib/*/faketime/libfaketime.so.1 2>/dev/null | head -1)
[ -n "$libfaketime" ] || { echo "$0: libfaketime not found: apt-get install faketime" >&2; exit 2; }
wrapper=${TMPDIR:-/tmp}/flywheel-sem-clockwait.so
if [ ! -e "$wrapper" ] || [ "$here/faketime/sem_clockwait.c" -nt "$wrapper" ]; then
    cc -shared -fPIC -O2 -o "$wrapper" "$here/faketime/sem_clockwait.c" -ldl
fi
export LD_PRELOAD="$wrapper $libfaketime" FAKETIME="$offset"
exec "$@"
