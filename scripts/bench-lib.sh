# Shared by scripts/bench.sh and scripts/bench-auth.sh (sourced, not run): start the release
# binary on a fresh data directory or PostgreSQL database, set up a benchmark organisation with a
# client, and the wrk helpers. Cleans up on exit.
#
# After `bench_start BIN BACKEND [ENV=VALUE ...]`: $work, $pid, $url, $admin_secret, and the
# functions api / field. After `bench_setup_client`: $client_secret, and $work/{done,token}.lua.

work=$(mktemp -d)
bench_cleanup() {
  [ -n "${pid:-}" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  [ -n "${pgdb:-}" ] && psql -q "$pgadmin" -c "DROP DATABASE IF EXISTS $pgdb WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap bench_cleanup EXIT

# The value of the JSON string field $1 in the document on stdin.
field() { sed "s/.*\"$1\":\"\\([^\"]*\\)\".*/\\1/"; }

bench_start() {
  local bin=$1 backend=$2; shift 2
  local db_args=()
  if [ "$backend" = postgres ]; then
    pgadmin=${PORTCULLIS_TEST_PG_URL:-postgres://postgres@127.0.0.1:5432/test}
    pgdb=portcullis_bench_$$
    psql -q "$pgadmin" -c "CREATE DATABASE $pgdb" >/dev/null
    db_args=(--database-url "${pgadmin%/*}/$pgdb")
  fi
  admin_secret=$(head -c 32 /dev/urandom | base64 | tr -d '=+/' | head -c 43)
  env PORTCULLIS_ADMIN_CLIENT_SECRET="$admin_secret" PORTCULLIS_LOG__LEVEL=warn,portcullis=info "$@" \
    "$bin" serve --listen 127.0.0.1:0 --data-dir "$work/data" "${db_args[@]}" >"$work/out" 2>"$work/err" &
  pid=$!
  for _ in $(seq 100); do grep -q 'listening on' "$work/err" && break; sleep 0.1; done
  url=$(grep -o 'listening on http://[0-9.:]*' "$work/err" | sed 's/listening on //' || true)
  [ -n "$url" ] || { cat "$work/err" >&2; exit 1; }
  tok=$(curl -fs -u "portcullis\$admin:$admin_secret" -d grant_type=client_credentials "$url/oauth2/token" | field access_token)
}

# POST JSON $2 to path $1 as the bootstrap admin.
api() { curl -fs -H "authorization: Bearer $tok" -H 'content-type: application/json' -d "$2" "$url$1"; }

# Organisation `bench`, service `api` (scope api/read, role api:user) and client `bench$client`.
bench_setup_client() {
  api /api/v1/organisations '{"slug":"bench","name":"Bench"}' >/dev/null
  api /api/v1/organisations/bench/services '{"slug":"api","name":"API","audience":"https://api.example","scopes":["api/read"],"roles":["api:user"]}' >/dev/null
  client_secret=$(api /api/v1/organisations/bench/applications '{"slug":"client","name":"Bench client","scopes":["api/read"]}' | field client_secret)
  cat >"$work/done.lua" <<'LUA'
done = function(summary, latency, requests)
  io.write(string.format("RESULT %.1f %d %d\n", summary.requests / (summary.duration / 1e6),
    summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(99)))
end
LUA
  { cat "$work/done.lua"; cat <<LUA; } >"$work/token.lua"
wrk.method = "POST"
wrk.body = "grant_type=client_credentials&scope=api%2Fread"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
wrk.headers["Authorization"] = "Basic $(printf '%s' "bench\$client:$client_secret" | base64 -w0)"
LUA
}

# `wrk -t1` with $1 connections for $DURATION on script $2 against URL $3: "req/s errors p99us".
run() { wrk -t1 -c"$1" -d"$DURATION" -s "$2" "$3" | awk '/^RESULT/ {print $2, $3, $4}'; }
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a/b}'; }
