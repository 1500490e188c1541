"""Parameter groups of a timm ViT: which (block, matrix) pairs a group holds, written as a ``Targets`` string, the
weight slots behind it, and `Reparam`, which rebuilds a group's weights from one flat update.

Biases are not part of a group. A q, k or v matrix is a row slice of the fused ``attn.qkv.weight``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from core.methods.base import MATRICES, MATRIX_LINEAR, QKV_SLICES, Targets, inspect_vit

GROUP_SCHEMES: dict[str, str] = {
    "attn-mlp": "attention (q, k, v, proj) vs MLP (fc1, fc2), all blocks together",
    "matrices": "each matrix type (q, k, v, proj, fc1, fc2) across all blocks",
    "blocks": "each block, all six matrices",
    "attn-mlp-blocks": "attention and MLP of each block",
    "matrices-blocks": "each matrix of each block (6 x depth groups)",
}


def scheme_groups(scheme: str, depth: int) -> list[str]:
    """The groups of a named scheme (`GROUP_SCHEMES`) as ``Targets`` strings, e.g. ``["attn", "mlp"]``."""
    blocks = range(depth)
    table: dict[str, list[str]] = {
        "attn-mlp": ["attn", "mlp"],
        "matrices": list(MATRICES),
        "blocks": [f"all:{b}" for b in blocks],
        "attn-mlp-blocks": [f"{g}:{b}" for b in blocks for g in ("attn", "mlp")],
        "matrices-blocks": [f"{m}:{b}" for b in blocks for m in MATRICES],
    }
    if scheme not in table:
        raise ValueError(
            f"unknown group scheme {scheme!r}; choose one of {', '.join(GROUP_SCHEMES)} or pass a list of "
            "targets strings (one group each, e.g. ['q,v', 'fc1,fc2'])"
        )
    return table[scheme]


def resolve_groups(groups: str | Sequence[str], depth: int) -> list[str]:
    """Groups as canonical ``Targets`` strings: a scheme name, or a list of targets strings (one group each)."""
    texts = scheme_groups(groups, depth) if isinstance(groups, str) else list(groups)
    if not texts:
        raise ValueError("no groups to measure")
    out = []
    for text in texts:
        targets = Targets.parse(text)
        targets.resolve(depth)  # raises on an out-of-range block
        out.append(str(targets))
    if len(set(out)) != len(out):
        raise ValueError(f"groups {out} name the same group twice")
    return out


@dataclass(frozen=True)
class Slot:
    """One re-parameterised piece of a group: rows ``rows`` (start, end) of parameter ``param``, or all of it.

    A q, k or v matrix is a row slice of the fused ``attn.qkv.weight``; proj, fc1 and fc2 are whole weights.
    Biases are not part of a group.
    """

    param: str
    rows: tuple[int, int] | None = None


def group_slots(model: nn.Module, targets: str | Targets) -> list[Slot]:
    """The weight slots of a group of a timm ViT, in block then ``MATRICES`` order."""
    arch = inspect_vit(model)
    width = arch.embed_dim
    slots = []
    for block, matrices in Targets.parse(targets).resolve(arch.depth).items():
        for matrix in matrices:
            name = f"blocks.{block}.{MATRIX_LINEAR[matrix]}.weight"
            if matrix in QKV_SLICES:
                part = QKV_SLICES.index(matrix)
                slots.append(Slot(name, (part * width, (part + 1) * width)))
            else:
                slots.append(Slot(name))
    return slots


def slot_sizes(model: nn.Module, slots: Sequence[Slot]) -> list[int]:
    """How many weights each slot holds."""
    return Reparam(dict(model.named_parameters()), slots).sizes


def classifier_path(model: nn.Module) -> str:
    """The module path of ``model.get_classifier()`` (``"head"`` for timm ViTs)."""
    head = model.get_classifier()
    if not any(p.numel() for p in head.parameters()):
        raise ValueError("the model has no classifier head (num_classes=0); create it with the task's class count")
    return next(name for name, module in model.named_modules() if module is head)


class Reparam:
    """Builds a group's parameters from a flat update: ``theta_0 + delta``, delta laid out slot after slot.

    ``Reparam(dict(model.named_parameters()), slots)(delta)`` is the ``{name: tensor}`` dict to pass to
    ``functional_call`` (with ``prefix`` when the called module holds the model under that name).

    For a row slice of a fused weight the whole weight is rebuilt as the concatenation of its slices, the frozen
    ones being the model's own tensors (so they stay bit-identical and get no gradient).
    """

    def __init__(self, params: dict[str, Tensor], slots: Sequence[Slot], prefix: str = "") -> None:
        self.base: dict[str, Tensor] = {}
        self.pieces: dict[str, list[tuple[tuple[int, int] | None, int, int]]] = {}  # name -> (rows, offset, size)
        self.sizes: list[int] = []
        offset = 0
        for s in slots:
            name = prefix + s.param
            if name not in params:
                raise ValueError(f"the model has no parameter {s.param!r}")
            w = params[name].detach()
            size = w.numel() if s.rows is None else (s.rows[1] - s.rows[0]) * w[0].numel()
            if s.rows is not None and not 0 <= s.rows[0] < s.rows[1] <= w.shape[0]:
                raise ValueError(f"rows {s.rows} are outside {s.param} ({w.shape[0]} rows)")
            self.base[name] = w
            self.pieces.setdefault(name, []).append((s.rows, offset, size))
            self.sizes.append(size)
            offset += size
        for name, pieces in self.pieces.items():
            ranges = sorted((r if r is not None else (0, self.base[name].shape[0])) for r, _, _ in pieces)
            if any(a[1] > b[0] for a, b in zip(ranges, ranges[1:], strict=False)) or (
                len(pieces) > 1 and any(r is None for r, _, _ in pieces)
            ):
                raise ValueError(f"slots overlap in {name}")
            pieces.sort(key=lambda p: p[0][0] if p[0] is not None else 0)
        self.D = offset

    def __call__(self, delta: Tensor) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for name, pieces in self.pieces.items():
            w = self.base[name]
            if pieces[0][0] is None:
                _, offset, size = pieces[0]
                out[name] = w + delta[offset : offset + size].view_as(w)
                continue
            parts, row = [], 0
            for rows, offset, size in pieces:
                start, end = rows  # type: ignore[misc]
                if row < start:
                    parts.append(w[row:start])
                parts.append(w[start:end] + delta[offset : offset + size].view(end - start, *w.shape[1:]))
                row = end
            if row < w.shape[0]:
                parts.append(w[row:])
            out[name] = torch.cat(parts)
        return out


def union_targets(groups: Sequence[str], depth: int) -> str:
    """The union of groups as one compact ``Targets`` string, checked to parse and resolve to exactly that union."""
    union: dict[int, set[str]] = {}
    for group in groups:
        for block, matrices in Targets.parse(group).resolve(depth).items():
            union.setdefault(block, set()).update(matrices)
    blocks_by_matrices: dict[tuple[str, ...], list[int]] = {}
    for block in sorted(union):
        blocks_by_matrices.setdefault(tuple(m for m in MATRICES if m in union[block]), []).append(block)
    terms = tuple(
        (matrices, None if blocks == list(range(depth)) else tuple(blocks))
        for matrices, blocks in blocks_by_matrices.items()
    )
    text = str(Targets(terms))
    resolved = Targets.parse(text).resolve(depth)
    if {b: set(m) for b, m in resolved.items()} != union:
        raise AssertionError(f"targets {text!r} do not resolve to the union of {list(groups)}")
    return text
