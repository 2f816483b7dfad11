#!/usr/bin/env bash
# A side-by-side load run on one box: the stand-in node directly, nginx as a
# plain reverse proxy in front of it, and the host (memory store, then
# SQLite) in front of it, each non-streamed and streamed, and the host
# answering the same call from its response cache (mode `cached`: the header
# `X-Cxmpute-Cache: ttl=600`, so every call after the first is a hit, held,
# settled at the cache price and recorded like any call). Prints requests/s,
# each target's ratio to nginx, latency percentiles and the CPU the process
# in the middle (nginx's workers, the host) spent per call.
#
# The box is shared and noisy: the references are measured in the same run,
# and the ratios are what to read, not the absolute numbers.
#
#   scripts/bench.sh
#   BENCH_SECONDS=20 BENCH_CONNECTIONS=64 scripts/bench.sh
#
# Settings (environment):
#   BENCH_SECONDS      length of each measured wrk run (default 10, at most 60:
#                      the node is sent a heartbeat before each run and leaves
#                      routing after 90 s without one)
#   BENCH_WARMUP       unmeasured wrk run before each measured one (default 2 s)
#   BENCH_CONNECTIONS  wrk connections (default 32)
#   BENCH_THREADS      wrk threads (default 1)
#   BENCH_ROUNDS       how many times the whole sequence runs, node, nginx and
#                      hosts alternating (default 1, at most 9). The box's
#                      neighbours come and go within minutes: each row's ratio
#                      is to the nginx of its own round, and with more than one
#                      round a last table gives each target's median ratio and
#                      CPU a call over the rounds.
#   BENCH_HOSTS        which hosts to load after the references (default
#                      "host-memory host-sqlite sqlite-proc"; sqlite-proc is
#                      the SQLite host with --sqlite-durability process; a
#                      host named twice is loaded twice, each time afresh)
#   BENCH_MODES        which calls to load the hosts with (default "plain stream
#                      cached"; the node and nginx always run plain and stream)
#   BENCH_BASELINE     a git revision: its host is built too, and each host of
#                      BENCH_HOSTS is loaded at that revision (rows base-memory,
#                      base-sqlite, base-proc) right before this tree's, so a
#                      change is measured against its baseline in one run
#   BENCH_HOST_LOG     the host's RUST_LOG (default info: a line per call, as
#                      the host runs by default; the log goes to a file)
#   BENCH_PERF         a TARGET-MODE (e.g. host-memory-plain) whose process in
#                      the middle is profiled with `perf record -g` during its
#                      measured run; the profile is written to
#                      target/perf-TARGET-MODE.data (read it with `perf report -i`;
#                      with several rounds, the last round's)
#   BENCH_PERF_CALL_GRAPH  how perf unwinds the stacks: fp (default; frame
#                      pointers, which release builds of Rust code mostly
#                      lack) or dwarf (complete call chains, larger profiles)
#
# Installs wrk and nginx with apt-get when missing. Everything listens on
# 127.0.0.1 and every process it starts is stopped on exit. Exits non-zero
# when any target answered something other than 2xx.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

seconds=${BENCH_SECONDS:-10}
warmup=${BENCH_WARMUP:-2}
connections=${BENCH_CONNECTIONS:-32}
threads=${BENCH_THREADS:-1}
rounds=${BENCH_ROUNDS:-1}
host_log=${BENCH_HOST_LOG:-info}
hosts=${BENCH_HOSTS:-host-memory host-sqlite sqlite-proc}
modes=${BENCH_MODES:-plain stream cached}
baseline=${BENCH_BASELINE:-}
for m in $modes; do
  case $m in
    plain | stream | cached) ;;
    *) echo "BENCH_MODES names plain, stream or cached, got '$m'" >&2; exit 2 ;;
  esac
done
for h in $hosts; do
  case $h in
    host-memory | host-sqlite | sqlite-proc) ;;
    *) echo "BENCH_HOSTS names host-memory, host-sqlite or sqlite-proc, got '$h'" >&2; exit 2 ;;
  esac
