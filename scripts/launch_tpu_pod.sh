#!/usr/bin/env bash
# Run flax-narrow pretraining on every worker of a Cloud TPU VM slice (see docs/pods.md).
#
#   export TPU_NAME=my-v4-32 ZONE=us-central2-b [PROJECT=my-project] [BRANCH=main]
#   export REPO=<git URL of your flax-narrow checkout>      # for setup
#   scripts/launch_tpu_pod.sh setup                       # clone/update, .venv, install flax-narrow + jax[tpu]
#   scripts/launch_tpu_pod.sh run <flax-narrow pretrain arguments>
#   scripts/launch_tpu_pod.sh logs | status | stop
#
# `run` starts the same command on all workers in the background (log: ~/flax-narrow/pretrain.log), with
# --distributed on (jax.distributed.initialize() finds the pod itself) and --resume (continue after preemption;
# a first launch starts fresh). `stop` sends SIGTERM: each worker saves a checkpoint and exits with code 143.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU zone}"
BRANCH="${BRANCH:-main}"
DIR="${DIR:-flax-narrow}"
PROJECT_FLAG=()
if [[ -n "${PROJECT:-}" ]]; then PROJECT_FLAG=(--project "$PROJECT"); fi

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" --worker=all --command "$1"
}

quote_args() {
  local out="" a
  for a in "$@"; do out+=" $(printf '%q' "$a")"; done
  printf '%s' "$out"
}

cmd="${1:-}"
shift || true
case "$cmd" in
  setup)
    : "${REPO:?set REPO to the git URL to clone on the workers}"
    on_all_workers "set -e
      if [ -d $DIR/.git ]; then git -C $DIR fetch -q origin && git -C $DIR checkout -q $BRANCH && git -C $DIR pull -q;
      else git clone -q -b $BRANCH $REPO $DIR; fi
      cd $DIR && python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip
      .venv/bin/pip install -q -e . 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
    ;;
  run)
    args="$(quote_args "$@")"
    on_all_workers "cd $DIR || exit 1
      export JAX_COMPILATION_CACHE_DIR=\$HOME/.cache/jax-compilation
      nohup .venv/bin/flax-narrow pretrain --distributed on --resume$args > pretrain.log 2>&1 < /dev/null &
      echo \$! > pretrain.pid
      echo \"\$(hostname): started pid \$(cat pretrain.pid)\""
    ;;
  logs)
    on_all_workers "echo == \$(hostname); tail -n ${LINES:-20} $DIR/pretrain.log"
    ;;
  status)
    on_all_workers "cd $DIR; if [ -f pretrain.pid ] && kill -0 \$(cat pretrain.pid) 2>/dev/null; then \
      echo \"\$(hostname): running (pid \$(cat pretrain.pid))\"; else echo \"\$(hostname): not running\"; fi"
    ;;
  stop)
    on_all_workers "cd $DIR; if [ -f pretrain.pid ] && kill -TERM \$(cat pretrain.pid) 2>/dev/null; then \
      echo \"\$(hostname): SIGTERM sent\"; else echo \"\$(hostname): not running\"; fi"
    ;;
  *)
    echo "usage: $0 setup | run <pretrain args> | logs | status | stop" >&2
    exit 2
    ;;
esac
