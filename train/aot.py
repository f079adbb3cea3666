"""Deviceless check of a pretraining config for a TPU topology: compile the exact train step on this machine.

``flax-narrow pretrain --compile-only --topology v4-32`` builds the run's mesh over the devices of a TPU
topology described by libtpu (``jax.experimental.topologies``; no TPU needed, ``pip install libtpu``), lowers
and compiles the same jitted train step :func:`flax_narrow.train.loop.pretrain` runs (state shardings,
gradient accumulation, masking, dropout, optimizer; with ``data.packing=segments`` the segment ids too) against
abstract inputs, and reads XLA's per-device memory and FLOP counts from the compiled program. A config that
does not fit a device's HBM is refused with the levers that would make it fit.

Nothing is read but the config: the corpus and tokenizer are not loaded (the masking ids are placeholders,
which change constants of the program only, not its shapes), and a distillation teacher is built from its
``config.json`` alone.

Topology names: ``v4-N`` and ``v5p-N`` count TensorCores (two per chip; one JAX device per chip, megacore),
``v5e-N`` (or ``v5litepod-N``) and ``v6e-N`` count chips. ``N`` is a power of two (v4/v5p: >= 8; v5e/v6e:
1 or >= 4). A libtpu topology string such as ``v4:2x2x4`` is accepted as it is.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from typing import Any

import jax
from flax import nnx

from flax_narrow.config import EncoderConfig
from flax_narrow.errors import ConfigError
from flax_narrow.modeling import BertForMaskedLM

from . import flops as F
from . import sharding as shd
from . import step as S
from .config import PretrainConfig
from .masking import MaskingSpec
from .optimizer import learning_rate_schedule, make_optimizer

log = logging.getLogger(__name__)

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Generation:
    """One TPU generation: libtpu's topology prefix, its chip mode and the HBM of one JAX device."""

    prefix: str
    dims: int  # torus dimensions (3 for v4/v5p, 2 for v5e/v6e)
    cores_per_name_unit: int  # v4-8 has 8 TensorCores = 4 chips; v5e-8 has 8 chips
    chip_config: str
    hbm_bytes: int


GENERATIONS: dict[str, Generation] = {
    "v4": Generation("v4", 3, 2, "megacore", 32 * GIB),
    "v5p": Generation("v5", 3, 2, "megacore", 95 * GIB),
    "v5e": Generation("v5e", 2, 1, "default", 16 * GIB),
    "v5litepod": Generation("v5e", 2, 1, "default", 16 * GIB),
    "v6e": Generation("v6e", 2, 1, "default", 32 * GIB),
}
_PREFIX_TO_GEN = {"v4": "v4", "v5": "v5p", "v5e": "v5e", "v6e": "v6e"}


@dataclasses.dataclass(frozen=True)
class TopologySpec:
    """What :func:`jax.experimental.topologies.get_topology_desc` needs, and the per-device HBM."""

    name: str
    topology_name: str
    chip_config_name: str
    chips_per_host_bounds: tuple[int, int, int]
    wrap: tuple[bool, bool, bool]
    num_chips: int
    hbm_bytes: int


def _chip_grid(chips: int, ndim: int) -> list[int]:
    """The usual slice shape for a power-of-two chip count: grow [2, 2(, 1)] by doubling the smallest axis
    (the last of equals), e.g. 16 chips in 3-D -> 2x2x4, 64 -> 4x4x4; 32 in 2-D -> 4x8."""
    grid = [2, 2, 1] if ndim == 3 else [2, 2]
    while math.prod(grid) < chips:
        smallest = min(grid)
        i = max(j for j, g in enumerate(grid) if g == smallest)
        grid[i] *= 2
    return grid


