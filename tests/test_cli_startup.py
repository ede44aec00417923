"""The command line answers --help and refuses a bad option or a missing argument without importing torch or
transformers; `heal`'s options come from `HealConfig`; --verbose still reaches the loaders when a command runs."""

import dataclasses
import json
import subprocess
import sys

import click
import transformers
from click.testing import CliRunner

from lorsa_surgery.cli import main
from lorsa_surgery.training.config import HealConfig

# Every command and group, its --help, an unknown option, and (where one is required) no argument at all.
STARTUP = """
import json, sys
import click
from click.testing import CliRunner
from lorsa_surgery.cli import main

def walk(command, path):
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from walk(sub, path + [name])

runner, codes = CliRunner(), {}
for path, command in walk(main, []):
    required = any(isinstance(p, click.Argument) and p.required for p in command.params)
    calls = {"help": ["--help"], "bad option": ["--no-such-option"]} | ({"missing argument": []} if required else {})
    codes[" ".join(path)] = {what: runner.invoke(main, path + args).exit_code for what, args in calls.items()}
print(json.dumps({"codes": codes, "loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))}))
"""


def test_help_and_argument_errors_do_not_import_torch():
    done = subprocess.run([sys.executable, "-c", STARTUP], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["loaded"] == []
    codes = result["codes"]
    assert {"", "train", "heal", "tasks train", "heads causal", "heads detect", "demo"} <= codes.keys()
    for command, by_call in codes.items():
        assert by_call.pop("help") == 0, command
        assert set(by_call.values()) == {2}, (command, by_call)  # click's usage error, before anything runs


def test_heal_options_are_generated_from_its_config():
    from lorsa_surgery.cli.heal import heal

    options = {p.name: p for p in heal.params if isinstance(p, click.Option)}
    for f in dataclasses.fields(HealConfig):
        assert f.name in options, f.name
        assert options[f.name].default == f.default and options[f.name].help, f.name
    assert {"--warmup", "--log-every", "--text", "--lora-rank", "--lorsa-lr"} <= {o for p in options.values() for o in p.opts}


def test_verbose_reaches_the_loaders_only_when_a_command_runs(tmp_path):
    logging = transformers.utils.logging
    before = logging.get_verbosity()
    try:
        logging.set_verbosity_info()
        CliRunner().invoke(main, ["inspect", "--help"])
        assert logging.get_verbosity() == logging.INFO  # help runs no command
        CliRunner().invoke(main, ["inspect", str(tmp_path / "nowhere")])
        assert logging.get_verbosity() == logging.ERROR
        CliRunner().invoke(main, ["--verbose", "inspect", str(tmp_path / "nowhere")])
        assert logging.get_verbosity() == logging.WARNING
    finally:
        logging.set_verbosity(before)
