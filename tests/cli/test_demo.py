import pytest

from pyro_backpass.cli import main, resolve_device

FIGURES = ("parse_cluttered", "parse_plain", "queries", "occlusion", "imagination", "samples",
           "clamped_samples")  # fmt: skip


@pytest.mark.usefixtures("one_thread")
def test_demo_smoke_writes_figures(tmp_path, capsys):
    main(["demo", "--smoke", "--out", str(tmp_path), "--device", "cpu", "--print-shapes"])
    for name in FIGURES:
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "cluttered scene" in out and "occlusion" in out and "Trace Shapes" in out


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(SystemExit, match="unknown device"):
        resolve_device("tpu9")
