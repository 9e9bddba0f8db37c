"""The hierarchical generative model of CNN activations, as an ``nn.Module`` and a Pyro model.

Top-down, a category is instantiated level by level: each level ``l`` below ``category`` has a
mixture index ``γ_l`` (which of K kernel sets generates it) and an offset ``δ_l``, with priors
``P(γ_l | γ's above)`` (Dirichlet n-gram tables) and ``P(δ_l)`` (uniform by default)::

    c ~ P(c)
    for l = L-1 … 0:
        γ_l ~ P(γ_l | γ_{l+1..l+n}),   δ_l ~ P(δ_l)
        F^l_td ~ Normal(φ_l(F^{l+1}_td, γ_l, δ_l), σ0_l)           (element-wise)
        F^l_bu ~ ThresholdedGaussian(F^l_td; λ_l, β_l, σ1_l, σ2_l)  (where observed)

Reference: Wang et al. 2016, eqs. (1)–(9).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Any

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.ops.indexing import Vindex
from torch import nn

from pyro_backpass.backbone import SHIPPED_BACKBONES, Backbone
from pyro_backpass.files import atomic_write, check_keys, read_safetensors
from pyro_backpass.levels import (
    Cfg,
    LevelSpec,
    full_resolution_level,
    levels_from_cfg,
    levels_up_to,
)
from pyro_backpass.model.checks import category_indices, check_bu, check_observed
from pyro_backpass.model.mask_readout import MaskReadout
from pyro_backpass.model.observation import ClosedFormConstants, Observation
from pyro_backpass.model.priors import CategoricalPrior, NGramPrior, SitePrior, UniformPrior
from pyro_backpass.model.top_down import TopDownStep, offset_grid, shift_all

__all__ = ["ENUMERATE", "GenerativeModel", "backbone_fingerprint", "default_offsets"]

# The infer= of every enumerated site (category, γ, δ): parallel enumeration.
ENUMERATE = {"enumerate": "parallel"}
_PRIOR_TYPES = {c.__name__: c for c in (CategoricalPrior, UniformPrior, NGramPrior)}
_CONFIG_KEY = "pyro_backpass.GenerativeModel"


# The models inside the package, by the shipped backbone they model: their weights files.
_SHIPPED_MODELS = {
    "default": "generative_model.safetensors",
    "localised": "generative_model_localised.safetensors",
}


def _backbone_file_exists(path: str | None) -> bool:
    """Whether a ``train-backbone`` checkpoint (the stem or either file) is at ``path``."""
    if not path:
        return False
    stem = Path(path)
    stem = stem.with_suffix("") if stem.suffix in (".json", ".safetensors") else stem
    found = [stem.with_suffix(s).exists() for s in (".json", ".safetensors")]
    if any(found) and not all(found):
        raise FileNotFoundError(
            f"backbone checkpoint {stem} is incomplete: one of {stem}.json and "
            f"{stem}.safetensors is missing"
        )
    return all(found)


def backbone_fingerprint(backbone: nn.Module) -> str:
    """SHA-256 of a backbone's parameters and buffers (names, shapes, values), in order."""
    digest = hashlib.sha256()
    for name, tensor in backbone.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def default_offsets(levels: Sequence[LevelSpec]) -> dict[str, list[tuple[int, int]]]:
    """{−2..2}² just below ``category``, {−1..1}² on other pools, {(0, 0)} elsewhere."""
    out = {}
    for i, spec in enumerate(levels[:-1]):
        top = levels[i + 1].kind == "category"
        out[spec.name] = offset_grid(2 if top else 1 if spec.kind == "pool" else 0)
    return out


def _checked_device(name: str | torch.device | None, path: Path) -> torch.device | None:
    """``map_location`` as a device this machine has, or a clear error."""
    if name is None:
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"load({path}): map_location={name!r} is not a device ({err})") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            raise ValueError(
                f"load({path}): map_location={name!r} but this machine has "
                f"{count} CUDA device(s); load with map_location='cpu'"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"load({path}): map_location={name!r} but MPS is not available")
    return device


