"""Count issue #12's QA list: bad inputs tried → clear error / warning / accepted by design.

Runs every case of ``tests/reliability_cases.py`` (library inputs), every subcommand with
every bad value its checked options admit (found from the parser, as
``tests/cli/test_arguments.py`` does) and the atomic-write checks of ``tests/test_files.py``,
and writes what each gave. A case that gives anything but its expected outcome is counted as
``wrong`` (a silent wrong answer or an unclear error) and listed.

Run: ``python benchmarks/reliability.py`` (about a minute); ``--smoke`` runs a few cases, no
file checks, and writes nothing unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine  # noqa: E402

OUT = RESULTS / "reliability.json"


def library_cases(*, limit: int | None = None) -> list[dict]:
    from tests.reliability_cases import CASES, run_case

    rows = []
    for case in CASES[:limit]:
        seen = run_case(case)
        rows.append({"id": case.id, "area": case.area, "expected": case.kind,
                     "outcome": seen if seen == case.kind else f"wrong ({seen})"})  # fmt: skip
    return rows


def cli_cases(*, limit: int | None = None) -> list[dict]:
    from pyro_backpass.cli import main
    from tests.cli.test_arguments import _bad_values, _name, _required, _subparsers

    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="pb_cli_"))
    for command, parser in sorted(_subparsers().items())[:limit]:
        for action, values in _bad_values(parser, tmp):
            option = _name(action)
            flag = [option] if action.option_strings else []
            argv = [command] + _required(parser, tmp, skip=action.dest) + flag + values
            err, code = io.StringIO(), None
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                try:
                    main(argv)
                except SystemExit as exc:
                    code = exc.code
            lines = err.getvalue().strip().splitlines()
            clear = code == 2 and len(lines) == 1 and re.match(rf".*{command}: error: ", lines[0])
            outcome = "error" if clear else f"wrong (exit {code}: {lines[-1:]})"
            name = " ".join([command, option, *values]).replace(str(tmp), "TMP")
            rows.append({"id": name, "area": "cli", "expected": "error", "outcome": outcome})
    return rows


def file_checks() -> list[dict]:
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider",
         str(ROOT / "tests" / "test_files.py"), "-rA"],
        capture_output=True, text=True, cwd=ROOT, check=False,
    )  # fmt: skip
    rows = []
    for line in out.stdout.splitlines():
        m = re.match(r"(PASSED|FAILED|ERROR) tests/test_files.py::(\S+)", line)
        if m:
            rows.append({"id": m.group(2), "area": "files", "expected": "error-free write",
                         "outcome": "ok" if m.group(1) == "PASSED" else "wrong"})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="results JSON")
    parser.add_argument("--smoke", action="store_true",
                        help="a few cases, no file checks, nothing written")  # fmt: skip
    args = parser.parse_args(argv)
    limit = 3 if args.smoke else None
    rows = library_cases(limit=limit) + cli_cases(limit=limit and 1)
    rows += [] if args.smoke else file_checks()
    counts = Counter(r["outcome"].split(" ")[0] for r in rows)  # "wrong (...)" -> "wrong"
    result = {
        "machine": machine(),
        "inputs_tried": len(rows),
        "counts": {
            "clear_error": counts["error"],
            "warning": counts["warning"],
            "accepted_handled_as_documented": counts["accepted"],
            "file_behaviour_checks_passed": counts["ok"],
            "silent_wrong_or_unclear": counts["wrong"],
        },
        "by_area": dict(Counter(r["area"] for r in rows)),
        "wrong": [r for r in rows if r["outcome"].startswith("wrong")],
        "cases": rows,
    }
    print({k: v for k, v in result.items() if k not in ("cases",)})
    out = args.out if args.out is not None else (None if args.smoke else OUT)
    if out is not None:
        from pyro_backpass.files import atomic_write_json

        atomic_write_json(out, result)
    return result


if __name__ == "__main__":
    main()
