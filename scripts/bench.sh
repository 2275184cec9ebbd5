#!/usr/bin/env bash
# Token endpoint benchmark: Portcullis (release build) vs node oidc-provider, plus Portcullis's
# own /healthz measured with the same wrk settings in the same run.
#
# Usage: scripts/bench.sh [sqlite|postgres]     (ROUNDS, DURATION, CONNECTIONS as in the peer script)
# Needs: wrk, node/npm, a release build (cargo build --release -p portcullis), and for postgres
# a server at PORTCULLIS_TEST_PG_URL (default postgres://postgres@127.0.0.1:5432/test).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
backend=${1:-sqlite}
bin=${BENCH_BIN:-$here/target/release/portcullis}
peer=${PEER_SCRIPT:-$here/../shared/peers/oidc-provider/token-bench.sh}
[ -x "$bin" ] || { echo "build first: cargo build --release -p portcullis" >&2; exit 1; }
command -v wrk >/dev/null || { echo "install wrk: apt-get install wrk" >&2; exit 1; }
export ROUNDS=${ROUNDS:-3} DURATION=${DURATION:-10s} CONNECTIONS=${CONNECTIONS:-32}

work=$(mktemp -d)
db_args=()
cleanup() {
  [ -n "${pid:-}" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  [ -n "${pgdb:-}" ] && psql -q "$pgadmin" -c "DROP DATABASE IF EXISTS $pgdb WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
if [ "$backend" = postgres ]; then
  pgadmin=${PORTCULLIS_TEST_PG_URL:-postgres://postgres@127.0.0.1:5432/test}
  pgdb=portcullis_bench_$$
  psql -q "$pgadmin" -c "CREATE DATABASE $pgdb" >/dev/null
  db_args=(--database-url "${pgadmin%/*}/$pgdb")
fi

admin_secret=$(head -c 32 /dev/urandom | base64 | tr -d '=+/' | head -c 43)
PORTCULLIS_ADMIN_CLIENT_SECRET=$admin_secret PORTCULLIS_LOG__LEVEL=warn,portcullis=info \
  "$bin" serve --listen 127.0.0.1:0 --data-dir "$work/data" "${db_args[@]}" >"$work/out" 2>"$work/err" &
pid=$!
for _ in $(seq 100); do grep -q 'listening on' "$work/err" && break; sleep 0.1; done
url=$(grep -o 'listening on http://[0-9.:]*' "$work/err" | sed 's/listening on //' || true)
[ -n "$url" ] || { cat "$work/err" >&2; exit 1; }

tok=$(curl -fs -u "portcullis\$admin:$admin_secret" -d grant_type=client_credentials "$url/oauth2/token" | sed 's/.*"access_token":"\([^"]*\)".*/\1/')
api() { curl -fs -H "authorization: Bearer $tok" -H 'content-type: application/json' -d "$2" "$url$1"; }
api /api/v1/organisations '{"slug":"bench","name":"Bench"}' >/dev/null
api /api/v1/organisations/bench/services '{"slug":"api","name":"API","audience":"https://api.example","scopes":["api/read"]}' >/dev/null
secret=$(api /api/v1/organisations/bench/applications '{"slug":"client","name":"Bench client","scopes":["api/read"]}' | sed 's/.*"client_secret":"\([^"]*\)".*/\1/')

echo "== $backend: token endpoint vs oidc-provider ($ROUNDS x $DURATION, $CONNECTIONS connections)"
PORTCULLIS_TOKEN_URL="$url/oauth2/token" CLIENT_ID='bench$client' CLIENT_SECRET="$secret" SCOPE=api/read "$peer"

echo "== $backend: token endpoint vs Portcullis /healthz (same wrk settings)"
cat >"$work/done.lua" <<'LUA'
done = function(summary, latency, requests)
  io.write(string.format("RESULT %.1f %d %d\n", summary.requests / (summary.duration / 1e6),
    summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(99)))
end
LUA
basic=$(printf '%s' "bench\$client:$secret" | base64 -w0)
cat "$work/done.lua" >"$work/token.lua"
cat >>"$work/token.lua" <<LUA
wrk.method = "POST"
wrk.body = "grant_type=client_credentials&scope=api%2Fread"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
wrk.headers["Authorization"] = "Basic $basic"
LUA
run() { wrk -t1 -c"$CONNECTIONS" -d"$DURATION" -s "$1" "$2" | awk '/^RESULT/ {print $2, $3, $4}'; }
h=(); t=()
for r in $(seq "$ROUNDS"); do
  read -r hv he hp < <(run "$work/done.lua" "$url/healthz")
  read -r tv te tp < <(run "$work/token.lua" "$url/oauth2/token")
  echo "round $r: /healthz ${hv} req/s (errors $he, p99 ${hp}us)  token ${tv} tok/s (errors $te, p99 ${tp}us)"
  h+=("$hv"); t+=("$tv")
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
mh=$(median "${h[@]}"); mt=$(median "${t[@]}")
echo "median: /healthz $mh req/s, token $mt tok/s, token/healthz $(awk -v a="$mt" -v b="$mh" 'BEGIN {printf "%.2f", a/b}')"
