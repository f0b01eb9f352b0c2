"""The ``shardoptim`` console script end to end, on checkpoints written by a real 2-rank run.

The commands run as real subprocesses of the installed script where the process boundary is the
point (exit status, stderr without a traceback, JSON on stdout); the rest call ``cli.main`` in
this process (the same code, without paying for a torch import per command).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

import shardoptim
from shardoptim import checkpoint
from shardoptim.checkpoint import cli
from shardoptim.checkpoint.consolidate import read_consolidated, read_model_file

from . import cli_scenarios, scenarios
from .test_resharding import assert_same

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(sys.executable).with_name("shardoptim")


def shardoptim_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The installed console script (``python -m shardoptim.checkpoint.cli`` where it is not installed)."""
    command = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "shardoptim.checkpoint.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=120, cwd=REPO)


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = cli.main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(scope="module")
def saved(worlds, tmp_path_factory):
    """Checkpoints of steps 4 and 7 of a 2-rank AdamW run, and the model's state at step 7."""
    root = tmp_path_factory.mktemp("cli")
    reference = worlds.get(2).run(cli_scenarios.train_and_save, str(root))[0]
    return {"step4": root / "step-4", "step7": root / "step-7", "reference": reference, "root": root}


def copy_of(source: Path, tmp_path: Path, name: str = "copy") -> Path:
    target = tmp_path / name
    shutil.copytree(source, target)
    return target


def record_of(directory: Path, file_prefix: str, tensor: str) -> tuple[Path, dict]:
    manifest = json.loads((directory / "MANIFEST.json").read_text())
    name = next(n for n in manifest["files"] if n.startswith(file_prefix))
    record = next(t for t in manifest["files"][name]["tensors"] if t["name"] == tensor)
    return directory / name, record


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


# -- inspect ------------------------------------------------------------------------------------------


def test_inspect_json_describes_the_2_rank_checkpoint(saved):
    result = shardoptim_cli("inspect", str(saved["step4"]), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert (info["world_size"], info["step"], info["extra"]) == (2, 4, {"step": 4})
    assert info["optimizer"]["algorithm"] == "AdamW" and info["optimizer"]["sharded"]
    assert info["optimizer"]["bucket_cap_numel"] == cli_scenarios.SHARDING["bucket_cap_numel"]
    assert [p["name"] for p in info["parameters"]][:3] == ["embed.weight", "body.0.weight", "body.2.weight"]
    assert all(len(b["ranks"]) == 2 for b in info["buckets"]) and len(info["buckets"]) > 5
    assert sorted(f["name"].split(".")[0] for f in info["files"]) == ["rank00000-of-00002", "rank00001-of-00002",
                                                                       "shared"]
    assert info["ema"]["kind"] == "sharded" and info["rng"]["ranks"] == 2


def test_inspect_prints_tables(saved, capsys):
    status, out, _ = run_main(capsys, "inspect", str(saved["step4"]))
    assert status == 0
    for expected in ("AdamW", "world size  2", "param groups", "weight_decay", "embed.weight", "buckets", "files",
                     "scheduler 0", "calls"):
        assert expected in out


# -- verify -------------------------------------------------------------------------------------------


def test_verify_passes_a_sound_checkpoint(saved):
    result = shardoptim_cli("verify", str(saved["step4"]))
    assert result.returncode == 0, result.stderr
    assert "ok:" in result.stdout and "every digest matches" in result.stdout


def test_verify_names_the_file_and_tensor_of_a_corrupted_byte(saved, tmp_path):
    damaged = copy_of(saved["step4"], tmp_path)
    path, record = record_of(damaged, "rank00001", "r1.b1.exp_avg")
    flip_byte(path, record["offset"] + 5)
    result = shardoptim_cli("verify", str(damaged))
    assert result.returncode == 1
    assert path.name in result.stderr and "r1.b1.exp_avg" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_verify_json_reports_a_truncated_file(saved, tmp_path, capsys):
    damaged = copy_of(saved["step4"], tmp_path)
    path = next(damaged.glob("rank00000-*"))
    path.write_bytes(path.read_bytes()[:-7])
    status, out, err = run_main(capsys, "verify", str(damaged), "--json")
    report = json.loads(out)
    assert status == 1 and not report["ok"] and "truncated" in err
    assert [f["ok"] for f in report["files"]] == [False, True, True]


def test_an_incomplete_checkpoint_is_refused_clearly(saved, tmp_path):
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    for path in saved["step4"].glob("*.safetensors"):
        shutil.copy(path, incomplete)
    result = shardoptim_cli("verify", str(incomplete))
    assert result.returncode == 1
    assert "not a complete checkpoint" in result.stderr and "MANIFEST.json" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_missing_path_fails_without_a_traceback(tmp_path):
    result = shardoptim_cli("consolidate", str(tmp_path / "nothing-here"), str(tmp_path / "out"))
    assert result.returncode == 1
    assert "nothing-here" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["inspect", "verify", "diff"])