done
for v in "$seconds" "$warmup" "$connections" "$threads" "$rounds"; do
  case $v in '' | *[!0-9]*) echo "BENCH_* settings are whole numbers, got '$v'" >&2; exit 2 ;; esac
done
if [ "$seconds" -lt 1 ] || [ "$seconds" -gt 60 ] || [ "$warmup" -gt 20 ]; then
  echo "BENCH_SECONDS must be 1 to 60 and BENCH_WARMUP at most 20" >&2
  exit 2
fi
if [ "$rounds" -lt 1 ] || [ "$rounds" -gt 9 ]; then
  echo "BENCH_ROUNDS must be 1 to 9" >&2
  exit 2
fi
if [ "$connections" -lt "$threads" ] || [ "$threads" -lt 1 ]; then
  echo "BENCH_CONNECTIONS must be at least BENCH_THREADS (at least 1)" >&2
  exit 2
fi

work=$(mktemp -d)
pids=()
cleanup() {
  # Newest first: the host and nginx before the node they call.
  local i
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do stop "${pids[i]}"; done
  rm -rf "$work"
  [ -z "$baseline" ] || git worktree prune 2>/dev/null || true
}
# Stops one process it started: SIGTERM, then SIGKILL after 5 s.
stop() {
  kill "$1" 2>/dev/null || return 0
  for _ in $(seq 1 50); do
    kill -0 "$1" 2>/dev/null || break
    sleep 0.1
  done
  kill -9 "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'bench: %s\n' "$*" >&2; exit 1; }

# ---- tools -------------------------------------------------------------------

missing=()
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v nginx >/dev/null 2>&1 || missing+=(nginx)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
for t in curl python3 pgrep; do
  command -v "$t" >/dev/null 2>&1 || die "$t is needed"
done

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# The first value of "name":"..." or "name":123 in a JSON text on stdin.
field() {
  grep -o "\"$1\":\(\"[^\"]*\"\|-\?[0-9]\+\)" | head -n 1 | sed -e "s/^\"$1\"://" -e 's/^"//' -e 's/"$//'
}

# utime + stime of the processes given, in clock ticks.
cpu_ticks() {
  local total=0 p stat
  for p in "$@"; do
    stat=$(cat "/proc/$p/stat" 2>/dev/null) || die "process $p is gone"
    # Fields after the command name (which may hold spaces): state is the
    # 3rd field of the line, utime the 14th and stime the 15th.
    read -r -a f <<<"${stat##*) }"
    total=$((total + f[11] + f[12]))
  done
  echo "$total"
}
ticks_per_second=$(getconf CLK_TCK)

# ---- build -------------------------------------------------------------------

# executable NAME ARTIFACTS: the path of the example NAME in cargo's JSON
# messages ARTIFACTS.
executable() {
  grep '"reason":"compiler-artifact"' <<<"$2" | grep "\"name\":\"$1\"" \
    | grep -o '"executable":"[^"]*"' | head -n 1 | sed -e 's/^"executable":"//' -e 's/"$//'
}

if [ -n "$baseline" ]; then
  # Built in a worktree of its own, into a target directory of its own
  # that stays between runs (its dependencies compile once). Not this
  # tree's: cargo names a workspace's artifacts by their path inside the
  # workspace, so the baseline's build would overwrite this tree's host and
  # its fingerprints, and this tree's next build, its sources older than
  # those fingerprints, would find itself fresh and load the baseline twice.
  rev=$(git rev-parse --verify "$baseline^{commit}") || die "BENCH_BASELINE: no revision '$baseline'"
  log "building the baseline host at ${rev:0:12} (into target/bench-baseline)"
  git worktree add --detach "$work/baseline" "$rev" >/dev/null 2>&1 || die "cannot check out $rev"
  base_artifacts=$(cd "$work/baseline" && CARGO_TARGET_DIR="$root/target/bench-baseline" cargo build --release \
    --example host --message-format=json-render-diagnostics) || die "the baseline does not build"
  cp "$(executable host "$base_artifacts")" "$work/host-baseline"
  git worktree remove --force "$work/baseline"
fi

log "building the release examples (stand_in, host)"
artifacts=$(cargo build --release --example stand_in --example host \
  --message-format=json-render-diagnostics)
stand_in_bin=$(executable stand_in "$artifacts")
host_bin=$(executable host "$artifacts")
[ -x "$stand_in_bin" ] && [ -x "$host_bin" ] || die "cannot find the built examples"
if [ -n "$baseline" ] && cmp -s "$work/host-baseline" "$host_bin"; then
  # Expected when the baseline is this very tree; otherwise a build mix-up.
  log "note: the baseline's host is byte for byte this tree's"
fi

# ---- the load ----------------------------------------------------------------

cat >"$work/chat.lua" <<'EOF'
-- POSTs one chat completion per request; BENCH_STREAM=1 asks for a stream,
-- BENCH_CACHE=1 for the response cache, BENCH_KEY (when set) is sent as the
-- API key.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
if os.getenv("BENCH_CACHE") == "1" then
  wrk.headers["X-Cxmpute-Cache"] = "ttl=600"
end
local key = os.getenv("BENCH_KEY")
if key and key ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. key
end
local stream = ""
if os.getenv("BENCH_STREAM") == "1" then stream = ',"stream":true' end
wrk.body = '{"model":"llama3.2:3b","messages":[{"role":"user","content":"Hello!"}],'
  .. '"max_tokens":16' .. stream .. '}'

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d non2xx=%d socket_errors=%d duration_us=%d p50_us=%d p99_us=%d\n",
    summary.requests, e.status, e.connect + e.read + e.write + e.timeout,
    summary.duration, latency:percentile(50), latency:percentile(99)))
