"""The QA list of issue #12: bad (or suspicious) inputs, each with the outcome it must have.

Every case is one call with one bad input. ``kind`` is what the user must get:

- ``"error"``: an exception of ``raises`` whose message matches ``match`` (names the problem);
- ``"warning"``: a warning whose message matches ``match``, and a result;
- ``"accepted"``: legal input, handled as documented (``run`` returns True when the result
  is right, e.g. a float64 model comes back float64).

``tests/test_reliability.py`` runs them all; ``benchmarks/reliability.py`` counts them. The
command-line cases (every subcommand × every bad value) are in ``tests/cli/test_arguments.py``
and are counted from the same parser introspection.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from safetensors.torch import save_file

from pyro_backpass import (
    Backbone,
    CategoricalPrior,
    GenerativeModel,
    exact_map,
    greedy_map,
    log_joint,
    sample,
)


@dataclass(frozen=True)
class Case:
    id: str
    area: str  # the section
    kind: str  # "error" | "warning" | "accepted"
    run: Callable[[], object]
    raises: type[BaseException] | tuple[type[BaseException], ...] = ValueError
    match: str = ""


@cache
def _gm() -> GenerativeModel:
    return GenerativeModel.random([4, "M"], num_components=3, num_categories=2, image_size=16)


@cache
def _bu() -> dict[str, torch.Tensor]:
    return sample(_gm(), 2, observe=True, seed=0).bu


def _tmp() -> Path:
    return Path(tempfile.mkdtemp(prefix="pb_reliability_"))


def _with(**levels: torch.Tensor) -> dict[str, torch.Tensor]:
    return {**_bu(), **levels}


def _scaled(level: str, factor: float) -> dict[str, torch.Tensor]:
    return _with(**{level: _bu()[level] * factor})


def _saved_with(edit: Callable[[dict, dict], None]) -> Path:
    """A model file whose state or config ``edit(state, config)`` changed."""
    gm = _gm()
    state = {k: v.detach().clone().contiguous() for k, v in gm.state_dict().items()}
    config = gm.config()
    edit(state, config)
    path = _tmp() / "m.safetensors"
    save_file(state, str(path), metadata={"pyro_backpass.GenerativeModel": json.dumps(config)})
    return path


def _raw_config(text: str) -> Path:
    gm = _gm()
    state = {k: v.detach().contiguous() for k, v in gm.state_dict().items()}
    path = _tmp() / "m.safetensors"
    save_file(state, str(path), metadata={"pyro_backpass.GenerativeModel": text})
    return path


def _set(key: str, value) -> Callable[[dict, dict], None]:
    def edit(state: dict, config: dict) -> None:
        state[key][(0,) * state[key].dim()] = value

    return edit


def _drop(key: str) -> Callable[[dict, dict], None]:
    def edit(state: dict, config: dict) -> None:
        del config[key]

    return edit


def _float64_round_trip() -> bool:
    gm = _gm().double()
    try:
        path = gm.save(_tmp() / "m.safetensors")
        back = GenerativeModel.load(path)
        same = all(torch.equal(v, back.state_dict()[k]) for k, v in gm.state_dict().items())
        return back.dtype == torch.float64 and same
    finally:
        gm.float()


def _version_2_still_loads() -> bool:
    def edit(state: dict, config: dict) -> None:
        config["format_version"] = 2
        del config["dtype"]

    return GenerativeModel.load(_saved_with(edit)).dtype == torch.float32


def _backbone_pair(edit: Callable[[dict], object]) -> Path:
    from pyro_backpass.backbone.small_vgg import SmallVGG

    bb = Backbone.from_small_vgg(SmallVGG([4, "M"], num_classes=2), categories=["a", "b"],
                                 image_size=(16, 16), mean=[0.5] * 3, std=[0.25] * 3)  # fmt: skip
    path = bb.save(_tmp() / "bb")
    cfg = path.with_suffix(".json")
    config = json.loads(cfg.read_text())
    new = edit(config)
    cfg.write_text(new if isinstance(new, str) else json.dumps(config))
    return path


def _prior_moved_to_model_dtype() -> bool:
    gm = GenerativeModel.random([4, "M"], num_components=3, num_categories=2, image_size=16)
    gm.double()
    gm.priors["delta_pool1"] = CategoricalPrior(torch.arange(1.0, 26.0))  # float32, after .to
    bu = {k: v.double() for k, v in _bu().items()}
    result = greedy_map(gm, bu)
    moved = gm.priors["delta_pool1"].probs.dtype == torch.float64
    return moved and bool(result.log_joint.isfinite().all())


def _prior_wrong_size():
    gm = GenerativeModel.random([4, "M"], num_components=3, num_categories=2, image_size=16)
    gm.priors["delta_pool1"] = CategoricalPrior(torch.ones(9))
    return greedy_map(gm, _bu())


def _exact_slow_warning():
    from pyro_backpass.inference import exact

    old = exact.SLOW_SECONDS
    exact.SLOW_SECONDS = 0.0  # any call counts as slow: the warning's content is under test
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # stop at the warning (1st chunk)
            exact_map(_gm(), _bu())
    except RuntimeWarning as w:
        warnings.warn(str(w), RuntimeWarning, stacklevel=1)  # for run_case to see
        return None
    finally:
        exact.SLOW_SECONDS = old
    return None


def _default_model_on_32px_images():
    gm = GenerativeModel.default()
    images = torch.rand(1, 3, 32, 32)
    bu = {k: v for k, v in gm.backbone(images).items() if k in gm.hidden_levels}
    return greedy_map(gm, bu)


def _short_reprs() -> bool:
    gm = _gm()
    s = sample(gm, 16, observe=True, seed=0)
    r = greedy_map(gm, s.bu, top_k=5)
    return all(len(repr(x)) < 1200 for x in (s, r)) and "tensor(" not in repr(s) + repr(r)


def _cuda_missing() -> str:
    return f"cuda:{torch.cuda.device_count()}"  # one past the last GPU, or "cuda:0" on CPU


CASES: list[Case] = [
    # ----------------------------------------------------------- silent wrong answers
    Case("bu key not canonical (pool_1)", "answers", "error",
         lambda: greedy_map(_gm(), _with(pool_1=_bu()["pool1"])), match="unknown level.*pool_1"),
    Case("bu key wrong case (Image)", "answers", "error",
         lambda: greedy_map(_gm(), _with(Image=_bu()["image"])), match="'Image'.*levels are"),
    Case("bu key typo (pol1)", "answers", "error",
         lambda: exact_map(_gm(), _with(pol1=_bu()["pool1"])), match="unknown level.*pol1"),
    Case("bu key canonical but unused (conv5_3)", "answers", "accepted",
         lambda: greedy_map(_gm(), _with(conv5_3=torch.zeros(2, 1))) is not None),
    Case("bu finite but absurd (1e30), greedy", "answers", "error",
         lambda: greedy_map(_gm(), _scaled("pool1", 1e30)), match="level 'pool1'.*512 of 512"),
    Case("bu finite but absurd (1e30), exact", "answers", "error",
         lambda: exact_map(_gm(), _scaled("conv1_1", 1e30)), match="level 'conv1_1'.*elements"),
    Case("bu finite but absurd (1e30), log_joint", "answers", "error",
         lambda: log_joint(_gm(), _scaled("image", 1e30), greedy_map(_gm(), _bu()).assignment),
         match="level 'image'.*elements"),
    Case("bu category absurd (1e30)", "answers", "error",
         lambda: greedy_map(_gm(), _with(category=torch.full((2, 2), 1e30))),
         match="level 'category'"),
    Case("bu top_k>1 absurd (1e30)", "answers", "error",
         lambda: greedy_map(_gm(), _scaled("image", 1e30), top_k=3), match="level 'image'"),
    Case("checkpoint weight NaN", "answers", "error",
         lambda: GenerativeModel.load(_saved_with(_set("steps.pool1.weight", float("nan")))),
         match="steps.pool1.weight has 1 NaN/inf"),
    Case("checkpoint σ1 inf", "answers", "error",
         lambda: GenerativeModel.load(_saved_with(_set("observations.pool1.scale_on",
                                                       float("inf")))),
         match="scale_on has 1 NaN/inf"),
    Case("checkpoint σ2 negative", "answers", "error",
         lambda: GenerativeModel.load(_saved_with(_set("observations.conv1_1.scale_off", -0.3))),
         match="conv1_1 scale_off .σ2. must be > 0"),
    Case("checkpoint σ0 zero", "answers", "error",
         lambda: GenerativeModel.load(_saved_with(_set("steps.image.scale_td", 0.0))),
         match="image scale_td .σ0. must be > 0"),
    Case("checkpoint prior negative", "answers", "error",
         lambda: GenerativeModel.load(_saved_with(_set("priors.gamma_pool1.probs", -0.5))),
         match="'gamma_pool1' is not on the simplex"),
    Case("checkpoint prior not normalised", "answers", "error",
         lambda: GenerativeModel.load(_saved_with(_set("priors.delta_pool1.probs", 3.0))),
         match="'delta_pool1' is not on the simplex"),
    Case("constructor σ1 NaN", "answers", "error",
         lambda: GenerativeModel.random([4, "M"], num_components=2, scale_on=float("nan")),
         match="scale_on"),
    Case("constructor threshold inf", "answers", "error",
         lambda: GenerativeModel.random([4, "M"], num_components=2, threshold=float("inf")),
         match="threshold has 1 NaN/inf"),
    Case("constructor σ0 negative", "answers", "error",
         lambda: GenerativeModel.random([4, "M"], num_components=2, scale_td=-0.1),
         match="scale_td"),
    Case("chunk_elements 0", "answers", "error",
         lambda: greedy_map(_gm(), _bu(), chunk_elements=0), match="chunk_elements"),
    Case("chunk_elements negative", "answers", "error",
         lambda: greedy_map(_gm(), _bu(), chunk_elements=-10), match="chunk_elements"),
    Case("chunk_elements True", "answers", "error",
         lambda: greedy_map(_gm(), _bu(), chunk_elements=True), match="chunk_elements"),
    Case("float64 model saved and loaded", "answers", "accepted", _float64_round_trip),
    Case("format version 2 file (no dtype)", "answers", "accepted", _version_2_still_loads),
    Case("format version 3 file without dtype", "answers", "error",
         lambda: GenerativeModel.load(_saved_with(_drop("dtype"))), match="missing.*'dtype'"),
    Case("backbone run on 32 px for a 16 px model", "answers", "error",
         lambda: greedy_map(_gm(), {"pool1": torch.rand(2, 4, 16, 16)}),
         match="16×16-pixel images"),
    Case("default model on 32 px images", "answers", "error", _default_model_on_32px_images,
         match="64×64-pixel images"),
    Case("prior assigned after .to(dtype)", "answers", "accepted", _prior_moved_to_model_dtype),
    Case("prior of the wrong size assigned on the model", "answers", "error", _prior_wrong_size,
         match=r"gm.priors\['delta_pool1'\].*expected table \(25,\)"),
    # ----------------------------------------------------------- bounded cost
    Case("exact_map projected slow", "cost", "warning", _exact_slow_warning,
         match="joint states per image.*GiB each.*s in all"),
    Case("exact_map over the memory limit", "cost", "error",
         lambda: exact_map(_gm(), _bu(), max_memory_bytes=1000), raises=MemoryError,
         match="joint states per image in 150 chunks.*GiB"),
    Case("exact_map max_memory_bytes 0", "cost", "error",
         lambda: exact_map(_gm(), _bu(), max_memory_bytes=0), match="max_memory_bytes"),
    # ----------------------------------------------------------- files
    Case("model config not JSON", "files", "error",
         lambda: GenerativeModel.load(_raw_config("{not json")),
         match=r"m.safetensors: its config is not valid JSON"),
    Case("model config a list", "files", "error",
         lambda: GenerativeModel.load(_raw_config("[1, 2]")), match="expected a JSON object"),
    Case("model config missing levels", "files", "error",
         lambda: GenerativeModel.load(_saved_with(_drop("levels"))),
         match=r"m.safetensors config: missing key\(s\) \['levels'\]"),
    Case("model config missing priors", "files", "error",
         lambda: GenerativeModel.load(_saved_with(_drop("priors"))), match=r"\['priors'\]"),
    Case("backbone config not JSON", "files", "error",
         lambda: Backbone.load(_backbone_pair(lambda c: "{oops")),
         match=r"bb.json is not valid JSON"),
    Case("backbone config missing categories", "files", "error",
         lambda: Backbone.load(_backbone_pair(lambda c: c.pop("categories"))),
         match=r"bb.json: missing key\(s\) \['categories'\]"),
    Case("backbone config missing normalisation std", "files", "error",
         lambda: Backbone.load(_backbone_pair(lambda c: c["normalisation"].pop("std"))),
         match=r"normalisation: missing key\(s\) \['std'\]"),
    Case("load(map_location) on a missing GPU", "files", "error",
         lambda: GenerativeModel.load(_gm().save(_tmp() / "m.safetensors"),
                                      map_location=_cuda_missing()),
         match="CUDA device"),
    Case("load(map_location) not a device", "files", "error",
         lambda: GenerativeModel.load(_gm().save(_tmp() / "m.safetensors"),
                                      map_location="gpu7"),
         match="not a device"),
    Case("Backbone.vgg16(weights=123)", "files", "error", lambda: Backbone.vgg16(weights=123),
         raises=TypeError, match="None, 'cache' or a path"),
    Case("Backbone.vgg16(weights=[path])", "files", "error",
         lambda: Backbone.vgg16(weights=["x.pth"]), raises=TypeError, match="got list"),
    # ----------------------------------------------------------- what a user sees
    Case("repr of Sample and MapResult", "user", "accepted", _short_reprs),
]  # fmt: skip


def run_case(case: Case) -> str:
    """Run one case; return the outcome seen: "error", "warning", "accepted" or "wrong: ..."."""
    import re

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            value = case.run()
        except case.raises as err:
            if re.search(case.match, str(err)) and "\n" not in str(err).strip():
                return "error"
            return f"wrong: unclear {type(err).__name__}: {err}"
    relevant = [w for w in caught if re.search(case.match or "$^", str(w.message))]
    if relevant:
        return "warning"
    if case.kind == "accepted" and value is True:
        return "accepted"
    return f"wrong: no error, returned {type(value).__name__}"
