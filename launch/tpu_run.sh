#!/usr/bin/env bash
# Runs a towerplus_jax stage on a Cloud TPU VM, pod slice or multislice: pre-flight memory check, (create,) copy,
# install, run on every worker.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_run.sh --name=TPU --project=PROJECT --zone=ZONE --config=CONFIG --workdir=DIR
                         [options] [-- MAIN_FLAGS...]

First compiles the run for the TPU type on this machine and stops if it does not fit in HBM (the pre-flight:
  $PREFLIGHT_PYTHON -m towerplus_jax.aot --config=CONFIG --topology=TYPE [--num_slices=N] [--hbm_gib=G]
  --config.* MAIN_FLAGS..., run in REPO_DIR; it needs libtpu on this machine).
Then copies the repository to every worker of a Cloud TPU VM / pod slice (every slice with --num-slices),
installs it in a virtual environment there, and runs on all workers at once (with jax.distributed initialised):
  TOWERPLUS_DISTRIBUTED=1 python -m towerplus_jax.main --config=CONFIG --workdir=DIR MAIN_FLAGS...
Output of all workers is streamed here and appended to REMOTE_DIR/logs/<host>-<time>.log on each worker.
The exit status is the run's (the first non-zero one of the slices); 1 when the pre-flight says the run
does not fit, 2 for bad arguments or a pre-flight that could not run. Rerunning the same command resumes from
the latest checkpoint in DIR.

Required:
  --name=TPU                 TPU VM (node) name; also the queued-resource id with --queued (with
                             --num-slices=N the nodes are TPU-0 ... TPU-(N-1))
  --project=PROJECT          Google Cloud project (passed to every gcloud call)
  --zone=ZONE                zone, e.g. us-central2-b (passed to every gcloud call)
  --config=CONFIG            stage config, e.g. configs/sft.py:gemma2_2b (alias: --stage)
  --workdir=DIR              run folder; gs://BUCKET/... for multi-host slices (a local path is
                             relative to REMOTE_DIR on each worker)
TPU:
  --accelerator-type=TYPE    e.g. v4-32, v5litepod-16, v5p-8, v6e-16 (one slice's type; needed to create
                             and, unless read from the existing node, for the pre-flight)
  --runtime-version=VERSION  default per family: v6e v2-alpha-tpuv6e, v5p v2-alpha-tpuv5,
                             v5e/v5litepod v2-alpha-tpuv5-lite, v2/v3/v4 tpu-ubuntu2204-base
  --create                   create the TPU first (an existing READY one is reused, a preempted one
                             recreated)
  --spot | --preemptible     create a Spot / preemptible TPU
  --queued                   create through a queued resource (gcloud compute tpus queued-resources)
  --num-slices=N             multislice: N slices of TYPE as one queued resource (needs --queued to
                             create; the run gets --config.mesh.slices=N); default 1
  --delete-after             delete the TPU when the script ends, whatever the outcome
  --retries=N                after a failed run: wait, check the TPU state, recreate it if it was
                             preempted, and rerun (resuming from the checkpoint); default 0
  --retry-wait=SECONDS       wait before a retry and between state polls; default 60
  --wait-timeout=SECONDS     give up waiting for the TPU to be READY after this long; default 7200
Pre-flight:
  --hbm-gib=G                HBM budget per chip in GiB for the pre-flight (default: the chip's)
  --skip-preflight           launch without the pre-flight (alias: --skip_preflight)
  PREFLIGHT_PYTHON           environment variable: the Python that runs it (split on spaces, e.g.
                             "uv run python"); default python3
Software:
  --repo-dir=PATH            what to copy; default the repository holding this script (git-tracked and
                             untracked non-ignored files; without git: all but .git, workdirs, caches)
  --remote-dir=PATH          where it goes on each worker, relative to the home folder; default towerplus_jax
  --pip-extras=EXTRAS        extras installed with the package; default all
  --python-version=X.Y       Python of the virtual environment (made with uv); default 3.12 (jax 0.12,
                             whose TPU compiler needs less memory than 3.11's jax 0.10)
  --env=KEY=VALUE            exported on every worker before the run (repeatable)
  -h, --help                 this text

Example:
  launch/tpu_run.sh --name=tower --project=P --zone=us-central2-b --accelerator-type=v4-32 --create \
    --spot --retries=5 --config=configs/sft.py:gemma2_2b --workdir=gs://BUCKET/sft -- --config.train.steps=100
EOF
}

die() { echo "tpu_run.sh: error: $*" >&2; exit 2; }
log() { echo "[tpu_run $(date -u +%H:%M:%S)] $*" >&2; }
# Quotes one word for a POSIX shell.
shquote() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }

