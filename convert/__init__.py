"""Checkpoint readers, declarative key maps and writers (installed as ``flax_narrow.convert``)."""
