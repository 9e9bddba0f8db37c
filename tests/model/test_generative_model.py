import json

import pytest
import torch
from pyro import poutine
from safetensors.torch import save_file

from pyro_backpass import (
    Backbone,
    GenerativeModel,
    SmallVGG,
    exact_map,
    greedy_map,
    log_joint,
    sample,
)


def small(**kw):
    return GenerativeModel.random([3, "M", 4, "M"], num_components=3, num_categories=2,
                                  image_size=8, **kw)  # fmt: skip


def test_structure():
    gm = small()
    assert [s.name for s in gm.levels] == [
        "image",
        "conv1_1",
        "pool1",
        "conv2_1",
        "pool2",
        "category",
    ]
    assert gm.categories == ("c0", "c1")
    assert len(gm.offsets["pool2"]) == 25 and len(gm.offsets["pool1"]) == 9
    assert gm.offsets["conv1_1"] == [(0, 0)] and gm.offsets["image"] == [(0, 0)]
    assert gm.gamma_parents("pool2") == ("category",)
    assert gm.gamma_parents("conv2_1") == ("gamma_pool2",)
    gm2 = GenerativeModel.random([3, "M"], num_components={"image": 2, "conv1_1": 3, "pool1": 4},
                                 ngram_order=2, image_size=8)  # fmt: skip
    assert gm2.gamma_parents("conv1_1") == ("gamma_pool1", "category")
    assert gm2.priors["gamma_image"].log_probs().shape == (3, 4, 2)


def test_random_phi_has_unit_rms_on_every_level():
    gm = GenerativeModel.random([3, "M", 4, "M"], num_components=3, num_categories=2,
                                image_size=16, scale_td=0.01)  # fmt: skip
    s = sample(gm, 64, seed=0)
    for name in gm.hidden_levels:
        rms = s.td[name].pow(2).mean().sqrt().item()
        assert 0.5 < rms < 2.0, (name, rms)


def test_model_sites_and_enumeration_shapes():
    gm = small()
    s = sample(gm, 2, observe=True, seed=0)
    trace = poutine.trace(gm.model).get_trace(s.bu)
    names = [n for n in trace.nodes if trace.nodes[n]["type"] == "sample"]
    assert names[:4] == ["images", "category", "gamma_pool2", "delta_pool2"]
    assert trace.nodes["bu_image"]["is_observed"]
    assert trace.nodes["gamma_pool1"]["infer"]["enumerate"] == "parallel"
    tiny = GenerativeModel.random([2, "M"], num_components=2, image_size=4)
    shapes = tiny.format_shapes({"pool1": torch.rand(1, 2, 2, 2)})
    assert "delta_pool1" in shapes and "bu_pool1" in shapes


def test_sample_tables_draws_dirichlet_rows():
    gm = small()
    trace = poutine.trace(gm.model).get_trace(batch_size=2, sample_tables=True)
    table = trace.nodes["table_gamma_conv2_1"]["value"]
    assert table.shape == (3, 3)
    torch.testing.assert_close(table.sum(-1), torch.ones(3))
    assert not torch.allclose(table, gm.priors["gamma_conv2_1"].probs)


def test_save_load_round_trip(tmp_path):
    gm = small()
    path = gm.save(tmp_path / "m.safetensors")
    gm2 = GenerativeModel.load(path)
    for k, v in gm.state_dict().items():
        assert torch.equal(v, gm2.state_dict()[k]), k
    s = sample(gm, 2, observe=True, seed=0)
    a, b = greedy_map(gm, s.bu), greedy_map(gm2, s.bu)
    assert all(torch.equal(a.assignment[k], b.assignment[k]) for k in gm.sites)
    assert gm2.offsets == gm.offsets and gm2.categories == gm.categories
    assert not list(tmp_path.glob(".*tmp"))  # no temporary left behind


