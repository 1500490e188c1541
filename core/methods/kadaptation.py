"""KAdaptation (He et al., AAAI 2023, "Parameter-efficient Model Adaptation for Vision Transformers").

The update of each adapted matrix is a sum of Kronecker products:

    dW = s * sum_{i=1..n} A_i kron B_i      (PyTorch layout, out x in)

A_i (n x n) are "slow" weights shared by all blocks (one set per matrix kind: one for q, one for v), each rank-1
(a_i b_i^T); B_i = u_i v_i^T ((out/n) x (in/n), rank r) are "fast" weights of each block and matrix. A bias shift of
width d per block is added to every adapted q/k/v slice of that block (as the official code adds one b to q and v);
proj/fc1/fc2 targets get their own. Defaults n = 32 (or the largest divisor of the width not above 32), r = 1,
s = 160, dropout 0.5 on dW during training only: 50,176 trainable parameters on ViT-B/16 (40,960 Kronecker factors
and 9,216 bias shifts).

Where PETLab differs from the official code (PEViT), on purpose:

- Initialisation. The official code zeroes both fast factors u_i and v_i, so the gradients of u_i, v_i and A_i are
  exactly zero and its 40,960 Kronecker parameters never move; it trains only the per-block bias b (9,216 on ViT-B)
  and the head. PETLab zeroes only v_i (u_i ~ U(+-0.01)), so the Kronecker part trains.
- Layout. The official code computes the update in the (tokens, batch, width) layout and reshapes it straight to
  (batch x heads, tokens, head width) without a transpose, which mixes tokens and samples within a batch: with a
  non-zero update one sample's logits change when only another sample changes (with the update stuck at zero, each
  (token, head) receives a permuted chunk of b). PETLab adds the update to the qkv output before timm splits the
  heads, so each sample's output depends on that sample alone and the update merges into the weights exactly.
- Scaling. The official code adds q's update and bias after q is multiplied by the attention scale
  1/sqrt(head width); PETLab adds them before it, as a change of W_q and b_q. Relative to the official model, with
  64-wide heads (ViT-B, ViT-S), the shared bias therefore acts as b/8 on q and b on v, and q's Kronecker update is
  8 times smaller for the same s. Because b is shared by q and v, no choice of PETLab's parameters reproduces the
  official forward: it is a different model, not a reparametrisation of the official one.
- Fast weights for v. The official code builds v's update from q's fast weights (its v fast weights are counted but
  unused; the maintainers say this is intended); PETLab gives the v slice its own.

Speed: each Kronecker term is itself low-rank, A_t kron u_t v_t^T = (a_t kron u_t)(b_t kron v_t)^T with
A_t = a_t b_t^T, so dW = s P Q with P (out x n r) and Q (n r x in) built from the small factors. Without dropout the
update acts on the activations through P and Q (a rank-n r path: FacT's written-out product, ``LowRankProduct``,
which keeps only the code for the backward), never building a d x d matrix. The paper's dropout on dW
(DropConnect) needs the whole update and its whole gradient, so while training with dropout > 0 the dropped update
of the adapted slices is added to the frozen weight and the linear makes its one product with the sum: the cost
above the frozen backbone is the weight gradient of the adapted slices (as full fine-tuning of them, and no more)
and a mask drawn over the adapted slices only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.methods.base import (
    MATRICES,
    AdapterState,
    Arch,
    LinearWrapper,
    LowRankProduct,
    MethodConfig,
    Shared,
    Targets,
    compute_dtype,
    inject_per_linear,
    save_input,
    saved_input,
    share,
)
from core.methods.registry import Method, register


@dataclass(frozen=True)
class KAdaptationConfig(MethodConfig):
    """KAdaptation options.

    Attributes:
        n: number of Kronecker terms and size of each A_i; must divide the width and the adapted matrices' sizes.
            None picks 32, or the largest divisor of the width not above 32 (the applied config records which).
        rank: r of each fast weight B_i = u_i v_i^T.
        scale: s (official code: 160).
        dropout: DropConnect on dW during training (official: 0.5).
        targets: matrices and blocks (default the q and v slices of every block).
    """

    n: int | None = None
    rank: int = 1
    scale: float = 160.0
    dropout: float = 0.5
    targets: Targets = field(default_factory=lambda: Targets.parse("q,v"))

    def resolved_n(self, arch: Arch) -> int:
        if self.n is None:
            return max(k for k in range(1, 33) if arch.embed_dim % k == 0)
        return self.n

    def check(self, arch: Arch) -> None:
        d = arch.embed_dim
        n = self.resolved_n(arch)
        divisors = [k for k in range(1, d + 1) if d % k == 0 and arch.mlp_hidden % k == 0]
        if n not in divisors:
            near = ", ".join(map(str, [k for k in divisors if k <= 4 * n][-6:]))
            raise ValueError(
                f"KAdaptation n={self.n} must divide the width {d} and MLP width {arch.mlp_hidden}; try {near}"
            )
        if not 1 <= self.rank <= d // n:
            raise ValueError(f"KAdaptation rank={self.rank} is out of range; use 1 to width/n = {d // n}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"KAdaptation dropout={self.dropout} must be in [0, 1)")
        self.targets.resolve(arch.depth)


class SlowWeights(Shared):
    """The shared rank-1 A_t = a_t b_t^T (``left[kind][t]`` outer ``right[kind][t]``), one set per adapted matrix kind
    (q, v, ...), U(+-0.01) as the code."""

    def __init__(self, kinds: tuple[str, ...], n: int, ref: Tensor) -> None:
        super().__init__()
        kw = {"device": ref.device, "dtype": ref.dtype}
        self.left = nn.ParameterDict({k: nn.Parameter(torch.empty(n, n, **kw).uniform_(-0.01, 0.01)) for k in kinds})
        self.right = nn.ParameterDict({k: nn.Parameter(torch.empty(n, n, **kw).uniform_(-0.01, 0.01)) for k in kinds})


class _Kept(torch.autograd.Function):
    """``update * keep * scale`` for a boolean ``keep``, which is what the backward keeps (one byte an entry)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, update: Tensor, keep: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.mul(update, keep).mul_(scale)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        (keep,) = ctx.saved_tensors
        return torch.mul(grad, keep).mul_(ctx.scale), None, None


