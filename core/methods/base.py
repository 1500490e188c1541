"""The adapter contract shared by every PETL method.

Read in this order: the model's shape (``Arch``), what to adapt (``Targets``), the option dataclass every method
config derives from (``MethodConfig``), the module types (``AdapterModule``, ``Wrapper``, ``LinearWrapper``,
``ScaleShift``), and the two structural functions that decide what trains and how a model is merged.

Conventions: weights are in PyTorch layout (out x in, ``y = x @ W.T + b``). timm fuses q, k and v in one
``attn.qkv`` linear whose output rows are ``q | k | v``; a method that adapts only some of those slices builds a
block-structured update of the whole fused weight.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.config import coerce_fields

MATRICES: tuple[str, ...] = ("q", "k", "v", "proj", "fc1", "fc2")
GROUPS: dict[str, tuple[str, ...]] = {
    "all": MATRICES,
    "attn": ("q", "k", "v", "proj"),
    "qkv": ("q", "k", "v"),
    "mlp": ("fc1", "fc2"),
}
QKV_SLICES: tuple[str, ...] = ("q", "k", "v")
# Which child linear of a block holds each matrix.
MATRIX_LINEAR: dict[str, str] = {
    "q": "attn.qkv",
    "k": "attn.qkv",
    "v": "attn.qkv",
    "proj": "attn.proj",
    "fc1": "mlp.fc1",
    "fc2": "mlp.fc2",
}


# ----------------------------------------------------------------------------------------------------------------
# The model's shape
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Arch:
    """The sizes of a timm ViT that the methods need, read from the model (never assumed)."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_hidden: int
    num_classes: int
    patch_size: int
    num_prefix_tokens: int

    @property
    def mlp_ratio(self) -> int:
        """How many d-wide blocks fc1 has (4 for every standard ViT); refuses non-integer ratios."""
        if self.mlp_hidden % self.embed_dim:
            raise ValueError(
                f"this model's MLP hidden width {self.mlp_hidden} is not a multiple of its width "
                f"{self.embed_dim}; FacT's tensorisation needs whole d x d slices"
            )
        return self.mlp_hidden // self.embed_dim

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def inspect_vit(model: nn.Module) -> Arch:
    """Check that ``model`` is a timm ViT the methods can adapt, and read its sizes.

    Raises:
        ValueError: naming what is missing, if the model lacks ``blocks[i].attn.qkv``/``attn.proj``/``mlp.fc1``/
            ``mlp.fc2`` linears, a ``patch_embed`` or ``get_classifier``.
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential | nn.ModuleList) or len(blocks) == 0:
        raise ValueError(
            f"{type(model).__name__} is not a timm Vision Transformer: it has no `blocks`. PETLab adapts timm ViTs "
            "whose blocks have attn.qkv, attn.proj, mlp.fc1 and mlp.fc2 linears (vit_*, deit_*, DINOv2, ...)."
        )
    for i, block in enumerate(blocks):
        for path in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            try:
                layer = block.get_submodule(path)
            except AttributeError:
                layer = None
            if not isinstance(layer, nn.Linear):
                raise ValueError(
                    f"{type(model).__name__} is not a timm ViT PETLab can adapt: blocks.{i}.{path} is "
                    f"{'missing' if layer is None else type(layer).__name__}, expected nn.Linear"
                )
    if not hasattr(model, "patch_embed") or not hasattr(model, "get_classifier"):
        raise ValueError(f"{type(model).__name__} is not a timm ViT: it lacks patch_embed or get_classifier()")
    attn = blocks[0].attn
    embed_dim = attn.qkv.in_features
    if attn.qkv.out_features != 3 * embed_dim:
        raise ValueError(f"blocks.0.attn.qkv maps {embed_dim} -> {attn.qkv.out_features}, expected 3 x {embed_dim}")
    patch = model.patch_embed.patch_size
    return Arch(
        embed_dim=embed_dim,
        depth=len(blocks),
        num_heads=int(attn.num_heads),
        mlp_hidden=blocks[0].mlp.fc1.out_features,
        num_classes=int(getattr(model, "num_classes", 0)),
        patch_size=int(patch[0] if isinstance(patch, tuple | list) else patch),
        num_prefix_tokens=int(getattr(model, "num_prefix_tokens", 1)),
    )


# ----------------------------------------------------------------------------------------------------------------
# What to adapt
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Targets:
    """Which matrices of which blocks a method adapts: a union of (matrices x blocks) terms.

    The text form is the one serialised value everywhere (configs, run store, CLI, intrinsic-dimension selection):
    terms separated by ``;``, each ``MATRICES[:BLOCKS]``. MATRICES is a comma list of ``q k v proj fc1 fc2`` or the
    groups ``all attn qkv mlp``; BLOCKS is a comma list of indices and inclusive ranges (``0-5,8``), all blocks when
    left out. Examples: ``"q,v"``, ``"all"``, ``"attn:0-5;mlp:6-11"``.
    """

    terms: tuple[tuple[tuple[str, ...], tuple[int, ...] | None], ...]

    @classmethod
    def parse(cls, value: str | Targets) -> Targets:
        """Parse the text form; raises ValueError naming the bad part and what is allowed."""
        if isinstance(value, Targets):
            return value
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"targets must be a non-empty string like 'q,v' or 'attn:0-5;mlp:6-11', got {value!r}")
        terms = []
        for raw in value.split(";"):
            term = raw.strip().replace(" ", "")
            if not term:
                continue
            mats_text, _, blocks_text = term.partition(":")
            mats: list[str] = []
            for m in mats_text.split(","):
                if m in GROUPS:
                    mats.extend(GROUPS[m])
                elif m in MATRICES:
                    mats.append(m)
                else:
                    raise ValueError(
                        f"unknown target matrix {m!r} in targets {value!r}; allowed: {', '.join(MATRICES)} "
                        f"or the groups {', '.join(GROUPS)}"
                    )
            ordered = tuple(m for m in MATRICES if m in mats)
            blocks = _parse_blocks(blocks_text, value) if blocks_text else None
            terms.append((ordered, blocks))
        if not terms:
            raise ValueError(f"targets {value!r} names nothing to adapt")
        return cls(tuple(terms))

    def __str__(self) -> str:
        parts = []
        for mats, blocks in self.terms:
            text = next((g for g, ms in GROUPS.items() if ms == mats), ",".join(mats))
            if blocks is not None:
                text += ":" + _format_blocks(blocks)
            parts.append(text)
        return ";".join(parts)

    def resolve(self, depth: int) -> dict[int, tuple[str, ...]]:
        """Map block index -> the matrices adapted there (in ``MATRICES`` order), for a model of ``depth`` blocks."""
        chosen: dict[int, set[str]] = {}
        for mats, blocks in self.terms:
            for b in range(depth) if blocks is None else blocks:
                if not 0 <= b < depth:
                    raise ValueError(f"targets {str(self)!r} names block {b}, but the model has blocks 0-{depth - 1}")
                chosen.setdefault(b, set()).update(mats)
        return {b: tuple(m for m in MATRICES if m in chosen[b]) for b in sorted(chosen)}


def _parse_blocks(text: str, whole: str) -> tuple[int, ...]:
    out: set[int] = set()
    for part in text.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise ValueError(f"bad block list {text!r} in targets {whole!r}; use indices and ranges like '0-5,8'")
        lo, hi = int(match[1]), int(match[2] or match[1])
        if hi < lo:
            raise ValueError(f"bad block range {part!r} in targets {whole!r}: the end is before the start")
        out.update(range(lo, hi + 1))
    return tuple(sorted(out))


def _format_blocks(blocks: tuple[int, ...]) -> str:
    runs: list[list[int]] = []
    for b in blocks:
        if runs and b == runs[-1][1] + 1:
            runs[-1][1] = b
        else:
            runs.append([b, b])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


# ----------------------------------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's options. Subclasses add typed fields with defaults and override ``check``."""

    def check(self, arch: Arch) -> None:
        """Validate the options against the model; raise ValueError naming the bad value and what is allowed."""

    @classmethod
    def from_options(cls, **options: Any) -> MethodConfig:
        """Build from keyword options (from Python, the CLI or a saved file), text converted to the field types.

        Raises:
            ValueError: an unknown option, or a value that is not of its field's type.
        """
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - set(fields))
        if unknown:
            allowed = ", ".join(fields) or "none"
            raise ValueError(f"unknown option(s) {', '.join(unknown)} for this method; allowed: {allowed}")
        return cls(**coerce_fields(cls, options))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (targets as their text form)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {k: (str(v) if isinstance(v, Targets) else v) for k, v in values.items()}