NAME="" PROJECT="" ZONE="" CONFIG="" WORKDIR="" ACCEL="" RUNTIME=""
CREATE=0 SPOT=0 PREEMPTIBLE=0 QUEUED=0 DELETE_AFTER=0 SLICES=1
RETRIES=0 RETRY_WAIT=60 WAIT_TIMEOUT=7200
SKIP_PREFLIGHT=0 HBM_GIB="" HBM_GIB_GIVEN=0 PREFLIGHT_PYTHON=${PREFLIGHT_PYTHON:-python3}
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REMOTE_DIR=towerplus_jax PIP_EXTRAS=all PYTHON_VERSION=3.12
ENVS=() MAIN_ARGS=()

while (($#)); do
  arg=$1
  shift
  case $arg in
    --) MAIN_ARGS=("$@"); break ;;
    -h | --help) usage; exit 0 ;;
    --create) CREATE=1; continue ;;
    --spot) SPOT=1; continue ;;
    --preemptible) PREEMPTIBLE=1; continue ;;
    --queued) QUEUED=1; continue ;;
    --delete-after) DELETE_AFTER=1; continue ;;
    --skip-preflight | --skip_preflight) SKIP_PREFLIGHT=1; continue ;;
    --*=*) key=${arg%%=*}; val=${arg#*=} ;;
    --*) key=$arg; (($#)) || die "$arg needs a value"; val=$1; shift ;;
    *) die "unexpected argument '$arg' (flags for towerplus_jax.main go after --)" ;;
  esac
  case $key in
    --name) NAME=$val ;;
    --project) PROJECT=$val ;;
    --zone) ZONE=$val ;;
    --config | --stage) CONFIG=$val ;;
    --workdir) WORKDIR=$val ;;
    --accelerator-type) ACCEL=$val ;;
    --runtime-version) RUNTIME=$val ;;
    --num-slices) SLICES=$val ;;
    --hbm-gib) HBM_GIB=$val HBM_GIB_GIVEN=1 ;;
    --retries) RETRIES=$val ;;
    --retry-wait) RETRY_WAIT=$val ;;
    --wait-timeout) WAIT_TIMEOUT=$val ;;
    --repo-dir) REPO_DIR=$val ;;
    --remote-dir) REMOTE_DIR=$val ;;
    --pip-extras) PIP_EXTRAS=$val ;;
    --python-version) PYTHON_VERSION=$val ;;
    --env) ENVS+=("$val") ;;
    *) die "unknown flag '$key' (see --help)" ;;
  esac
done

for required in NAME PROJECT ZONE CONFIG WORKDIR; do
  [[ -n ${!required} ]] || die "--$(echo "$required" | tr '[:upper:]' '[:lower:]') is required (see --help)"
done
for number in RETRIES RETRY_WAIT WAIT_TIMEOUT; do
  [[ ${!number} =~ ^[0-9]+$ ]] || die "--$(echo "$number" | tr '[:upper:]_' '[:lower:]-')=${!number} is not a whole number"
done
[[ $SLICES =~ ^[1-9][0-9]*$ ]] || die "--num-slices=$SLICES is not a whole number >= 1"
if ((HBM_GIB_GIVEN)) && ! [[ $HBM_GIB =~ ^([0-9]+([.][0-9]*)?|[.][0-9]+)$ && $HBM_GIB =~ [1-9] ]]; then
  die "--hbm-gib=$HBM_GIB is not a positive number (GiB per chip)"
fi
for kv in ${ENVS[@]+"${ENVS[@]}"}; do
  [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env=$kv is not KEY=VALUE"
done
((SLICES == 1 || QUEUED || !CREATE)) ||
  die "--num-slices=$SLICES needs --queued to create (the slices are made as one queued resource)"
((SPOT + PREEMPTIBLE < 2)) || die "--spot and --preemptible exclude each other"
((!QUEUED || !PREEMPTIBLE)) || die "queued resources take --spot, not --preemptible"
[[ -d $REPO_DIR ]] || die "--repo-dir=$REPO_DIR is not a folder"
CONFIG_FILE=${CONFIG%%:*}
[[ -f $REPO_DIR/$CONFIG_FILE ]] || die "--config=$CONFIG: no file $CONFIG_FILE in $REPO_DIR (give it relative to the repo)"
[[ $WORKDIR == gs://* ]] || log "warning: --workdir=$WORKDIR is local to each worker; multi-host slices need gs://"

default_runtime() {
  case $1 in
    v6e*) echo v2-alpha-tpuv6e ;;
    v5p*) echo v2-alpha-tpuv5 ;;
    v5litepod* | v5e*) echo v2-alpha-tpuv5-lite ;;
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    *) die "no default runtime version for accelerator type '$1': pass --runtime-version" ;;
  esac
}
if [[ -n $ACCEL && -z $RUNTIME ]]; then RUNTIME=$(default_runtime "$ACCEL"); fi

