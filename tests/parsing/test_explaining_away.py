"""explain_away: what an object explains leaves the bottom-up maps, every level."""

import pytest
import torch

from pyro_backpass.parsing import explain_away


def test_subtract_and_unobserve_touch_only_the_objects_on_elements():
    bu = {"image": torch.full((1, 3, 4, 4), 1.0), "conv1_1": torch.full((1, 2, 4, 4), 2.0)}
    td = {"image": torch.zeros(1, 3, 4, 4), "conv1_1": torch.zeros(1, 2, 4, 4)}
    td["image"][..., 0, 0] = 0.7  # on (λ = 0.5)
    td["image"][..., 1, 1] = 0.3  # off: untouched
    td["conv1_1"][..., 2, 2] = 3.0  # on, more than bu: clipped at 0
    lam = {"image": 0.5, "conv1_1": 1.0}
    new_bu, new_obs = explain_away(bu, {}, td, lam, how="subtract")
    assert torch.allclose(new_bu["image"][..., 0, 0], torch.tensor(0.3))
    assert torch.equal(new_bu["image"][..., 1, 1], bu["image"][..., 1, 1])
    assert torch.equal(new_bu["conv1_1"][..., 2, 2], torch.zeros(1, 2))
    assert new_obs == {}
    new_bu, new_obs = explain_away(bu, {}, td, lam, how="unobserve")
    assert new_bu["image"] is bu["image"]
    assert torch.equal(new_obs["conv1_1"], td["conv1_1"] < 1.0)
    again, obs2 = explain_away(bu, new_obs, {"image": td["image"], "conv1_1": td["conv1_1"] * 0},
                               lam, how="unobserve")  # fmt: skip
    assert torch.equal(obs2["conv1_1"], new_obs["conv1_1"])  # masks only ever shrink
    with pytest.raises(ValueError, match="how"):
        explain_away(bu, {}, td, lam, how="erase")