def parse_topology(name: str) -> TopologySpec:
    """A TopologySpec for a slice name (``v4-32``, ``v5p-8``, ``v5e-16``, ``v6e-8``) or ``v4:2x2x4``.

    Raises:
      ConfigError: an unknown generation or a size that is not a slice of it.
    """
    raw = name.strip().lower()
    m = re.fullmatch(r"(v4|v5|v5e|v6e):(\d+(?:x\d+)+)", raw)
    if m:
        gen = GENERATIONS[_PREFIX_TO_GEN[m.group(1)]]
        grid = [int(x) for x in m.group(2).split("x")]
        if len(grid) != gen.dims or min(grid) < 1:
            raise ConfigError(f"--topology {name!r}: {m.group(1)} takes {gen.dims} dimensions, like 2x2x1")
        topology_name = raw
    else:
        m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", raw)
        if not m:
            raise ConfigError(
                f"--topology {name!r}: expected a TPU slice name such as v4-32, v5p-8, v5e-16 or v6e-8 "
                "(or a libtpu topology such as v4:2x2x4)"
            )
        gen = GENERATIONS[m.group(1)]
        units = int(m.group(2))
        chips, rem = divmod(units, gen.cores_per_name_unit)
        smallest = 4 if gen.dims == 3 else 1
        ok = rem == 0 and chips >= smallest and chips & (chips - 1) == 0 and (gen.dims == 3 or chips != 2)
        if not ok:
            sizes = "8, 16, 32, ..." if gen.dims == 3 else "1, 4, 8, 16, ..."
            raise ConfigError(f"--topology {name!r}: {m.group(1)} slices have {sizes} (a power of two)")
        grid = [1, 1] if chips == 1 else _chip_grid(chips, gen.dims)
        topology_name = f"{gen.prefix}:" + "x".join(str(g) for g in grid)
    if gen.dims == 3:
        wrap = (True, True, True) if min(grid) >= 4 else (False, False, False)
    else:
        wrap = (grid[0] >= 16, grid[1] >= 16, False)
    host = (2, 2, 1) if math.prod(grid) >= 4 else (1, 1, 1)
    return TopologySpec(name, topology_name, gen.chip_config, host, wrap, math.prod(grid), gen.hbm_bytes)


def _quiet_libtpu_env(spec: TopologySpec) -> None:
    """On a machine without a TPU, libtpu looks for the TPU VM's metadata and prints warnings; tell it
    (only where the environment does not say otherwise) that this is a single local host, and that it need not
    be the only process using libtpu."""
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # libtpu takes /tmp/libtpu_lockfile for one process per machine; a compile-only client drives no TPU, so
    # it may share the machine with other JAX processes that loaded libtpu (any JAX without JAX_PLATFORMS set)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", spec.name if "-" in spec.name else "v4-8")


def topology_devices(spec: TopologySpec) -> list[Any]:
    """The compile-only devices of the topology.

    Raises:
      ConfigError: libtpu is missing or cannot describe the topology.
    """
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise ConfigError(
            "--compile-only --topology needs libtpu (pip install 'flax-narrow[tpu-aot]' or pip install libtpu "
            "in the version jax[tpu] pins)"
        ) from None
    from jax.experimental import topologies

    _quiet_libtpu_env(spec)
    try:
        topo = topologies.get_topology_desc(
            spec.topology_name,
            "tpu",
            chip_config_name=spec.chip_config_name,
            chips_per_host_bounds=spec.chips_per_host_bounds,
            num_slices=1,
            wrap=spec.wrap,
        )
    except Exception as e:  # libtpu raises JaxRuntimeError / RuntimeError with its own message
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--topology {spec.name!r} ({spec.topology_name}): libtpu: {first}") from None
    return list(topo.devices)


def placeholder_masking(cfg: PretrainConfig) -> MaskingSpec:
    """Masking parameters with made-up special ids (they are constants of the program, not shapes)."""
    m, t = cfg.model, cfg.train
    others = [i for i in range(min(m.vocab_size, 8)) if i != m.pad_token_id]
    return MaskingSpec(
        max_predictions=t.max_predictions,
        vocab_size=m.vocab_size,
        mask_token_id=others[0] if others else m.pad_token_id,
        pad_token_id=m.pad_token_id,
        special_token_ids=tuple(sorted({m.pad_token_id, *others[:3]})),
        mask_prob=t.mask_prob,
        mask_token_prob=t.mask_token_prob,
        random_token_prob=t.random_token_prob,
    )


def abstract_teacher(cfg: PretrainConfig, mesh: jax.sharding.Mesh) -> S.Teacher:
    """The distillation teacher's graph and sharded abstract weights, from its config.json only."""
    path = os.path.expanduser(str(cfg.kd.teacher))
    if not os.path.exists(os.path.join(path, "config.json")) and not path.endswith(".json"):
        raise ConfigError(
            f"kd.teacher {cfg.kd.teacher!r}: --compile-only reads the teacher's config.json from a local "
            "directory; download the checkpoint first"
        )
    tconf = EncoderConfig.from_hf_config(path, dtype=cfg.kd.teacher_dtype or cfg.model.dtype)
    parts = S.split_model(nnx.eval_shape(lambda: BertForMaskedLM(tconf, rngs=nnx.Rngs(0))))
    p_sh = shd.tree_shardings(parts.params, mesh)
    r_sh = shd.tree_shardings(parts.rest, mesh)
    return S.Teacher(
        parts.graphdef,
        shd.abstract_with_shardings(parts.params, p_sh),
        shd.abstract_with_shardings(parts.rest, r_sh),
        tconf,
    )


