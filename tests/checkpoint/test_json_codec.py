"""Manifest JSON: strict both ways, lossless floats (inf/NaN included), limits on decode."""

from __future__ import annotations

import json
import math
import random
import struct

import pytest
import torch

from shardoptim.checkpoint.errors import CheckpointFormatError
from shardoptim.checkpoint.json_codec import JsonLimits, decode_json, encode_json, json_nesting_depth


def _bits(value: float) -> int:
    return struct.unpack("<Q", struct.pack("<d", value))[0]


def _from_bits(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<Q", bits))[0]


SPECIAL_FLOATS = [
    math.inf, -math.inf, math.nan, -math.nan, _from_bits(0x7FF0000000000001), _from_bits(0xFFF8000000000000),
    0.0, -0.0, 5e-324, -5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, 0.1, 1 / 3, 1e22, 2.0**-1074,
]


def test_every_float_round_trips_bit_for_bit():
    rng = random.Random(0)
    floats = SPECIAL_FLOATS + [_from_bits(rng.getrandbits(64)) for _ in range(2000)]
    decoded = decode_json(encode_json({"values": floats}))["values"]
    assert [_bits(v) for v in decoded] == [_bits(v) for v in floats]


def test_output_is_strict_json_that_any_parser_reads():
    data = encode_json({"best": math.inf, "worst": -math.inf, "loss": math.nan, "lr": [1e-3]})

    def refuse(name):
        raise ValueError(name)

    plain = json.loads(data, parse_constant=refuse)
    assert plain == {"best": {"$float": "inf"}, "worst": {"$float": "-inf"}, "loss": {"$float": "nan"}, "lr": [1e-3]}
    assert decode_json(data)["best"] == math.inf


def test_a_realistic_tree_round_trips():
    tree = {
        "scheduler": {"best": math.inf, "num_bad_epochs": 0, "mode": "min", "cooldown_counter": 0,
                      "last_epoch": 12, "_last_lr": [0.001, 0.0005], "milestones": {"30": 1, "80": 2}},
        "extra": {"step": 10_000, "epoch": 3, "loader": [[1, 2], [3, None]], "flag": True, "name": "run \u00e9 \U0001f600"},
        "big": 2**80, "empty": {}, "nothing": [],
    }
    assert decode_json(encode_json(tree)) == tree
    assert decode_json(encode_json(tree, indent=2)) == tree


def test_tuples_come_back_as_lists():
    assert decode_json(encode_json({"betas": (0.9, 0.999)})) == {"betas": [0.9, 0.999]}


def test_user_keys_that_look_like_tags_are_escaped():
    tree = {"$float": "inf", "$$x": 1, "$": [{"$float": 2}], "plain": {"$float": "nan"}}
    data = encode_json(tree)
    assert decode_json(data) == tree


@pytest.mark.parametrize(
    "value, where",
    [
        ({"a": torch.zeros(1)}, "['a']"),
        ({"a": {1, 2}}, "['a']"),
        ({"a": b"bytes"}, "['a']"),
        ({1: "int key"}, "keys must be str"),
        ({"a": [1, {"b": object()}]}, "['a'][1]['b']"),
    ],
)
def test_values_that_are_not_json_data_are_refused_with_their_place(value, where):
    with pytest.raises(TypeError) as info:
        encode_json(value)
    assert where in str(info.value)


def test_encode_refuses_what_decode_would_refuse():
    deep: list = []
    for _ in range(10):
        deep = [deep]
    with pytest.raises(ValueError, match="max_depth"):
        encode_json(deep, limits=JsonLimits(max_depth=5))
    with pytest.raises(ValueError, match="max_bytes"):
        encode_json("x" * 100, limits=JsonLimits(max_bytes=50))
    assert decode_json(encode_json(deep, limits=JsonLimits(max_depth=11)), limits=JsonLimits(max_depth=11)) == deep


def test_size_limit_is_checked_before_parsing():
    with pytest.raises(CheckpointFormatError, match="MANIFEST.json.*over the limit"):
        decode_json(b"[" + b"1," * 1000 + b"1]", source="MANIFEST.json", limits=JsonLimits(max_bytes=1000))


def test_deep_nesting_is_refused_without_recursion():
    hostile = "[" * 200_000 + "]" * 200_000
    with pytest.raises(CheckpointFormatError, match="nested 200000 deep"):
        decode_json(hostile, source="m.json")
    # brackets inside strings do not count
    assert decode_json('{"s": "[[[[[[[[[[{{{{{{"}', limits=JsonLimits(max_depth=1)) == {"s": "[[[[[[[[[[{{{{{{"}
    assert json_nesting_depth('{"a": [1, {"b": "]]]"}], "c": "\\"[["}') == 3


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"a": 1, "a": 2}', "duplicate key"),
        ('{"x": {"a": 1, "a": 2}}', "duplicate key"),
        ('{"a": NaN}', "NaN is not JSON"),
        ('{"a": Infinity}', "Infinity is not JSON"),
        ('{"a": -Infinity}', "Infinity is not JSON"),
        ('{"a": 1e999}', "overflows a double"),
        ('{"a": ' + "1" * 5000 + "}", "invalid JSON"),
        ('{"$bogus": 1}', "unknown tag"),
        ('{"$float": "infinity"}', "must hold"),
        ('{"$float": "nan:0x0000000000000001"}', "must hold"),
        ('{"a": 1', "invalid JSON"),
        ("", "invalid JSON"),
    ],
)
def test_malformed_or_hostile_json_is_refused(text, message):
    with pytest.raises(CheckpointFormatError, match=message) as info:
        decode_json(text, source="ckpt/MANIFEST.json")
    assert "ckpt/MANIFEST.json" in str(info.value)


def test_invalid_utf8_is_refused():
    with pytest.raises(CheckpointFormatError, match="not UTF-8"):
        decode_json(b'{"a": "\xff"}', source="m.json")
