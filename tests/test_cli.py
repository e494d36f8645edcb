"""The command line a new user meets: config errors before the heavy imports, `apbv config`, --help."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_apbv.cli import _parser, main
from megatron_apbv.runtime.config import RunConfig
from megatron_apbv.runtime.config_command import schema_rows
from megatron_apbv.models.resolve import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/tiny_cpu.yaml")
HEAVY = ("torch", "megatron", "deepspeed", "transformers", "safetensors")


def _imported_after(argv: list[str]) -> tuple[int, list[str], str]:
    """Exit code, heavy modules imported and stderr of ``main(argv)`` in a fresh interpreter."""
    code = (
        "import json, sys\n"
        "from megatron_apbv.cli import main\n"
        f"rc = main({argv!r})\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
        "sys.exit(rc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    return proc.returncode, json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", TINY, "apbv.windw=3"], "apbv.windw: unknown key"),
        (["bench", TINY, "--level", "layer", "model.num_query_groups=3"], "not divisible by model.num_query_groups=3"),
        (["eval", "model.hidden_size=-1"], "model.hidden_size"),
        (["plan", TINY, "dtype=float8", "--gpus", "8"], "dtype"),
    ],
)
def test_config_error_comes_before_the_heavy_imports(argv, message):
    rc, heavy, stderr = _imported_after(argv)
    assert rc == 2, stderr
    assert message in stderr
    assert heavy == [], f"imported {heavy} before reporting the config error"


def test_config_command_imports_nothing_heavy():
    rc, heavy, stderr = _imported_after(["config", TINY, "apbv.window=7"])
    assert rc == 0, stderr
    assert heavy == []


@pytest.mark.parametrize(
    "overrides",
    [[], ["apbv.variant=exact", "input.frame_size=[28,56]"], ["apbv.passing_schedule=[4,0.5]", "seed=7"]],
)
def test_config_output_loads_back_to_the_same_config(overrides, tmp_path, capsys):
    assert main(["config", TINY, *overrides]) == 0
    printed = capsys.readouterr().out
    (tmp_path / "resolved.yaml").write_text(printed)
    assert load_config(tmp_path / "resolved.yaml") == load_config(TINY, overrides)
    assert main(["config", TINY, *overrides, "--json"]) == 0
    line = capsys.readouterr().out
    assert line.count("\n") == 1
    assert RunConfig.model_validate(json.loads(line)) == load_config(TINY, overrides)


def test_config_command_reports_a_bad_key(capsys):
    assert main(["config", TINY, "apbv.windw=3"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "apbv.windw: unknown key" in captured.err


def test_schema_lists_every_key_with_its_default():
    rows = schema_rows()
    defaults = RunConfig().model_dump(mode="json")
    leaves = {}

    def walk(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict):
                walk(value, prefix + key + ".")
            else:
                leaves[prefix + key] = value

    walk(defaults)
    assert {row["key"]: row["default"] for row in rows} == leaves
    assert all(row["description"] for row in rows), [row["key"] for row in rows if not row["description"]]
    by_key = {row["key"]: row for row in rows}
    assert by_key["apbv.variant"]["type"] == "'apbv' | 'apb_like' | 'star' | 'exact'"
    assert by_key["model.num_layers"]["type"] == "int >= 1 <= 100000"


def test_schema_command_prints_every_key(capsys):
    assert main(["config", "--schema"]) == 0
    out = capsys.readouterr().out
    for row in schema_rows():
        assert f"{row['key']}: {row['type']} = " in out
    assert main(["config", "--schema", "--json"]) == 0
    assert [r["key"] for r in json.loads(capsys.readouterr().out)["keys"]] == [r["key"] for r in schema_rows()]


@pytest.mark.parametrize("command", ["run", "generate", "bench", "eval"])
def test_help_names_the_launcher(command):
    parser = _parser(None)  # the commands' own options need their modules (torch): not what is tested here
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    text = sub.choices[command].format_help()
    assert f"torchrun --nproc_per_node 2 -m megatron_apbv {command} configs/tiny_cpu.yaml" in text
    assert "launch/README.md" in text


def test_yaml_output_is_plain_yaml(capsys):
    assert main(["config", TINY]) == 0
    tree = yaml.safe_load(capsys.readouterr().out)
    assert tree["apbv"]["anchor"] == load_config(TINY).apbv.anchor
