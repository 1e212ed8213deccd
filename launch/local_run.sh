#!/usr/bin/env bash
# Runs a towerplus_jax stage on this machine (CPU or GPU); rerunning the same command resumes from the checkpoint.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/local_run.sh --config=CONFIG --workdir=DIR [--env=KEY=VALUE ...] [-- MAIN_FLAGS...]

Runs, from the repository root,
  python -m towerplus_jax.main --config=CONFIG --workdir=DIR MAIN_FLAGS...
With an NVIDIA GPU (nvidia-smi lists one) it first adds XLA GPU flags to XLA_FLAGS
(--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_highest_priority_async_stream=true;
a flag already in XLA_FLAGS is left as set) and XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 unless set.
Rerunning the same command resumes from the latest checkpoint in DIR.

  --config=CONFIG      stage config, e.g. configs/sft.py:tiny (alias: --stage); relative to the
                       current folder or to the repository
  --workdir=DIR        run folder (local path or gs://...)
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
CONFIG="" WORKDIR="" MAIN_ARGS=()

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

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
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
cd "$REPO_DIR"
exec "$PYTHON" -m towerplus_jax.main "--config=$CONFIG" "--workdir=$WORKDIR" ${MAIN_ARGS[@]+"${MAIN_ARGS[@]}"}
