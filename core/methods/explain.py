"""What each registered method changes, for teaching: its update as formulas, its trainable count in closed form,
what it should do to the weights' spectrum, and its rows among the papers' published results.

One `Explanation` per method name (`EXPLANATIONS`); a test fails if a registered method has none. The closed forms
are written from each method's definition (Jie & Deng 2023 for FacT, Dong et al. 2024 for RLRR, He et al. 2023
for KAdaptation, the baselines' papers) and are checked against the weightless count of `core.experiment`, so the
formula a student reads is the count the code trains.

Formulas are LaTeX (for ``st.latex`` / KaTeX). Shapes are in PyTorch layout: W is d_out x d_in, y = x W^T + b.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from core.methods.base import Arch, inspect_vit
from core.methods.registry import get_method, list_methods, make_config


@dataclass(frozen=True)
class Shape:
    """The sizes of a timm ViT that the closed forms need (read from a model, never assumed).

    Attributes:
        arch: width d, depth L, MLP hidden width (m d), patch size p.
        channels: input image channels.
        positions: rows of the position embedding (grows with the image size).
        prefix_tokens: learned class and register tokens.
        layer_scale: whether the blocks carry LayerScale (DINOv2), two d-vectors per block.
    """

    arch: Arch
    channels: int
    positions: int
    prefix_tokens: int
    layer_scale: bool

    @classmethod
    def of(cls, model: nn.Module) -> Shape:
        """The shape of a timm ViT (a weightless ``core.backbone.skeleton`` is enough)."""
        arch = inspect_vit(model)
        pos = getattr(model, "pos_embed", None)
        tokens = sum(
            getattr(model, n).numel() for n in ("cls_token", "reg_token") if getattr(model, n, None) is not None
        )
        return cls(
            arch=arch,
            channels=model.patch_embed.proj.weight.shape[1],
            positions=pos.shape[1] if pos is not None else 0,
            prefix_tokens=tokens // arch.embed_dim,
            layer_scale=any(True for _ in getattr(model.blocks[0], "ls1", nn.Identity()).parameters()),
        )


@dataclass(frozen=True)
class ClosedForm:
    """A trainable count (head excluded) and how it is reached, with this backbone's numbers put in (LaTeX)."""

    value: int
    worked: str


@dataclass(frozen=True)
class Explanation:
    """One method, for the Learn page.

    Attributes:
        title: the method's name as the papers write it.
        changes: what it changes, in words (Markdown).
        update: the update as LaTeX lines, one ``st.latex`` each.
        count: the trainable count (head excluded) as a LaTeX formula in d, L, m, r, ...
        closed_form: ``closed_form(shape, config)`` evaluates that formula for a backbone and the method's options.
        spectrum: what the update is expected to do to the singular values of each adapted matrix (Markdown).
        references: the method's rows in the papers' published results (``core.pareto`` reference method labels).
    """

    title: str
    changes: str
    update: tuple[str, ...]
    count: str
    closed_form: Callable[[Shape, Any], ClosedForm]
    spectrum: str
    references: tuple[str, ...] = ()


def number(value: int) -> str:
    """An integer with thousands separators, in LaTeX (``{,}`` keeps KaTeX from spacing the comma)."""
    return f"{value:,}".replace(",", "{,}")


def _io(matrix: str, arch: Arch) -> tuple[int, int]:
    """(d_out, d_in) of one adapted matrix: a q/k/v slice, proj, fc1 or fc2."""
    d, h = arch.embed_dim, arch.mlp_hidden
    return {"fc1": (h, d), "fc2": (d, h)}.get(matrix, (d, d))


def _adapted(config: Any, arch: Arch) -> list[tuple[int, str]]:
    """(block, matrix) of every matrix the config's ``targets`` adapt."""
    return [(b, m) for b, mats in config.targets.resolve(arch.depth).items() for m in mats]


def _linears(config: Any, arch: Arch) -> list[tuple[int, str]]:
    """(block, layer) of every adapted linear layer: the q/k/v slices of one block share the fused ``qkv``."""
    layers = {(b, "qkv" if m in "qkv" else m) for b, m in _adapted(config, arch)}
    return sorted(layers)


