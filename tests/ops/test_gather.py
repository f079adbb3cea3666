import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_narrow import NarrowOverflowError, gather_rows, mask_to_positions, positions_from_mask, scatter_rows


def test_positions_are_ascending_and_padded():
    mask = np.array([[0, 1, 0, 1, 1, 0], [1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], bool)
    pos, valid, over = mask_to_positions(mask, 4)
    np.testing.assert_array_equal(pos, [[1, 3, 4, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(valid, [[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    assert not np.asarray(over).any()


def test_matches_a_numpy_reference_on_random_masks():
    rng = np.random.default_rng(0)
    mask = rng.random((16, 40)) < 0.3
    p = 20
    pos, valid, over = jax.jit(mask_to_positions, static_argnums=1)(mask, p)
    for b in range(16):
        sel = np.flatnonzero(mask[b])
        k = min(len(sel), p)
        np.testing.assert_array_equal(np.asarray(pos[b, :k]), sel[:k])
        assert np.asarray(valid[b]).sum() == k
        assert bool(over[b]) == (len(sel) > p)


def test_overflow_is_a_flag_in_jit_and_an_error_on_the_host():
    mask = np.zeros((2, 10), bool)
    mask[1, :6] = True
    _, _, over = jax.jit(mask_to_positions, static_argnums=1)(mask, 5)
    np.testing.assert_array_equal(over, [False, True])
    with pytest.raises(NarrowOverflowError, match=r"rows \[1\] select \[6\] positions but the budget is P=5"):
        positions_from_mask(mask, 5)
    pos, valid = positions_from_mask(mask)  # default P = the largest count
    assert pos.shape == (2, 6) and int(valid.sum()) == 6


def test_gather_and_scatter_are_inverse_on_selected_rows():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 7, 5)).astype(np.float32)
    mask = rng.random((3, 7)) < 0.5
    mask[:, 0] = False  # position 0 unselected: padded slots must not write there
    pos, valid = positions_from_mask(mask, 7)
    g = gather_rows(jnp.asarray(x), pos)
    assert g.shape == (3, 7, 5)
    back = np.asarray(scatter_rows(g, pos, valid, 7, fill_value=-1.0))
    np.testing.assert_array_equal(back[mask], x[mask])
    assert (back[~mask] == -1.0).all()


def test_one_compilation_for_different_masks():
    calls = []

    @jax.jit
    def f(mask):
        calls.append(1)
        pos, valid, _ = mask_to_positions(mask, 4)
        return pos.sum() + valid.sum()

    rng = np.random.default_rng(2)
    for _ in range(5):
        f(rng.random((2, 9)) < rng.random())
    assert len(calls) == 1
