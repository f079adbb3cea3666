"""The training loop does not wait on the device every step: device values reach the host only through its
explicit, batched metric fetches (``jax.device_get`` once per ``train.log_every`` steps), never through an
implicit ``float(x)`` / ``np.asarray(x)`` / ``int(x)`` on a device array in the step loop."""

import jax
from jax._src.array import ArrayImpl
from train_helpers import small_overrides

from flax_narrow.train import loop
from flax_narrow.train.config import load_config


def test_values_reach_the_host_only_in_batched_fetches(data_cache, monkeypatch):
    steps, log_every = 12, 4
    cfg = load_config("tiny", None, small_overrides(data_cache, **{"train.steps": steps, "train.log_every": log_every}))
    fetches, implicit, inside = [], [], [False]
    real_get, real_value = jax.device_get, ArrayImpl._value

    def device_get(x):
        fetches.append(1)
        inside[0] = True
        try:
            return real_get(x)
        finally:
            inside[0] = False

    def value(self):
        if not inside[0]:
            implicit.append(self.shape)
        return real_value.fget(self)

    monkeypatch.setattr(loop.jax, "device_get", device_get)
    monkeypatch.setattr(ArrayImpl, "_value", property(value))
    result = loop.pretrain(cfg)
    monkeypatch.undo()
    assert result.final_step == steps and len(result.history) == steps
    assert implicit == [], f"{len(implicit)} implicit device-to-host reads, shapes {implicit[:5]}"
    # the start step, one fetch per log window, the final step; a per-step sync would be >= steps
    assert 1 <= len(fetches) <= steps // log_every + 2, len(fetches)
