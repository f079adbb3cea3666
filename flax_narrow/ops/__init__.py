"""Static-shape operations shared by the models and the training code."""

from flax_narrow.ops.gather import gather_rows, mask_to_positions, positions_from_mask, scatter_rows

__all__ = ["gather_rows", "mask_to_positions", "positions_from_mask", "scatter_rows"]