def test_bad_files_give_clear_errors(tmp_path):
    gm = small()
    path = gm.save(tmp_path / "m.safetensors")
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors"):
        GenerativeModel.load(tmp_path / "trunc.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"hello world, not a model")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        GenerativeModel.load(tmp_path / "junk.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a pyro_backpass GenerativeModel"):
        GenerativeModel.load(tmp_path / "other.safetensors")
    config = gm.config() | {"format_version": 99}
    state = {k: v.contiguous() for k, v in gm.state_dict().items()}
    meta = {"pyro_backpass.GenerativeModel": json.dumps(config)}
    save_file(state, str(tmp_path / "v99.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="format version 99"):
        GenerativeModel.load(tmp_path / "v99.safetensors")
    config = gm.config() | {"num_components": {k: 4 for k in gm.num_components}}
    meta = {"pyro_backpass.GenerativeModel": json.dumps(config)}
    save_file(state, str(tmp_path / "mismatch.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="do not match"):
        GenerativeModel.load(tmp_path / "mismatch.safetensors")
    with pytest.raises(FileNotFoundError):
        GenerativeModel.load(tmp_path / "missing.safetensors")


def test_constructor_errors():
    with pytest.raises(ValueError, match="num_components"):
        GenerativeModel.random([3], num_components={"image": 2}, image_size=8)
    with pytest.raises(ValueError, match="offsets: unknown level"):
        GenerativeModel.random([3], num_components=2, image_size=8, offsets={"pool7": 1})
    with pytest.raises(ValueError, match="too small"):
        GenerativeModel.random([3, "M", 3, "M"], num_components=2, image_size=2)


def test_per_channel_background_survives_save_and_load(tmp_path):
    gm = GenerativeModel.random([3, "M"], num_components=2, num_categories=2, image_size=8)
    obs = gm.observations["conv1_1"]
    obs.per_channel_background()
    obs.background.copy_(torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1))
    obs.scale_off.copy_(torch.tensor([0.4, 0.5, 0.6]).view(3, 1, 1))
    back = GenerativeModel.load(gm.save(tmp_path / "m.safetensors"))
    assert back.observations["conv1_1"].background.flatten().tolist() == pytest.approx(
        [0.1, 0.2, 0.3]
    )
    assert back.observations["conv1_1"].scale_off.shape == (3, 1, 1)
    assert back.observations["pool1"].background.dim() == 0  # the other levels stay pooled


def _two_pool_backbone():
    net = SmallVGG([2, "M", 2, "M"], num_classes=2)
    return Backbone.from_small_vgg(net, categories=["c0", "c1"], image_size=8,
                                   mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])  # fmt: skip


def test_a_model_cut_at_a_top_level_has_the_backbones_shapes_up_to_it(tmp_path):
    bb = _two_pool_backbone()
    gm = GenerativeModel.for_backbone(bb, num_components=2, top_level="pool1")
    assert [s.name for s in gm.levels] == ["image", "conv1_1", "pool1", "category"]
    acts = bb(torch.rand(3, 3, 8, 8))  # every level of the backbone, pool2 included
    for spec in gm.levels[:-1]:
        assert spec.shape == tuple(acts[spec.name].shape[1:]), spec.name
    assert gm.steps["pool1"].kind == "template"
    assert tuple(gm.steps["pool1"].weight.shape[-3:]) == tuple(acts["pool1"].shape[1:])
    # Saved and loaded, the cut model keeps its levels and parameters.
    gm2 = GenerativeModel.load(gm.save(tmp_path / "cut.safetensors"))
    assert gm2.levels == gm.levels and gm2.offsets == gm.offsets
    for k, v in gm.state_dict().items():
        assert torch.equal(v, gm2.state_dict()[k]), k
    gm2.attach_backbone(bb, name="custom")  # the backbone still matches the cut model
    with pytest.raises(ValueError, match=r"'pool3' is not a level.*\['conv1_1', 'pool1'"):
        GenerativeModel.for_backbone(bb, num_components=2, top_level="pool3")


def test_a_model_of_a_backbone_checkpoint_reattaches_it_from_the_recorded_path(tmp_path):
    bb = _two_pool_backbone()
    stem = tmp_path / "bb"
    bb.save(stem)
    gm = GenerativeModel.for_backbone(Backbone.load(stem), num_components=2,
                                      backbone_name="mine", backbone_path=stem)  # fmt: skip
    path = gm.save(tmp_path / "gm.safetensors")
    loaded = GenerativeModel.load(path)
    assert loaded.backbone is not None
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(loaded.backbone(x)["pool2"], bb(x)["pool2"])
    record = loaded.config()["backbone"]
    assert record["name"] == "mine" and record["path"] == str(stem.resolve())
    # The checkpoint replaced by another backbone: refused, naming the path.
    other = _two_pool_backbone()
    other.save(stem)
    with pytest.raises(ValueError, match="another version of .*bb.*fingerprints differ"):
        GenerativeModel.load(path)
    with pytest.raises(ValueError, match="fingerprints differ"):
        GenerativeModel.load(path, backbone=other)
    # Half gone: damaged, said so; gone: the model loads without one; given explicitly, the
    # right one is attached.
    stem.with_suffix(".json").unlink()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        GenerativeModel.load(path)
    for f in tmp_path.glob("bb.*"):
        f.unlink()
    assert GenerativeModel.load(path).backbone is None
    assert GenerativeModel.load(path, backbone=bb).backbone is bb
    # A model saved without a backbone takes the one given, named custom.
    bare = GenerativeModel.for_backbone(bb, num_components=2)
    bare.__dict__["_backbone_record"] = None
    again = GenerativeModel.load(bare.save(tmp_path / "bare.safetensors"), backbone=bb)
    assert again.backbone is bb and again.config()["backbone"]["name"] == "custom"


def test_a_cut_model_is_the_model_of_the_shorter_network_and_ignores_the_levels_above():
    """Cut at pool1, the model of a two-pool backbone takes the parameters of a random model of
    the one-pool network (same state-dict shapes), and with the backbone's pool2 and conv2_1 in
    ``bu`` it finds what that model finds on its own levels — the joint MAP, by enumeration."""
    bb = _two_pool_backbone()
    cut = GenerativeModel.for_backbone(bb, num_components=2, top_level="pool1")
    ref = GenerativeModel.random([2, "M"], num_components=2, num_categories=2, image_size=8,
                                 seed=3)  # fmt: skip
    cut.load_state_dict(ref.state_dict())
    s = sample(ref, 2, observe=True, seed=1)
    extra = {k: v for k, v in bb(torch.rand(2, 3, 8, 8)).items() if k in ("conv2_1", "pool2")}
    full_bu = {**s.bu, **extra}
    greedy = greedy_map(cut, full_bu)
    exact = exact_map(ref, s.bu)  # Pyro's infer_discrete over all 400 joint states
    for site in ref.sites:
        assert torch.equal(greedy.assignment[site], exact.assignment[site]), site
    torch.testing.assert_close(greedy.log_joint, exact.log_joint, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(log_joint(cut, full_bu, greedy.assignment), greedy.log_joint,
                               rtol=1e-5, atol=1e-3)  # fmt: skip
    with pytest.raises(ValueError, match="unknown level name"):
        greedy_map(cut, {**full_bu, "pool_2": extra["pool2"]})  # a typo is still an error