def drop_connect(update: Tensor, p: float) -> Tensor:
    """DropConnect: each entry of ``update`` kept with probability 1 - p and scaled by 1 / (1 - p), else zeroed.
    The mask comes from one uniform draw per entry (a cheaper generator than ``bernoulli_``) and is applied as a
    product with the boolean mask, forward and backward: on the CPU a masked fill took twice as long."""
    return _Kept.apply(update, torch.rand_like(update) >= p, 1 / (1 - p))


def updated_weight(weight: Tensor, update: Tensor, rows: tuple[tuple[int, int], ...], dtype: torch.dtype) -> Tensor:
    """``weight`` with ``update[i]`` added to its row block ``rows[i]`` (in the weight's precision), cast to
    ``dtype``; a new tensor."""
    updated = weight.clone()
    for part, (lo, hi) in zip(update, rows, strict=True):
        updated[lo:hi] += part
    return updated.to(dtype)


class UpdatedRowsLinear(torch.autograd.Function):
    """``y = x (W + dW)^T + b`` where dW is ``update[i]`` on the row block ``rows[i]`` and zero elsewhere.

    One product with the updated weight, as the frozen backbone makes one with W. The backward forms the weight
    gradient of the updated rows only (the frozen rows get none) and rebuilds ``W + dW`` instead of keeping it; it
    keeps the input only where it cannot be rebuilt from its producer (``save_input``).
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        update: Tensor,
        rows: tuple[tuple[int, int], ...],
    ) -> Tensor:
        dtype = compute_dtype(x)
        used = x.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            y = F.linear(used, updated_weight(weight, update, rows, dtype), None if bias is None else bias.to(dtype))
        save_input(ctx, x, used, weight, update)
        ctx.rows, ctx.has_bias = rows, bias is not None
        return y

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, update = saved_input(ctx)
        x_rows = x.reshape(-1, x.shape[-1])
        grad_rows = grad_y.reshape(x_rows.shape[0], -1).to(x.dtype)
        grad_x = grad_bias = grad_update = None
        with torch.autocast(x.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                grad_x = (grad_rows @ updated_weight(weight, update, ctx.rows, x.dtype)).view(x.shape)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_bias = grad_rows.sum(0)
            if ctx.needs_input_grad[3]:
                grad_update = torch.stack([grad_rows[:, lo:hi].T @ x_rows for lo, hi in ctx.rows])
        return grad_x, None, grad_bias, grad_update, None


class KronLinear(LinearWrapper):
    """The Kronecker update on a linear or on some q/k/v slices; fast weights u (parts, n, out/n, r) and v."""

    def __init__(
        self, base: nn.Linear, mats: tuple[str, ...], config: KAdaptationConfig, n: int, slow: SlowWeights
    ) -> None:
        super().__init__(base, mats)
        share(self, slow)
        self.n, self.scale, self.dropout = n, config.scale, config.dropout
        out = next(iter(self.parts.values()))
        self.fast_out, self.fast_in = (out[1] - out[0]) // n, base.in_features // n  # the shape of each B_t
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        parts, r = len(self.parts), config.rank
        self.fast_u = nn.Parameter(torch.empty(parts, n, self.fast_out, r, **kw).uniform_(-0.01, 0.01))
        self.fast_v = nn.Parameter(torch.zeros(parts, n, r, self.fast_in, **kw))  # zero: dW = 0 at step 0
        self.bias_shift = nn.Parameter(torch.zeros(out[1] - out[0], **kw))  # one per block, shared by q/k/v

    def low_rank_factors(self) -> tuple[Tensor, Tensor]:
        """(P, Q) with dW_i = s P_i Q_i for adapted part i: P (parts, out_i, n r), Q (parts, n r, in).

        kron(A_t, u_t v_t^T)[(a, b), (p, q)] = left[t, a] right[t, p] sum_k u_t[b, k] v_t[k, q], so
        P[(a, b), (t, k)] = left[t, a] u_t[b, k] and Q[(t, k), (p, q)] = right[t, p] v_t[k, q].
        """
        left = torch.stack([self.shared.left[m] for m in self.parts])  # (parts, n_t, n)
        right = torch.stack([self.shared.right[m] for m in self.parts])
        parts, n, r = self.fast_u.shape[0], self.n, self.fast_u.shape[-1]
        P = torch.einsum("ita,itbk->iabtk", left, self.fast_u).reshape(parts, n * self.fast_out, n * r)
        Q = torch.einsum("itp,itkq->itkpq", right, self.fast_v).reshape(parts, n * r, n * self.fast_in)
        return P, Q

    def forward(self, x: Tensor) -> Tensor:
        if self.training and self.dropout > 0:
            return self.dropconnect_forward(x)
        P, Q = self.low_rank_factors()
        # Code Q_i x of every adapted part in one product; part i's block of the output gains s P_i (code_i).
        expand = (self.scale * P).mT  # (parts, n r, out_i)
        weight, bias = self.base.weight, self.updated_bias()
        return LowRankProduct.apply(x, weight, bias, Q.flatten(0, 1), expand, self.part_blocks, 0.0, 0.0)

    def dropconnect_forward(self, x: Tensor) -> Tensor:
        """Training with DropConnect: one product with the frozen weight plus the dropped update of the adapted
        slices; the backward forms the weight gradient of those slices only."""
        P, Q = self.low_rank_factors()
        dropped = drop_connect(self.scale * torch.bmm(P, Q), self.dropout)  # (parts, out_i, in)
        rows = tuple(self.parts.values())
        return UpdatedRowsLinear.apply(x, self.base.weight, self.updated_bias(), dropped, rows)

    def delta_weight(self) -> Tensor:
        P, Q = self.low_rank_factors()
        updates = self.scale * torch.bmm(P, Q)  # (parts, out_i, in)
        return self.place({m: updates[i] for i, m in enumerate(self.parts)}, dim=0)

    def delta_bias(self) -> Tensor:
        return self.place({m: self.bias_shift for m in self.parts}, dim=0)


def inject(model: nn.Module, config: KAdaptationConfig, arch: Arch, state: AdapterState) -> None:
    n = config.resolved_n(arch)
    state.config = KAdaptationConfig(**{**vars(config), "n": n})  # record the n actually used
    plan = config.targets.resolve(arch.depth)
    kinds = tuple(m for m in MATRICES if any(m in mats for mats in plan.values()))
    slow = SlowWeights(kinds, n, model.blocks[0].attn.qkv.weight)
    state.shared["kadaptation"] = slow

    inject_per_linear(model, config.targets, arch.depth, lambda base, mats: KronLinear(base, mats, config, n, slow))


register(
    Method(
        name="kadaptation",
        config=KAdaptationConfig,
        inject=inject,
        backbone="none",
        mergeable=True,
        identity_at_init=lambda c: True,
        summary="KAdaptation: sums of Kronecker products, slow weights shared across blocks, low-rank fast weights",
        paper="He et al., Parameter-efficient Model Adaptation for Vision Transformers, AAAI 2023",
        differs_from_official=(
            "**KAdaptation** fixes three things in the official code: it zero-initialises only one fast factor (the "
            "code zeroes both, so the Kronecker part never trains), adds the update to W_q / W_v before the "
            "attention scaling so it merges exactly, and gives the v slice its own fast weights."
        ),
    )
)
