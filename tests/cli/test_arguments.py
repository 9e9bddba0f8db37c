"""Every subcommand, every bad value: one ``error:`` line on stderr, exit status 2, no traceback;
``--help`` shows defaults in plain text and every option has help.

The bad values are found from the parser itself (each option's checked type), so a new
subcommand built with :mod:`pyro_backpass.cli.arguments` is covered without editing this file.
"""

import argparse
import re

import pytest
import torch

from pyro_backpass.cli import arguments, build_parser, main


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _required(p: argparse.ArgumentParser, tmp_path, *, skip: str = "") -> list[str]:
    """Good values for the required options and positionals other than ``skip`` (so the bad
    one is the only problem)."""
    argv = []
    for a in p._actions:
        if a.dest == skip or not a.required:
            continue
        if a.option_strings:
            argv += [a.option_strings[0], str(tmp_path / "fresh")]
        elif a.type in (arguments.input_file, arguments.input_dir):
            good = tmp_path / "input.png"
            good.write_bytes(b"")
            argv.append(str(good if a.type is arguments.input_file else tmp_path))
    return argv


def _name(a: argparse.Action) -> str:
    return a.option_strings[-1] if a.option_strings else a.dest


def _bad_values(p: argparse.ArgumentParser, tmp_path) -> list[tuple[str, list[str]]]:
    existing = tmp_path / "existing.txt"
    existing.write_text("x")
    cuda_missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU, if any
    table = {
        arguments.positive_int: [["0"], ["-3"], ["x"]],
        arguments.non_negative_int: [["-1"], ["x"]],
        arguments.positive_float: [["0"], ["-1"], ["nan"], ["inf"]],
        arguments.any_device: [[cuda_missing], ["tpu"]]
        + ([] if torch.cuda.is_available() else [["cuda"]]),
        arguments.cpu_device: [["cuda"], ["tpu"]],
        arguments.output_dir: [[str(existing)], [str(existing / "below")]],
        arguments.checkpoint_stem: [[str(existing)], [str(tmp_path / "x.pth")]],
        arguments.input_file: [[str(tmp_path / "missing.png")], [str(tmp_path)]],
        arguments.input_dir: [[str(tmp_path / "missing")], [str(existing)]],
    }
    cases = []
    for a in p._actions:
        for values in table.get(a.type, []):
            cases.append((a, values))
    return cases


def test_every_subcommand_has_checked_options():
    # Each subcommand has at least one option of a checked type (device, out, counts).
    for name, p in _subparsers().items():
        checked = [a for a in p._actions if getattr(a.type, "__module__", "") == arguments.__name__]
        assert checked, f"{name} has no checked option"


@pytest.mark.parametrize("command", sorted(_subparsers()))
def test_every_bad_value_is_one_error_line_and_exit_2(command, tmp_path, capsys):
    p = _subparsers()[command]
    cases = _bad_values(p, tmp_path)
    assert cases
    for action, values in cases:
        option = _name(action)
        flag = [option] if action.option_strings else []
        argv = [command] + _required(p, tmp_path, skip=action.dest) + flag + values
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2, argv
        lines = err.strip().splitlines()
        assert len(lines) == 1 and re.match(rf"pyro-backpass {command}: error: ", lines[0]), (
            argv,
            err,
        )
        assert "Traceback" not in err and option in lines[0], (argv, err)


def test_run_time_input_errors_are_one_line_too(tmp_path, capsys):
    # A value only the library can judge (an unknown category) stops with one line, exit 2.
    argv = ["train-backbone", "--smoke", "--no-progress", "--out", str(tmp_path / "x")]
    with pytest.raises(SystemExit) as exc:
        main(argv + ["--categories", "airplane", "zebra"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "train-backbone: error: unknown categories ['zebra']" in err


def test_resume_without_a_run_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--out", str(tmp_path / "empty"), "--resume", "--preset", "smoke"])
    assert exc.value.code == 2 and "no run to resume" in capsys.readouterr().err


@pytest.mark.parametrize("command", sorted(_subparsers()))
def test_help_shows_defaults_in_plain_text(command, capsys):
    p = _subparsers()[command]
    for a in p._actions:
        assert a.help and a.help.strip(), f"{command} {a.option_strings}: no help"
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    assert "``" not in out and not re.search(r":(func|class|mod|meth|attr):`", out), out
    for a in p._actions:
        if a.default not in (None, False, argparse.SUPPRESS) and a.option_strings != [
            "-h",
            "--help",
        ]:
            assert "default" in (a.help or "") or "(default: " in out, (command, a.dest)
    assert "(default: None)" not in out and "(default: False)" not in out


def test_plain_text_unwraps_rest():
    doc = "Run :func:`~pyro_backpass.greedy_map` on ``bu``; see :class:`GenerativeModel`::\n"
    doc += "\n    x = 1\n\nReferences: Wang et al."
    text = arguments.plain_text(doc)
    assert text == "Run greedy_map on bu; see GenerativeModel:\n\n    x = 1\n"


def test_values_smoke_replaces_are_reported(tmp_path, capsys, monkeypatch):
    from pyro_backpass.cli import backbone_training

    monkeypatch.setattr(backbone_training, "train_backbone", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # stop before training: the note is under test
        main(["train-backbone", "--smoke", "--epochs", "7", "--out", str(tmp_path / "x")])
    assert "--smoke replaces the epochs given" in capsys.readouterr().err
