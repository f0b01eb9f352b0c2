"""Checkpoints of optimizer, scheduler and EMA state: safetensors shards and a JSON manifest on fsspec storage.

The storage layer is built (docs/checkpoint-format.md describes it); ``save``/``load``/``latest`` and
``CheckpointManager`` (DESIGN.md §2) are to come, on top of it:

- :mod:`.storage` — ``Storage(url, storage_options)``: one directory on any fsspec URL, checked
  relative names, writes visible only complete (create-only for the commit), exact ranged reads;
- :mod:`.durable_write` — the commit strategy per backend (local disk, S3, memory://, others);
- :mod:`.tensorfile_writer` / :mod:`.tensorfile_reader` / :mod:`.tensorfile_record` — streaming
  safetensors files with a CRC32 per block and tensor and a file digest, and their checked reader;
- :mod:`.safetensors_header` — the header, encoded and strictly parsed;
- :mod:`.json_codec` — strict, lossless JSON for the manifest (±inf and NaN included);
- :mod:`.digests`, :mod:`.tensor_bytes`, :mod:`.errors` — CRC algebra, tensor byte views, exceptions.
"""
