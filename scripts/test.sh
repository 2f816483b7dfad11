#!/usr/bin/env bash
# Runs every test of the workspace on a fresh machine: installs and starts
# what the tests need (a DynamoDB API server, an SMTP sink, espeak-ng, a
# headless Chromium with its WebDriver), runs fmt, clippy and the tests, and
# stops the servers afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

log() { printf '==> %s\n' "$*"; }

# System packages: espeak-ng for the text-to-speech backend.
if ! command -v espeak-ng >/dev/null 2>&1; then
  log "installing espeak-ng"
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq espeak-ng >/dev/null
fi

# Chromium and its WebDriver for the dashboard's browser test.
if ! command -v chromedriver >/dev/null 2>&1 || ! command -v chromium >/dev/null 2>&1; then
  log "installing chromium and chromium-driver"
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium chromium-driver >/dev/null
fi
export CXMPUTE_TEST_CHROMEDRIVER="$(command -v chromedriver)"

# Python tools in a virtualenv of the project: moto's DynamoDB server,
# aiosmtpd, and an OpenAPI validator for the API document.
venv="$root/.venv"
if [ ! -x "$venv/bin/moto_server" ] || [ ! -x "$venv/bin/aiosmtpd" ] \
  || [ ! -x "$venv/bin/openapi-spec-validator" ]; then
  log "installing moto[server], aiosmtpd and openapi-spec-validator into .venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check 'moto[server]>=5' 'aiosmtpd>=1.4' \
    'openapi-spec-validator>=0.7'
fi
export CXMPUTE_TEST_OPENAPI_VALIDATOR="$venv/bin/openapi-spec-validator"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
  for _ in $(seq 1 100); do
    if python3 -c "import socket,sys; socket.create_connection(('127.0.0.1',$1),0.2)" 2>/dev/null; then return 0; fi
    sleep 0.2
  done
  echo "service on port $1 did not start" >&2; return 1
}

moto_port=$(free_port)
log "starting moto_server on 127.0.0.1:$moto_port"
"$venv/bin/moto_server" -H 127.0.0.1 -p "$moto_port" >"$work/moto.log" 2>&1 &
pids+=($!)

smtp_port=$(free_port)
# A complete Maildir: the server only creates the subfolders of a folder it makes itself.
mkdir -p "$work/maildir/tmp" "$work/maildir/new" "$work/maildir/cur"
log "starting aiosmtpd on 127.0.0.1:$smtp_port"
"$venv/bin/aiosmtpd" -n -l "127.0.0.1:$smtp_port" -c aiosmtpd.handlers.Mailbox "$work/maildir" \
  >"$work/smtp.log" 2>&1 &
pids+=($!)

wait_port "$moto_port"
wait_port "$smtp_port"

export CXMPUTE_TEST_DYNAMO_ENDPOINT="http://127.0.0.1:$moto_port"
export CXMPUTE_TEST_SMTP="127.0.0.1:$smtp_port"
export CXMPUTE_TEST_MAILDIR="$work/maildir"
# Tests that need these services fail instead of skipping when this is set.
export CXMPUTE_REQUIRE_SERVICES=1
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy"
cargo clippy --workspace --all-targets --all-features -- -D warnings
log "cargo doc (broken doc links fail the run)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --all-features --no-deps
log "cargo test"
cargo test --workspace --all-features --all-targets
log "doc tests"
cargo test --workspace --all-features --doc
