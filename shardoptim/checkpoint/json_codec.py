"""Strict JSON for checkpoint manifests: lossless floats (±inf and NaN included), bounded decoding.

The encoding, not the schema: any tree of ``dict`` (``str`` keys), ``list``/``tuple``, ``str``,
``int``, ``float``, ``bool`` and ``None`` becomes RFC 8259 JSON that any parser reads, and
:func:`decode_json` gives the same tree back (tuples come back as lists):

- finite floats are written as ``repr`` writes them (the shortest string that reads back to the same
  double), so they round-trip bit for bit, ``-0.0`` included;
- non-finite floats, which strict JSON lacks, become one-key objects: ``{"$float": "inf"}``,
  ``{"$float": "-inf"}``, ``{"$float": "nan"}`` (the usual quiet NaN, bits ``0x7ff8000000000000``)
  or ``{"$float": "nan:0xfff8000000000000"}`` (any other NaN, its 64 bits kept — x86 arithmetic
  produces the negative one);
- a key of the user's that starts with ``$`` is written with one more ``$`` in front and read back
  without it, so no user dictionary is ever mistaken for a tagged value.

Anything else (tensors, sets, bytes, non-``str`` keys, which ``json.dumps`` would silently turn into
strings) is refused with a ``TypeError`` naming where in the tree it is. Decoding refuses, with a
:class:`~shardoptim.checkpoint.errors.CheckpointFormatError` naming the source, input over
``max_bytes``, nesting deeper than ``max_depth`` (checked on the raw text before the parser runs),
duplicate keys, the non-standard literals ``NaN``/``Infinity``, numbers that overflow a double, and
invalid UTF-8. No pickle, no ``eval``: ``json`` from the standard library does the parsing.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import CheckpointFormatError

FLOAT_TAG = "$float"
_CANONICAL_NAN_BITS = 0x7FF8000000000000
_NAN_RE = re.compile(r"nan:0x([0-9a-f]{16})")
_STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKET_RE = re.compile(r"[^\[\]{}]+")
_DEPTH_STEP = str.maketrans({"[": "\x01", "{": "\x01", "]": "\x02", "}": "\x02"})


@dataclass(frozen=True)
class JsonLimits:
    """Bounds that :func:`decode_json` enforces before and while parsing."""

    max_bytes: int = 64 * 2**20
    """Largest encoded document accepted, in bytes."""
    max_depth: int = 64
    """Deepest nesting of arrays and objects accepted (``[]`` and ``{}`` are depth 1)."""


def _float_to_json(value: float) -> Any:
    if math.isfinite(value):
        return value
    if math.isinf(value):
        return {FLOAT_TAG: "inf" if value > 0 else "-inf"}
    bits = struct.unpack("<Q", struct.pack("<d", value))[0]
    return {FLOAT_TAG: "nan" if bits == _CANONICAL_NAN_BITS else f"nan:0x{bits:016x}"}


def _float_from_tag(text: object, where: str) -> float:
    if text == "inf":
        return math.inf
    if text == "-inf":
        return -math.inf
    if text == "nan":
        return math.nan
    match = _NAN_RE.fullmatch(text) if isinstance(text, str) else None
    if match is not None:
        value = struct.unpack("<d", struct.pack("<Q", int(match.group(1), 16)))[0]
        if math.isnan(value):
            return value
    raise ValueError(f"{where}: {{{FLOAT_TAG!r}: ...}} must hold 'inf', '-inf', 'nan' or 'nan:0x<16 hex>', got {text!r:.80}")


def _to_tree(value: Any, where: str, depth: int, max_depth: int) -> Any:
    # bool before int (bool is an int); exact types so that str/int/float subclasses with their own
    # meaning (enums, numpy scalars) are refused rather than silently flattened.
    if value is None or type(value) in (bool, int, str):
        return value
    if type(value) is float:
        tagged = _float_to_json(value)
        if isinstance(tagged, dict) and depth + 1 > max_depth:
            raise ValueError(f"{where}: nesting deeper than max_depth={max_depth}")
        return tagged
    if isinstance(value, Mapping) or isinstance(value, (list, tuple)):
        if depth + 1 > max_depth:
            raise ValueError(f"{where}: nesting deeper than max_depth={max_depth}")
    if isinstance(value, Mapping):
        tree = {}
        for key, item in value.items():
            if type(key) is not str:
                raise TypeError(f"{where}: keys must be str, got {type(key).__name__} {key!r:.80}")
            out_key = "$" + key if key.startswith("$") else key
            tree[out_key] = _to_tree(item, f"{where}[{key!r}]", depth + 1, max_depth)
        return tree
    if isinstance(value, (list, tuple)):
        return [_to_tree(item, f"{where}[{i}]", depth + 1, max_depth) for i, item in enumerate(value)]
    raise TypeError(
        f"{where}: {type(value).__name__} is not JSON data (dict with str keys, list, tuple, str, int, "
        f"float, bool, None); convert it first (tensors: .tolist() or a safetensors file)"
    )


def encode_json(value: Any, *, limits: JsonLimits = JsonLimits(), indent: int | None = None) -> bytes:
    """Encode ``value`` as strict UTF-8 JSON that :func:`decode_json` reads back exactly.

    Raises ``TypeError`` for values that are not JSON data, ``ValueError`` for nesting deeper than
    ``limits.max_depth`` or output larger than ``limits.max_bytes`` (it would not decode).
    """
    tree = _to_tree(value, "$", 0, limits.max_depth)
    text = json.dumps(tree, allow_nan=False, ensure_ascii=False, indent=indent, separators=None if indent else (",", ":"))
    data = text.encode("utf-8")
    if len(data) > limits.max_bytes:
        raise ValueError(f"encoded JSON is {len(data)} bytes, over max_bytes={limits.max_bytes}")
    return data


def json_nesting_depth(text: str) -> int:
    """Deepest nesting of ``[``/``{`` in ``text``, ignoring brackets inside string literals.

    Runs in linear time at C speed (regular expressions, then one pass over the brackets alone), so
    it can bound the parser's recursion before the parser sees hostile input.
    """
    brackets = _NOT_BRACKET_RE.sub("", _STRING_RE.sub("", text)).translate(_DEPTH_STEP)
    steps = map({"\x01": 1, "\x02": -1}.__getitem__, brackets)
    return max(itertools.accumulate(steps, initial=0))


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON (strict JSON has no NaN/Infinity; they are written as {{{FLOAT_TAG!r}: ...}})")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text:.40} overflows a double")
    return value


def _decode_object(pairs: list[tuple[str, Any]]) -> Any:
    if len(pairs) == 1 and pairs[0][0] == FLOAT_TAG:
        return _float_from_tag(pairs[0][1], "tagged float")
    result: dict[str, Any] = {}
    for key, item in pairs:
        if key.startswith("$$"):
            key = key[1:]
        elif key.startswith("$"):
            raise ValueError(f"unknown tag {key!r:.80} (a key starting with one '$' is reserved; keys of the data start with '$$')")
        if key in result:
            raise ValueError(f"duplicate key {key!r:.80}")
        result[key] = item
    return result


def decode_json(data: bytes | str, *, source: str = "JSON", limits: JsonLimits = JsonLimits()) -> Any:
    """Decode strict JSON written by :func:`encode_json`, refusing hostile or damaged input.

    ``source`` (a file's URL) is named in every error. Raises
    :class:`~shardoptim.checkpoint.errors.CheckpointFormatError`.
    """
    size = len(data.encode("utf-8") if isinstance(data, str) else data)
    if size > limits.max_bytes:
        raise CheckpointFormatError(f"{source}: {size} bytes of JSON, over the limit of {limits.max_bytes}")
    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CheckpointFormatError(f"{source}: not UTF-8 ({exc})") from None
    else:
        text = data
    depth = json_nesting_depth(text)
    if depth > limits.max_depth:
        raise CheckpointFormatError(f"{source}: JSON nested {depth} deep, over the limit of {limits.max_depth}")
    try:
        return json.loads(
            text, object_pairs_hook=_decode_object, parse_constant=_reject_constant, parse_float=_finite_float
        )
    except (ValueError, RecursionError) as exc:
        raise CheckpointFormatError(f"{source}: invalid JSON: {exc}") from None