# The TPU VMs: NAME, or NAME-0 ... NAME-(N-1) for a multislice (the queued resource's --node-prefix naming).
NODES=("$NAME")
if ((SLICES > 1)); then
  NODES=()
  for ((i = 0; i < SLICES; i++)); do NODES+=("$NAME-$i"); done
fi
# Multislice nodes only exist through a queued resource: deleting and waiting act on it even without --queued.
on_queued_resource() { ((QUEUED || SLICES > 1)); }

# Every gcloud call: explicit project and zone, no prompts.
gc() { gcloud "$@" --project="$PROJECT" --zone="$ZONE" --quiet; }
# Recreated workers come back with new host keys under the same name, hence no strict host key checking.
ssh_node() { gc compute tpus tpu-vm ssh "$1" --worker=all --strict-host-key-checking=no --command="$2"; }
# Runs a command on every worker of every node, one node after the other; the first non-zero exit status.
ssh_all() {
  local node rc=0 status
  for node in "${NODES[@]}"; do
    status=0
    ssh_node "$node" "$1" || status=$?
    ((rc != 0)) || rc=$status
  done
  return "$rc"
}
# Runs a command on every worker of every node at once (a multislice starts together); the first non-zero exit
# status in node order.
ssh_all_at_once() {
  local pids=() pid node rc=0 status
  if ((SLICES == 1)); then ssh_node "$NAME" "$1"; return; fi
  for node in "${NODES[@]}"; do
    ssh_node "$node" "$1" &
    pids+=("$!")
  done
  for pid in "${pids[@]}"; do
    status=0
    wait "$pid" || status=$?
    ((rc != 0)) || rc=$status
  done
  return "$rc"
}

SCRATCH=$(mktemp -d)
PKG=$SCRATCH/towerplus_jax.tar.gz
NODE_YAML=$SCRATCH/node.yaml
REMOTE_PKG=towerplus_jax.tar.gz

# State of one node (READY, CREATING, PREEMPTED, ...) or NOT_FOUND; its description goes to file $2.
node_state() {
  local state
  gc compute tpus tpu-vm describe "$1" >"$2" 2>/dev/null || { : >"$2"; echo NOT_FOUND; return; }
  state=$(awk '/^state:/ {print $2}' "$2")
  echo "${state:-UNKNOWN}"
}

# READY when every node is, else the state of the first node that is not; keeps the first description found in
# NODE_YAML.
tpu_state() {
  local node state worst=READY
  : >"$NODE_YAML"
  for node in "${NODES[@]}"; do
    state=$(node_state "$node" "$SCRATCH/node-part.yaml")
    [[ -s $NODE_YAML ]] || cp "$SCRATCH/node-part.yaml" "$NODE_YAML"
    [[ $worst != READY ]] || worst=$state
  done
  echo "$worst"
}

queued_state() {
  gc compute tpus queued-resources describe "$NAME" --format='value(state.state)' 2>/dev/null || echo NOT_FOUND
}

# Fills in the accelerator type and runtime from the last description when the flags left them out.
fill_spec_from_node() {
  [[ -n $ACCEL ]] || ACCEL=$(awk '/^acceleratorType:/ {print $2}' "$NODE_YAML")
  [[ -n $RUNTIME ]] || RUNTIME=$(awk '/^runtimeVersion:/ {print $2}' "$NODE_YAML")
  [[ -n $ACCEL ]] || die "cannot (re)create $NAME: pass --accelerator-type"
  [[ -n $RUNTIME ]] || RUNTIME=$(default_runtime "$ACCEL")
}

delete_tpu() {
  log "deleting $NAME"
  if on_queued_resource; then
    gc compute tpus queued-resources delete "$NAME" --force
  else
    gc compute tpus tpu-vm delete "$NAME"
  fi
}

