"""``Backbone``: one interface to the CNNs whose activations the generative model explains.

``backbone(images) -> Activations`` for raw RGB images in ``[0, 1]``; the backbone applies its
own normalisation (the training set's statistics for :class:`SmallVGG`, ImageNet's for VGG16).
Two kinds ship:

* :meth:`Backbone.default` — the built-in :class:`SmallVGG` trained on the rendered categories
  (weights inside the package, no download). ``compositional=True`` gives the one trained with
  the compositionality objective of Stone et al. (2017), see :mod:`.train`.
* :meth:`Backbone.vgg16` — torchvision's VGG16 ``features`` (conv1_1 … pool5), from a local
  state_dict file, from torchvision's local cache, or randomly initialised. Never downloads.

A checkpoint is two files with one stem: ``NAME.safetensors`` (the tensors) and ``NAME.json``
(format version, architecture, cfg, categories, image size, normalisation, training record and
the SHA-256 of the tensors file, so that a corrupt, truncated or swapped file is caught).

References:
    Wang, Zhang, Xie, Yuille (2016). A backward pass through a CNN using a generative model
    of its activations. arXiv:1611.02767.
    Simonyan, Zisserman (2015). Very deep convolutional networks for large-scale image
    recognition. ICLR.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pyro_backpass.backbone.activations import Activations, read_levels
from pyro_backpass.backbone.small_vgg import SmallVGG, make_layers
from pyro_backpass.files import atomic_write, atomic_write_json, check_keys, read_json
from pyro_backpass.levels import Cfg, LevelSpec, levels_from_cfg

__all__ = [
    "Backbone",
    "FORMAT_VERSION",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SHIPPED_BACKBONES",
    "VGG16_CFG",
]

FORMAT_VERSION = 1
FORMAT_NAME = "pyro_backpass.backbone"
# torchvision's cfgs["D"].
VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Images are checked to lie in [0, 1]; resampling and compositing leave rounding errors.
_RANGE_TOL = 1e-4
# The backbones inside the package, by the name models record: their weights files.
_SHIPPED = {
    "default": "small_vgg",
    "compositional": "small_vgg_compositional",
    "localised": "small_vgg_localised",
}
SHIPPED_BACKBONES: tuple[str, ...] = tuple(_SHIPPED)


class Backbone(nn.Module):
    """A VGG-style feature stack with canonical level names, normalisation and optional head.

    :param features: a ``make_layers``-style stack (conv, ReLU per int, max-pool per "M").
    :param cfg: the config list it was built from.
    :param head: maps the last pool's map ``(B, C, h, w)`` to logits ``(B, K)``; ``None`` for
        a features-only backbone (VGG16), which then has no ``category`` level and no ``predict``.
    :param categories: the K category names, in logit order.
    :param image_size: the input size the backbone was trained at; ``levels`` are given for it.
    :param mean, std: per-channel normalisation applied to the ``[0, 1]`` input.
    """

    def __init__(
        self,
        features: nn.Sequential,
        cfg: Cfg,
        *,
        head: nn.Module | None = None,
        categories: Sequence[str] = (),
        image_size: int | tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        architecture: str = "small_vgg",
        info: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if (head is None) != (len(categories) == 0):
            raise ValueError("a head needs categories and categories need a head")
        if len(set(categories)) != len(categories):
            raise ValueError(f"duplicate category names: {list(categories)}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 entries, std > 0; got {mean}, {std}")
        self.features = features
        self.head = head
        self.cfg: tuple[int | str, ...] = tuple(cfg)
        self.categories: tuple[str, ...] = tuple(categories)
        self.image_size: tuple[int, int] = (
            (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        )
        self.architecture = architecture
        self.info: dict[str, Any] = dict(info or {})
        # Buffers follow .to(device); not persistent because the JSON config holds them.
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    # ----------------------------------------------------------------------------- builders

    @classmethod
    def from_small_vgg(
        cls,
        net: SmallVGG,
        *,
        categories: Sequence[str],
        image_size: int | tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        info: Mapping[str, Any] | None = None,
    ) -> Backbone:
        """Wrap a (trained) :class:`SmallVGG`; shares its parameters."""
        if len(categories) != net.num_classes:
            raise ValueError(f"{len(categories)} categories for a {net.num_classes}-class net")
        return cls(
            net.features,
            net.cfg,
            head=_GapHead(net.classifier),
            categories=categories,
            image_size=image_size,
            mean=mean,
            std=std,
            info=info,
        )

    @classmethod
    def default(cls, *, compositional: bool = False, localised: bool = False) -> Backbone:
        """The shipped :class:`SmallVGG`, trained on the rendered categories (no download).

        ``compositional=True`` loads the backbone trained with the compositionality objective
        of Stone et al. (2017). That method is covered by US patent 11,216,727; check whether
        it applies to your use before relying on it. ``localised=True`` loads the one also
        trained with per-cell category labels from scene masks (``train-backbone
        --localised``, issue #10's lever 3; README: what it buys).
        """
        if compositional and localised:
            raise ValueError("choose compositional or localised, not both (none is shipped)")
        return cls.shipped("compositional" if compositional else
                           "localised" if localised else "default")  # fmt: skip

    @classmethod
    def shipped(cls, name: str) -> Backbone:
        """A shipped backbone by the name models record: one of :data:`SHIPPED_BACKBONES`."""
        if name not in _SHIPPED:
            raise ValueError(f"no shipped backbone {name!r}; shipped: {list(_SHIPPED)}")
        name = _SHIPPED[name]
        ref = resources.files("pyro_backpass").joinpath("weights", f"{name}.safetensors")
        with resources.as_file(ref) as path:
            if not path.exists():
                raise FileNotFoundError(
                    f"shipped weights {name}.safetensors are missing from the package; "
                    "train them with `pyro-backpass train-backbone`"
                )
            return cls.load(path)

    @classmethod
    def vgg16(cls, *, weights: str | os.PathLike | None = None) -> Backbone:
        """torchvision's VGG16 ``features`` (conv1_1 … pool5) with ImageNet normalisation.

        :param weights: ``None`` for random initialisation; a path to a state_dict file
            (``.pth``/``.pt`` via ``torch.load(weights_only=True)`` or ``.safetensors``) holding
            either a full ``vgg16`` state_dict or its ``features`` alone; or ``"cache"`` to use
            torchvision's ImageNet weights if they are already in the local torch hub cache.
            Nothing is ever downloaded.
        """
        if weights is not None and not isinstance(weights, (str, os.PathLike)):
            raise TypeError(
                f"Backbone.vgg16(weights=...) takes None, 'cache' or a path (str or "
                f"os.PathLike), got {type(weights).__name__} {weights!r}"
            )
        features = make_layers(VGG16_CFG)
        if weights is not None:
            if isinstance(weights, str) and weights == "cache":
                path = _vgg16_cache_path()
                if not path.exists():
                    raise FileNotFoundError(
                        f"VGG16 ImageNet weights are not in the torch hub cache ({path}). "
                        "Nothing is downloaded here: place vgg16-397923af.pth there, or pass "
                        "weights=PATH to a state_dict file, or weights=None for random weights."
                    )
            else:
                path = Path(weights)
            state = _features_state(_read_state_dict(path), path)
            _load_checked(features, state, path, what="VGG16 features")
        return cls(
            features,
            VGG16_CFG,
            image_size=224,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            architecture="vgg16",
        )

    # -------------------------------------------------------------------------- properties

    @property
    def levels(self) -> tuple[LevelSpec, ...]:
        """Specs of ``image``, every conv/pool level and (with a head) ``category``."""
        return self.levels_for(self.image_size)

    def levels_for(self, image_size: int | tuple[int, int]) -> tuple[LevelSpec, ...]:
        """Like :attr:`levels`, for inputs of another size."""
        specs = levels_from_cfg(self.cfg, image_size=image_size, num_categories=1)
        if self.head is None:
            return specs[:-1]
        return specs[:-1] + (LevelSpec("category", "category", len(self.categories), 1, 1),)

    def category_index(self, name: str) -> int:
        """Index of a category name in :attr:`categories`."""
        try:
            return self.categories.index(name)
        except ValueError:
            raise KeyError(
                f"unknown category {name!r}; this backbone knows {list(self.categories)}"
            ) from None

    # ------------------------------------------------------------------------------ forward

    def forward(self, images: Tensor) -> Activations:
        """Activations of raw RGB ``images`` ``(B, 3, H, W)`` in ``[0, 1]``.

        The ``image`` level is the raw input; the others are read after each conv's ReLU and
        each pool. Gradients flow (wrap in ``torch.no_grad()`` for inference).
        """
        self._check_images(images)
        x = (images - self.mean) / self.std
        tensors: dict[str, Tensor] = {"image": images}
        tensors.update(read_levels(self.features, self.cfg, x))
        specs = self.levels_for(tuple(images.shape[-2:]))
        return Activations(tensors, tuple(s for s in specs if s.kind != "category"))

    def logits(self, acts: Activations | Tensor) -> Tensor:
        """Category logits ``(B, K)`` from activations (or from images, which runs forward)."""
        if self.head is None:
            raise ValueError(
                f"this {self.architecture} backbone is features-only: it has no classifier head"
            )
        if isinstance(acts, Tensor):
            acts = self(acts)
        return self.head(acts[list(acts)[-1]])

    def cell_logits(self, acts: Activations | Tensor) -> Tensor:
        """Per-cell category logits ``(B, K, h, w)`` of the top level (the class activation
        map): the head's linear layer at every cell, whose mean over cells is :meth:`logits`.
        Only for a global-average-pool head (:class:`SmallVGG`)."""
        if not isinstance(self.head, _GapHead):
            raise ValueError(
                f"this {self.architecture} backbone has no global-average-pool head: per-cell "
                "logits need one (SmallVGG has)"
            )
        if isinstance(acts, Tensor):
            acts = self(acts)
        return self.head.cells(acts[list(acts)[-1]])

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        """Most probable category per image: LongTensor ``(B,)`` indexing :attr:`categories`."""
        return self.logits(images).argmax(dim=-1)

    def _check_images(self, images: Tensor) -> None:
        if not isinstance(images, Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.dim() != 4:
            hint = " (a single image? use images.unsqueeze(0))" if images.dim() == 3 else ""
            raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}{hint}")
        if images.shape[1] != 3:
            raise ValueError(f"images must have 3 (RGB) channels, got {images.shape[1]}")
        if not images.is_floating_point():
            raise TypeError(
                f"images must be floating point in [0, 1], got {images.dtype}"
                + (" (uint8? divide by 255)" if images.dtype == torch.uint8 else "")
            )
        if images.dtype != self.mean.dtype:
            raise TypeError(
                f"images are {images.dtype} but the backbone is {self.mean.dtype}; "
                "convert one of them (.to(dtype))"
            )
        n_pools = sum(1 for c in self.cfg if c == "M")
        if min(images.shape[-2:]) < 2**n_pools:
            raise ValueError(
                f"images of {images.shape[-2]}x{images.shape[-1]} px are too small for "
                f"{n_pools} pools (need >= {2**n_pools} px)"
            )
        if images.numel() == 0:
            raise ValueError("images is an empty batch")
        if not torch.isfinite(images).all():
            raise ValueError("images contain NaN or inf pixels")
        lo, hi = images.min().item(), images.max().item()
        if lo < -_RANGE_TOL or hi > 1 + _RANGE_TOL:
            raise ValueError(
                f"images must be raw RGB in [0, 1] (the backbone normalises them itself); "
                f"got values in [{lo:.3g}, {hi:.3g}]"
            )

    # -------------------------------------------------------------------------- save / load

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``STEM.safetensors`` and ``STEM.json`` atomically; returns the tensors path."""
        from safetensors.torch import save_file

        if self.architecture != "small_vgg":
            raise ValueError(f"only small_vgg backbones are saved, not {self.architecture}")
        path = _tensors_path(path)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
        config = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "architecture": self.architecture,
            "cfg": list(self.cfg),
            "categories": list(self.categories),
            "image_size": list(self.image_size),
            "normalisation": {
                "mean": self.mean.flatten().tolist(),
                "std": self.std.flatten().tolist(),
            },
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "info": self.info,
        }
        atomic_write_json(path.with_suffix(".json"), config)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Backbone:
        """Load a checkpoint written by :meth:`save` (either file of the pair, or the stem)."""
        from safetensors import SafetensorError
        from safetensors.torch import load as load_bytes

        path = _tensors_path(path)
        cfg_path = path.with_suffix(".json")
        for p in (path, cfg_path):
            if not p.exists():
                raise FileNotFoundError(f"backbone checkpoint file {p} does not exist")
        config = read_json(cfg_path)
        check_keys(config, ["format"], source=cfg_path)
        if config.get("format") != FORMAT_NAME:
            raise ValueError(f"{cfg_path} is not a pyro_backpass backbone config")
        if config.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{cfg_path} has format version {config.get('format_version')}; "
                f"this pyro_backpass reads version {FORMAT_VERSION}"
            )
        if config.get("architecture") != "small_vgg":
            raise ValueError(
                f"{cfg_path} is for architecture {config.get('architecture')!r}; "
                "Backbone.load reads small_vgg checkpoints (use Backbone.vgg16 for VGG16)"
            )
        check_keys(config, ["cfg", "categories", "image_size", "normalisation", "sha256"],
                   source=cfg_path)  # fmt: skip
        check_keys(config["normalisation"], ["mean", "std"], source=f"{cfg_path} normalisation")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != config.get("sha256"):
            raise ValueError(
                f"{path} is corrupt, truncated or not the file {cfg_path.name} describes "
                "(SHA-256 mismatch)"
            )
        try:
            state = load_bytes(data)
        except SafetensorError as err:
            raise ValueError(f"{path} is not a readable safetensors file: {err}") from None
        categories = list(config["categories"])
        norm = config["normalisation"]
        backbone = cls.from_small_vgg(
            SmallVGG(config["cfg"], num_classes=len(categories)),
            categories=categories,
            image_size=tuple(config["image_size"]),
            mean=norm["mean"],
            std=norm["std"],
            info=config.get("info", {}),
        )
        _load_checked(backbone, state, path, what=f"SmallVGG{list(config['cfg'])}")
        return backbone

    def extra_repr(self) -> str:
        return (
            f"architecture={self.architecture}, cfg={list(self.cfg)}, "
            f"image_size={self.image_size}, categories={list(self.categories)}"
        )


