"""The deviceless TPU check: topology names, the fit verdict, and real compiles against libtpu's topologies."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest

from flax_narrow.cli import main
from flax_narrow.errors import ConfigError
from flax_narrow.train import aot
from flax_narrow.train.config import load_config

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")


@pytest.mark.parametrize(
    "name,topology,chips,config",
    [
        ("v4-8", "v4:2x2x1", 4, "megacore"),
        ("v4-32", "v4:2x2x4", 16, "megacore"),
        ("v4-128", "v4:4x4x4", 64, "megacore"),
        ("v5p-16", "v5:2x2x2", 8, "megacore"),
        ("v5e-1", "v5e:1x1", 1, "default"),
        ("v5litepod-16", "v5e:4x4", 16, "default"),
        ("v6e-8", "v6e:2x4", 8, "default"),
        ("v6e-256", "v6e:16x16", 256, "default"),
        ("v4:2x4x4", "v4:2x4x4", 32, "megacore"),
    ],
)
def test_parse_topology(name, topology, chips, config):
    spec = aot.parse_topology(name)
    assert (spec.topology_name, spec.num_chips, spec.chip_config_name) == (topology, chips, config)


def test_parse_topology_wraps_full_tori_only():
    assert aot.parse_topology("v4-128").wrap == (True, True, True)
    assert aot.parse_topology("v4-64").wrap == (False, False, False)
    assert aot.parse_topology("v6e-256").wrap == (True, True, False)


@pytest.mark.parametrize("name", ["v4-12", "v4-4", "v5e-2", "v3-8", "tpu", "v4:2x2"])
def test_parse_topology_refuses(name):
    with pytest.raises(ConfigError, match="--topology"):
        aot.parse_topology(name)


def _report(**kw) -> aot.CompileReport:
    base = dict(
        topology="v5e-4",
        topology_name="v5e:2x2",
        device_kind="TPU v5 lite",
        num_devices=4,
        mesh={"data": 4, "fsdp": 1, "tensor": 1},
        micro_batch=64,
        rows_per_device=16,
        argument_bytes=2 * aot.GIB,
        output_bytes=2 * aot.GIB,
        alias_bytes=2 * aot.GIB,
        temp_bytes=10 * aot.GIB,
        code_bytes=0,
        hbm_bytes=16 * aot.GIB,
        xla_flops_per_device=1.0,
        model_flops_per_step=4.0,
        compile_seconds=1.0,
    )
    return aot.CompileReport(**{**base, **kw})


def test_fit_error_names_the_levers():
    cfg = load_config("tiny", None, [])
    assert aot.fit_error(cfg, _report()) is None  # 2 + 10 GiB of 16
    err = aot.fit_error(cfg, _report(temp_bytes=15 * aot.GIB))
    assert err is not None
    text = str(err)
    assert "17.00 GiB per device" in text and "16 GiB" in text
    assert "train.grad_accum_steps" in text and "model.remat_policy" in text and "mesh.fsdp" in text
    # Memory held by parameters and optimizer state: fsdp first, no remat advice.
    err = aot.fit_error(cfg, _report(argument_bytes=12 * aot.GIB, output_bytes=12 * aot.GIB, alias_bytes=12 * aot.GIB))
    assert err is not None and str(err).split("To fit: ")[1].startswith("raise mesh.fsdp")
    assert "remat" not in str(err)


def test_needed_bytes_counts_aliased_outputs_once():
    r = _report()
    assert r.needed_bytes == 12 * aot.GIB
    assert dataclasses.replace(r, alias_bytes=0).needed_bytes == 14 * aot.GIB


@needs_libtpu
def test_compile_only_tiny_fits_v4_8(capsys):
    rc = main(["pretrain", "--preset", "tiny", "--compile-only", "--topology", "v4-8"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "4 x TPU v4" in out and "mesh {'data': 4" in out
    assert "per device: needs" in out and "fits: v4-8" in out
    assert "FLOPs per step per device: XLA" in out


@needs_libtpu
def test_compile_only_refuses_what_does_not_fit(capsys):
    rc = main(
        [
            "pretrain",
            "--preset",
            "tiny",
            "--compile-only",
            "--topology",
            "v5e-1",
            "--set",
            "train.global_batch_size=65536",
            "--set",
            "data.seq_len=128",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "16 GiB per device" in err and "train.grad_accum_steps" in err and "mesh.fsdp" in err


def test_compile_only_needs_a_topology(capsys):
    rc = main(["pretrain", "--preset", "tiny", "--compile-only"])
    assert rc == 2
    assert "--compile-only needs --topology" in capsys.readouterr().err


@needs_libtpu
def test_compile_only_with_a_distillation_teacher_from_its_config(tmp_path, capsys):
    import json

    from flax_narrow.config import EncoderConfig

    teacher = EncoderConfig.tiny(vocab_size=2048, num_hidden_layers=3, max_position_embeddings=128)
    (tmp_path / "config.json").write_text(json.dumps(teacher.to_hf_config()))
    args = ["pretrain", "--preset", "tiny", "--compile-only", "--topology", "v4-8"]
    rc = main([*args, "--set", f"kd.teacher={tmp_path}", "--set", "kd.kd_weight=1.0"])
    assert rc == 0, capsys.readouterr().err
    assert "fits: v4-8" in capsys.readouterr().out
    rc = main([*args, "--set", f"kd.teacher={tmp_path / 'missing'}", "--set", "kd.kd_weight=1.0"])
    assert rc == 2 and "reads the teacher's config.json from a local directory" in capsys.readouterr().err
