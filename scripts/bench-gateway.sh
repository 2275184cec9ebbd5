#!/usr/bin/env bash
# Gateway benchmark (release build): `portcullis serve` with a [gateway] route in front of the
# upstream that ../shared/peers/nginx/gateway-bench.sh starts (nginx returning a fixed body on
# 127.0.0.1:18080), loaded alternately with nginx as a plain TLS reverse proxy to that upstream,
# with the same wrk settings in one run:
#   1. one bearer token for every request (the verified-token cache path);
#   2. a new ES256 token for every request (signature verification, no cache hit);
#   3. latency at half of the gateway's maximum load (wrk with a per-request delay), gateway
#      against nginx at the same offered rate.
#
# Usage: scripts/bench-gateway.sh    (ROUNDS=3 DURATION=10s CONNECTIONS=32 ACCESS_LOG=off|on
#                                    STEPS="1 2 3 4" to run only some steps)
# Needs: nginx, wrk, openssl, curl, and `cargo build --release -p portcullis`.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
target=${BENCH_TARGET:-$here/target/release}
bin=$target/portcullis
peer=${PEER_SCRIPT:-$here/../shared/peers/nginx/gateway-bench.sh}
[ -x "$bin" ] || { echo "build first: cargo build --release -p portcullis" >&2; exit 1; }
for t in wrk nginx; do command -v $t >/dev/null || { echo "install $t: apt-get install nginx wrk" >&2; exit 1; }; done
export ROUNDS=${ROUNDS:-3} DURATION=${DURATION:-10s} CONNECTIONS=${CONNECTIONS:-32}
UPSTREAM_PORT=${UPSTREAM_PORT:-18080}

# shellcheck source=scripts/bench-lib.sh
. "$here/scripts/bench-lib.sh"
cat >"$work/gateway.toml" <<TOML
[gateway]
listen = "127.0.0.1:0"
server_names = ["localhost"]
mtls = "optional"

[[gateway.routes]]
path = "/bench/"
upstream = "http://127.0.0.1:$UPSTREAM_PORT"
auth = ["bearer"]
require_scopes = ["api/read"]
audience = "https://api.example"
TOML
# The access log is one line per request; nginx's side runs with `access_log off`.
log_filter=warn,portcullis=info,portcullis::gateway::access=warn
[ "${ACCESS_LOG:-off}" = on ] && log_filter=warn,portcullis=info
bench_start "$bin" sqlite PORTCULLIS_CONFIG="$work/gateway.toml" RUST_LOG="$log_filter" ${TOKIO_WORKER_THREADS:+TOKIO_WORKER_THREADS=$TOKIO_WORKER_THREADS}
for _ in $(seq 100); do grep -q 'gateway listening on' "$work/err" && break; sleep 0.1; done
gw=$(grep -o 'gateway listening on https://[0-9.:]*' "$work/err" | sed 's/.*:\([0-9]*\)$/\1/')
[ -n "$gw" ] || { cat "$work/err" >&2; exit 1; }
bench_setup_client
basic=$(printf '%s' "bench\$client:$client_secret" | base64 -w0)
token() {
  curl -fs -H "authorization: Basic $basic" -d grant_type=client_credentials -d scope=api/read \
    --data-urlencode resource=https://api.example "$url/oauth2/token" | field access_token
}
t=$(token)
gateway_url="https://localhost:$gw/bench/ping"

STEPS=" ${STEPS:-1 2 3 4} "
step() { [[ $STEPS == *" $1 "* ]]; }

if step 1; then
echo "== 1. cached bearer token"
GATEWAY_URL=$gateway_url AUTH_HEADER="Authorization: Bearer $t" "$peer"
fi

if step 2; then
echo "== 2. a new ES256 token per request"
# Tokens minted by wrk against the token endpoint, one per response; more than a round uses.
cat >"$work/mint.lua" <<LUA
wrk.method = "POST"
wrk.body = "grant_type=client_credentials&scope=api%2Fread&resource=https%3A%2F%2Fapi.example"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
wrk.headers["Authorization"] = "Basic $basic"
response = function(status, headers, body)
  local t = body:match('"access_token":"([^"]+)"')
  if t then io.write(t, "\n") end
end
LUA
wrk -t1 -c16 -d"${MINT_DURATION:-20s}" -s "$work/mint.lua" "$url/oauth2/token" | grep '^ey' | sort -u >"$work/tokens"
echo "minted $(wc -l <"$work/tokens") unique tokens"
GATEWAY_URL=$gateway_url UNIQUE_TOKENS="$work/tokens" "$peer"
fi

echo "== 3. latency at half of the gateway's maximum load (cached token), 4. mTLS handshakes"
# The peer script has no paced mode, so this step runs the same nginx pair itself (upstream on
# $UPSTREAM_PORT, TLS proxy on $NGINX_PORT). wrk has no fixed-rate mode either: each connection
# waits DELAY ms after every response, so the offered rate is about CONNECTIONS / (DELAY +
# latency); the same delay is used for every target and the achieved rates are printed.
NGINX_PORT=${NGINX_PORT:-18443}
NGINX_MTLS_PORT=${NGINX_MTLS_PORT:-18444}
curl -fs "$url/pki/ca.pem" >"$work/ca.pem"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=localhost \
  -keyout "$work/ng-key.pem" -out "$work/ng-cert.pem" 2>/dev/null
