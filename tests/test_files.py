"""JSON lines written one durable line at a time: a partial last line (a killed writer) is
dropped on reading and cut on repair; appends after a repair give whole lines."""

import json

from pyro_backpass.files import JsonLinesAppender, read_json_lines, whole_lines


def test_a_partial_last_line_is_dropped_and_cut_on_repair(tmp_path):
    path = tmp_path / "x.jsonl"
    with JsonLinesAppender(path) as f:
        f.write({"a": 1})
        f.write({"b": [1, 2]})
    with open(path, "a") as f:
        f.write('{"c": ')  # killed mid-line
    assert read_json_lines(path) == [{"a": 1}, {"b": [1, 2]}]
    assert path.read_text().endswith('{"c": ')  # reading alone leaves the file be
    read_json_lines(path, repair=True)
    with JsonLinesAppender(path) as f:
        f.write({"d": None})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"a": 1}, {"b": [1, 2]}, {"d": None}
    ]  # fmt: skip


def test_missing_and_lineless_files_read_as_empty(tmp_path):
    assert whole_lines(tmp_path / "none.jsonl") == []
    (tmp_path / "half.jsonl").write_text('{"half"')
    assert whole_lines(tmp_path / "half.jsonl", repair=True) == []
    assert (tmp_path / "half.jsonl").read_text() == ""