# ----------------------------------------------------------------------------------------------------------------
# Closed forms, one per method
# ----------------------------------------------------------------------------------------------------------------
def _fact(shape: Shape, config: Any) -> ClosedForm:
    arch, r = shape.arch, config.rank
    d, m = arch.embed_dim, arch.mlp_ratio
    slices = sum(m if mat in ("fc1", "fc2") else 1 for _, mat in _adapted(config, arch))
    if config.variant == "tt":
        value = 2 * d * r + slices * r * r
        return ClosedForm(value, rf"2 \cdot {d} \cdot {r} + {slices} \cdot {r}^2 = {number(value)}")
    value = 2 * d * r + slices * r + r**3
    return ClosedForm(value, rf"2 \cdot {d} \cdot {r} + {slices} \cdot {r} + {r}^3 = {number(value)}")


def _low_rank_sum(shape: Shape, config: Any) -> tuple[int, int]:
    """(r, sum over adapted matrices of d_out + d_in)."""
    return config.rank, sum(sum(_io(mat, shape.arch)) for _, mat in _adapted(config, shape.arch))


def _lora(shape: Shape, config: Any) -> ClosedForm:
    r, total = _low_rank_sum(shape, config)
    return ClosedForm(r * total, rf"{r} \cdot {number(total)} = {number(r * total)}")


def _kadaptation(shape: Shape, config: Any) -> ClosedForm:
    arch = shape.arch
    r, total = _low_rank_sum(shape, config)
    n = config.resolved_n(arch)
    kinds = len({mat for _, mat in _adapted(config, arch)})
    biases = sum(_io("fc1" if layer == "fc1" else "q", arch)[0] for _, layer in _linears(config, arch))
    value = r * total + biases + 2 * n * n * kinds
    worked = rf"{r} \cdot {number(total)} + {number(biases)} + 2 \cdot {n}^2 \cdot {kinds} = {number(value)}"
    return ClosedForm(value, worked)


def _rlrr(shape: Shape, config: Any) -> ClosedForm:
    arch, d = shape.arch, shape.arch.embed_dim
    rescale = sum(i + 2 * o for o, i in (_io(mat, arch) for _, mat in _adapted(config, arch)))
    if not config.norms:
        return ClosedForm(rescale, rf"{number(rescale)} = {number(rescale)}")
    blocks = len(config.targets.resolve(arch.depth))
    value = rescale + 4 * d * blocks + 4 * d
    return ClosedForm(value, rf"{number(rescale)} + 4 \cdot {d} \cdot {blocks} + 4 \cdot {d} = {number(value)}")


def _adapter(shape: Shape, config: Any) -> ClosedForm:
    d, h = shape.arch.embed_dim, config.bottleneck
    blocks = len(config.block_indices(shape.arch.depth))
    value = blocks * (2 * d * h + h + d)
    return ClosedForm(value, rf"{blocks} \cdot (2 \cdot {d} \cdot {h} + {h} + {d}) = {number(value)}")


def _vpt(shape: Shape, config: Any) -> ClosedForm:
    d, blocks = shape.arch.embed_dim, shape.arch.depth if config.deep else 1
    value = config.tokens * d * blocks
    return ClosedForm(value, rf"{config.tokens} \cdot {d} \cdot {blocks} = {number(value)}")


def _ssf(shape: Shape, config: Any) -> ClosedForm:
    d, L, m = shape.arch.embed_dim, shape.arch.depth, shape.arch.mlp_ratio
    value = L * (14 + 2 * m) * d + 4 * d
    return ClosedForm(value, rf"{L} \cdot (14 + 2 \cdot {m}) \cdot {d} + 4 \cdot {d} = {number(value)}")


def _bitfit(shape: Shape, config: Any) -> ClosedForm:
    d, L, m = shape.arch.embed_dim, shape.arch.depth, shape.arch.mlp_ratio
    value = L * (7 + m) * d + 2 * d
    return ClosedForm(value, rf"{L} \cdot (7 + {m}) \cdot {d} + 2 \cdot {d} = {number(value)}")


def _linear(shape: Shape, config: Any) -> ClosedForm:
    return ClosedForm(0, "0")