end
EOF

body() {
  local stream=""
  [ "$1" = stream ] && stream=',"stream":true'
  printf '{"model":"llama3.2:3b","messages":[{"role":"user","content":"Hello!"}],"max_tokens":16%s}' "$stream"
}

# One call with curl first: a target that does not answer correctly stops
# the run with its answer, rather than showing up as a fast table row.
check_call() { # url mode key
  local auth=() out
  [ -n "$3" ] && auth=(-H "Authorization: Bearer $3")
  [ "$2" = cached ] && auth+=(-H "X-Cxmpute-Cache: ttl=600")
  out=$(curl -sS --max-time 10 -w '\n%{http_code}' "$1/v1/chat/completions" "${auth[@]}" \
    -H 'Content-Type: application/json' -d "$(body "$2")") || die "no answer from $1"
  local want='"content":"Hello from'
  [ "$2" = stream ] && want='data: [DONE]'
  [ "${out##*$'\n'}" = 200 ] && grep -qF "$want" <<<"$out" \
    || die "$1 answered a $2 call with: $out"
}

rows=()
failed=0
round=1
# nginx's requests a second per "round|mode": each row's reference.
declare -A nginx_rps

# run TARGET MODE URL KEY PIDS...: a warm-up, then the measured wrk run;
# the CPU of PIDS (the process in the middle) is read around the measured run.
run() {
  local target=$1 mode=$2 url=$3 key=$4
  shift 4
  local stream=0 cache=0
  [ "$mode" = stream ] && stream=1
  [ "$mode" = cached ] && cache=1
  check_call "$url" "$mode" "$key"
  log "$target, $mode: ${seconds}s, $connections connections"
  if [ "$warmup" -gt 0 ]; then
    BENCH_KEY=$key BENCH_STREAM=$stream BENCH_CACHE=$cache wrk -t"$threads" -c"$connections" -d"${warmup}s" \
      -s "$work/chat.lua" "$url/v1/chat/completions" >/dev/null
  fi
  local before=0 after=0 perf_pid=""
  if [ "${BENCH_PERF:-}" = "$target-$mode" ] && [ $# -gt 0 ]; then
    command -v perf >/dev/null 2>&1 || die "BENCH_PERF needs perf"
    perf record --call-graph "${BENCH_PERF_CALL_GRAPH:-fp}" -F 999 -o "target/perf-$target-$mode.data" -p "$(IFS=,; echo "$*")" \
      -- sleep "$seconds" >/dev/null 2>&1 &
    perf_pid=$!
  fi
  [ $# -gt 0 ] && before=$(cpu_ticks "$@")
  local out
  out=$(BENCH_KEY=$key BENCH_STREAM=$stream BENCH_CACHE=$cache wrk -t"$threads" -c"$connections" \
    -d"${seconds}s" -s "$work/chat.lua" "$url/v1/chat/completions")
  [ $# -gt 0 ] && after=$(cpu_ticks "$@")
  if [ -n "$perf_pid" ]; then
    wait "$perf_pid" || true
    log "profile of $target, $mode: target/perf-$target-$mode.data"
  fi
  local line
  line=$(grep '^BENCH ' <<<"$out") || die "wrk printed no summary: $out"
  local requests non2xx errors duration p50 p99
  requests=$(sed 's/.* requests=\([0-9]*\).*/\1/' <<<"$line")
  non2xx=$(sed 's/.* non2xx=\([0-9]*\).*/\1/' <<<"$line")
  errors=$(sed 's/.* socket_errors=\([0-9]*\).*/\1/' <<<"$line")
  duration=$(sed 's/.* duration_us=\([0-9]*\).*/\1/' <<<"$line")
  p50=$(sed 's/.* p50_us=\([0-9]*\).*/\1/' <<<"$line")
  p99=$(sed 's/.* p99_us=\([0-9]*\).*/\1/' <<<"$line")
  [ "$requests" -gt 0 ] || die "$target answered no request"
  [ "$non2xx" = 0 ] || failed=1
  local rps cpu="-"
  rps=$(awk -v r="$requests" -v d="$duration" 'BEGIN { printf "%.0f", r * 1e6 / d }')
  if [ $# -gt 0 ]; then
    cpu=$(awk -v t=$((after - before)) -v hz="$ticks_per_second" -v r="$requests" \
      'BEGIN { printf "%.0f", t * 1e6 / hz / r }')
  fi
  [ "$target" = nginx ] && nginx_rps["$round|$mode"]=$rps
  rows+=("$round|$target|$mode|$rps|$p50|$p99|$cpu|$non2xx|$errors")
}

# ---- 1. the node directly ----------------------------------------------------

"$stand_in_bin" >"$work/stand_in.out" 2>&1 &
pids+=($!)
node_url=""
for _ in $(seq 1 100); do
  node_url=$(sed -n 's/^listening on //p' "$work/stand_in.out")
  [ -n "$node_url" ] && break
  kill -0 "${pids[0]}" 2>/dev/null || die "the stand-in node stopped: $(cat "$work/stand_in.out")"
  sleep 0.1
done
[ -n "$node_url" ] || die "the stand-in node printed no address"
log "stand-in node at $node_url"

# ---- 2. nginx in front of it -------------------------------------------------

# Two servers: buffered (nginx's default) for plain answers, unbuffered for
# streams, as a proxy in front of a streaming API is set up.
nginx_plain=$(free_port)
nginx_stream=$(free_port)
mkdir -p "$work/nginx/logs"
# nginx started as root runs its workers as nobody: let them reach their
# temporary directories (the work directory's listing stays private).
chmod 711 "$work"
chmod 755 "$work/nginx"
cat >"$work/nginx/nginx.conf" <<EOF
daemon off;
worker_processes 2;
pid $work/nginx/nginx.pid;
error_log $work/nginx/logs/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $work/nginx/body;
  proxy_temp_path $work/nginx/proxy;
  fastcgi_temp_path $work/nginx/fastcgi;
  uwsgi_temp_path $work/nginx/uwsgi;
  scgi_temp_path $work/nginx/scgi;
  upstream node {
    server ${node_url#http://};
    keepalive 64;
  }
  server {
    listen 127.0.0.1:$nginx_plain;
    location / {
      proxy_pass http://node;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
  server {
    listen 127.0.0.1:$nginx_stream;
    location / {
      proxy_pass http://node;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }
  }
}
EOF
nginx -p "$work/nginx" -e "$work/nginx/logs/error.log" -c "$work/nginx/nginx.conf" \
  >"$work/nginx/logs/out.log" 2>&1 &
nginx_pid=$!
pids+=("$nginx_pid")
workers=""
for _ in $(seq 1 100); do
  workers=$(pgrep -P "$nginx_pid" | paste -sd ' ' - || true)
  [ "$(wc -w <<<"$workers")" -ge 2 ] \
    && curl -s -o /dev/null "http://127.0.0.1:$nginx_plain/" && break
  kill -0 "$nginx_pid" 2>/dev/null || die "nginx stopped: $(cat "$work/nginx/logs/"*)"
  sleep 0.1
done
log "nginx (workers $workers) on 127.0.0.1:$nginx_plain (buffered) and :$nginx_stream (unbuffered)"

# ---- 3 and 4. the host, on memory and on SQLite --------------------------------

admin_key="cx-bench-admin-$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
# bench_host NAME BINARY STORE-FLAGS...
bench_host() {
  local name=$1 bin=$2
  shift 2
  local port url pid
  port=$(free_port)
  url="http://127.0.0.1:$port"
  CXMPUTE_ADMIN_KEY=$admin_key RUST_LOG=$host_log "$bin" "$@" --allow-private-nodes \
    --listen "127.0.0.1:$port" >"$work/$name.log" 2>&1 &
  pid=$!
  pids+=("$pid")
  for _ in $(seq 1 150); do
    curl -sf -o /dev/null "$url/healthz" && break
    kill -0 "$pid" 2>/dev/null || die "the host stopped: $(tail -n 20 "$work/$name.log")"
    sleep 0.1
  done
  curl -sf -o /dev/null "$url/healthz" || die "the host did not start: $(tail -n 20 "$work/$name.log")"
  log "$name at $url"

  local admin=(-H "Authorization: Bearer $admin_key" -H 'Content-Type: application/json')
  local user user_id user_key provider provider_key provision provision_id
  # A million credits: far more than any run spends.
  user=$(curl -sf "$url/v1/admin/users" "${admin[@]}" \
    -d '{"email":"bench-user@example.com","credits":1000000000000}') || die "cannot create the user"
  user_id=$(field user_id <<<"$user")
  user_key=$(field api_key <<<"$user")
  provider=$(curl -sf "$url/v1/admin/providers" "${admin[@]}" \
    -d '{"email":"bench-provider@example.com"}') || die "cannot create the provider"
  provider_key=$(field provider_key <<<"$provider")
  provision=$(curl -sf "$url/v1/provider/provisions" -H "Authorization: Bearer $provider_key" \
    -H 'Content-Type: application/json' \
    -d "{\"endpoint\":\"$node_url\",\"services\":[{\"service\":\"chat\",\"model\":\"llama3.2:3b\"}]}") \
    || die "cannot register the node"
  provision_id=$(field provision_id <<<"$provision")
  [ -n "$user_key" ] && [ -n "$provision_id" ] || die "unexpected answers: $user $provision"

  local balance_before balance_after mode
  balance_before=$(curl -sf "$url/v1/admin/users/$user_id" "${admin[@]}" | field credits)
  for mode in $modes; do
    # Keeps the node in routing for the run (see BENCH_SECONDS).
    curl -sf -X POST -o /dev/null "$url/v1/provider/provisions/$provision_id/heartbeat" \
      -H "Authorization: Bearer $provider_key" || die "the node's heartbeat was refused"
    run "$name" "$mode" "$url" "$user_key" "$pid"
  done
  balance_after=$(curl -sf "$url/v1/admin/users/$user_id" "${admin[@]}" | field credits)
  [ "$balance_after" -lt "$balance_before" ] \
    || die "$name: the user's balance did not move ($balance_before -> $balance_after)"
  log "$name: the user's balance went from $balance_before to $balance_after micro-credits"
  stop "$pid"
  unset 'pids[${#pids[@]}-1]'
}

# bench_store NAME BINARY: the host named by BENCH_HOSTS, run from BINARY,
# on a database of its own (a host may be named twice, to be loaded twice).
stores=0
bench_store() {
  stores=$((stores + 1))
  local db="$work/$1-$stores.db"
  case $1 in
    *-memory) bench_host "$1" "$2" --store memory ;;
    *-sqlite) bench_host "$1" "$2" --store sqlite --db "$db" ;;
    # The same with commits acknowledged once in the OS's cache (no fsync
    # per batch): what the fsync costs, and the operator's other choice.
    *-proc) bench_host "$1" "$2" --store sqlite --db "$db" --sqlite-durability process ;;
  esac
}

for ((round = 1; round <= rounds; round++)); do
  [ "$rounds" -gt 1 ] && log "round $round of $rounds"
  run node plain "$node_url" ""
  run node stream "$node_url" ""
  # shellcheck disable=SC2086 # the worker ids, one word each
  run nginx plain "http://127.0.0.1:$nginx_plain" "" $workers
  # shellcheck disable=SC2086
  run nginx stream "http://127.0.0.1:$nginx_stream" "" $workers
  for h in $hosts; do
    if [ -n "$baseline" ]; then
      bench_store "base-${h#*-}" "$work/host-baseline"
    fi
    bench_store "$h" "$host_bin"
  done
done

# ---- the table ---------------------------------------------------------------

printf '\n%d s per run (after %d s of warm-up), %d connections, %d wrk thread(s), %d cores\n' \
  "$seconds" "$warmup" "$connections" "$threads" "$(nproc)"
printf '%-5s %-12s %-7s %9s %9s %9s %9s %13s %8s %8s\n' \
  round target mode "req/s" "x nginx" "p50 ms" "p99 ms" "cpu us/call" non-2xx "sock err"
ratios=()
for r in "${rows[@]}"; do
  IFS='|' read -r rd target mode rps p50 p99 cpu non2xx errors <<<"$r"
  # Cached calls have no nginx row of their own: they stand against plain ones.
  ref=${nginx_rps["$rd|stream"]}
  [ "$mode" = stream ] || ref=${nginx_rps["$rd|plain"]}
  ratio=$(awk -v r="$rps" -v n="$ref" 'BEGIN { printf "%.2f", r / n }')
  ratios+=("$target|$mode|$ratio|$cpu")
  awk -v rd="$rd" -v t="$target" -v m="$mode" -v r="$rps" -v x="$ratio" -v p50="$p50" -v p99="$p99" \
    -v c="$cpu" -v f="$non2xx" -v e="$errors" 'BEGIN {
      printf "%-5s %-12s %-7s %9d %9s %9.2f %9.2f %13s %8d %8d\n", rd, t, m, r, x, p50 / 1000, p99 / 1000, c, f, e
    }'
done
printf '(cpu us/call: the CPU time of the process in the middle, nginx workers or the host, per call)\n'
if [ "$rounds" -gt 1 ]; then
  # Each target and mode, in the order first run: the median over its rows
  # of the ratio and of the CPU a call (the lower middle of an even count).
  printf '\nmedians over %d rounds\n%-12s %-7s %9s %13s %s\n' "$rounds" target mode "x nginx" "cpu us/call" "ratios"
  printf '%s\n' "${ratios[@]}" | awk -F'|' '
    !(($1 "|" $2) in n) { order[++k] = $1 "|" $2 }
    { key = $1 "|" $2; i = ++n[key]; x[key, i] = $3; c[key, i] = $4 }
    function median(a, key, cnt,   v, i, j, t) {
      for (i = 1; i <= cnt; i++) v[i] = a[key, i]
      for (i = 2; i <= cnt; i++) for (j = i; j > 1 && v[j - 1] + 0 > v[j] + 0; j--) { t = v[j]; v[j] = v[j - 1]; v[j - 1] = t }
      return v[int((cnt + 1) / 2)]
    }
    END {
      for (o = 1; o <= k; o++) {
        key = order[o]; split(key, p, "|"); all = ""
        for (i = 1; i <= n[key]; i++) all = all (i > 1 ? " " : "") x[key, i]
        printf "%-12s %-7s %9s %13s %s\n", p[1], p[2], median(x, key, n[key]), median(c, key, n[key]), all
      }
    }'
fi
if [ "$failed" != 0 ]; then
  echo "bench: some answers were not 2xx (see non-2xx)" >&2
  exit 1
fi