class _GapHead(nn.Module):
    """Global average pool + linear: the :class:`SmallVGG` head, sharing its layer."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, top: Tensor) -> Tensor:
        return self.linear(top.mean(dim=(-2, -1)))  # (B, C, h, w) -> (B, K)

    def cells(self, top: Tensor) -> Tensor:
        """The linear layer at every cell: ``(B, C, h, w) -> (B, K, h, w)``."""
        return (
            torch.einsum("bchw,kc->bkhw", top, self.linear.weight) + self.linear.bias[:, None, None]
        )


def _tensors_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.suffix in (".json", ".safetensors"):
        return path.with_suffix(".safetensors")
    if path.suffix:
        raise ValueError(
            f"{path}: a backbone checkpoint is a .safetensors + .json pair "
            "(for a torchvision state_dict use Backbone.vgg16(weights=PATH))"
        )
    return path.with_suffix(".safetensors")


def _vgg16_cache_path() -> Path:
    from torchvision.models import VGG16_Weights

    name = os.path.basename(VGG16_Weights.IMAGENET1K_V1.url)
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.exists():
        raise FileNotFoundError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch/safetensors raise many types for a damaged file
        raise ValueError(
            f"could not read weights file {path} (corrupt, truncated or not a state_dict): {err}"
        ) from None
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"weights file {path} does not hold a state_dict of tensors")
    return dict(state)


def _features_state(state: dict[str, Tensor], path: Path) -> dict[str, Tensor]:
    """Accept a full vgg16 state_dict (``features.N.*``, ``classifier.*``) or features-only."""
    if any(k.startswith("features.") for k in state):
        state = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
    return state


def _load_checked(module: nn.Module, state: Mapping[str, Tensor], path: Path, *, what: str) -> None:
    """``load_state_dict`` with an error that names the file and the first mismatch."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        detail = "; ".join(
            part
            for part in (
                f"missing {missing[:3]}" if missing else "",
                f"unexpected {unexpected[:3]}" if unexpected else "",
                f"shape mismatch {wrong[:3]}" if wrong else "",
            )
            if part
        )
        raise ValueError(f"weights file {path} is not for {what} (another architecture?): {detail}")
    module.load_state_dict(state)