wait_ready() {
  local deadline=$((SECONDS + WAIT_TIMEOUT)) state
  while state=$(tpu_state) && [[ $state != READY ]]; do
    if on_queued_resource && [[ $state == NOT_FOUND ]]; then
      state="queued resource $(queued_state)"
      [[ $state != *FAILED* && $state != *SUSPENDED* ]] || die "$NAME: $state"
    fi
    ((SECONDS < deadline)) || die "$NAME is not READY after ${WAIT_TIMEOUT}s ($state)"
    log "waiting for $NAME: $state"
    sleep "$RETRY_WAIT"
  done
}

create_tpu() {
  local deadline=$((SECONDS + WAIT_TIMEOUT)) mode=()
  ((SPOT)) && mode=(--spot)
  ((PREEMPTIBLE)) && mode=(--preemptible)
  ((SLICES == 1 || QUEUED)) || die "cannot recreate the $SLICES slices of $NAME without --queued"
  fill_spec_from_node
  log "creating $NAME ($( ((SLICES == 1)) || echo "$SLICES x ")$ACCEL, $RUNTIME${mode[*]+ ${mode[*]}})"
  if ((QUEUED)); then
    if [[ $(queued_state) == NOT_FOUND ]]; then
      if ((SLICES > 1)); then
        gc compute tpus queued-resources create "$NAME" --node-count="$SLICES" --node-prefix="$NAME" \
          --accelerator-type="$ACCEL" --runtime-version="$RUNTIME" ${mode[@]+"${mode[@]}"}
      else
        gc compute tpus queued-resources create "$NAME" --node-id="$NAME" --accelerator-type="$ACCEL" \
          --runtime-version="$RUNTIME" ${mode[@]+"${mode[@]}"}
      fi
    fi
  else
    until gc compute tpus tpu-vm create "$NAME" --accelerator-type="$ACCEL" --version="$RUNTIME" \
      ${mode[@]+"${mode[@]}"}; do
      ((SECONDS < deadline)) || die "could not create $NAME within ${WAIT_TIMEOUT}s"
      log "create failed; retrying in ${RETRY_WAIT}s"
      sleep "$RETRY_WAIT"
      [[ $(tpu_state) == NOT_FOUND ]] || delete_tpu || true
    done
  fi
  wait_ready
}

# Makes the TPU READY from state $1: reuses it, waits for it, creates it, or recreates a preempted/stopped one.
ensure_tpu() {
  log "$NAME: $1"
  case $1 in
    READY) ;;
    NOT_FOUND) create_tpu ;;
    CREATING | STARTING | RESTARTING | REPAIRING) wait_ready ;;
    *) fill_spec_from_node; delete_tpu; create_tpu ;;
  esac
}

package_repo() {
  if git -C "$REPO_DIR" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$REPO_DIR" && git ls-files -z --cached --others --exclude-standard |
      while IFS= read -r -d '' f; do [[ -e $f ]] && printf '%s\0' "$f"; done |
      tar -czf "$PKG" --null -T -)
  else
    tar -czf "$PKG" -C "$REPO_DIR" --exclude=.git --exclude=./workdirs --exclude=__pycache__ \
      --exclude='*.egg-info' --exclude=.pytest_cache --exclude=./.venv --exclude=./build --exclude=./dist .
  fi
  log "packaged $REPO_DIR ($(du -h "$PKG" | cut -f1))"
}

install_command() {
  local dir
  dir=$(shquote "$REMOTE_DIR")
  printf '%s' "set -e; mkdir -p $dir; tar -xzf $REMOTE_PKG -C $dir; cd $dir;" \
    " python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --user -q uv;" \
    " python3 -m uv venv -q --allow-existing --python $(shquote "$PYTHON_VERSION") .venv;" \
    " python3 -m uv pip install -q --python .venv/bin/python -e $(shquote ".[$PIP_EXTRAS,tpu]")"
}

