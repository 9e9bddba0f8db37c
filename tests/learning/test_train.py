"""The training command: stages, checkpoints, resume, configuration checks, the shipped model."""

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from pyro_backpass import GenerativeModel, Scenes, fit_mask_readout, greedy_map
from pyro_backpass.cli import main
from pyro_backpass.data import split_seed
from pyro_backpass.learning import (
    PRESETS,
    mask_iou,
    render_object_set,
    top_clamped_passes,
    train_mask_readout,
    train_model,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "run"
    torch.set_num_threads(1)
    main(["train", "--preset", "smoke", "--out", str(out), "--no-progress", "--threads", "1"])
    return out


def test_the_command_writes_every_stage_and_a_loadable_model(trained):
    for name in ("config.json", "log.json", "observation.safetensors", "hard_em.safetensors",
                 "model.safetensors"):  # fmt: skip
        assert (trained / name).is_file(), name
    assert not list(trained.glob(".*.tmp"))
    log = json.loads((trained / "log.json").read_text())
    assert set(log["seconds"]) == {"observation", "hard_em", "mask_threshold", "mask_readout"}
    assert len(log["em"]) == PRESETS["smoke"].em.iterations + 1
    gm = GenerativeModel.load(trained / "model.safetensors")
    assert gm.backbone is not None and gm.config()["backbone"]["name"] == "default"
    # The last stage fits the mask readout and saves it with the model.
    assert gm.mask_readout is not None and gm.mask_readout.hidden == PRESETS["smoke"].readout_hidden
    assert gm.mask_readout.reads_input  # the preset's readout reads the input too (issue #10)
    assert float(gm.mask_readout.threshold) == log["mask_readout"]["threshold"]
    lam = float(gm.observations["conv1_1"].threshold)
    best = max(log["mask_threshold_iou"].items(), key=lambda kv: kv[1])[0]
    assert float(gm.observations["conv1_1"].mask_threshold) == pytest.approx(float(best) * lam)


def test_train_mask_readout_gives_the_readout_the_last_stage_fitted(trained):
    """A trained model without its readout, refitted by the training step alone: the same readout
    (the oracle: the uninterrupted training run)."""
    gm = GenerativeModel.load(trained / "model.safetensors")
    want = gm.mask_readout
    gm.attach_mask_readout(None)
    report = train_mask_readout(gm, gm.backbone, PRESETS["smoke"])
    log = json.loads((trained / "log.json").read_text())
    assert report == log["mask_readout"]
    for (name, a), (_, b) in zip(want.state_dict().items(), gm.mask_readout.state_dict().items(),
                                 strict=True):  # fmt: skip
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="fits no readout"):
        off = replace(PRESETS["smoke"], readout_objects_per_category=0)
        train_mask_readout(gm, gm.backbone, off)


def test_the_readout_learns_from_scene_objects_and_reports_their_iou(trained):
    """Scene objects enter the fit through the top-clamped passes: their count is the scenes'
    visible objects of the model's categories, and the reported validation-scene IoU is the
    fitted readout's on those passes (recomputed here from the passes themselves)."""
    gm = GenerativeModel.load(trained / "model.safetensors")
    gm.attach_mask_readout(None)
    val = render_object_set(gm.categories, 1, seed=split_seed("validation"), backbone=gm.backbone)
    train = render_object_set(gm.categories, 1, seed=split_seed("train"), backbone=gm.backbone)
    scenes, val_scenes = list(Scenes(2, seed=5)), list(Scenes(2, seed=6))
    readout, report = fit_mask_readout(
        gm, gm.backbone, train, val, scenes=scenes, validation_scenes=val_scenes, hidden=2,
        epochs=1,
    )  # fmt: skip
    visible = sum(1 for sc in scenes for i in sc.instances
                  if i.category in gm.categories and i.mask.any())  # fmt: skip
    assert visible > 0 and report["train_scene_objects"] == visible
    ious = [float(mask_iou(readout(r.td), inst.mask[None])[0])
            for inst, r in top_clamped_passes(gm, gm.backbone, val_scenes)]  # fmt: skip
    assert report["validation_scene_iou"] == pytest.approx(sum(ious) / len(ious), abs=1e-6)
    with pytest.raises(ValueError, match="no visible object"):
        empty = replace(Scenes(1, seed=6)[0], instances=())
        fit_mask_readout(gm, gm.backbone, train, val, validation_scenes=[empty], hidden=0)


def test_resume_after_the_first_stage_gives_the_uninterrupted_parameters(trained, tmp_path):
    again = tmp_path / "again"
    train_model(PRESETS["smoke"], out_dir=again, progress=False)
    for stage in ("hard_em", "model"):  # as if killed during hard EM
        (again / f"{stage}.safetensors").unlink()
    resumed = train_model(PRESETS["smoke"], out_dir=again, resume=True, progress=False)
    full = GenerativeModel.load(trained / "model.safetensors")
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(),
                                 strict=True):  # fmt: skip
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)