def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB // 10 else f"{n / 1024**2:.1f} MiB"


@dataclasses.dataclass
class CompileReport:
    """What the compiled step needs per device. Bytes are XLA's ``memory_analysis()`` of one device."""

    topology: str
    topology_name: str
    device_kind: str
    num_devices: int
    mesh: dict[str, int]
    micro_batch: int
    rows_per_device: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    hbm_bytes: int
    xla_flops_per_device: float | None
    model_flops_per_step: float
    compile_seconds: float

    @property
    def needed_bytes(self) -> int:
        """Peak HBM of one device: live arguments, outputs not aliased to a donated input, temporaries, code."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    @property
    def fits(self) -> bool:
        return self.needed_bytes <= self.hbm_bytes

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["needed_bytes"] = self.needed_bytes
        d["fits"] = self.fits
        return d

    def lines(self) -> list[str]:
        g = _size
        flops = "n/a" if self.xla_flops_per_device is None else f"{self.xla_flops_per_device:.4g}"
        return [
            f"topology {self.topology} ({self.topology_name}): {self.num_devices} x {self.device_kind}, "
            f"mesh {self.mesh}",
            f"micro-batch {self.micro_batch} rows, {self.rows_per_device} per device; compiled in "
            f"{self.compile_seconds:.1f} s",
            f"per device: arguments {g(self.argument_bytes)} (params + optimizer state + batch), temporaries "
            f"{g(self.temp_bytes)}, outputs {g(self.output_bytes)} (aliased {g(self.alias_bytes)}), code "
            f"{g(self.code_bytes)}",
            f"per device: needs {g(self.needed_bytes)} of {g(self.hbm_bytes)} HBM "
            f"({100 * self.needed_bytes / self.hbm_bytes:.0f}%)",
            f"FLOPs per step per device: XLA {flops}; model matmuls "
            f"{self.model_flops_per_step / self.num_devices:.4g} (flops.train_step_flops / devices)",
        ]


def advice(cfg: PretrainConfig, report: CompileReport) -> str:
    """What to change so that the step fits, from the largest part of the per-device memory."""
    t, m = cfg.train, cfg.model
    moves = []
    if report.temp_bytes >= report.argument_bytes:
        if report.rows_per_device > 1:
            moves.append(
                f"fewer rows per device: raise train.grad_accum_steps (now {t.grad_accum_steps}) or lower "
                f"train.global_batch_size (now {t.global_batch_size})"
            )
        if m.remat_policy == "none":
            moves.append("set model.remat_policy=dots (or full) to recompute activations in the backward pass")
    moves.append(
        f"raise mesh.fsdp (now {report.mesh.get('fsdp', 1)}) to shard parameters and optimizer state "
        f"({report.argument_bytes / GIB:.2f} GiB per device now)"
    )
    if report.temp_bytes < report.argument_bytes and report.rows_per_device > 1:
        moves.append(f"raise train.grad_accum_steps (now {t.grad_accum_steps})")
    return "; ".join(moves)


def compile_for_topology(cfg: PretrainConfig, topology: str) -> CompileReport:
    """Lower and compile ``cfg``'s train step for ``topology`` (see the module docstring).

    Raises:
      ConfigError: libtpu missing, an unknown topology, a mesh that does not match it, or a step XLA refuses
        to compile (e.g. out of memory).
    """
    spec = parse_topology(topology)
    devices = topology_devices(spec)
    tcfg = cfg.train
    accum, micro, seq_len = tcfg.grad_accum_steps, tcfg.micro_batch_size, cfg.data.seq_len
    mesh = shd.make_mesh(cfg.mesh, devices)
    n_batch = mesh.shape["data"] * mesh.shape["fsdp"]
    if micro % n_batch:
        raise ConfigError(
            f"the micro-batch of {micro} sequences (global_batch_size / grad_accum_steps) is not divisible by "
            f"data x fsdp = {n_batch} batch shards of {topology}"
        )
    tx = make_optimizer(tcfg)
    state_spec = S.state_spec(cfg.model, tx, mesh, seed=tcfg.seed)
    rest = shd.abstract_with_shardings(state_spec.abstract_rest, state_spec.rest_shardings)
    teacher = abstract_teacher(cfg, mesh) if cfg.kd.enabled else None
    train_fn = S.make_train_step(
        state_spec.graphdef,
        tx,
        placeholder_masking(cfg),
        seed=tcfg.seed,
        schedule=learning_rate_schedule(tcfg),
        kd=cfg.kd,
        teacher_graphdef=teacher.graphdef if teacher is not None else None,
    )
    try:
        compiled = S.compile_steps(
            train_fn,
            None,
            state_spec,
            mesh,
            accum=accum,
            micro_batch=micro,
            seq_len=seq_len,
            rest=rest,
            teacher=teacher,
            segment_ids=cfg.data.packing == "segments",
        )
    except Exception as e:  # XLA's compiler errors (RESOURCE_EXHAUSTED when the program does not fit)
        text = str(e).strip()
        first = text.splitlines()[0] if text else type(e).__name__
        if "RESOURCE_EXHAUSTED" in text or "memory" in text.lower():
            raise ConfigError(
                f"{topology}: XLA cannot fit the train step into {spec.hbm_bytes / GIB:.0f} GiB per device "
                f"({first[:300]}). To fit: raise train.grad_accum_steps, lower train.global_batch_size, set "
                "model.remat_policy=dots, or raise mesh.fsdp"
            ) from None
        raise ConfigError(f"{topology}: XLA could not compile the train step: {first[:500]}") from None
    mem = compiled.memory
    return CompileReport(
        topology=topology,
        topology_name=spec.topology_name,
        device_kind=devices[0].device_kind,
        num_devices=len(devices),
        mesh={k: int(v) for k, v in mesh.shape.items()},
        micro_batch=micro,
        rows_per_device=micro // n_batch,
        argument_bytes=mem.get("argument_size_in_bytes", 0),
        output_bytes=mem.get("output_size_in_bytes", 0),
        alias_bytes=mem.get("alias_size_in_bytes", 0),
        temp_bytes=mem.get("temp_size_in_bytes", 0),
        code_bytes=mem.get("generated_code_size_in_bytes", 0),
        hbm_bytes=spec.hbm_bytes,
        xla_flops_per_device=compiled.xla_flops,
        model_flops_per_step=F.train_step_flops(
            cfg.model,
            batch=tcfg.global_batch_size,
            seq_len=seq_len,
            predictions=tcfg.max_predictions,
            teacher=teacher.config if teacher is not None else None,
        ),
        compile_seconds=compiled.compile_seconds,
    )


def fit_error(cfg: PretrainConfig, report: CompileReport) -> ConfigError | None:
    """The refusal of a step that needs more HBM than one device has (None when it fits)."""
    if report.fits:
        return None
    return ConfigError(
        f"{report.topology}: the train step needs {report.needed_bytes / GIB:.2f} GiB per device but a "
        f"{report.device_kind} has {report.hbm_bytes / GIB:.0f} GiB (arguments "
        f"{report.argument_bytes / GIB:.2f}, temporaries {report.temp_bytes / GIB:.2f}). To fit: " + advice(cfg, report)
    )


def check_fits(cfg: PretrainConfig, topology: str) -> CompileReport:
    """:func:`compile_for_topology`, then refuse a step that does not fit (:func:`fit_error`).

    Raises:
      ConfigError: as :func:`compile_for_topology`, or the step does not fit (the message says what to change).
    """
    report = compile_for_topology(cfg, topology)
    err = fit_error(cfg, report)
    if err is not None:
        raise err
    return report


def compile_only_main(cfg: PretrainConfig, topology: str | None) -> int:
    """``flax-narrow pretrain --compile-only``: print the report; 0 when the step fits, ConfigError if not."""
    if not topology:
        raise ConfigError("--compile-only needs --topology (e.g. v4-32, v5p-8, v5e-16, v6e-8)")
    report = compile_for_topology(cfg, topology)
    for line in report.lines():
        print(line)
    err = fit_error(cfg, report)
    if err is not None:
        raise err
    print(f"fits: {topology} can run this config")
    return 0