run_command() {
  local inner kv words=""
  for kv in ${ENVS[@]+"${ENVS[@]}"}; do words+=" export ${kv%%=*}=$(shquote "${kv#*=}");"; done
  words+=" export TOWERPLUS_DISTRIBUTED=1;"
  inner="set -o pipefail; cd $(shquote "$REMOTE_DIR") && mkdir -p logs;$words"
  inner+=" .venv/bin/python -m towerplus_jax.main $(shquote "--config=$CONFIG") $(shquote "--workdir=$WORKDIR")"
  ((SLICES == 1)) || inner+=" $(shquote "--config.mesh.slices=$SLICES")"
  for kv in ${MAIN_ARGS[@]+"${MAIN_ARGS[@]}"}; do inner+=" $(shquote "$kv")"; done
  inner+=" 2>&1 | tee -a logs/\$(hostname)-$STAMP.log"
  printf 'bash -c %s' "$(shquote "$inner")"
}

setup_workers() {
  local node
  for node in "${NODES[@]}"; do
    log "copying to all workers of $node"
    gc compute tpus tpu-vm scp "$PKG" "$node:$REMOTE_PKG" --worker=all --strict-host-key-checking=no
  done
  log "installing on all workers"
  ssh_all "$(install_command)"
}

# Compiles the run for the TPU type here and stops unless it fits (towerplus_jax.aot: 0 fits, 1 does not fit,
# 2 bad input / no libtpu). Nothing has been created or touched yet, so a failure leaves the TPU as it was.
preflight() {
  local python=() args=() kv node_accel rc=0
  if ((SKIP_PREFLIGHT)); then
    log "pre-flight skipped (--skip-preflight)"
    return
  fi
  node_accel=$(awk '/^acceleratorType:/ {print $2}' "$NODE_YAML")
  if [[ -z $ACCEL ]]; then
    ACCEL=$node_accel
  elif [[ -n $node_accel && $node_accel != "$ACCEL" ]]; then
    log "warning: $NAME is a $node_accel, not --accelerator-type=$ACCEL; the pre-flight checks $ACCEL"
  fi
  if [[ -z $ACCEL ]]; then
    DELETE_AFTER=0
    die "pre-flight: the accelerator type of $NAME is unknown (no such TPU to read it from): pass" \
      "--accelerator-type=TYPE, or --skip-preflight to launch without the check"
  fi
  read -ra python <<<"$PREFLIGHT_PYTHON"
  ((${#python[@]})) || python=(python3)
  args=(-m towerplus_jax.aot "--config=$CONFIG" "--topology=$ACCEL")
  ((SLICES == 1)) || args+=("--num_slices=$SLICES")
  [[ -z $HBM_GIB ]] || args+=("--hbm_gib=$HBM_GIB")
  for kv in ${MAIN_ARGS[@]+"${MAIN_ARGS[@]}"}; do
    [[ $kv != --config.* ]] || args+=("$kv")
  done
  log "pre-flight (in $REPO_DIR): ${python[*]} ${args[*]}"
  (cd "$REPO_DIR" && exec "${python[@]}" "${args[@]}" </dev/null) || rc=$?
  case $rc in
    0) log "pre-flight: $CONFIG fits $ACCEL" ;;
    1)
      DELETE_AFTER=0
      echo "tpu_run.sh: error: pre-flight: $CONFIG does not fit $ACCEL (see the report above;" \
        "--skip-preflight to launch anyway)" >&2
      exit 1 ;;
    *)
      DELETE_AFTER=0
      die "pre-flight could not run (${python[*]} -m towerplus_jax.aot exited with status $rc, see above);" \
        "--skip-preflight bypasses it" ;;
  esac
}

# shellcheck disable=SC2329  # run by the EXIT trap
cleanup() {
  local rc=$?
  rm -rf "$SCRATCH"
  if ((DELETE_AFTER)); then delete_tpu || log "could not delete $NAME"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

STAMP=$(date -u +%Y%m%d-%H%M%S)
state=$(tpu_state)
if ((!CREATE)); then
  case $state in
    READY | CREATING | STARTING | RESTARTING | REPAIRING) ;;
    *) die "$NAME is $state (pass --create to create or recreate it)" ;;
  esac
fi
preflight
package_repo
if ((CREATE)); then
  ensure_tpu "$state"
elif [[ $state != READY ]]; then
  wait_ready
fi
setup_workers

attempt=0
while :; do
  log "run (attempt $((attempt + 1))/$((RETRIES + 1))): $(run_command)"
  rc=0
  ssh_all_at_once "$(run_command)" || rc=$?
  ((rc != 0)) || break
  if ((attempt >= RETRIES)); then
    log "run failed with exit status $rc"
    break
  fi
  attempt=$((attempt + 1))
  log "run failed with exit status $rc; checking $NAME in ${RETRY_WAIT}s"
  sleep "$RETRY_WAIT"
  state=$(tpu_state)
  if [[ $state == READY ]]; then
    log "$NAME is READY: stopping leftover processes, then resuming"
    ssh_all "pkill -f '[t]owerplus_jax[.]main' || true" || log "could not reach every worker"
  else
    ensure_tpu "$state"
    setup_workers
  fi
done
exit "$rc"
