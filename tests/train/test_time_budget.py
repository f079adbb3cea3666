"""``train.max_seconds`` and ``train.eval_every_seconds``: runs stopped and evaluated by training time."""

import pytest
from train_helpers import small_overrides

from flax_narrow.errors import ConfigError
from flax_narrow.train.config import load_config
from flax_narrow.train.loop import pretrain
from flax_narrow.train.metrics import read_jsonl


def test_time_budget_stops_the_run_and_evaluates_on_the_clock(tmp_path, data_cache):
    budget, every = 3.0, 1.0
    sets = small_overrides(
        data_cache,
        **{
            "train.steps": 100_000,
            "train.max_seconds": budget,
            "train.eval_every_seconds": every,
            "train.eval_batches": 1,
            "data.eval_fraction": 0.1,
            "train.log_every": 2,
            "output_dir": str(tmp_path / "run"),
        },
    )
    r = pretrain(load_config("tiny", None, sets))
    assert 0 < r.final_step < 100_000 and not r.preempted
    assert r.final_step % 2 == 0  # the clock is read at log flushes only
    # The flushes' training time, summed from the per-window seconds in metrics.jsonl, says which flushes
    # crossed the next mark (and which ended the run): exactly those steps were evaluated.
    recs = read_jsonl(str(tmp_path / "run" / "metrics.jsonl"))
    clock, expected, mark = 0.0, [], every
    for step in sorted(s for s in recs if "seconds" in recs[s]):
        clock += recs[step]["seconds"]
        if clock >= mark or clock >= budget:
            expected.append((step, clock))
            while mark <= clock:
                mark += every
        if clock >= budget:
            break
    assert [e["step"] for e in r.evals] == [s for s, _ in expected]
    assert [e["train_seconds"] for e in r.evals] == pytest.approx([c for _, c in expected])
    assert r.evals[-1]["step"] == r.final_step and r.evals[-1]["train_seconds"] >= budget
    assert (tmp_path / "run" / "checkpoints" / str(r.final_step)).is_dir()  # the end saves, as the last step does


def test_eval_every_seconds_alone_builds_the_eval_split(tmp_path, data_cache):
    sets = small_overrides(data_cache, **{"train.steps": 4, "train.eval_every_seconds": 1e-6, "train.eval_batches": 1})
    r = pretrain(load_config("tiny", None, sets + ["data.eval_fraction=0.1"]))
    assert [e["step"] for e in r.evals] == [1, 2, 3, 4]  # log_every=1: every flush is past the next mark
    with pytest.raises(ConfigError, match="eval_every_seconds"):
        pretrain(load_config("tiny", None, sets + ["data.eval_fraction=0"]))


@pytest.mark.parametrize("setting", ["train.max_seconds=0", "train.eval_every_seconds=-1"])
def test_bad_time_settings_are_refused(setting):
    with pytest.raises(ConfigError, match=setting.split("=")[0].split(".")[1]):
        load_config("tiny", None, [setting])
