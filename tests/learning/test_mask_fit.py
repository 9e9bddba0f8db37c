"""fit_mask_readout recovers a mask rule it was not told (the oracle that made the masks)."""

import pytest
import torch

from pyro_backpass import GenerativeModel, fit_mask_readout
from pyro_backpass.learning import mask_fit


def _model():
    return GenerativeModel.random([3, "M", 4, "M"], num_components=2, num_categories=2,
                                  image_size=8, seed=0)  # fmt: skip


def _objects(n, seed):
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, 8, 8, generator=gen)
    return images, torch.zeros(n, 8, 8, dtype=torch.bool), torch.zeros(n, dtype=torch.long)


def _fake_reconstructions(monkeypatch):
    """Replace F̂ by random maps, fixed per image set; returns the replacement."""
    td_by_seed = {}

    def fake(gm_, backbone, images, labels, *, levels, batch_size=64, with_input=False):
        key = float(images.sum())
        if key not in td_by_seed:
            gen = torch.Generator().manual_seed(int(key * 1000) % 2**31)
            n = images.shape[0]
            td_by_seed[key] = {
                "conv1_1": torch.rand(n, 3, 8, 8, generator=gen),
                "pool1": torch.rand(n, 3, 4, 4, generator=gen),
                "input/conv1_1": torch.rand(n, 3, 8, 8, generator=gen),
                "input/pool1": torch.rand(n, 3, 4, 4, generator=gen),
            }
        keys = [*levels, *(f"input/{n}" for n in levels if with_input)]
        return {k: td_by_seed[key][k] for k in keys}

    monkeypatch.setattr(mask_fit, "object_reconstructions", fake)
    return fake


def test_the_fit_recovers_the_rule_that_made_the_masks(monkeypatch):
    """F̂ is replaced by random maps; the masks are "pool1's channel 2, repeated up, above 0.6"
    — the logistic readout must find that rule (it reads conv1_1 and pool1)."""
    gm = _model()
    fake = _fake_reconstructions(monkeypatch)
    train, val = _objects(40, 1), _objects(20, 2)
    for images, masks, _ in (train, val):
        pool = fake(gm, None, images, None, levels=["pool1"])["pool1"][:, 2] > 0.6
        masks.copy_(pool.repeat_interleave(2, 1).repeat_interleave(2, 2))
    readout, report = fit_mask_readout(gm, None, train, val, levels=["conv1_1", "pool1"],
                                       kernel_size=1, hidden=0, max_iter=200)  # fmt: skip
    assert report["validation_iou"] > 0.95 and report["train_iou"] > 0.95
    assert gm.mask_readout is readout and readout.hidden == 0
    assert set(report) == {"validation_iou", "validation_iou_threshold_rule", "train_iou",
                           "threshold"}  # fmt: skip


def test_a_readout_that_reads_the_input_recovers_a_rule_on_the_input(monkeypatch):
    """The masks are "the input's conv1_1 channel 1 above 0.5" (F̂ random, independent of it):
    a readout of F̂ alone cannot find them, one with ``reads_input`` does, and the model then
    reads its masks with it (the readout's channels: F̂ of both levels, then the input's)."""
    gm = _model()
    fake = _fake_reconstructions(monkeypatch)
    train, val = _objects(40, 1), _objects(20, 2)
    for images, masks, _ in (train, val):
        x = fake(gm, None, images, None, levels=["conv1_1"], with_input=True)["input/conv1_1"]
        masks.copy_(x[:, 1] > 0.5)
    kw = {"levels": ["conv1_1", "pool1"], "kernel_size": 1, "hidden": 0, "max_iter": 200}
    _, without = fit_mask_readout(gm, None, train, val, **kw)
    readout, report = fit_mask_readout(gm, None, train, val, reads_input=True, **kw)
    assert report["validation_iou"] > 0.95 > 0.6 > without["validation_iou"]
    assert readout.reads_input and gm.mask_readout is readout
    assert readout.config()["reads_input"] is True
    weight = readout.weight[0, :, 0, 0].abs()  # 12 channels: F̂ (3 + 3), then the input's
    assert int(weight.argmax()) == 7  # the input's conv1_1 channel 1
    with pytest.raises(ValueError, match="reads_input must be a bool"):
        fit_mask_readout(gm, None, train, val, reads_input=1, **kw)


def _band_masks(fake, gm, objects):
    """The oracle: "conv1_1's channel 0 within 0.2 of 0.5" — no linear filter separates it."""
    for images, masks, _ in objects:
        x = fake(gm, None, images, None, levels=["conv1_1"])["conv1_1"][:, 0]
        masks.copy_((x - 0.5).abs() < 0.2)


def test_the_net_learns_a_rule_no_logistic_filter_can(monkeypatch):
    gm = _model()
    fake = _fake_reconstructions(monkeypatch)
    train, val = _objects(60, 1), _objects(20, 2)
    _band_masks(fake, gm, (train, val))
    kw = {"levels": ["conv1_1", "pool1"], "kernel_size": 1}
    _, linear = fit_mask_readout(gm, None, train, val, hidden=0, **kw)
    net, report = fit_mask_readout(gm, None, train, val, hidden=8, epochs=150, lr=1e-2, **kw)
    assert report["validation_iou"] > 0.9 > 0.6 > linear["validation_iou"]
    assert net.hidden == 8 and gm.mask_readout is net
    again, _ = fit_mask_readout(gm, None, train, val, hidden=8, epochs=150, lr=1e-2, **kw)
    for a, b in zip(net.parameters(), again.parameters(), strict=True):  # seeded: reproducible
        assert torch.equal(a, b)


def test_bad_inputs_are_refused():
    gm = _model()
    train = _objects(4, 1)
    with pytest.raises(ValueError, match="unknown levels"):
        fit_mask_readout(gm, None, train, train, levels=["conv9_9"])
    bad = (train[0], train[1].float(), train[2])
    with pytest.raises(ValueError, match="bool"):
        fit_mask_readout(gm, None, bad, train)
    with pytest.raises(ValueError, match="one label per image"):
        fit_mask_readout(gm, None, train, (train[0], train[1], train[2][:2]))
    with pytest.raises(ValueError, match="epochs must be an int >= 1"):
        fit_mask_readout(gm, None, train, train, epochs=0)
    with pytest.raises(ValueError, match="hidden must be an int >= 0"):
        fit_mask_readout(gm, None, train, train, hidden=-1)


def test_object_passes_report_the_shipped_models_readout_mask():
    from pyro_backpass import RenderedObjects, greedy_map
    from pyro_backpass.learning import object_passes

    gm = GenerativeModel.default()
    assert gm.mask_readout is not None  # the shipped model reads its masks with one
    ds = RenderedObjects("airplane", 3, seed=5)
    images = torch.stack([ds[i][0] for i in range(3)])
    labels = torch.zeros(3, dtype=torch.long)
    got = object_passes(gm, gm.backbone, images, labels)
    bu = {k: v for k, v in gm.backbone(images).items() if k in gm.hidden_levels}
    direct = greedy_map(gm, bu, category=labels)
    assert torch.equal(got["mask"], gm.mask_readout(direct.td, bu))
