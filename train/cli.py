"""``flax-narrow pretrain``: a thin entry point over :func:`flax_narrow.train.loop.pretrain`.

The config is a preset, then an optional JSON/YAML file, then the convenience flags given (``--steps``,
``--output-dir``, ``--resume``, ``--init-from``, ``--peak-tflops``), then ``--set section.field=value``
overrides: the order of every command (finetune and agora too).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 143  # 128 + SIGTERM: stopped on request after saving a checkpoint

EPILOG = """\
examples:
  flax-narrow pretrain --preset tiny --output-dir runs/tiny
  flax-narrow pretrain --preset narrowbert-base --set data.files='corpus/*.txt' --output-dir /shared/runs/nb1
  flax-narrow pretrain --config run.yaml --set train.learning_rate=3e-4 --resume
  flax-narrow pretrain --preset bort --set kd.teacher=ckpt/roberta-large --print-config

presets: tiny, tiny-bert, demo-narrowbert, demo-bert, narrowbert-base, bert-base, bort.
sections for --set: model (EncoderConfig fields), data, train, kd, mesh, checkpoint; e.g.
  --set model.full_length_layers=2 --set mesh.fsdp=4 --set checkpoint.every_steps=500
exit codes: 0 done; 2 configuration/checkpoint error; 143 (SIGTERM) / 130 (SIGINT, Ctrl-C) stopped after
saving a checkpoint.
multi-host: run the same command on every host with --distributed on (jax.distributed.initialize() then finds
TPU pods and SLURM jobs itself; scripts/ does this), or --coordinator-address/--num-processes/--process-id.
--output-dir is a filesystem path every host can write (on TPU VMs, a bucket mounted with gcsfuse).
"""


def register(sub) -> None:
    """Add ``pretrain`` to the ``flax-narrow`` sub-commands."""
    p = sub.add_parser(
        "pretrain",
        help="MLM (+ distillation) pretraining of BORT / NarrowBERT / BERT",
        description="MLM (+ knowledge distillation) pretraining on a device mesh, with exact resume.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", default=None, help="named preset (default: the config file's, else 'tiny')")
    p.add_argument("--config", default=None, metavar="FILE", help="JSON or YAML config file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one config field (repeatable)",
    )
    p.add_argument("--output-dir", default=None, help="run directory (metrics, TensorBoard, checkpoints)")
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps (train.steps)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the run")
    p.add_argument(
        "--stop-at",
        type=int,
        default=None,
        metavar="STEP",
        help="stop after this step (checkpointing it); the schedule still spans train.steps, --resume continues",
    )
    p.add_argument("--init-from", default=None, help="initial weights: a converted/HF checkpoint or hub id")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s per device for the MFU estimate")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument(
        "--compile-only",
        action="store_true",
        help="compile the train step for --topology on this machine (no TPU; needs libtpu), print per-device "
        "memory and FLOPs, exit 2 if it does not fit (docs/pods.md)",
    )
    p.add_argument("--topology", default=None, help="TPU slice for --compile-only: v4-32, v5p-8, v5e-16, v6e-8, ...")
    add_distributed_args(p)
    p.set_defaults(func=_cli)


def add_distributed_args(p: argparse.ArgumentParser) -> None:
    """The multi-host flags (shared by pretrain, finetune and agora); :func:`init_distributed` reads them."""
    g = p.add_argument_group("multi-host")
    g.add_argument(
        "--distributed",
        choices=("auto", "on", "off"),
        default="auto",
        help="call jax.distributed.initialize(): auto = when a cluster is detected (TPU pod, SLURM, JAX_COORDINATOR_"
        "ADDRESS) or a coordinator is given",
    )
    g.add_argument("--coordinator-address", default=None, help="host:port of process 0")
    g.add_argument("--num-processes", type=int, default=None)
    g.add_argument("--process-id", type=int, default=None)
    g.add_argument("--cpu-devices", type=int, default=None, help="fake CPU devices per process (testing)")


def resolve_config(args: argparse.Namespace):
    """The PretrainConfig from the parsed arguments."""
    from .config import load_config

    overrides = []  # the flags given, then --set: the same order as finetune and agora
    if args.output_dir is not None:
        overrides.append(f"output_dir={args.output_dir}")
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    if args.resume:
        overrides.append("checkpoint.resume=true")
    if args.init_from is not None:
        overrides.append(f"checkpoint.init_from={args.init_from}")
    if args.peak_tflops is not None:
        overrides.append(f"train.peak_tflops={args.peak_tflops}")
    overrides += args.overrides
    return load_config(args.preset, args.config, overrides)


def cluster_detected() -> bool:
    """A multi-process launch we recognise from the environment."""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env:
        return True
    hosts = env.get("TPU_WORKER_HOSTNAMES") or env.get("MEGASCALE_COORDINATOR_ADDRESS")
    return bool(hosts and ("," in hosts or env.get("MEGASCALE_COORDINATOR_ADDRESS")))


def init_distributed(args: argparse.Namespace) -> None:
    """Set up devices and ``jax.distributed`` before any JAX backend starts."""
    import jax

    if args.cpu_devices is not None:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    explicit = args.coordinator_address is not None
    if args.distributed == "off" or (args.distributed == "auto" and not explicit and not cluster_detected()):
        return
    # CPU processes exchange gradients with gloo (the setting only concerns the CPU backend).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kw = {}
    if explicit:
        kw = dict(
            coordinator_address=args.coordinator_address,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    jax.distributed.initialize(**kw)
    log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def _cli(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    if args.compile_only:
        from .aot import compile_only_main

        return compile_only_main(cfg, args.topology)
    init_distributed(args)
    import jax

    from .loop import pretrain
    from .runtime import enable_compilation_cache

    enable_compilation_cache(cfg.train.compilation_cache_dir)

    if jax.process_index() == 0:
        logging.getLogger("flax_narrow").setLevel(min(logging.getLogger().level, logging.INFO))
    result = pretrain(cfg, stop_at=args.stop_at)
    if jax.process_index() == 0:
        last = result.history[-1] if result.history else {}
        summary = {
            "final_step": result.final_step,
            "loss": last.get("loss"),
            "accuracy": last.get("accuracy"),
            "steps_per_s": result.steps_per_second,
            "compile_s": round(result.compile_seconds, 2),
            "preempted": result.preempted,
            "run_dir": result.run_dir,
        }
        print(json.dumps(summary), file=sys.stderr)
    if result.preempted:
        return 128 + result.stop_signal if result.stop_signal else EXIT_PREEMPTED
    return 0
