"""The ``shardoptim`` console script: inspect, verify, consolidate, reshard, convert and diff checkpoints.

Each command prints a readable table, or JSON with ``--json``; takes ``--storage-option KEY=VALUE``
(repeatable, passed to fsspec; VALUE is read as JSON when it parses, else as a string); shows a
progress bar on copies that last more than a couple of seconds, unless ``--quiet`` or stderr is not a
terminal. Exit status: 0 success, 1 a damaged, incomplete or missing checkpoint (or, for ``diff``,
a difference), 2 a usage error. Faults are one line on stderr; ``--debug`` adds the traceback.

The operations themselves are library functions (``summary.summarize``,
``integrity.verify_checkpoint``, ``consolidate.consolidate``, ``world_size.reshard``,
``convert.convert``, ``compare.compare``); this module parses arguments and prints.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

EXIT_OK, EXIT_FAULT, EXIT_USAGE = 0, 1, 2
_ROWS = 40


class UsageError(Exception):
    """A command line that asks for something impossible (exit status 2)."""


# -- parsing ------------------------------------------------------------------------------------------


def _storage_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def _world_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


URL_HELP = "checkpoint directory (path or fsspec URL)"


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON instead of tables")
    common.add_argument("--storage-option", "-o", action="append", type=_storage_option, default=[],
                        metavar="KEY=VALUE", help="an fsspec storage option (repeatable; VALUE as JSON if it parses)")
    common.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    common.add_argument("--debug", action="store_true", help="show the traceback of a fault")
    parser = argparse.ArgumentParser(
        prog="shardoptim", description="Inspect, check and transform shardoptim checkpoints (any fsspec URL).",
        epilog="exit status: 0 success; 1 damaged, incomplete or missing checkpoint, or diff found a difference; "
               "2 usage error",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, run: Callable[[argparse.Namespace], int], **texts: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[common], **texts)
        sub.set_defaults(run=run)
        return sub

    p = command("inspect", _inspect, help="what a checkpoint holds (reads the manifest only)",
                description="Step, world size, save id, algorithm, param groups and hyper-parameters, "
                            "the parameter table, buckets, files, schedulers/EMA/RNG/extra.")
    p.add_argument("url", help=URL_HELP)
    p.add_argument("--all", action="store_true", help=f"show every row (tables stop at {_ROWS} rows by default)")

    p = command("verify", _verify, help="completeness and every digest (reads every byte)",
                description="Checks that the manifest is there (the save committed) and consistent, that "
                            "every file it lists is there with the recorded size, and every file's "
                            "digest. Exit 1 naming the first bad file (and tensor).")
    p.add_argument("url", help=URL_HELP)

    p = command("consolidate", _consolidate, help="one torch.optim-format state dict + the model's",
                description="Writes OUT/optimizer.safetensors (flat keys state.{index}.{name}), "
                            "OUT/optimizer.json (param_groups, scalars, key map), OUT/model.safetensors "
                            "(every key of the saved model) and OUT/ema.safetensors when there is an EMA.")
    p.add_argument("url", help=URL_HELP)
    p.add_argument("out", help="output directory (path or fsspec URL)")
    p.add_argument("--pt", action="store_true",
                   help="also write OUT/optimizer.pt, which torch.load(weights_only=True) reads and "
                        "torch.optim.<Algorithm>.load_state_dict accepts")
    p.add_argument("--overwrite", action="store_true", help="replace files already in OUT")

    p = command("reshard", _reshard, help="the checkpoint for another world size",
                description="Writes a new checkpoint for M ranks computed from the files alone, reading "
                            "only the ranges the new shards need; files first, the manifest last.")
    p.add_argument("url", help=URL_HELP)
    p.add_argument("out", help="directory of the new checkpoint")
    p.add_argument("--world-size", "-n", type=_world_size, required=True, metavar="M", help="ranks of the new one")

    p = command("convert", _convert, help="a torch.optim state dict or a DCP checkpoint -> ours",
                description="IN is a torch.save'd torch.optim state dict (read with weights_only=True) or "
                            "a torch.distributed.checkpoint directory of {'model': ..., 'optim': ...}. "
                            "The result loads with shardoptim.checkpoint.load into a shardoptim or "
                            "torch.optim optimizer of the algorithm. DCP keeps one rank's copy of a plain "
                            "tensor that ranks saved under the same key.")
    p.add_argument("source", metavar="IN", help="a torch.save file or a DCP directory")
    p.add_argument("out", help="directory of the new checkpoint")
    p.add_argument("--algorithm", help="the optimizer class name (AdamW, SGD, ...): needed when the param groups do "
                                       "not tell it")
    p.add_argument("--model-state", metavar="FILE",
                   help="a model state dict (torch.save'd, or .safetensors): parameter names, shapes and dtypes, "
                        "saved as the checkpoint's model")
    p.add_argument("--step", type=int, help="the step to record (default: the optimizer's, when all agree)")

    p = command("diff", _diff, help="which values differ between two checkpoints",
                description="Compares consolidated values (so across world sizes): model keys, "
                            "optimizer state per parameter and state name, EMA, and the JSON parts. "
                            "Exit 0 when equal within the tolerances, 1 when not.")
    p.add_argument("a", help="first checkpoint")
    p.add_argument("b", help="second checkpoint")
    p.add_argument("--rtol", type=_tolerance, default=0.0, help="relative tolerance (default 0: exact)")
    p.add_argument("--atol", type=_tolerance, default=0.0, help="absolute tolerance (default 0: exact)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``shardoptim`` command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except UsageError as error:
        _fault(args, error)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"shardoptim {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - a fault is one line, never a traceback (unless --debug)
        _fault(args, error)
        return EXIT_FAULT


def _fault(args: argparse.Namespace, error: BaseException) -> None:
    if args.debug:
        traceback.print_exception(error, file=sys.stderr)
    print(f"shardoptim {args.command}: {describe_error(error)}", file=sys.stderr)


def describe_error(error: BaseException) -> str:
    """One line for a fault: the message the checkpoint layer wrote, or the OS error with its path."""
    from .errors import CheckpointError

    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if isinstance(error, (CheckpointError, OSError, ValueError, EOFError, UsageError)):
        return text or type(error).__name__
    return f"unexpected {type(error).__name__}: {text} (run with --debug for the traceback)"


def _options(args: argparse.Namespace) -> dict[str, Any] | None:
    return dict(args.storage_option) or None


def _progress(args: argparse.Namespace) -> Any:
    from .progress import SILENT

    if args.quiet or args.json or not sys.stderr.isatty():
        return SILENT
    return _Bar()


class _Bar:
    """A tqdm bar in bytes that appears only for work lasting more than two seconds."""

    def __init__(self) -> None:
        self.bar: Any = None

    def start(self, total: int, what: str) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=what, unit="B", unit_scale=True, unit_divisor=1024, delay=2.0,
                        file=sys.stderr, leave=False, dynamic_ncols=True)

    def advance(self, nbytes: int) -> None:
        if self.bar is not None:
            self.bar.update(nbytes)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _print_json(value: Any) -> None:
    from .json_codec import encode_json

    print(encode_json(value, indent=1).decode())


# -- printing helpers ---------------------------------------------------------------------------------


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, limit: int | None = _ROWS, indent: str = "  "
           ) -> str:
    shown = list(rows if limit is None else rows[:limit])
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in shown]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [indent + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    if limit is not None and len(rows) > limit:
        lines.append(f"{indent}... {len(rows) - limit} more (--all shows every row)")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_cell(v) for v in value) + "]"
    return str(value)


def _size(nbytes: int) -> str:
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{nbytes} B"


def _fields(pairs: Sequence[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in pairs)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in pairs)


def _short_json(value: Any, limit: int = 200) -> str:
    from .json_codec import encode_json

    text = encode_json(value).decode()
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- commands -----------------------------------------------------------------------------------------


def _opened(args: argparse.Namespace, url: str) -> Any:
    from .consistency import check_consistency
    from .reader import open_checkpoint

    checkpoint = open_checkpoint(url, _options(args))
    check_consistency(checkpoint)
    return checkpoint


def _inspect(args: argparse.Namespace) -> int:
    from .summary import summarize

    info = summarize(_opened(args, args.url))
    if args.json:
        _print_json(info)
        return EXIT_OK
    limit = None if args.all else _ROWS
    optimizer, model = info["optimizer"], info["model"]
    head = [
        ("checkpoint", info["url"]),
        ("save", f"{info['save_id']} (format version {info['format_version']})"),
        ("step", _cell(info["step"]) + ("" if info["metric"] is None else f", metric {_cell(info['metric'])}")),
        ("world size", info["world_size"]),
    ]
    if optimizer is not None:
        how = ("sharded" if optimizer["sharded"] else "whole on every rank") if optimizer["format"] == "shardoptim" \
            else "torch.optim format (per parameter)"
        cap = f", bucket cap {optimizer['bucket_cap_numel']} elements" if optimizer.get("bucket_cap_numel") else ""
        head.append(("optimizer", f"{optimizer['algorithm']}, {len(optimizer['param_groups'])} param group(s), "
                                  f"{len(info['parameters'])} parameters, {how}{cap}"))
    else:
        head.append(("optimizer", "none"))
    if model is not None:
        kinds = [e["kind"] for e in model["entries"]]
        head.append(("model", f"{model['keys']} keys: {kinds.count('optimizer parameter')} optimizer parameters, "
                              f"{kinds.count('tensor')} other tensors, {kinds.count('tied')} tied"))
    else:
        head.append(("model", "none"))
    head.append(("files", f"{len(info['files'])}, {_size(info['total_bytes'])}"))
    print(_fields(head))
    if optimizer is not None:
        groups = optimizer["param_groups"]
        keys = list(dict.fromkeys(k for g in groups for k in g["hyperparameters"]))
        rows = [["params", *[g["params"] for g in groups]]]
        rows += [[key, *[g["hyperparameters"].get(key) for g in groups]] for key in keys]
        print("\nparam groups\n" + _table(["", *[f"group {i}" for i in range(len(groups))]], rows, limit=None))
    if info["parameters"]:
        rows = [[p["index"], p["group"], p["name"], list(p["shape"]), p["dtype"], p["numel"], p["bucket"], p["steps"]]
                for p in info["parameters"]]
        print("\nparameters\n" + _table(["index", "group", "name", "shape", "dtype", "numel", "bucket", "steps"],
                                        rows, limit=limit))
    if info["buckets"]:
        rows = []
        for b in info["buckets"]:
            per_rank = sorted({stop - start for start, stop in b["ranks"]})
            rows.append([b["index"], b["group"], b["dtype"], b["device"], b["trainable"], len(b["params"]), b["numel"],
                         b["padding"], f"{len(b['ranks'])} x {'/'.join(map(str, per_rank))}",
                         ", ".join(b["state"]) or "-"])
        print("\nbuckets\n" + _table(["bucket", "group", "dtype", "device", "trainable", "params", "elements",
                                      "padding", "ranks x elements", "state"], rows, limit=limit))
    if optimizer is not None and optimizer["per_parameter"]:
        print(f"\nper-parameter state (torch format) for parameters: {', '.join(optimizer['per_parameter'][:20])}"
              + (" ..." if len(optimizer["per_parameter"]) > 20 else ""))
    if model is not None:
        others = [e for e in model["entries"] if e["kind"] != "optimizer parameter"]
        if others:
            rows = [[e["key"], e["kind"], e.get("shape"), e.get("dtype") or "", e.get("same_as") or ""]
                    for e in others]
            print("\nmodel keys outside the optimizer\n" + _table(["key", "kind", "shape", "dtype", "same as"], rows,
                                                                  limit=limit))
    rows = [[f["name"], _size(f["size"]), f["digest"], f["tensors"]] for f in info["files"]]
    print("\nfiles\n" + _table(["name", "size", "digest", "tensors"], rows, limit=limit))
    tail = []
    for i, sched in enumerate(info["schedulers"]):
        shown = ", ".join(f"{k}={_short_json(v, 60)}" for k, v in sched.items() if k != "keys")
        tail.append((f"scheduler {i}", f"{shown} ({len(sched.get('keys', []))} keys)"))
    ema = info["ema"]
    tail.append(("ema", "none" if ema is None else _short_json(ema)))
    tail.append(("rng", f"{info['rng']['ranks']} rank(s): {', '.join(info['rng']['generators']) or '-'}"))
    tail.append(("extra", _short_json(info["extra"])))
    print("\n" + _fields(tail))
    return EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    from .integrity import verify_checkpoint

    report = verify_checkpoint(args.url, storage_options=_options(args), progress=_progress(args))
    if args.json:
        _print_json(report.to_json())
    else:
        if report.files:
            rows = [[f.name, _size(f.size), f.digest, "ok" if f.ok else "BAD"] for f in report.files]
            print(_table(["file", "size", "digest", "status"], rows, limit=None, indent=""))
        for name in report.unlisted:
            print(f"note: {name} is in the directory but not in the manifest (left by an unfinished save?)")
        if report.ok:
            total = sum(f.size for f in report.files)
            print(f"ok: {report.url}: complete, {len(report.files)} files, {_size(total)}, every digest matches")
    if not report.ok:
        print(f"shardoptim verify: {report.problem}", file=sys.stderr)
        return EXIT_FAULT
    return EXIT_OK


def _consolidate(args: argparse.Namespace) -> int:
    from .consolidate import consolidate

    result = consolidate(args.url, args.out, pt=args.pt, storage_options=_options(args), overwrite=args.overwrite,
                         progress=_progress(args))
    if args.json:
        _print_json({"out": result.out, "files": result.files})
    else:
        print(f"wrote {result.out}")
        print(_table(["file", "size"], [[name, _size(size)] for name, size in result.files.items()], limit=None))
    return EXIT_OK


def _reshard(args: argparse.Namespace) -> int:
    from .reader import open_checkpoint
    from .world_size import reshard

    before = open_checkpoint(args.url, _options(args)).manifest.world_size
    manifest = reshard(args.url, args.out, world_size=args.world_size, storage_options=_options(args),
                       progress=_progress(args))
    info = {
        "out": args.out, "world_size": manifest.world_size, "from_world_size": before, "save_id": manifest.save_id,
        "buckets": len((manifest.optimizer or {}).get("buckets", [])),
        "files": {name: record.size for name, record in sorted(manifest.files.items())},
    }
    if args.json:
        _print_json(info)
    else:
        print(f"wrote {args.out}: {before} -> {manifest.world_size} ranks, save {manifest.save_id}, "
              f"{info['buckets']} buckets")
        print(_table(["file", "size"], [[n, _size(s)] for n, s in info["files"].items()], limit=None))
    return EXIT_OK


def _convert(args: argparse.Namespace) -> int:
    from .convert import convert

    result = convert(args.source, args.out, algorithm=args.algorithm, model_state=args.model_state, step=args.step,
                     storage_options=_options(args), progress=_progress(args))
    manifest = result.manifest
    info = {
        "out": result.url, "source_format": result.source_format, "algorithm": result.algorithm,
        "parameters": len(manifest.params), "param_groups": len(manifest.optimizer["param_groups"]),
        "model_keys": len(manifest.model["entries"]) if manifest.model else 0, "step": manifest.step,
        "save_id": manifest.save_id, "notes": result.notes,
    }
    if args.json:
        _print_json(info)
    else:
        print(f"wrote {result.url} from a {result.source_format} input: {result.algorithm}, "
              f"{info['parameters']} parameters in {info['param_groups']} group(s), {info['model_keys']} model keys, "
              f"step {_cell(manifest.step)}")
        for note in result.notes:
            print(f"note: {note}")
    return EXIT_OK


def _diff(args: argparse.Namespace) -> int:
    from .compare import compare

    result = compare(args.a, args.b, rtol=args.rtol, atol=args.atol, storage_options=_options(args))
    if args.json:
        _print_json(result.to_json())
    else:
        print(f"A {result.a} ({result.world_sizes[0]} ranks)\nB {result.b} ({result.world_sizes[1]} ranks)")
        if result.tensors:
            rows = [[d.section, d.key, f"{d.count}/{d.numel}", d.max_abs, d.max_rel, d.note or ""]
                    for d in result.tensors]
            print("\ntensors that differ\n" + _table(["section", "key", "differ", "max abs", "max rel", "note"], rows,
                                                     limit=None))
        if result.values:
            rows = [[d.section, d.path, _short_json(d.a, 60), _short_json(d.b, 60)] for d in result.values]
            print("\nvalues that differ\n" + _table(["section", "path", "A", "B"], rows, limit=None))
        for note in result.notes:
            print(f"note: {note}")
        tolerance = "exactly" if not (args.rtol or args.atol) else f"within rtol={args.rtol:g}, atol={args.atol:g}"
        verdict = "equal" if result.equal else (f"{len(result.tensors)} tensor(s) and {len(result.values)} value(s) "
                                                f"differ")
        print(f"\n{verdict}: {result.tensors_compared} tensors compared {tolerance}")
    return EXIT_OK if result.equal else EXIT_FAULT


if __name__ == "__main__":
    sys.exit(main())
