#!/usr/bin/env bash
# Runs a towerplus_jax stage on this machine (CPU or GPU); rerunning the same command resumes from the checkpoint.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/local_run.sh --config=CONFIG --workdir=DIR [--processes=N] [--cpu_devices=K] [--env=KEY=VALUE ...]
                          [-- MAIN_FLAGS...]

Runs, from the repository root,
  python -m towerplus_jax.main --config=CONFIG --workdir=DIR MAIN_FLAGS...
With an NVIDIA GPU (nvidia-smi lists one) it first adds XLA GPU flags to XLA_FLAGS
(--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_highest_priority_async_stream=true;
a flag already in XLA_FLAGS is left as set) and XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 unless set.
Rerunning the same command resumes from the latest checkpoint in DIR.

With --processes=N > 1 it starts N processes joined by jax.distributed exactly as the hosts of a
pod slice are (JAX_COORDINATOR_ADDRESS=127.0.0.1:<free port>, JAX_NUM_PROCESSES, JAX_PROCESS_ID),
the GPUs split evenly between them (CUDA_VISIBLE_DEVICES), or on CPU K devices each; every output
line is prefixed [pI], SIGTERM/SIGINT is passed to all, and the exit code is the worst of them.

  --config=CONFIG      stage config, e.g. configs/sft.py:tiny (alias: --stage); relative to the
                       current folder or to the repository
  --workdir=DIR        run folder (local path or gs://...)
  --processes=N        local JAX processes (default 1)
  --cpu_devices=K      without a GPU: CPU devices per process (sets
                       --xla_force_host_platform_device_count=K; default: left as set)
  --env=KEY=VALUE      exported before the run (repeatable)
  -h, --help           this text
Environment: PYTHON (default: python, else python3).

Example:
  launch/local_run.sh --config=configs/sft.py:tiny --workdir=/tmp/sft -- --config.train.steps=20
EOF
}

die() { echo "local_run.sh: error: $*" >&2; exit 2; }

GPU_XLA_FLAGS=(--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_highest_priority_async_stream=true)
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONFIG="" WORKDIR="" MAIN_ARGS=() PROCESSES=1 CPU_DEVICES=""

while (($#)); do
  arg=$1
  shift
  case $arg in
    --) MAIN_ARGS=("$@"); break ;;
    -h | --help) usage; exit 0 ;;
    --*=*) key=${arg%%=*}; val=${arg#*=} ;;
    --*) key=$arg; (($#)) || die "$arg needs a value"; val=$1; shift ;;
    *) die "unexpected argument '$arg' (flags for towerplus_jax.main go after --)" ;;
  esac
  case $key in
    --config | --stage) CONFIG=$val ;;
    --workdir) WORKDIR=$val ;;
    --processes) [[ $val =~ ^[1-9][0-9]*$ ]] || die "--processes=$val is not a positive integer"; PROCESSES=$val ;;
    --cpu_devices) [[ $val =~ ^[1-9][0-9]*$ ]] || die "--cpu_devices=$val is not a positive integer"; CPU_DEVICES=$val ;;
    --env)
      [[ $val =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env=$val is not KEY=VALUE"
      export "${val?}" ;;
    *) die "unknown flag '$key' (see --help)" ;;
  esac
done
[[ -n $CONFIG ]] || die "--config is required (see --help)"
[[ -n $WORKDIR ]] || die "--workdir is required (see --help)"

# Paths given relative to the caller's folder keep working after the cd to the repository.
CONFIG_FILE=${CONFIG%%:*}
if [[ -f $CONFIG_FILE && $CONFIG_FILE != /* ]]; then
  CONFIG="$(cd "$(dirname "$CONFIG_FILE")" && pwd)/$(basename "$CONFIG_FILE")${CONFIG#"$CONFIG_FILE"}"
elif [[ ! -f $CONFIG_FILE && ! -f $REPO_DIR/$CONFIG_FILE ]]; then
  die "--config=$CONFIG: no file $CONFIG_FILE here or in $REPO_DIR"
fi
if [[ $WORKDIR != *://* && $WORKDIR != /* ]]; then WORKDIR="$PWD/$WORKDIR"; fi

NUM_GPUS=0
if command -v nvidia-smi >/dev/null 2>&1; then NUM_GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true); fi
if ((NUM_GPUS > 0)); then
  for flag in "${GPU_XLA_FLAGS[@]}"; do
    [[ " ${XLA_FLAGS:-} " == *" ${flag%%=*}="* ]] || XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }$flag"
  done
  export XLA_FLAGS
  export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
  echo "local_run.sh: GPU found; XLA_FLAGS=$XLA_FLAGS" >&2
fi

if [[ -z ${PYTHON:-} ]]; then
  if command -v python >/dev/null 2>&1; then PYTHON=python; else PYTHON=python3; fi
fi
if [[ -n $CPU_DEVICES ]] && ((NUM_GPUS == 0)); then
  export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$CPU_DEVICES"
fi
cd "$REPO_DIR"
RUN=("$PYTHON" -m towerplus_jax.main "--config=$CONFIG" "--workdir=$WORKDIR" ${MAIN_ARGS[@]+"${MAIN_ARGS[@]}"})
((PROCESSES > 1)) || exec "${RUN[@]}"

if ((NUM_GPUS > 0)); then
  ((NUM_GPUS % PROCESSES == 0)) || die "--processes=$PROCESSES does not divide the $NUM_GPUS GPUs"
fi
PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export JAX_COORDINATOR_ADDRESS="127.0.0.1:$PORT" JAX_NUM_PROCESSES=$PROCESSES
PIDS=()
for ((i = 0; i < PROCESSES; i++)); do
  (
    export JAX_PROCESS_ID=$i
    if ((NUM_GPUS > 0)); then
      per=$((NUM_GPUS / PROCESSES))
      export CUDA_VISIBLE_DEVICES=$(seq -s, $((i * per)) $((i * per + per - 1)))
    fi
    exec "${RUN[@]}"
  ) > >(sed -u "s/^/[p$i] /") 2>&1 &
  PIDS+=($!)
  echo "local_run.sh: process $i of $PROCESSES: pid $! (coordinator $JAX_COORDINATOR_ADDRESS)" >&2
done
forward() { kill -s "$1" "${PIDS[@]}" 2>/dev/null || true; }
trap 'forward TERM' TERM
trap 'forward INT' INT
WORST=0
for pid in "${PIDS[@]}"; do
  while :; do
    rc=0
    wait "$pid" || rc=$?
    # wait returns >128 when a trapped signal interrupts it while the child still runs: wait again.
    if ((rc > 128)) && kill -0 "$pid" 2>/dev/null; then continue; fi
    break
  done
  if ((rc > WORST)); then WORST=$rc; fi
done
exit "$WORST"