def _torchrun_train(out, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "pyro_backpass.cli", "train", "--preset", "smoke", "--out", str(out),
           "--no-progress", "--threads", "1", *extra]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _assert_same_parameters(a, b):
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow  # two processes of ~15 s on two cores, then a resume
def test_torchrun_with_two_processes_gives_the_single_process_parameters(trained, tmp_path):
    out = tmp_path / "two"
    summary = _torchrun_train(out)
    assert summary["processes"] == 2  # printed once, by rank 0
    full = GenerativeModel.load(trained / "model.safetensors")
    _assert_same_parameters(full, GenerativeModel.load(out / "model.safetensors"))
    assert not list(out.glob(".*.tmp"))
    for stage in ("hard_em", "model"):  # as if killed during hard EM
        (out / f"{stage}.safetensors").unlink()
    _torchrun_train(out, "--resume")
    _assert_same_parameters(full, GenerativeModel.load(out / "model.safetensors"))


def test_resume_with_another_configuration_is_refused(trained, capsys):
    for argv, message in [
        (["--resume", "--seed", "9"], "another configuration"),
        (["--resume", "--no-readout-input"], "another configuration"),
        ([], "holds checkpoints"),
    ]:
        with pytest.raises(SystemExit) as exc:
            main(["train", "--preset", "smoke", "--out", str(trained), "--no-progress", *argv])
        assert exc.value.code == 2 and message in capsys.readouterr().err