class GenerativeModel(nn.Module):
    """A generative model of a CNN's activations on chosen levels.

    :param levels: level specs bottom to top, ``image`` first and ``category`` last.
    :param categories: category names (as many as the ``category`` level has channels).
    :param num_components: K per hidden level (an int for all, or ``{level: K}``).
    :param offsets: δ values per level (``{level: [(dy, dx), ...]}`` or ``{level: radius}``);
        missing levels get :func:`default_offsets`.
    :param ngram_order: n, how many upper levels' γ condition each γ (the category counts).
    :param scale_td: σ0 (an int for all levels or ``{level: σ0}``).
    :param threshold, background, scale_on, scale_off: observation parameters for every level
        (λ, β, σ1, σ2); set per level through ``gm.observations[level]`` afterwards.
    :param cfg: the backbone config the levels came from (kept for the record).
    """

    # 2: the file names the backbone the model explains and that backbone's fingerprint.
    # 3: the config records the parameters' dtype (version 2 files still load: their dtype is
    #    read from the tensors).
    # 4: the config may hold a learned mask readout (``mask_readout``; None without one; its
    #    ``hidden`` is 0, a logistic filter, when absent).
    FORMAT_VERSION = 4
    READS_VERSIONS = (2, 3, 4)

    def __init__(
        self,
        levels: Sequence[LevelSpec],
        *,
        categories: Sequence[str],
        num_components: int | Mapping[str, int],
        offsets: Mapping[str, Sequence[tuple[int, int]] | int] | None = None,
        ngram_order: int = 1,
        scale_td: float | Mapping[str, float] = 0.1,
        threshold: float = 0.5,
        background: float = 0.0,
        scale_on: float = 0.3,
        scale_off: float = 0.3,
        cfg: Cfg | None = None,
    ) -> None:
        super().__init__()
        levels = tuple(levels)
        if len(levels) < 2 or levels[0].kind != "image" or levels[-1].kind != "category":
            raise ValueError("levels must run from an 'image' level up to a 'category' level")
        if len(categories) != levels[-1].channels or len(set(categories)) != len(categories):
            raise ValueError(
                f"need {levels[-1].channels} distinct category names, got {list(categories)}"
            )
        if ngram_order < 1:
            raise ValueError(f"ngram_order must be >= 1, got {ngram_order}")
        self._levels, self._categories = levels, tuple(categories)
        self.ngram_order, self.cfg = int(ngram_order), None if cfg is None else list(cfg)
        hidden = [s.name for s in levels[:-1]]
        ks = self._per_level(num_components, hidden, "num_components")
        sigma0 = self._per_level(scale_td, hidden, "scale_td")
        offs = default_offsets(levels)
        for name, value in (offsets or {}).items():
            if name not in offs:
                raise ValueError(f"offsets: unknown level {name!r}; hidden levels: {hidden}")
            offs[name] = offset_grid(value) if isinstance(value, int) else list(value)

        self.steps = nn.ModuleDict()
        self.observations = nn.ModuleDict()
        for i, spec in enumerate(levels[:-1]):
            self.steps[spec.name] = TopDownStep(
                levels[i + 1], spec, num_components=ks[spec.name], offsets=offs[spec.name],
                scale_td=sigma0[spec.name],
            )  # fmt: skip
        for spec in levels:
            self.observations[spec.name] = Observation(
                spec, threshold=threshold, background=background, scale_on=scale_on,
                scale_off=scale_off,
            )  # fmt: skip
        self.priors = nn.ModuleDict(self.default_priors())
        # An optional learned readout of the object mask from F̂ (attach_mask_readout).
        self.register_module("mask_readout", None)
        # The backbone whose activations this models: kept outside the module tree (its
        # parameters are not the model's), named in saved files by name and fingerprint.
        self.__dict__["_backbone"] = None
        self.__dict__["_backbone_record"] = None
        self.check_parameters()

    @staticmethod
    def _per_level(value: Any, names: list[str], what: str) -> dict[str, Any]:
        if isinstance(value, Mapping):
            missing = [n for n in names if n not in value]
            unknown = [n for n in value if n not in names]
            if missing or unknown:
                raise ValueError(f"{what}: missing levels {missing}, unknown levels {unknown}")
            return dict(value)
        return {n: value for n in names}

    def check_parameters(self, *, source: str = "GenerativeModel") -> None:
        """Raise a ``ValueError`` naming the first bad parameter: every weight finite, every
        σ finite and > 0, every prior table non-negative with rows summing to 1.

        Run on construction and by :meth:`load`; run it after editing parameters by hand.
        """
        for name, t in itertools.chain(self.named_parameters(), self.named_buffers()):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise ValueError(f"{source}: {name} has {bad:,} NaN/inf entries of {t.numel():,}")
        for level, obs in self.observations.items():
            for what, t in (("scale_on (σ1)", obs.scale_on), ("scale_off (σ2)", obs.scale_off)):
                if not bool((t > 0).all()):
                    raise ValueError(f"{source}: {level} {what} must be > 0, got {t.min().item()}")
        for level, step in self.steps.items():
            if not float(step.scale_td) > 0:
                raise ValueError(
                    f"{source}: {level} scale_td (σ0) must be > 0, got {step.scale_td}"
                )
        for site, prior in self.priors.items():
            probs = getattr(prior, "probs", None)
            if probs is None:
                continue  # a custom prior: its log_probs() is its own business
            sums = probs.sum(-1)
            if bool((probs < 0).any()) or not torch.allclose(
                sums, torch.ones_like(sums), atol=1e-4
            ):
                raise ValueError(
                    f"{source}: the prior table of {site!r} is not on the simplex (entries in "
                    f"[{probs.min().item():.3g}, {probs.max().item():.3g}], rows summing to "
                    f"[{sums.min().item():.4g}, {sums.max().item():.4g}])"
                )

    @property
    def backbone(self) -> Backbone | None:
        """The backbone whose activations this model explains (``gm.backbone(images)`` gives
        the ``bu`` that :func:`~pyro_backpass.greedy_map` takes), if one is attached."""
        return self.__dict__["_backbone"]

    def attach_backbone(
        self, backbone: Backbone, *, name: str, path: str | os.PathLike | None = None
    ) -> GenerativeModel:
        """Attach ``backbone`` (checked against the model's levels); ``name`` is recorded in
        saved files (the shipped backbones, ``SHIPPED_BACKBONES``, are reloaded by name), and so
        is ``path``, the checkpoint the backbone was read from (written by
        ``pyro-backpass train-backbone``): :meth:`load` reattaches it from there while it
        exists with the same fingerprint."""
        image = self._levels[0]
        levels = {s.name: s.shape for s in backbone.levels_for((image.height, image.width))}
        wrong = [s.name for s in self._levels[:-1] if levels.get(s.name) != s.shape]
        if wrong or tuple(backbone.categories) != self._categories:
            raise ValueError(
                f"backbone {name!r} does not match the model: levels {wrong} differ or "
                f"categories {list(backbone.categories)} != {list(self._categories)}"
            )
        self.__dict__["_backbone"] = backbone
        record = {"name": name, "sha256": backbone_fingerprint(backbone)}
        if path is not None:
            record["path"] = str(Path(path).resolve())
        self.__dict__["_backbone_record"] = record
        return self

    def attach_mask_readout(self, readout: MaskReadout | None) -> GenerativeModel:
        """Read object masks with ``readout`` (None: back to the ``mask_threshold`` rule of the
        full-resolution level). Its levels must be hidden levels of this model, with the same
        shapes, and its size that of the model's full-resolution level."""
        if readout is not None:
            specs = {s.name: s for s in self._levels[:-1]}
            wrong = [s.name for s in readout.levels if specs.get(s.name) != s]
            if wrong:
                raise ValueError(f"mask readout: levels {wrong} are not hidden levels of the "
                                 f"model with these shapes; hidden: {list(specs)}")  # fmt: skip
            full = specs[full_resolution_level(self._levels)]
            if readout.size != (full.height, full.width):
                raise ValueError(f"mask readout: size {readout.size} is not the full-resolution "
                                 f"level {full.name!r}'s {(full.height, full.width)}")  # fmt: skip
            readout = readout.to(device=self.device, dtype=self.dtype)
        self.mask_readout = readout
        return self

    # ------------------------------------------------------------------ structure
    @property
    def levels(self) -> tuple[LevelSpec, ...]:
        """Level specs, bottom (``image``) to top (``category``)."""
        return self._levels

    @property
    def hidden_levels(self) -> tuple[str, ...]:
        """Names of the levels with hidden variables (all but ``category``), bottom to top."""
        return tuple(s.name for s in self._levels[:-1])

    @property
    def categories(self) -> tuple[str, ...]:
        return self._categories

    @property
    def offsets(self) -> dict[str, list[tuple[int, int]]]:
        """``{level: [(dy, dx), ...]}``; a δ value indexes this list."""
        return {n: [tuple(o) for o in s.offsets.tolist()] for n, s in self.steps.items()}

    @property
    def num_components(self) -> dict[str, int]:
        return {n: s.num_components for n, s in self.steps.items()}

    @property
    def sites(self) -> list[str]:
        """Discrete site names in top-down (sampling) order."""
        out = ["category"]
        for name in reversed(self.hidden_levels):
            out += [f"gamma_{name}", f"delta_{name}"]
        return out

    @property
    def site_sizes(self) -> dict[str, int]:
        sizes = {"category": len(self._categories)}
        for name in reversed(self.hidden_levels):
            sizes[f"gamma_{name}"] = self.steps[name].num_components
            sizes[f"delta_{name}"] = self.steps[name].num_offsets
        return sizes

    @property
    def device(self) -> torch.device:
        return self.observations["image"].threshold.device

    @property
    def dtype(self) -> torch.dtype:
        return self.observations["image"].threshold.dtype

    def constants(self, name: str) -> ClosedFormConstants:
        """Level ``name``'s closed-form constants (kept by its :class:`Observation` while the
        parameters stay the same)."""
        return self.observations[name].constants(self.steps[name].scale_td)

    def gamma_parents(self, level: str) -> tuple[str, ...]:
        """The n-gram prefix of ``γ_level``: the n nearest upper levels' γ (or ``category``)."""
        names = [s.name for s in self._levels]
        i = names.index(level)
        above = names[i + 1 : i + 1 + self.ngram_order]
        return tuple("category" if n == "category" else f"gamma_{n}" for n in above)

    def default_priors(self) -> dict[str, SitePrior]:
        sizes = self.site_sizes
        priors: dict[str, SitePrior] = {"category": UniformPrior(sizes["category"])}
        for name in reversed(self.hidden_levels):
            parents = self.gamma_parents(name)
            priors[f"gamma_{name}"] = NGramPrior.uniform(
                [sizes[p] for p in parents], sizes[f"gamma_{name}"], parents=parents
            )
            priors[f"delta_{name}"] = UniformPrior(sizes[f"delta_{name}"])
        return priors

    def resolve_priors(self, priors: Mapping[str, SitePrior] | None = None) -> dict[str, SitePrior]:
        """The model's priors with per-call overrides, all checked against the sites and on
        the model's device and dtype.

        Priors assigned after ``gm.to(device)`` (``gm.priors[site] = ...``) are moved here, the
        one place every inference call and the Pyro model read them from.
        """
        device, dtype = self.device, self.dtype
        sizes, order = self.site_sizes, self.sites
        out = {}
        model_priors = [(f"gm.priors[{s!r}]", s, p) for s, p in self.priors.items()]
        call_priors = [(f"priors[{s!r}]", s, p) for s, p in (priors or {}).items()]
        for label, site, prior in model_priors + call_priors:
            if site not in sizes:
                raise ValueError(f"{label}: unknown site {site!r}; sites: {order}")
            if not isinstance(prior, SitePrior):
                raise TypeError(f"{label} must be a SitePrior, got {type(prior).__name__}")
            probs = getattr(prior, "probs", None)
            if isinstance(probs, torch.Tensor) and (probs.device, probs.dtype) != (device, dtype):
                prior.to(device=device, dtype=dtype)
            table = prior.log_probs()
            want = tuple(sizes[p] for p in prior.parents if p in sizes) + (sizes[site],)
            bad_parent = [p for p in prior.parents if p not in sizes or p == site]
            if bad_parent or tuple(table.shape) != want:
                raise ValueError(
                    f"{label}: parents {prior.parents} / table {tuple(table.shape)} do "
                    f"not fit the model (expected table {want}, parents among {order})"
                )
            if any(order.index(p) >= order.index(site) for p in prior.parents):
                raise ValueError(f"{label}: parents must be sites above it: {order}")
            if self._level_of(site) is not None and any(
                self._level_of(p) == self._level_of(site) for p in prior.parents
            ):
                raise ValueError(f"{label}: parents must be on higher levels")
            if table.device != device:
                raise ValueError(f"{label} is on {table.device}, the model on {device}")
            out[site] = prior
        missing = [s for s in order if s not in out]
        if missing:
            raise ValueError(f"gm.priors lacks sites {missing}")
        return out

    @staticmethod
    def _level_of(site: str) -> str | None:
        return None if site == "category" else site.split("_", 1)[1]

    def observation_td(self, category: torch.Tensor) -> torch.Tensor:
        """``F^L_td``: the one-hot category, ``(..., N, 1, 1)``."""
        onehot = F.one_hot(category, len(self._categories)).to(self.dtype)
        return onehot[..., None, None]

    # ------------------------------------------------------------------ the Pyro model
    def model(
        self,
        bu: Mapping[str, torch.Tensor] | None = None,
        *,
        batch_size: int | None = None,
        category: Any = None,
        observed: Mapping[str, torch.Tensor] | None = None,
        priors: Mapping[str, SitePrior] | None = None,
        sample_tables: bool = False,
        sample_bu: bool = False,
        noise: float = 1.0,
    ) -> dict[str, torch.Tensor]:
        """The Bayes net as a Pyro model; returns the top-down activations by level.

        Sites: ``category``; per level top-down ``gamma_<level>`` and ``delta_<level>``
        (marked for parallel enumeration), ``td_<level>`` ~ Normal(φ, σ0).to_event(3) and,
        where ``bu`` has the level, ``bu_<level>`` observed through a
        :class:`ThresholdedGaussian`; ``bu_category`` observes the one-hot category. All inside
        ``plate("images", B)``.

        :param bu: level name → ``(B, C, H, W)`` bottom-up activations (levels absent are
            unobserved; canonical names of levels the model lacks, e.g. a backbone's levels
            above the model's top, are ignored; other names are an error).
        :param batch_size: B when ``bu`` is None.
        :param category: a name, an index or one per image: observes the ``category`` site.
        :param observed: level → bool mask ``(B, C, H, W)``-broadcastable; False elements have
            no observation term.
        :param priors: per-call prior overrides, site → :class:`SitePrior`.
        :param sample_tables: draw the n-gram tables from their Dirichlet priors (sites
            ``table_<site>``) instead of using the point estimates.
        :param sample_bu: also sample ``bu_<level>`` on every level not in ``bu``.
        :param noise: multiplier of σ0 on the top-down path (1: the model; 0: the mean path,
            ``td_<level>`` = φ through a ``Delta``; between: a temperature for samples).
        """
        if not (isinstance(noise, (int, float)) and noise >= 0 and noise == noise):
            raise ValueError(f"noise must be a number >= 0, got {noise!r}")
        bu, b = check_bu(self, bu, batch_size=batch_size)
        masks = check_observed(self, observed, bu, b)
        cat_obs = category_indices(self, category, b)
        priors = self.resolve_priors(priors)
        tables = {
            site: prior.table(sample=sample_tables, name=f"table_{site}")
            for site, prior in priors.items()
        }
        td: dict[str, torch.Tensor] = {}
        with pyro.plate("images", b, dim=-1):
            values = {
                "category": pyro.sample(
                    "category", dist.Categorical(tables["category"]), obs=cat_obs, infer=ENUMERATE
                )
            }
            self._observe("category", self.observation_td(values["category"]), bu, masks, sample_bu)
            upper = values["category"]
            for name in reversed(self.hidden_levels):
                for site in (f"gamma_{name}", f"delta_{name}"):
                    probs = self._cpd(tables[site], priors[site].parents, values)
                    values[site] = pyro.sample(site, dist.Categorical(probs), infer=ENUMERATE)
                step = self.steps[name]
                phi = step.phi(upper, values[f"gamma_{name}"], values[f"delta_{name}"])
                if noise > 0:
                    path = dist.Normal(phi, noise * step.scale_td).to_event(3)
                else:
                    path = dist.Delta(phi, event_dim=3)
                td[name] = pyro.sample(f"td_{name}", path)
                self._observe(name, td[name], bu, masks, sample_bu)
                upper = td[name]
        return td

    @staticmethod
    def _cpd(table: torch.Tensor, parents: Sequence[str], values: Mapping[str, torch.Tensor]):
        if not parents:
            return table
        return Vindex(table)[tuple(values[p] for p in parents) + (slice(None),)]

    def _observe(self, name, td, bu, masks, sample_bu) -> None:
        if name not in bu and not sample_bu:
            return
        d = self.observations[name].distribution(td)
        if name in masks:
            d = d.mask(masks[name])
        pyro.sample(f"bu_{name}", d.to_event(3), obs=bu.get(name))

    def format_shapes(self, bu: Mapping[str, torch.Tensor] | None = None, **kwargs: Any) -> str:
        """The trace's shapes (``trace.format_shapes()``) under parallel enumeration."""
        from pyro import poutine

        enum_model = poutine.enum(self.model, first_available_dim=-2)
        trace = poutine.trace(enum_model).get_trace(bu, **kwargs)
        trace.compute_log_prob()
        return trace.format_shapes()

    # ------------------------------------------------------------------ construction
    @classmethod
    def for_backbone(
        cls,
        backbone: Backbone,
        *,
        num_components: int | Mapping[str, int],
        image_size: int | None = None,
        top_level: str | None = None,
        backbone_name: str = "custom",
        backbone_path: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> GenerativeModel:
        """An untrained model of ``backbone``'s activations (its levels and categories), with
        the backbone attached.

        :param image_size: the input size the levels are taken at (default: the backbone's).
        :param top_level: the top hidden level, just below ``category`` (default: the
            backbone's last level). With a lower one, e.g. ``"pool3"``, the hierarchy is cut
            there (:func:`~pyro_backpass.levels_up_to`): the category generates that level's
            templates directly, and the backbone's levels above it are not modelled — their
            activations, like those of any level the model lacks, are ignored in ``bu``.
        :param backbone_name: recorded in saved files; the shipped backbones' names
            (``SHIPPED_BACKBONES``) are reloaded with the model.
        :param backbone_path: the checkpoint ``backbone`` was loaded from, if any: recorded, and
            :meth:`load` reattaches it from there (see :meth:`attach_backbone`).
        :param kwargs: any other ``GenerativeModel`` keyword (offsets, σ's, ...).
        """
        if not backbone.categories:
            raise ValueError("the backbone has no classifier head, so no categories to model")
        size = backbone.image_size if image_size is None else image_size
        levels = backbone.levels_for(size)
        if top_level is not None:
            levels = levels_up_to(levels, top_level)
        gm = cls(levels, categories=backbone.categories,
                 num_components=num_components, cfg=backbone.cfg, **kwargs)  # fmt: skip
        return gm.attach_backbone(backbone, name=backbone_name, path=backbone_path)

    @classmethod
    def random(
        cls,
        cfg: Cfg,
        *,
        num_components: int | Mapping[str, int],
        num_categories: int = 1,
        image_size: int = 16,
        seed: int = 0,
        **scales: Any,
    ) -> GenerativeModel:
        """A model with random parameters, for tests, benchmarks and notebooks.

        Kernels are rescaled so that φ has RMS ≈ 1 on every level (per component, over all
        offsets, measured on ancestral samples from the levels above); a component whose φ
        vanishes is redrawn, so components are distinct and MAP ties do not occur. n-gram
        tables are drawn from a Dirichlet(2); offsets and categories are uniform. ``scales``
        (and any other ``GenerativeModel`` keyword, e.g. ``offsets``) override the defaults
        λ = 0.5, β = 0, σ0 = 0.1, σ1 = σ2 = 0.3.
        """
        levels = levels_from_cfg(cfg, image_size=image_size, num_categories=num_categories)
        gm = cls(
            levels,
            categories=[f"c{i}" for i in range(num_categories)],
            num_components=num_components,
            cfg=cfg,
            **scales,
        )
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            upper: torch.Tensor = torch.arange(num_categories).repeat_interleave(4)  # (S,)
            for name in reversed(gm.hidden_levels):
                step = gm.steps[name]
                for _attempt in range(20):
                    step.reset_parameters(gen)
                    # RMS over samples and all offsets (zero fill included): (K,)
                    phi = shift_all(step.phi_all(upper), step.offsets)  # (S, K, D, C, H, W)
                    rms = phi.pow(2).mean(dim=(0, 2, 3, 4, 5)).sqrt()
                    if bool((rms > 1e-3).all()):
                        break
                else:
                    raise RuntimeError(f"could not draw non-vanishing components for {name}")
                scale = rms.reciprocal()
                if step.kind == "template":
                    step.weight.mul_(scale.view(1, -1, 1, 1, 1))
                else:
                    step.weight.mul_(scale.view(-1, *[1] * (step.weight.dim() - 1)))
                    step.bias.mul_(scale.view(-1, 1))
                # Ancestral samples of this level feed the next level's rescaling.
                s = upper.shape[0]
                gamma = torch.randint(step.num_components, (s,), generator=gen)
                delta = torch.randint(step.num_offsets, (s,), generator=gen)
                phi = step.phi(upper, gamma, delta)
                upper = phi + step.scale_td * torch.randn(phi.shape, generator=gen)
            for prior in gm.priors.values():
                if isinstance(prior, NGramPrior):
                    alpha = torch.full(prior.probs.shape, 2.0)
                    prior.probs.copy_(torch._standard_gamma(alpha, generator=gen))
                    prior.probs.div_(prior.probs.sum(-1, keepdim=True))
        return gm

    # ------------------------------------------------------------------ persistence
    def config(self) -> dict[str, Any]:
        priors = {}
        for site, prior in self.priors.items():
            kind = type(prior).__name__
            if kind not in _PRIOR_TYPES:
                raise TypeError(f"cannot save prior of custom type {kind} for site {site!r}")
            entry: dict[str, Any] = {"type": kind}
            if isinstance(prior, NGramPrior):
                entry |= {"parents": list(prior.parents), "concentration": prior.concentration}
            priors[site] = entry
        return {
            "format_version": self.FORMAT_VERSION,
            "levels": [asdict(s) for s in self._levels],
            "categories": list(self._categories),
            "num_components": self.num_components,
            "offsets": {k: [list(o) for o in v] for k, v in self.offsets.items()},
            "ngram_order": self.ngram_order,
            "cfg": self.cfg,
            "priors": priors,
            "backbone": self._backbone_record,
            "dtype": str(self.dtype).removeprefix("torch."),
            "mask_readout": None if self.mask_readout is None else self.mask_readout.config(),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write parameters (safetensors) with the JSON config in its metadata, atomically."""
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        meta = {_CONFIG_KEY: json.dumps(self.config())}
        return atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=meta))

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        map_location: str | None = None,
        backbone: Backbone | None = None,
    ) -> GenerativeModel:
        """Read a model written by :meth:`save`; clear errors for wrong or damaged files.

        The backbone it was fitted to is attached: a shipped one by name, a checkpoint by the
        path recorded when it exists there, or ``backbone`` when given — each checked against
        the fingerprint recorded in the file (another backbone is a ``ValueError``). A model
        whose backbone file is gone loads without one (``gm.backbone`` is None)."""
        path = Path(path)
        meta, state = read_safetensors(path, what="model")
        if _CONFIG_KEY not in meta:
            raise ValueError(f"{path} is not a pyro_backpass GenerativeModel file (no config)")
        try:
            config = json.loads(meta[_CONFIG_KEY])
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: its config is not valid JSON ({err})") from None
        check_keys(config, ["format_version"], source=f"{path} config")
        version = config["format_version"]
        if version not in cls.READS_VERSIONS:
            raise ValueError(
                f"{path} has format version {version}; this version of pyro_backpass reads "
                f"{list(cls.READS_VERSIONS)} (version 2 added the backbone record: re-save the "
                "model with this version after gm.attach_backbone(...))"
            )
        keys = ["levels", "categories", "num_components", "offsets", "ngram_order", "cfg"]
        check_keys(config, keys + ["priors"] + (["dtype"] if version >= 3 else []),
                   source=f"{path} config")  # fmt: skip
        device = _checked_device(map_location, path)
        try:
            levels = [LevelSpec(**s) for s in config["levels"]]
        except TypeError as err:
            raise ValueError(f"{path} config: a level entry is malformed ({err})") from None
        gm = cls(
            levels,
            categories=config["categories"],
            num_components=config["num_components"],
            offsets={k: [tuple(o) for o in v] for k, v in config["offsets"].items()},
            ngram_order=config["ngram_order"],
            cfg=config["cfg"],
        )
        for site, entry in config["priors"].items():
            check_keys(entry, ["type"], source=f"{path} config, priors[{site!r}]")
            if f"priors.{site}.probs" not in state:
                raise ValueError(f"{path}: no tensor priors.{site}.probs for the prior of {site!r}")
            shape = state[f"priors.{site}.probs"].shape
            if entry["type"] == "NGramPrior":
                check_keys(entry, ["parents", "concentration"],
                           source=f"{path} config, priors[{site!r}]")  # fmt: skip
                prior = NGramPrior(
                    torch.ones(shape),
                    parents=entry["parents"],
                    concentration=entry["concentration"],
                )
            elif entry["type"] == "UniformPrior":
                prior = UniformPrior(shape[-1])
            else:
                prior = CategoricalPrior(torch.ones(shape))
            gm.priors[site] = prior
        readout = config.get("mask_readout")
        if readout is not None:
            check_keys(readout, ["levels", "kernel_size", "size"],
                       source=f"{path} config, mask_readout")  # fmt: skip
            specs = {s.name: s for s in levels}
            unknown = [n for n in readout["levels"] if n not in specs]
            if unknown:
                raise ValueError(f"{path} config: the mask readout reads unknown levels {unknown}")
            gm.attach_mask_readout(MaskReadout(
                [specs[n] for n in readout["levels"]], size=tuple(readout["size"]),
                kernel_size=readout["kernel_size"], hidden=readout.get("hidden", 0),
                reads_input=readout.get("reads_input", False),
            ))  # fmt: skip
        for name, obs in gm.observations.items():
            # β and σ2 are one number per level, or one per channel (fit_background).
            if state.get(f"observations.{name}.background", torch.zeros(())).dim() == 3:
                obs.per_channel_background()
        expected = gm.state_dict()
        bad = [k for k in expected if k not in state or state[k].shape != expected[k].shape] + [
            k for k in state if k not in expected
        ]
        if bad:
            raise ValueError(f"{path}: tensors do not match its own config: {bad[:5]}")
        if version >= 3:
            dtype = getattr(torch, str(config["dtype"]), None)
            if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
                raise ValueError(f"{path} config: unknown dtype {config['dtype']!r}")
        else:  # version 2 recorded no dtype: the tensors carry it
            dtype = state["observations.image.threshold"].dtype
        gm.to(dtype=dtype)
        gm.load_state_dict(state)
        gm.check_parameters(source=str(path))
        record = config.get("backbone")
        given = backbone is not None
        if record is not None:
            if not isinstance(record, dict) or not isinstance(record.get("name"), str):
                raise ValueError(f"{path} config: the backbone record {record!r} names none")
            gm.__dict__["_backbone_record"] = dict(record)  # attach it with attach_backbone
            shipped = record["name"] in SHIPPED_BACKBONES
            if not given and shipped:
                backbone = Backbone.shipped(record["name"])
            elif not given and _backbone_file_exists(record.get("path")):
                backbone = Backbone.load(record["path"])
        if backbone is not None:
            if record is not None and backbone_fingerprint(backbone) != record.get("sha256"):
                if given:
                    raise ValueError(
                        f"{path} was fitted to another backbone than the one given (fingerprints "
                        "differ); pass backbone= the one it was fitted to"
                    )
                where = f"the {record['name']!r} backbone" if shipped else record["path"]
                raise ValueError(
                    f"{path} was fitted to another version of {where} (fingerprints differ); "
                    "refit it with `pyro-backpass train`, or pass backbone= the one it was "
                    "fitted to"
                )
            gm.attach_backbone(
                backbone,
                name="custom" if record is None else record["name"],
                path=None if record is None else record.get("path"),
            )
        return gm.to(device) if device is not None else gm

    @classmethod
    def default(cls, *, backbone: str = "default") -> GenerativeModel:
        """The shipped model of a shipped backbone (weights inside the package, no download),
        trained by ``pyro-backpass train --preset default`` (README: the command and seed);
        ``gm.backbone`` is its backbone.

        :param backbone: ``"default"`` (the shipped model, which every other shipped file —
            descent verifiers, parse thresholds — belongs to), or ``"localised"``: the same
            recipe on ``Backbone.default(localised=True)`` (issue #10's lever 3; no verifier or
            parse threshold is shipped for it yet).
        """
        if backbone not in _SHIPPED_MODELS:
            raise ValueError(
                f"no shipped model of backbone {backbone!r}; shipped: {list(_SHIPPED_MODELS)}"
            )
        name = _SHIPPED_MODELS[backbone]
        ref = resources.files("pyro_backpass").joinpath("weights", name)
        with resources.as_file(ref) as path:
            if not path.exists():
                raise FileNotFoundError(
                    f"the shipped generative model weights/{name} is missing from the "
                    "package; train one with `pyro-backpass train`"
                )
            return cls.load(path)

    def extra_repr(self) -> str:
        ks = ", ".join(f"{k}={v}" for k, v in self.num_components.items())
        return f"categories={list(self._categories)}, K: {ks}"