def _full(shape: Shape, config: Any) -> ClosedForm:
    arch = shape.arch
    d, L, m, p, c = arch.embed_dim, arch.depth, arch.mlp_ratio, arch.patch_size, shape.channels
    ls = 2 if shape.layer_scale else 0
    per_block = (4 + 2 * m) * d * d + (9 + m + ls) * d
    embed = (c * p * p + 1) * d + (shape.positions + shape.prefix_tokens) * d
    value = L * per_block + embed + 2 * d
    worked = (
        rf"{L} \cdot ({4 + 2 * m} \cdot {d}^2 + {9 + m + ls} \cdot {d}) + ({c} \cdot {p}^2 + 1) \cdot {d} "
        rf"+ ({shape.positions} + {shape.prefix_tokens}) \cdot {d} + 2 \cdot {d} = {number(value)}"
    )
    return ClosedForm(value, worked)


# ----------------------------------------------------------------------------------------------------------------
# The explanations
# ----------------------------------------------------------------------------------------------------------------
_LOW_RANK_SUM = r"\sum_{W \in \text{targets}} (d_\text{out} + d_\text{in})"
_NO_UPDATE = (
    "It makes **no weight update** to analyse: the spectra of every pretrained matrix stay exactly as they were. "
)

EXPLANATIONS: dict[str, Explanation] = {
    "fact": Explanation(
        title="FacT: Factor-Tuning (TT and Tucker)",
        changes=(
            "Stacks every d x d update of the encoder (per block q, k, v, proj, the m row blocks of fc1 and the m "
            "column blocks of fc2: (4 + 2m)L slices) into one tensor and factorises it. U and V are shared by the "
            "whole model; each slice only adds a tiny r x r core (TT), or reads its core from one shared Tucker "
            "core C through a slice matrix P (TK). V starts at zero, so training starts from the pretrained model."
        ),
        update=(
            r"\Delta\mathcal{W} \in \mathbb{R}^{(4+2m)L \times d \times d}, \qquad "
            r"\Delta W_j = s\, V\, \Sigma_j\, U \quad (V \in \mathbb{R}^{d \times r},\ U \in \mathbb{R}^{r \times d})",
            r"\text{TT:}\quad \Sigma_j \in \mathbb{R}^{r \times r} \text{ learned per slice}",
            r"\text{TK:}\quad \Delta\mathcal{W} = s\, C \times_1 P^\top \times_2 V \times_3 U^\top, \quad "
            r"\Sigma_j = \big(C \times_3 P_{:,j}\big)^\top,\ C \in \mathbb{R}^{r \times r \times r}",
        ),
        count=r"\text{TT: } 2dr + (4+2m)L\,r^2 \qquad \text{TK: } 2dr + (4+2m)L\,r + r^3",
        closed_form=_fact,
        spectrum=(
            "Every slice's update has rank at most r and all slices share the same r input directions (U) and "
            "output directions (V). Expect only the top few singular values of each matrix to move, the update's "
            "own spectrum to fall off a cliff after r values, and the same few directions to appear in every "
            "block: a low, model-wide subspace."
        ),
        references=("FacT-TT4", "FacT-TT<=16", "FacT-TK8", "FacT-TK<=32"),
    ),
    "rlrr": Explanation(
        title="RLRR: Residual-based Low-Rank Rescaling",
        changes=(
            "Rescales every element of each frozen weight by a residual rank-1 matrix, per q/k/v slice and per "
            "proj/fc1/fc2, shifts the bias, and adds SSF's per-channel scale and shift after norm1, norm2, the final "
            "norm and the patch embedding. The official initialisation is *not* the identity at step 0."
        ),
        update=(
            r"W' = W \odot \left(\mathbf{1} + \ell\, c^\top\right), \qquad b' = b + f "
            r"\qquad (\ell, f \in \mathbb{R}^{d_\text{out}},\ c \in \mathbb{R}^{d_\text{in}})",
            r"\Delta W = W \odot (\ell\, c^\top) = \operatorname{diag}(\ell)\, W \operatorname{diag}(c)",
            r"\text{SSF:}\quad y \mapsto y \odot \gamma + \beta \ \text{after norm1, norm2, the final norm and the "
            r"patch embedding}",
        ),
        count=r"\sum_{W} (d_\text{in} + 2\,d_\text{out}) + 4d\,L + 4d \;=\; 31dL + 4d \text{ (all six matrices)}",
        closed_form=_rlrr,
        spectrum=(
            "The update diag(l) W diag(c) has the rank of W itself: every singular value can move, each by a "
            "modest factor, and the singular vectors tilt only as far as two diagonal rescalings allow. With the "
            "official initialisation the spectrum has already shifted at step 0 (each weight scaled by "
            "1 + l_i c_j, about 7% spread)."
        ),
        references=("RLRR", "RLRR*"),
    ),
    "kadaptation": Explanation(
        title="KAdaptation: Kronecker adaptation",
        changes=(
            "Adds to each adapted matrix (q and v by default) a sum of n Kronecker products: small slow weights "
            "A_i shared by every block (rank 1 each), times fast weights B_i of each block, themselves low-rank "
            "(rank r). A bias shift per block. The fast weights' v factor starts at zero."
        ),
        update=(
            r"\Delta W = s \sum_{i=1}^{n} A_i \otimes B_i, \qquad A_i = a_i b_i^\top \in \mathbb{R}^{n \times n} "
            r"\text{ (shared)}",
            r"B_i = u_i v_i^\top \in \mathbb{R}^{\frac{d_\text{out}}{n} \times \frac{d_\text{in}}{n}}, \quad "
            r"u_i \in \mathbb{R}^{\frac{d_\text{out}}{n} \times r},\ "
            r"v_i \in \mathbb{R}^{r \times \frac{d_\text{in}}{n}} \text{ (per block)}",
        ),
        count=r"r" + _LOW_RANK_SUM + r" + \sum_{\text{linears}} d_\text{out} + 2n^2 K \;=\; L(4dr + d) + 4n^2"
        r"\text{ (q, v; } K = 2 \text{ kinds)}",
        closed_form=_kadaptation,
        spectrum=(
            "rank(A kron B) = rank(A) rank(B), so the update has rank at most n r (32 with the defaults) and a "
            "structured, block-repeated pattern. Expect a band of up to n r shifted singular values, spread more "
            "evenly than LoRA's, on the q and v slices only."
        ),
        references=("KAdaptation",),
    ),
    "lora": Explanation(
        title="LoRA: low-rank adaptation",
        changes=(
            "Adds a trainable low-rank product B A beside each adapted matrix (the q and v slices of every block by "
            "default). B starts at zero."
        ),
        update=(
            r"\Delta W = \frac{\alpha}{r}\, B A, \qquad B \in \mathbb{R}^{d_\text{out} \times r},\ "
            r"A \in \mathbb{R}^{r \times d_\text{in}}",
        ),
        count=r"r" + _LOW_RANK_SUM + r" \;=\; 4dLr \text{ (q, v)}",
        closed_form=_lora,
        spectrum=(
            "Each update has rank at most r, with its own directions per matrix. Shuttleworth et al. (2024) found "
            "that LoRA tends to add *intruder dimensions*: new top singular vectors nearly orthogonal to every "
            "pretrained one, where full fine-tuning mostly shifts existing ones."
        ),
        references=("LoRA r=8", "LoRA"),
    ),
    "adapter": Explanation(
        title="Adapter (sequential) and AdaptFormer (parallel)",
        changes=(
            "Inserts a small bottleneck MLP (d -> h -> d) after each block's MLP (sequential) or beside it "
            "(parallel, scaled). The up-projection starts at zero."
        ),
        update=(
            r"\text{sequential: } y = \mathrm{MLP}(x) + s\, W_\uparrow\, \mathrm{GELU}(W_\downarrow\, \mathrm{MLP}(x))",
            r"\text{parallel: } y = \mathrm{MLP}(x) + s\, W_\uparrow\, \mathrm{ReLU}(W_\downarrow x), \quad "
            r"W_\downarrow \in \mathbb{R}^{h \times d},\ W_\uparrow \in \mathbb{R}^{d \times h}",
        ),
        count=r"L\,(2dh + h + d)",
        closed_form=_adapter,
        spectrum=_NO_UPDATE
        + "The change lives in a nonlinear bottleneck of h dimensions per block, so it cannot be folded into W.",
        references=("Adapter h=8", "AdaptFormer", "Adapter"),
    ),
    "vpt": Explanation(
        title="VPT: visual prompt tuning",
        changes=(
            "Adds learnable prompt tokens to the token sequence: once before the first block (shallow) or fresh "
            "ones before every block (deep). The frozen attention reads them like image tokens."
        ),
        update=(
            r"[\,x_\text{cls},\ x_\text{patches}\,] \;\mapsto\; [\,x_\text{cls},\ P_\ell,\ x_\text{patches}\,], "
            r"\qquad P_\ell \in \mathbb{R}^{t \times d}",
        ),
        count=r"t\,d \text{ (shallow)}, \qquad t\,d\,L \text{ (deep)}",
        closed_form=_vpt,
        spectrum=_NO_UPDATE + "The prompts change what the frozen attention attends to, not the weights.",
        references=("VPT-Shallow", "VPT-Deep"),
    ),
    "ssf": Explanation(
        title="SSF: scaling and shifting features",
        changes=(
            "A per-channel scale and shift after every linear (qkv, proj, fc1, fc2), both norms of each block, the "
            "final norm and the patch embedding. It folds into the preceding layer."
        ),
        update=(
            r"y \mapsto \gamma \odot y + \beta \quad\Longrightarrow\quad W' = \operatorname{diag}(\gamma)\, W,"
            r"\qquad b' = \gamma \odot b + \beta",
        ),
        count=r"L\,(14 + 2m)\,d + 4d",
        closed_form=_ssf,
        spectrum=(
            "diag(gamma) W rescales the rows of W: every singular value moves by a factor between min and max "
            "gamma, and the output-side singular vectors tilt. The official initialisation (gamma ~ N(1, .02)) "
            "has already shifted the spectrum a little at step 0."
        ),
        references=("SSF*",),
    ),
    "bitfit": Explanation(
        title="BitFit: bias-only fine-tuning",
        changes="Trains every bias of the backbone (linears, norms, patch embedding) and nothing else.",
        update=(r"W' = W, \qquad b' = b + \Delta b",),
        count=r"L\,(7 + m)\,d + 2d",
        closed_form=_bitfit,
        spectrum=_NO_UPDATE + "Only the biases move, which shifts activations without touching any W.",
        references=("BitFit", "Bias"),
    ),
    "linear": Explanation(
        title="Linear probing",
        changes="Trains the classifier head on the frozen backbone's features; the backbone does not change.",
        update=(r"\text{logits} = W_\text{head}\, \phi(x) + b_\text{head}, \qquad \phi \text{ frozen}",),
        count=r"0 \quad (\text{the head adds } C\,(d + 1))",
        closed_form=_linear,
        spectrum=_NO_UPDATE + "It is the floor every other method starts from.",
        references=("Linear",),
    ),
    "full": Explanation(
        title="Full fine-tuning",
        changes="Trains every parameter of the backbone: the upper bound in accuracy and in cost.",
        update=(r"W' = W + \Delta W, \qquad \Delta W \text{ unconstrained (full rank)}",),
        count=r"L\,\big((4 + 2m)\,d^2 + (9 + m)\,d\big) + (c\,p^2 + 1)\,d + (N + 1)\,d + 2d "
        r"\;[+\, 2dL \text{ with LayerScale}]",
        closed_form=_full,
        spectrum=(
            "The update is unconstrained, yet usually small next to W: most singular values shift a little, the "
            "top singular vectors mostly stay (Shuttleworth et al. 2024 found few intruder dimensions), and the "
            "update's own spectrum decays slowly instead of stopping at a rank."
        ),
        references=("Full",),
    ),
}


def explain(name: str) -> Explanation:
    """The explanation of a registered method.

    Raises:
        ValueError: an unknown method, or a registered one without an explanation (the guard test catches it).
    """
    get_method(name)
    if name not in EXPLANATIONS:
        raise ValueError(f"method {name!r} has no explanation in core.methods.explain; add one")
    return EXPLANATIONS[name]


def closed_form(name: str, model: nn.Module, options: dict[str, Any] | None = None) -> ClosedForm:
    """The closed-form trainable count (head excluded) of method ``name`` with ``options`` on ``model``'s shape.

    Raises:
        ValueError: an unknown method or a bad option.
    """
    config = make_config(name, **(options or {}))
    config.check(inspect_vit(model))
    return explain(name).closed_form(Shape.of(model), config)


def unexplained() -> list[str]:
    """Registered methods without an explanation (should be none)."""
    return [name for name in list_methods() if name not in EXPLANATIONS]