def test_a_run_written_before_the_top_level_options_still_resumes(trained, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    config = json.loads((trained / "config.json").read_text())
    assert (config["top_level"], config["top_offset_radius"]) == ("pool4", 2)
    del config["top_level"], config["top_offset_radius"]
    (old / "config.json").write_text(json.dumps(config))
    (old / "model.safetensors").write_bytes((trained / "model.safetensors").read_bytes())
    gm = train_model(PRESETS["smoke"], out_dir=old, resume=True, progress=False)
    assert gm.hidden_levels[-1] == "pool4"
    with pytest.raises(ValueError, match="differs in \\['top_level'\\]"):
        train_model(replace(PRESETS["smoke"], top_level="pool3"), out_dir=old, resume=True)


def test_a_run_written_before_the_mask_readout_resumes_without_one(trained, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    config = json.loads((trained / "config.json").read_text())
    for key in ("readout_objects_per_category", "readout_hidden", "readout_epochs"):
        del config[key]
    (old / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="differs in \\['readout_objects_per_category'\\]"):
        train_model(PRESETS["smoke"], out_dir=old, resume=True, progress=False)
    # What such a run used: no readout (`--readout-objects 0`).
    without = replace(PRESETS["smoke"], readout_objects_per_category=0)
    (old / "hard_em.safetensors").write_bytes((trained / "hard_em.safetensors").read_bytes())
    (old / "observation.safetensors").write_bytes(
        (trained / "observation.safetensors").read_bytes()
    )
    gm = train_model(without, out_dir=old, resume=True, progress=False)
    assert gm.mask_readout is None
    assert "mask_readout" not in json.loads((old / "log.json").read_text())["seconds"]


def test_an_unknown_top_level_is_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "bad"
    with pytest.raises(SystemExit) as exc:
        main(["train", "--preset", "smoke", "--out", str(out), "--top-level", "fc7"])
    assert exc.value.code == 2
    assert "choose one of ['conv1_1', 'pool1'" in capsys.readouterr().err
    assert not out.exists()


def test_a_missing_backbone_checkpoint_is_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "bad"
    with pytest.raises(SystemExit) as exc:
        main(["train", "--preset", "smoke", "--out", str(out), "--backbone", str(tmp_path / "no")])
    assert exc.value.code == 2
    assert "checkpoint written by `pyro-backpass train-backbone`" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow  # a backbone and a model smoke training (~20 s)
def test_a_model_of_a_trained_backbone_checkpoint_reloads_with_it(tmp_path):
    from pyro_backpass import Backbone, Scenes

    stem = tmp_path / "bb"
    main(["train-backbone", "--smoke", "--no-progress", "--out", str(stem), "--localised"])
    out = tmp_path / "model"
    main(["train", "--preset", "smoke", "--out", str(out), "--no-progress", "--threads", "1",
          "--backbone", str(stem)])  # fmt: skip
    gm = GenerativeModel.load(out / "model.safetensors")
    image = Scenes(1, seed=0)[0].image[None]
    torch.testing.assert_close(gm.backbone(image)["pool4"], Backbone.load(stem)(image)["pool4"])
    assert gm.config()["backbone"]["path"] == str(stem.resolve())


@pytest.mark.slow  # a second smoke training (~15 s)
def test_a_model_cut_at_pool3_trains_saves_and_runs_the_backward_pass(tmp_path):
    from pyro_backpass import Scenes

    out = tmp_path / "pool3"
    main(["train", "--preset", "smoke", "--out", str(out), "--no-progress", "--threads", "1",
          "--top-level", "pool3", "--top-offset-radius", "4", "--components", "3"])  # fmt: skip
    gm = GenerativeModel.load(out / "model.safetensors")
    assert gm.hidden_levels[-1] == "pool3" and len(gm.offsets["pool3"]) == 81
    # --components sets K below the top only (the smoke preset's top K is 2)
    assert gm.num_components["pool3"] == 2
    assert {gm.num_components[n] for n in gm.hidden_levels[:-1]} == {3}
    assert json.loads((out / "config.json").read_text())["top_level"] == "pool3"
    scene = Scenes(1, seed=0)[0]
    result = greedy_map(gm, gm.backbone(scene.image[None]), category="airplane")  # every level
    assert result.mask.shape == (1, 64, 64) and "pool4" not in result.td


def test_a_model_of_another_backbone_version_is_refused(trained, tmp_path):
    gm = GenerativeModel.load(trained / "model.safetensors")
    gm.__dict__["_backbone_record"] = {"name": "default", "sha256": "0" * 64}
    path = gm.save(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="another version of the 'default' backbone"):
        GenerativeModel.load(path)


def test_mask_iou_against_counts():
    a = torch.zeros(2, 4, 4, dtype=torch.bool)
    b = torch.zeros(2, 4, 4, dtype=torch.bool)
    a[0, :2, :2], b[0, 1:3, 1:3] = True, True  # 1 shared of 7
    torch.testing.assert_close(mask_iou(a, b), torch.tensor([1 / 7, 1.0]))
    with pytest.raises(ValueError, match="bool"):
        mask_iou(a.float(), b)


@pytest.mark.parametrize("backbone", ["default", "localised"])
def test_the_shipped_model_loads_with_its_backbone_and_runs_the_backward_pass(backbone):
    from pyro_backpass import Backbone, RenderedObjects, greedy_map
    from pyro_backpass.learning import PRESETS
    from pyro_backpass.model.generative_model import backbone_fingerprint

    gm = GenerativeModel.default(backbone=backbone)
    assert gm.backbone is not None and gm.config()["backbone"]["name"] == backbone
    assert gm.config()["backbone"]["sha256"] == backbone_fingerprint(Backbone.shipped(backbone))
    assert "path" not in gm.config()["backbone"]  # inside the package, found by name
    top = gm.hidden_levels[-1]
    assert gm.num_components[top] == PRESETS["default"].components_top
    image, mask = RenderedObjects("airplane", 1, seed=3)[0]
    with torch.no_grad():
        bu = {k: v for k, v in gm.backbone(image[None]).items() if k in gm.hidden_levels}
    result = greedy_map(gm, bu, category="airplane")
    assert result.mask.shape == (1, 64, 64) and torch.isfinite(result.log_joint).all()
    assert float(mask_iou(result.mask, mask[None])[0]) > 0.2  # it finds the object's pixels


def test_only_shipped_models_and_backbones_are_named():
    from pyro_backpass import Backbone

    with pytest.raises(ValueError, match=r"no shipped model of backbone 'compositional'"):
        GenerativeModel.default(backbone="compositional")
    with pytest.raises(ValueError, match=r"no shipped backbone 'zebra'.*'localised'"):
        Backbone.shipped("zebra")
    with pytest.raises(ValueError, match="not both"):
        Backbone.default(compositional=True, localised=True)


def test_a_run_written_before_the_readout_read_the_input_resumes_as_it_was(trained, tmp_path):
    """Runs written before ``readout_input`` existed used a readout of F̂ alone: resuming one
    under today's preset (which reads the input) is refused by name, and ``--no-readout-input``
    (``readout_input=False``) is the configuration that run had."""
    old = tmp_path / "old"
    old.mkdir()
    config = json.loads((trained / "config.json").read_text())
    assert config["readout_input"] is True
    del config["readout_input"]
    (old / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="differs in \\['readout_input'\\]"):
        train_model(PRESETS["smoke"], out_dir=old, resume=True, progress=False)
    (old / "model.safetensors").write_bytes((trained / "model.safetensors").read_bytes())
    before = replace(PRESETS["smoke"], readout_input=False)
    train_model(before, out_dir=old, resume=True, progress=False)  # accepted: nothing to redo


def test_the_shipped_model_is_the_default_preset_s_kind():
    """The shipped model's mask readout is the kind the default preset fits (it reads the
    input's activations beside F̂) and its configuration records it."""
    gm = GenerativeModel.default()
    assert PRESETS["default"].readout_input is True
    assert gm.mask_readout is not None and gm.mask_readout.reads_input
    assert gm.mask_readout.hidden == PRESETS["default"].readout_hidden