mkdir -p "$work/ng"
cat >"$work/ng/nginx.conf" <<CONF
worker_processes 2;
pid $work/ng/nginx.pid;
error_log $work/ng/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $work/ng; proxy_temp_path $work/ng; fastcgi_temp_path $work/ng;
  uwsgi_temp_path $work/ng; scgi_temp_path $work/ng;
  upstream app { server 127.0.0.1:$UPSTREAM_PORT; keepalive 64; }
  server { listen 127.0.0.1:$UPSTREAM_PORT; location / { return 200 '{"ok":true}'; } }
  server {
    listen 127.0.0.1:$NGINX_PORT ssl;
    ssl_certificate $work/ng-cert.pem; ssl_certificate_key $work/ng-key.pem;
    location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
  server {
    listen 127.0.0.1:$NGINX_MTLS_PORT ssl;
    ssl_certificate $work/ng-cert.pem; ssl_certificate_key $work/ng-key.pem;
    ssl_verify_client on; ssl_client_certificate $work/ca.pem; ssl_verify_depth 2;
    ssl_session_cache off; ssl_session_tickets off;
    location / { return 200; }
  }
}
CONF
nginx -c "$work/ng/nginx.conf" -p "$work/ng"
trap 'kill "$(cat "$work/ng/nginx.pid")" 2>/dev/null; bench_cleanup' EXIT
sleep 0.5
paced() { # $1 delay ms, $2 URL, $3 extra lua
  cat >"$work/paced.lua" <<LUA
$3
delay = function() return $1 end
done = function(summary, latency, requests)
  io.write(string.format("RESULT %.1f %d %d %d\n", summary.requests / (summary.duration / 1e6),
    summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(99)))
end
LUA
  wrk -t1 -c"$CONNECTIONS" -d"$DURATION" -s "$work/paced.lua" "$2" | awk '/^RESULT/ {print $2, $3, $4, $5}'
}
if step 3; then
auth_lua="wrk.headers[\"Authorization\"] = \"Bearer $t\""
read -r max _ _ _ < <(paced 0 "$gateway_url" "$auth_lua")
half=$(awk -v m="$max" 'BEGIN {printf "%d", m / 2}')
delay=$(awk -v c="$CONNECTIONS" -v r="$half" 'BEGIN {d = c * 1000 / r - 1; if (d < 0) d = 0; printf "%.2f", d}')
echo "gateway maximum ${max} req/s; offering about ${half} req/s (delay ${delay} ms per connection)"
for r in $(seq "$ROUNDS"); do
  read -r d de d50 d99 < <(paced "$delay" "http://127.0.0.1:$UPSTREAM_PORT/bench/ping" "")
  read -r n ne n50 n99 < <(paced "$delay" "https://localhost:$NGINX_PORT/bench/ping" "")
  read -r g ge g50 g99 < <(paced "$delay" "$gateway_url" "$auth_lua")
  echo "round $r: upstream direct ${d} req/s p50 ${d50}us p99 ${d99}us | nginx ${n} req/s p50 ${n50}us p99 ${n99}us | portcullis ${g} req/s p50 ${g50}us p99 ${g99}us (errors $de/$ne/$ge)"
  echo "round $r: portcullis adds p99 $((g99 - d99))us over the upstream, $((g99 - n99))us over nginx"
done
fi

step 4 || exit 0
echo "== 4. mTLS handshakes per second (openssl s_time, a new full handshake each time)"
# A transport certificate from our CA for bench\$client; both servers verify it against our
# chain (/pki/ca.pem). Neither resumes sessions (the gateway never does; nginx is told not to).
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$work/client.key" \
  -subj '/CN=bench$client/O=bench' -out "$work/client.csr" 2>/dev/null
csr=$(awk '{printf "%s\\n", $0}' "$work/client.csr")
api /api/v1/organisations/bench/certificates "{\"type\":\"transport\",\"application\":\"client\",\"csr\":\"$csr\"}" |
  sed 's/.*"certificate_pem":"\([^"]*\)".*/\1/' | sed 's/\\n/\n/g' >"$work/client.crt"
handshakes() { # host:port → full handshakes per second of wall time (one client, sequential)
  local secs=${DURATION%s}
  openssl s_time -connect "$1" -new -cert "$work/client.crt" -key "$work/client.key" -time "$secs" 2>/dev/null |
    awk -v s="$secs" '/connections in [0-9]+ real seconds/ {printf "%.0f", $1 / s}'
}
openssl x509 -in "$work/client.crt" -noout || { echo "no client certificate issued" >&2; exit 1; }
# Both must accept the certificate (nginx answers 400 to a missing or unverified one).
[ "$(curl -sk -o /dev/null -w '%{http_code}' --cert "$work/client.crt" --key "$work/client.key" "https://localhost:$NGINX_MTLS_PORT/")" = 200 ] ||
  { echo "nginx refused the client certificate" >&2; exit 1; }
curl -sf -o /dev/null --cacert "$work/ca.pem" --cert "$work/client.crt" --key "$work/client.key" \
  "https://localhost:$gw/.portcullis/healthz" || { echo "the gateway refused the client certificate" >&2; exit 1; }
for r in $(seq "$ROUNDS"); do
  n=$(handshakes "127.0.0.1:$NGINX_MTLS_PORT"); g=$(handshakes "127.0.0.1:$gw")
  echo "round $r: nginx ssl_verify_client on ${n:-?} handshakes/s  portcullis mtls ${g:-?} handshakes/s  ratio $(ratio "${g:-0}" "${n:-1}")"
done
