"""The learned mask readout: what it computes (against direct thresholding), how it travels with
the model (save/load, greedy_map's mask), and the errors for readouts that do not fit."""

import pytest
import torch

from pyro_backpass import GenerativeModel, MaskReadout, exact_map, greedy_map, sample
from pyro_backpass.levels import full_resolution_level


def _model():
    return GenerativeModel.random([3, "M", 4, "M"], num_components=2, num_categories=2,
                                  image_size=8, seed=0)  # fmt: skip


def _pick_channel(readout: MaskReadout, channel: int, cut: float) -> MaskReadout:
    """A readout that says "on" where ``channel`` of the concatenated features exceeds ``cut``."""
    with torch.no_grad():
        readout.weight.zero_()
        readout.weight[0, channel, readout.kernel_size // 2, readout.kernel_size // 2] = 1.0
        readout.bias.fill_(-cut)
    return readout


def test_a_one_channel_readout_is_a_threshold_on_that_channel():
    gm = _model()
    specs = {s.name: s for s in gm.levels}
    readout = _pick_channel(MaskReadout([specs["conv1_1"]], size=(8, 8), kernel_size=3), 1, 0.4)
    td = {"conv1_1": torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))}
    assert torch.equal(readout(td), td["conv1_1"][:, 1] > 0.4)


def test_coarser_levels_are_repeated_up_to_the_mask_size():
    gm = _model()
    specs = {s.name: s for s in gm.levels}
    # Features: conv1_1's 3 channels, then pool1's 3: channel 3 is pool1's first.
    readout = _pick_channel(
        MaskReadout([specs["conv1_1"], specs["pool1"]], size=(8, 8), kernel_size=1), 3, 0.5
    )
    gen = torch.Generator().manual_seed(1)
    td = {"conv1_1": torch.rand(2, 3, 8, 8, generator=gen),
          "pool1": torch.rand(2, 3, 4, 4, generator=gen)}  # fmt: skip
    coarse = td["pool1"][:, 0] > 0.5  # (2, 4, 4)
    want = coarse.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    assert torch.equal(readout(td), want)


def test_the_readout_is_the_models_mask_and_survives_save_and_load(tmp_path):
    gm = _model()
    specs = {s.name: s for s in gm.levels}
    readout = MaskReadout([specs["conv1_1"], specs["pool1"]], size=(8, 8), kernel_size=3)
    with torch.no_grad():
        readout.weight.normal_(generator=torch.Generator().manual_seed(2))
        readout.mean.fill_(0.1), readout.scale.fill_(0.5), readout.threshold.fill_(0.2)
    gm.attach_mask_readout(readout)
    s = sample(gm, 3, observe=True, seed=3)
    r = greedy_map(gm, s.bu)
    assert torch.equal(r.mask, readout(r.td))
    loaded = GenerativeModel.load(gm.save(tmp_path / "gm.safetensors"))
    assert loaded.config()["mask_readout"] == readout.config()
    assert torch.equal(greedy_map(loaded, s.bu).mask, r.mask)
    loaded.attach_mask_readout(None)  # back to the threshold rule of the full-resolution level
    name = full_resolution_level(loaded.levels)
    rule = r.td[name].amax(dim=-3) >= loaded.observations[name].mask_threshold
    assert torch.equal(greedy_map(loaded, s.bu).mask, rule)


def test_readouts_that_do_not_fit_the_model_are_refused():
    gm = _model()
    specs = {s.name: s for s in gm.levels}
    with pytest.raises(ValueError, match="not hidden levels"):
        gm.attach_mask_readout(MaskReadout([specs["category"]], size=(8, 8)))
    with pytest.raises(ValueError, match="full-resolution"):
        gm.attach_mask_readout(MaskReadout([specs["pool1"]], size=(4, 4)))
    with pytest.raises(ValueError, match="odd"):
        MaskReadout([specs["pool1"]], size=(8, 8), kernel_size=4)
    readout = MaskReadout([specs["pool1"]], size=(8, 8))
    with pytest.raises(ValueError, match="lacks"):
        readout({"conv1_1": torch.zeros(1, 3, 8, 8)})
    with pytest.raises(ValueError, match="must be"):
        readout({"pool1": torch.zeros(1, 3, 8, 8)})


def test_a_readout_of_the_input_reads_bu_after_fhat_and_fhat_where_unobserved(tmp_path):
    gm = _model()
    specs = {s.name: s for s in gm.levels}
    # Channels: F̂ of conv1_1 (0-2), then the input's conv1_1 (3-5): channel 4 is bu's second.
    readout = _pick_channel(
        MaskReadout([specs["conv1_1"]], size=(8, 8), kernel_size=1, reads_input=True), 4, 0.5
    )
    gen = torch.Generator().manual_seed(4)
    td = {"conv1_1": torch.rand(3, 3, 8, 8, generator=gen)}
    bu = {"conv1_1": torch.rand(3, 3, 8, 8, generator=gen)}
    assert torch.equal(readout(td, bu), bu["conv1_1"][:, 1] > 0.5)
    observed = {"conv1_1": torch.rand(3, 1, 8, 8, generator=gen) > 0.5}
    want = torch.where(observed["conv1_1"][:, 0], bu["conv1_1"][:, 1], td["conv1_1"][:, 1]) > 0.5
    assert torch.equal(readout(td, bu, observed), want)
    one = {"conv1_1": bu["conv1_1"][:1]}  # one input under several descents
    assert torch.equal(readout(td, one), (one["conv1_1"][:, 1] > 0.5).expand(3, 8, 8))
    with pytest.raises(ValueError, match="pass bu"):
        readout(td)
    with pytest.raises(ValueError, match="bu lacks"):
        readout(td, {"pool1": torch.zeros(3, 3, 4, 4)})
    with pytest.raises(ValueError, match="reads_input must be a bool"):
        MaskReadout([specs["conv1_1"]], size=(8, 8), reads_input="yes")
    # The model's passes hand it their input; it survives save and load.
    gm.attach_mask_readout(readout)
    s = sample(gm, 3, observe=True, seed=5)
    r = greedy_map(gm, s.bu)
    assert torch.equal(r.mask, s.bu["conv1_1"][:, 1] > 0.5)
    top = greedy_map(gm, s.bu, top_k=3)
    assert torch.equal(top.mask, s.bu["conv1_1"][:, 1] > 0.5)
    assert torch.equal(exact_map(gm, s.bu).mask, s.bu["conv1_1"][:, 1] > 0.5)
    loaded = GenerativeModel.load(gm.save(tmp_path / "gm.safetensors"))
    assert loaded.mask_readout.reads_input
    assert torch.equal(greedy_map(loaded, s.bu).mask, r.mask)
