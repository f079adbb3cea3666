"""Training programs and their machinery (installed as ``flax_narrow.train``)."""