def test_a_damaged_manifest_fails_without_a_traceback(saved, tmp_path, capsys, command):
    damaged = copy_of(saved["step4"], tmp_path)
    manifest = json.loads((damaged / "MANIFEST.json").read_text())
    layout = manifest["optimizer"]["buckets"][1]["layout"]
    layout["numel"], layout["bounds"] = 1 << 50, [[0, 1 << 49], [1 << 49, 1 << 50]]  # claims 4 PiB, consistently
    (damaged / "MANIFEST.json").write_text(json.dumps(manifest))
    args = [command, str(damaged)] + ([str(saved["step4"])] if command == "diff" else [])
    status, _, err = run_main(capsys, *args)
    assert status == 1 and "Traceback" not in err and "optimizer.buckets[1]" in err
    (damaged / "MANIFEST.json").write_text("{not json")
    status, _, err = run_main(capsys, *args)
    assert status == 1 and "MANIFEST.json" in err


def test_usage_errors_exit_2(saved, tmp_path, capsys):
    for args in (["reshard", str(saved["step4"]), str(tmp_path / "x")],
                 ["reshard", str(saved["step4"]), str(tmp_path / "x"), "--world-size", "0"],
                 ["inspect", str(saved["step4"]), "--storage-option", "no-equals-sign"],
                 ["diff", str(saved["step4"]), str(saved["step4"]), "--rtol", "-1"],
                 ["frobnicate"]):
        with pytest.raises(SystemExit) as exit_:
            cli.main(args)
        assert exit_.value.code == 2, args
    for command in ("inspect", "verify", "consolidate", "reshard", "convert", "diff"):
        with pytest.raises(SystemExit) as exit_:
            cli.main([command, "--help"])
        assert exit_.value.code == 0
        assert "--json" in capsys.readouterr().out


# -- consolidate --------------------------------------------------------------------------------------


