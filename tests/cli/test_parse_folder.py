"""parse-folder: every image of any size and mode gives one line, bad files a line with the
reason, a killed run resumes to the uninterrupted output, and two gloo processes under torchrun
write the single process's lines. The scene parser is stood in for by tests/cli/fake_parser.py
(the schema's keys, computed from the pixels), so these tests check the batch machinery."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pyro_backpass.cli import main
from pyro_backpass.files import read_json_lines

FAKE = ["--parser", "tests.cli.fake_parser:parse_batch", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    (root / "sub").mkdir()
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(root / "rgb.png")
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(root / "sub/grey.jpg")
    Image.fromarray(rng.integers(0, 256, (50, 20, 4), dtype=np.uint8)).save(root / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)).convert("P").save(
        root / "palette.gif"
    )
    Image.fromarray(rng.integers(0, 60000, (12, 7), dtype=np.uint16)).save(root / "deep.tif")
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / "poison.png")
    (root / "bad.png").write_bytes(b"not an image at all")
    good = (root / "rgb.png").read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "notes.txt").write_text("not an image suffix: ignored")
    return root


def _lines(path):
    return {r["image_id"]: r for r in read_json_lines(path)}


def test_every_image_gives_one_line_and_bad_files_say_why(folder, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    main(["parse-folder", str(folder), "--out", str(out), "--batch", "3", "--workers", "1", *FAKE])
    lines = _lines(out)
    assert sorted(lines) == ["bad.png", "deep.tif", "palette.gif", "poison.png", "rgb.png",
                             "rgba.png", "sub/grey.jpg", "truncated.png"]  # fmt: skip
    assert lines["rgb.png"]["size"] == [30, 40] and lines["rgba.png"]["size"] == [50, 20]
    assert lines["sub/grey.jpg"]["stop_reason"] == "fake" and lines["deep.tif"]["size"] == [12, 7]
    for bad in ("bad.png", "truncated.png"):
        assert lines[bad]["stop_reason"] == "error" and "cannot read image" in lines[bad]["error"]
    assert "poisoned" in lines["poison.png"]["error"]  # the parser raised for this image only
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["images"] == 8 and summary["errors"] == 3 and summary["processes"] == 1
    with pytest.raises(SystemExit) as exc:  # one "error:" line, exit 2
        main(["parse-folder", str(folder), "--out", str(out), *FAKE])
    assert exc.value.code == 2 and "exists; pass --resume" in capsys.readouterr().err


def test_a_killed_run_resumes_to_the_uninterrupted_lines(folder, tmp_path):
    full, cut = tmp_path / "full.jsonl", tmp_path / "cut.jsonl"
    main(["parse-folder", str(folder), "--out", str(full), "--workers", "0", *FAKE])
    text = full.read_text()
    first_three = "".join(text.splitlines(keepends=True)[:3])
    cut.write_text(first_three + text.splitlines()[3][:10])  # killed in the middle of a line
    main(["parse-folder", str(folder), "--out", str(cut), "--workers", "0", "--resume", *FAKE])
    assert sorted(cut.read_text().splitlines()) == sorted(text.splitlines())


@pytest.mark.slow  # ~20 s: torchrun and two interpreters starting on two cores
def test_two_processes_under_torchrun_write_the_single_process_lines(folder, tmp_path):
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    main(["parse-folder", str(folder), "--out", str(one), "--workers", "0", *FAKE])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "pyro_backpass.cli", "parse-folder", str(folder), "--out", str(two),
           "--workers", "0", "--batch", "2", *FAKE]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["processes"] == 2
    assert sorted(two.read_text().splitlines()) == sorted(one.read_text().splitlines())
    assert not list(tmp_path.glob("two.jsonl.part*"))  # merged, parts removed


def test_merging_parts_keeps_the_first_line_of_each_id_sorted_and_removes_the_parts(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"image_id":"c","n":0}\n')
    (tmp_path / "out.jsonl.part0of2").write_text('{"image_id":"a","n":1}\n{"image_id":"c","n":2}\n')
    (tmp_path / "out.jsonl.part1of2").write_text('{"image_id":"b","n":3}\n{"image_id":"d",')
    main(["merge-parts", *map(str, sorted(tmp_path.glob("out.jsonl.part*")))])
    assert out.read_text().splitlines() == [
        '{"image_id":"a","n":1}', '{"image_id":"b","n":3}', '{"image_id":"c","n":0}'
    ]  # fmt: skip
    assert not list(tmp_path.glob("out.jsonl.part*"))


def test_the_default_parser_is_parse_record_of_parse_scenes(folder, tmp_path, monkeypatch):
    """The real wiring (``--parser scene``): each loader batch goes to ``parse_scenes`` in one
    call; a batch holding a bad image is retried image by image (the two names stood in for)."""
    import pyro_backpass.parsing as parsing

    calls = []

    def parse_scenes(gm, images):
        calls.append([tuple(image.shape) for image in images])
        if any(tuple(image.shape) == (3, 8, 8) for image in images):  # poison.png
            raise ValueError("poisoned")
        return [{"size": list(image.shape[-2:])} for image in images]

    def parse_record(parse, *, image_id):
        return {"image_id": image_id, "size": parse["size"], "stop_reason": "stub",
                "threshold": 0.0, "instances": []}  # fmt: skip

    monkeypatch.setattr(parsing, "parse_scenes", parse_scenes)
    monkeypatch.setattr(parsing, "parse_record", parse_record)
    out = tmp_path / "out.jsonl"
    main(["parse-folder", str(folder), "--out", str(out), "--workers", "0", "--no-progress",
          "--batch", "3", "--device", "cpu"])  # fmt: skip
    lines = _lines(out)
    assert lines["rgba.png"] == {"image_id": "rgba.png", "size": [50, 20], "stop_reason": "stub",
                                 "threshold": 0.0, "instances": []}  # fmt: skip
    assert (
        lines["poison.png"]["stop_reason"] == "error" and "poisoned" in lines["poison.png"]["error"]
    )
    assert lines["rgb.png"]["stop_reason"] == "stub" and lines["deep.tif"]["size"] == [12, 7]
    assert max(len(c) for c in calls) == 3  # a loader batch of readable images, one call
    bad = next(i for i, c in enumerate(calls) if (3, 8, 8) in c and len(c) > 1)
    assert calls[bad + 1 : bad + 1 + len(calls[bad])] == [[s] for s in calls[bad]]  # retried
