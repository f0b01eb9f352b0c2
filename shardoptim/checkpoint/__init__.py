"""Checkpoints of optimizer, scheduler and EMA state: safetensors shards and a JSON manifest on fsspec storage.

Not built yet: the format is laid out in DESIGN.md §7; a later issue implements it.
"""