def test_consolidated_checkpoint_continues_in_torch_optim_as_the_sharded_run(saved, tmp_path):
    out = tmp_path / "consolidated"
    result = shardoptim_cli("consolidate", str(saved["step4"]), str(out), "--pt")
    assert result.returncode == 0, result.stderr
    assert {p.name for p in out.iterdir()} == {"optimizer.safetensors", "optimizer.json", "optimizer.pt",
                                               "model.safetensors", "ema.safetensors"}
    state = torch.load(out / "optimizer.pt", weights_only=True)
    assert_same(read_consolidated(str(out)), state, "safetensors + JSON vs .pt")
    document = json.loads((out / "optimizer.json").read_text())
    assert document["keys"]["state.0.exp_avg"]["path"] == [0, "exp_avg"]
    assert isinstance(state["param_groups"][0]["betas"], tuple)
    assert 3 not in state["state"]  # the frozen weight was never stepped

    torch.manual_seed(123)
    model, _, _, _ = scenarios.build("AdamW", False)
    model.load_state_dict(read_model_file(str(out)))
    groups = [{"params": [p for p in model.parameters() if p.dim() > 1]},
              {"params": [p for p in model.parameters() if p.dim() <= 1], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1.0)
    opt.load_state_dict(state)
    start = cli_scenarios.SAVED_STEP
    cli_scenarios.continue_training(model, opt, range(start, start + cli_scenarios.CONTINUED))
    for key, value in saved["reference"].items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert not torch.equal(model.state_dict()["embed.weight"], read_model_file(str(out))["embed.weight"])


def test_consolidate_refuses_a_corrupted_state_tensor(saved, tmp_path, capsys):
    damaged = copy_of(saved["step4"], tmp_path)
    path, record = record_of(damaged, "rank00000", "r0.b1.exp_avg_sq")
    flip_byte(path, record["offset"])
    status, _, err = run_main(capsys, "consolidate", str(damaged), str(tmp_path / "out"))
    assert status == 1 and "r0.b1.exp_avg_sq" in err and "corrupted" in err


# -- reshard ------------------------------------------------------------------------------------------


def test_resharded_checkpoints_load_as_the_original_does(worlds, saved, tmp_path, capsys):
    to3, to1 = tmp_path / "to3", tmp_path / "to1"
    result = shardoptim_cli("reshard", str(saved["step4"]), str(to3), "--world-size", "3", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["world_size"] == 3
    status, _, err = run_main(capsys, "reshard", str(saved["step4"]), str(to1), "--world-size", "1")
    assert status == 0, err
    assert run_main(capsys, "verify", str(to3))[0] == 0 and run_main(capsys, "verify", str(to1))[0] == 0
    assert json.loads(run_main(capsys, "inspect", str(to1), "--json")[1])["optimizer"]["sharded"] is False

    def planned(directory: Path) -> list[dict]:
        return [b["layout"] for b in json.loads((directory / "MANIFEST.json").read_text())["optimizer"]["buckets"]]

    # the layouts an optimizer at that world size plans, so that a load reads each shard as it is
    assert planned(to3) == worlds.get(3).run(cli_scenarios.live_layouts)[0]
    assert planned(to1) == cli_scenarios.live_layouts()
    assert len(planned(to1)) < len(planned(saved["step4"]))  # the capped buckets merged
    original = worlds.get(3).run(cli_scenarios.load_full_state, str(saved["step4"]))
    resharded = worlds.get(3).run(cli_scenarios.load_full_state, str(to3))
    for rank, (a, b) in enumerate(zip(original, resharded)):
        assert_same(b, a, f"2->3 rank {rank}")
    assert_same(cli_scenarios.load_full_state(str(to1)), cli_scenarios.load_full_state(str(saved["step4"])), "2->1")
    status, _, err = run_main(capsys, "reshard", str(saved["step4"]), str(to1), "--world-size", "2")
    assert status == 1 and "committed checkpoint is there" in err


# -- convert ------------------------------------------------------------------------------------------


def torch_run() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(5)
    model, _, _, _ = scenarios.build("AdamW", False)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    cli_scenarios.continue_training(model, opt, range(2))
    return model, opt


def loaded_state(url: str, model: torch.nn.Module, cls: type) -> dict:
    fresh, _, _, _ = scenarios.build("AdamW", False)
    opt = cls(fresh.parameters(), lr=0.5)
    checkpoint.load(url, model=fresh, optimizer=opt)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    return opt.state_dict()


def test_convert_a_torch_save_state_dict(tmp_path):
    model, opt = torch_run()
    torch.save(opt.state_dict(), tmp_path / "optim.pt")
    torch.save(model.state_dict(), tmp_path / "model.pt")
    out = tmp_path / "converted"
    result = shardoptim_cli("convert", str(tmp_path / "optim.pt"), str(out), "--model-state", str(tmp_path / "model.pt"))
    assert result.returncode == 0, result.stderr
    assert "AdamW" in result.stdout
    for cls in (shardoptim.AdamW, torch.optim.AdamW):
        assert_same(loaded_state(str(out), model, cls)["state"], opt.state_dict()["state"], cls.__module__)


def test_convert_a_dcp_checkpoint(tmp_path, capsys):
    model, opt = torch_run()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ...": one process, as meant
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                 checkpoint_id=str(tmp_path / "dcp"))
    out = tmp_path / "converted"
    status, stdout, err = run_main(capsys, "convert", str(tmp_path / "dcp"), str(out), "--json")
    assert status == 0, err
    assert json.loads(stdout)["source_format"] == "dcp"
    info = json.loads(run_main(capsys, "inspect", str(out), "--json")[1])
    assert [p["name"] for p in info["parameters"]] == [name for name, _ in model.named_parameters()]
    assert info["optimizer"]["format"] == "torch" and info["step"] == 2
    assert_same(loaded_state(str(out), model, shardoptim.AdamW)["state"], opt.state_dict()["state"])


def test_convert_refuses_what_it_cannot_read_safely(tmp_path, capsys):
    model, opt = torch_run()
    state = opt.state_dict()
    torch.save(state, tmp_path / "optim.pt")
    status, _, err = run_main(capsys, "convert", str(tmp_path / "optim.pt"), str(tmp_path / "a"))
    assert status == 1 and "--model-state" in err  # the frozen parameters have no state to tell their shapes
    torch.save({"state": state["state"], "param_groups": state["param_groups"], "hook": shardoptim.ShardingConfig()},
               tmp_path / "pickled.pt")
    status, _, err = run_main(capsys, "convert", str(tmp_path / "pickled.pt"), str(tmp_path / "b"))
    assert status == 1 and "weights_only" in err and "Traceback" not in err
    assert not (tmp_path / "b").exists()


# -- diff ---------------------------------------------------------------------------------------------


def test_diff_of_a_checkpoint_with_itself_is_empty(saved):
    result = shardoptim_cli("diff", str(saved["step4"]), str(saved["step4"]))
    assert result.returncode == 0, result.stderr
    assert "equal:" in result.stdout


def test_diff_of_another_step_names_what_differs(saved, tmp_path, capsys):
    status, out, _ = run_main(capsys, "diff", str(saved["step4"]), str(saved["step7"]), "--json")
    found = json.loads(out)
    assert status == 1 and not found["equal"]
    differing = {(d["section"], d["key"]) for d in found["tensors"]}
    assert ("model", "embed.weight") in differing and ("optimizer", "0 (embed.weight).exp_avg") in differing
    assert ("model", "frozen.weight") not in differing
    assert {"path": "step", "section": "step", "a": 4, "b": 7} in found["values"]
    embed = next(d for d in found["tensors"] if d["key"] == "embed.weight")
    assert embed["max_abs"] > 0 and 0 < embed["count"] <= embed["numel"] == 66
    status, out, _ = run_main(capsys, "diff", str(saved["step4"]), str(saved["step7"]))
    assert status == 1 and "embed.weight" in out and "differ" in out


def test_diff_compares_across_world_sizes(saved, tmp_path, capsys):
    to3 = tmp_path / "to3"
    assert run_main(capsys, "reshard", str(saved["step4"]), str(to3), "--world-size", "3")[0] == 0
    status, out, _ = run_main(capsys, "diff", str(saved["step4"]), str(to3))
    assert status == 0 and "equal" in out and "RNG states not compared" in out


def test_mutated_manifests_are_refused_in_one_line(saved, tmp_path, capsys):
    """Field deletions, type swaps and extreme values anywhere in a real manifest: every command either
    works or refuses with one line naming a known fault (never an unexpected exception)."""
    import random

    base = json.loads((saved["step4"] / "MANIFEST.json").read_text())

    def paths(node, prefix=()):
        if prefix:
            yield prefix
        children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, child in children:
            yield from paths(child, (*prefix, key))

    where = list(paths(base))
    swaps = [None, -1, 1 << 62, 2.5, "x", "../../outside", [], {}, True, {"$tensor": "nope"}]
    chosen = random.Random(12).sample(where, 25)
    for case, path in enumerate(chosen):
        manifest = json.loads(json.dumps(base))
        parent = manifest
        for key in path[:-1]:
            parent = parent[key]
        if case % 3 == 0 and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = swaps[case % len(swaps)]
        directory = copy_of(saved["step4"], tmp_path, f"case{case}")
        (directory / "MANIFEST.json").write_text(json.dumps(manifest))
        for args in (["inspect", str(directory)], ["verify", str(directory)],
                     ["reshard", str(directory), str(tmp_path / f"out{case}"), "--world-size", "3"]):
            status, _, err = run_main(capsys, *args)
            assert status in (0, 1) and "unexpected" not in err, (path, args, err)
            assert status == 0 or len(err.strip().splitlines()) == 1, (path, args, err)