# ----------------------------------------------------------------------------------------------------------------
# Module types
# ----------------------------------------------------------------------------------------------------------------
class AdapterModule(nn.Module):
    """Marker base: every parameter an AdapterModule owns trains, except those of a wrapped ``base`` module."""


class Wrapper(AdapterModule):
    """Wraps one child of the ViT (``self.base``, frozen) and adds a small trainable module around it."""

    mergeable: ClassVar[bool] = False

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base

    def __getattr__(self, name: str) -> Any:
        # Attributes the ViT reads from the wrapped child (patch_embed.img_size, qkv.in_features, block.attn, ...)
        # stay reachable through the wrapper.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base" or "base" not in self._modules:
                raise
            return getattr(self._modules["base"], name)

    def merged(self) -> nn.Module:
        """Return ``base`` with this wrapper's update folded in (in place). Only for mergeable wrappers."""
        raise TypeError(f"{type(self).__name__} cannot be merged into the backbone")


def linear_slices(base: nn.Linear, mats: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """Output-row ranges of the adapted parts of a linear, keyed by matrix name: some q/k/v slices of a fused
    qkv, or one whole matrix (``proj``, ``fc1``, ``fc2``)."""
    if mats[0] not in QKV_SLICES:
        return {mats[0]: (0, base.out_features)}
    d = base.out_features // len(QKV_SLICES)
    return {m: (i * d, (i + 1) * d) for i, m in enumerate(QKV_SLICES) if m in mats}


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a matmul of ``x`` runs in here: autocast's lower precision where autocast is on for ``x``'s device
    (it leaves float64 alone), else ``x``'s own. For autograd functions that cast explicitly and run their products
    with autocast off, so that forward and backward use one dtype."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.dtype != torch.float64:
        return torch.get_autocast_dtype(device)
    return x.dtype


def long_contraction(a: Tensor, b: Tensor) -> Tensor:
    """``a^T b`` for a (M x k) with few columns and b (M x n) over a long M: the gradient of a thin product's small
    factor (its code against the input or the output gradient).

    On the CPU one such product keeps about one core busy whatever the threads (its k x n output is too small to
    share out). Split along M into one equal chunk per thread and run as one batched product, it uses them all;
    the chunks' results are then summed (the rounding differs from one product's). On other devices, or where M
    does not split evenly, it is one product.
    """
    m = a.shape[0]
    chunks = torch.get_num_threads() if a.device.type == "cpu" else 1
    while chunks > 1 and m % chunks:
        chunks -= 1
    if chunks == 1:
        return a.T @ b
    a_chunks, b_chunks = a.reshape(chunks, m // chunks, -1), b.reshape(chunks, m // chunks, -1)
    return torch.bmm(a_chunks.transpose(1, 2), b_chunks).sum(0)


def _layer_norm_output(node: torch.autograd.graph.Node) -> Tensor:
    """A LayerNorm's output from what its backward keeps: the input and the mean and 1/std it normalised with
    (equal to the forward's output up to rounding)."""
    out = (node._saved_input - node._saved_result1).mul_(node._saved_result2)
    if node._saved_weight is not None:
        out.mul_(node._saved_weight)
    return out if node._saved_bias is None else out.add_(node._saved_bias)


# The producers whose output can be rebuilt from their own backward's saved tensors, by autograd node type.
_REBUILDS: dict[str, Callable[[torch.autograd.graph.Node], Tensor]] = {
    "NativeLayerNormBackward0": _layer_norm_output,
    "GeluBackward0": lambda node: F.gelu(node._saved_self, approximate=node._saved_approximate),
}


def save_input(ctx: torch.autograd.function.FunctionCtx, x: Tensor, used: Tensor, *tensors: Tensor | None) -> None:
    """``ctx.save_for_backward(used, *tensors)`` for a custom autograd Function whose backward needs its input:
    ``x`` as the Function received it, ``used`` as its products read it (``x`` cast to the compute dtype).

    Where ``x`` is the output of a LayerNorm or a GELU (timm's norm1 and norm2 before qkv and fc1, the MLP's
    activation before fc2), the producer's own backward keeps its input anyway, and ``used`` is not kept: the
    backward rebuilds it from the producer's saved tensors in one elementwise pass (``saved_input``). An adapted
    linear there then keeps no activation of the width of its input beyond what the frozen backbone keeps.
    """
    node = x.grad_fn
    rebuildable = node is not None and type(node).__name__ in _REBUILDS and x._base is None and x.output_nr == 0
    ctx.input_producer = node if rebuildable else None
    ctx.input_dtype, ctx.input_device = used.dtype, used.device.type
    ctx.save_for_backward(None if rebuildable else used, *tensors)


def saved_input(ctx: torch.autograd.function.FunctionCtx) -> tuple[Tensor, ...]:
    """What ``save_input`` saved: ``used`` (rebuilt where it was not kept), then the other tensors."""
    used, *tensors = ctx.saved_tensors
    node = ctx.input_producer
    if node is not None:
        with torch.no_grad(), torch.autocast(ctx.input_device, enabled=False):
            used = _REBUILDS[type(node).__name__](node).to(ctx.input_dtype)
    return (used, *tensors)


def _block(expand: Tensor, j: int) -> Tensor:
    """Block j's expansion: the shared one, or row j of a per-block stack."""
    return expand if expand.dim() == 2 else expand[j]


class LowRankProduct(torch.autograd.Function):
    """``y = x W^T + b`` plus a low-rank update on the activations, with the backward written out.

    The update's code is ``z = x R^T`` (N, k r) with the reduction R (k r x in); output block ``blocks[j]`` (d wide)
    gains ``z_j E_j`` with E_j the expansion (r x d): one E shared by every block (FacT's s V^T), or one per block,
    E of shape (k, r, d) (LoRA's and KAdaptation's parts). Training dropout acts on the code (``code_dropout``,
    FacT's) or on the input the code reads (``input_dropout``, PEFT's ``lora_dropout``; the frozen product reads
    the input undropped). The frozen weight's product and the update share one output and one input gradient (the
    update's parts accumulated in place), and every thin product runs with its long dimension contiguous. The
    input is kept for the backward only where it cannot be rebuilt from its producer (``save_input``); dropout
    keeps its boolean mask.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        reduce: Tensor,
        expand: Tensor,
        blocks: tuple[int, ...],
        code_dropout: float,
        input_dropout: float,
    ) -> Tensor:
        dtype = compute_dtype(x)
        used, weight, reduce, expand = (t.to(dtype) for t in (x, weight, reduce, expand))
        r, d = expand.shape[-2:]
        with torch.autocast(x.device.type, enabled=False):
            rows = used.reshape(-1, x.shape[-1])
            read, input_mask = rows, None
            if input_dropout > 0:
                read, input_mask = torch.native_dropout(rows, input_dropout, True)
            z = read @ reduce.T  # (N, k r)
            code_mask = None
            if code_dropout > 0:
                z, code_mask = torch.native_dropout(z, code_dropout, True)
            y = F.linear(used, weight, None if bias is None else bias.to(dtype))
            out = y.view(rows.shape[0], -1, d)
            if expand.dim() == 2 and len(blocks) == out.shape[1]:  # one E, every block adapted: one product
                out.view(-1, d).addmm_(z.view(-1, r), expand)
            else:
                for j, block in enumerate(blocks):
                    out[:, block].addmm_(z[:, j * r : (j + 1) * r], _block(expand, j))
        save_input(ctx, x, used, weight, reduce, expand, z, code_mask, input_mask)
        ctx.blocks, ctx.has_bias = blocks, bias is not None
        ctx.code_scale, ctx.input_scale = 1 / (1 - code_dropout), 1 / (1 - input_dropout)
        return y

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, reduce, expand, z, code_mask, input_mask = saved_input(ctx)
        dropout_backward = torch.ops.aten.native_dropout_backward
        r, d = expand.shape[-2:]
        rows = x.reshape(-1, x.shape[-1])
        grad_rows = grad_y.reshape(rows.shape[0], -1).to(rows.dtype)
        grad_out = grad_rows.view(rows.shape[0], -1, d)
        blocks = ctx.blocks
        with torch.autocast(x.device.type, enabled=False):
            if expand.dim() == 2 and len(blocks) == grad_out.shape[1]:
                flat = grad_out.view(-1, d)
                grad_z = (flat @ expand.T).view(rows.shape[0], -1)
                grad_expand = long_contraction(z.view(-1, r), flat)
            else:
                grad_z = torch.cat([grad_out[:, block] @ _block(expand, j).T for j, block in enumerate(blocks)], 1)
                per_block = [z[:, j * r : (j + 1) * r].T @ grad_out[:, block] for j, block in enumerate(blocks)]
                grad_expand = sum(per_block) if expand.dim() == 2 else torch.stack(per_block)
            if code_mask is not None:
                grad_z = dropout_backward(grad_z, code_mask, ctx.code_scale)
            read = rows if input_mask is None else dropout_backward(rows, input_mask, ctx.input_scale)
            grad_reduce = long_contraction(grad_z, read)
            grad_x = grad_weight = grad_bias = None
            if ctx.needs_input_grad[0]:
                grad_x = grad_rows @ weight
                if input_mask is None:
                    grad_x.addmm_(grad_z, reduce)
                else:
                    grad_x.add_(dropout_backward(grad_z @ reduce, input_mask, ctx.input_scale))
                grad_x = grad_x.view(x.shape)
            if ctx.needs_input_grad[1]:
                grad_weight = grad_rows.T @ rows
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_bias = grad_rows.sum(0)
        return grad_x, grad_weight, grad_bias, grad_reduce, grad_expand, None, None, None


class LinearWrapper(Wrapper):
    """A frozen ``nn.Linear`` plus a weight update, ``y = x (W + dW)^T + b + db``.

    Subclasses implement ``delta_weight`` (and ``delta_bias`` where they shift the bias): the update of the whole
    weight in PyTorch layout. That one function serves merging and the spectra. The forward defaults to one product
    with ``W + delta_weight()``; the methods override it with a training forward of the same update that acts on the
    activations or needs less memory, and the tests check the two agree.

    Attributes:
        parts: output-row ranges of the adapted parts, keyed by matrix name (``{"fc1": whole}`` or some of
            ``q``, ``k``, ``v`` for a fused qkv).
        part_blocks: for each part, its block of the output in blocks one part wide (``LowRankProduct``'s
            ``blocks``): its q/k/v slice of a fused qkv, else the one block.
    """

    mergeable: ClassVar[bool] = True

    def __init__(self, base: nn.Linear, mats: tuple[str, ...]) -> None:
        super().__init__(base)
        self.parts = linear_slices(base, mats)
        self.fused = mats[0] in QKV_SLICES
        self.part_blocks = tuple(QKV_SLICES.index(m) for m in self.parts) if self.fused else (0,)

    @property
    def weight(self) -> Tensor:
        return self.base.weight

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.base.weight + self.delta_weight(), self.updated_bias())

    def delta_weight(self) -> Tensor:
        raise NotImplementedError

    def delta_bias(self) -> Tensor | None:
        return None

    def updated_bias(self) -> Tensor | None:
        """The frozen bias plus ``delta_bias`` (either may be None)."""
        shift, bias = self.delta_bias(), self.base.bias
        if shift is None or bias is None:
            return bias if shift is None else shift
        return bias + shift

    def place(self, parts: dict[str, Tensor], dim: int = -1) -> Tensor:
        """Assemble per-part tensors into the full output size along ``dim``, zeros where nothing is adapted."""
        if not self.fused:
            return next(iter(parts.values()))
        ref = next(iter(parts.values()))
        d = self.base.out_features // len(QKV_SLICES)
        shape = list(ref.shape)
        shape[dim] = d
        chunks = [parts[m] if m in parts else ref.new_zeros(shape) for m in QKV_SLICES]
        return torch.cat(chunks, dim=dim)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        base = self.base
        base.weight.add_(self.delta_weight().to(base.weight.dtype))
        db = self.delta_bias()
        if db is not None:
            if base.bias is None:
                base.bias = nn.Parameter(torch.zeros_like(db, dtype=base.weight.dtype))
            base.bias.add_(db.to(base.bias.dtype))
        return base


class ScaleShift(Wrapper):
    """SSF's per-channel ``y * gamma + beta`` after a LayerNorm, a linear or the patch embedding.

    Used by SSF (after every op) and by RLRR (after norm1, norm2, the final norm and the patch embedding). The
    channel dimension is the last one for all of these (timm's PatchEmbed flattens to tokens x channels). After a
    LayerNorm the pair runs as the norm's own affine (weight ``w gamma``, bias ``b gamma + beta``), so it costs
    no pass over the activations and keeps no output alive for the backward.
    """

    mergeable: ClassVar[bool] = True

    def __init__(self, base: nn.Module, channels: int, init: str) -> None:
        super().__init__(base)
        ref = next(base.parameters())
        self.scale = nn.Parameter(torch.ones(channels, device=ref.device, dtype=ref.dtype))
        self.shift = nn.Parameter(torch.zeros(channels, device=ref.device, dtype=ref.dtype))
        if init == "official":  # SSF's and RLRR's code: N(1, .02) and N(0, .02), not the identity at step 0
            nn.init.normal_(self.scale, 1.0, 0.02)
            nn.init.normal_(self.shift, 0.0, 0.02)

    def forward(self, x: Tensor) -> Tensor:
        base = self.base
        if isinstance(base, nn.LayerNorm):  # folded into the norm's affine: no extra pass, no extra saved output
            weight = self.scale if base.weight is None else base.weight * self.scale
            bias = self.shift if base.bias is None else torch.addcmul(self.shift, base.bias, self.scale)
            return F.layer_norm(x, base.normalized_shape, weight, bias, base.eps)
        return torch.addcmul(self.shift, base(x), self.scale)

    def delta_weight(self) -> Tensor:
        """For a wrapped linear: ``diag(scale) W - W`` (the spectra see SSF's update like any other)."""
        return (self.scale - 1)[:, None] * self.base.weight

    @torch.no_grad()
    def merged(self) -> nn.Module:
        s, t = self.scale, self.shift
        target = self.base
        if isinstance(target, nn.Module) and hasattr(target, "proj") and isinstance(target.proj, nn.Conv2d):
            # timm PatchEmbed: fold into the conv when nothing follows it, else into its norm's affine.
            target = target.proj if isinstance(target.norm, nn.Identity) else target.norm
        if isinstance(target, nn.Conv2d | nn.Linear):
            target.weight.mul_(s.view(-1, *([1] * (target.weight.dim() - 1))))
            bias = target.bias if target.bias is not None else torch.zeros_like(s)
            target.bias = nn.Parameter(bias * s + t)
        elif isinstance(target, nn.LayerNorm) and target.elementwise_affine:
            target.weight.mul_(s)
            if target.bias is None:
                target.bias = nn.Parameter(t.clone())
            else:
                target.bias.mul_(s).add_(t)
        else:
            raise TypeError(f"cannot fold a scale/shift into {type(target).__name__}")
        return self.base


def final_norm_path(model: nn.Module) -> str:
    """The encoder's final LayerNorm: ``norm`` for token pooling, ``fc_norm`` when timm moved it after pooling."""
    return "norm" if not isinstance(model.norm, nn.Identity) else "fc_norm"


def scale_shift_norms(model: nn.Module, blocks: list[int], channels: int, init: str) -> None:
    """SSF scale/shift after norm1 and norm2 of ``blocks``, the final norm and the patch embedding (SSF, RLRR)."""
    for b in blocks:
        for path in ("norm1", "norm2"):
            replace_child(model.blocks[b], path, ScaleShift(model.blocks[b].get_submodule(path), channels, init))
    for path in (final_norm_path(model), "patch_embed"):
        replace_child(model, path, ScaleShift(model.get_submodule(path), channels, init))


class Shared(AdapterModule):
    """Holds factors shared across layers (FacT's U and V, KAdaptation's slow weights) once, in ``model.petl``.

    Wrappers keep a plain (unregistered) reference, so the tensors appear once in ``state_dict`` and follow
    ``.to(device)`` with the model.
    """


class AdapterState(AdapterModule):
    """``model.petl``: which method was applied, with which options, and the shared factors."""

    def __init__(self, method: str, config: MethodConfig, arch: Arch) -> None:
        super().__init__()
        self.method = method
        self.config = config
        self.arch = arch
        self.shared = nn.ModuleDict()

    def extra_repr(self) -> str:
        return f"method={self.method}, config={self.config.to_dict()}"


def share(wrapper: nn.Module, shared: Shared) -> None:
    """Give ``wrapper`` an unregistered reference to ``shared`` (so it is not duplicated in ``state_dict``)."""
    object.__setattr__(wrapper, "shared", shared)


# ----------------------------------------------------------------------------------------------------------------
# Structural functions: what trains, where the wrappers are, merging
# ----------------------------------------------------------------------------------------------------------------
def replace_child(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)


def inject_per_linear(
    model: nn.Module, targets: Targets, depth: int, make: Callable[[nn.Linear, tuple[str, ...]], nn.Module]
) -> None:
    """Wrap each targeted linear once, in ``MATRICES`` order per block: ``make(base, mats)`` gets the adapted
    q/k/v slices of the fused qkv together, or the one matrix name of proj, fc1 or fc2."""
    for b, mats in targets.resolve(depth).items():
        block = model.blocks[b]
        qkv = tuple(m for m in mats if m in QKV_SLICES)
        for group in ([qkv] if qkv else []) + [(m,) for m in mats if m not in QKV_SLICES]:
            path = MATRIX_LINEAR[group[0]]
            replace_child(block, path, make(block.get_submodule(path), group))


def mark_trainable(model: nn.Module, backbone: str) -> None:
    """The one function that decides what trains, by module type.

    Args:
        backbone: which pretrained parameters train besides the adapter modules and the head: ``"none"``,
            ``"biases"`` (every bias of the backbone, BitFit) or ``"all"`` (full fine-tuning).
    """
    for p in model.parameters():
        p.requires_grad_(backbone == "all")
    if backbone == "biases":
        for module in model.modules():
            if not isinstance(module, AdapterModule) and isinstance(getattr(module, "bias", None), nn.Parameter):
                module.bias.requires_grad_(True)
    for module in model.modules():
        if isinstance(module, AdapterModule):
            wrapped = {id(p) for p in module.base.parameters()} if isinstance(module, Wrapper) else set()
            for p in module.parameters():
                if id(p) not in wrapped:
                    p.requires_grad_(True)
    for p in model.get_classifier().parameters():
        p.requires_grad_(True)


def wrappers(model: nn.Module) -> Iterator[tuple[str, Wrapper]]:
    """Every wrapper in the model with its path (methods never nest wrappers)."""
    for name, module in model.named_modules():
        if isinstance(module, Wrapper):
            yield name, module


def merge_wrappers(model: nn.Module) -> None:
    """Replace every wrapper by its base with the update folded in."""
    for name, wrapper in list(wrappers(model)):
        if not wrapper.mergeable:
            raise ValueError(f"{type(wrapper).__name__} at {name} cannot be merged into the backbone")
        replace_child(model, name, wrapper.merged())
