"""core.backbone: the offline default against ONNX Runtime, the cache, the hub paths, files and bad specs.

The offline default is converted once per session into a temporary cache; everything else uses vit_tiny at 32 px.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors.torch import load_file, save_file
from timm.layers import resample_abs_pos_embed
from timm.models import get_pretrained_cfg
from torch import nn

from core import _onnx_dinov2, backbone
from core.backbone import (
    CACHE_ENV,
    OFFLINE_DEFAULT,
    OFFLINE_DEFAULT_ARCH,
    OFFLINE_DEFAULT_DESCRIPTION,
    BackboneSpec,
    BackboneSpecError,
    BackboneUnavailable,
    WeightsFileError,
    build_backbone,
    offline_default_onnx,
    offline_default_weights,
)

TINY = "vit_tiny_patch16_224"
TINY_SPEC = BackboneSpec(name=TINY, weights="none", img_size=32, num_classes=3)
HUB_NAME = "vit_base_patch16_224.augreg2_in21k_ft_in1k"


@pytest.fixture(scope="session")
def offline_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The converted offline default, in a session-wide temporary cache folder."""
    return offline_default_weights(tmp_path_factory.mktemp("petlab_cache"))


@pytest.fixture
def petlab_cache(offline_weights: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point $PETLAB_CACHE at the session's cache folder for one test."""
    monkeypatch.setenv(CACHE_ENV, str(offline_weights.parent))
    return offline_weights.parent


@pytest.fixture(scope="module")
def tiny_state_dict() -> dict[str, torch.Tensor]:
    model, _ = build_backbone(TINY_SPEC)
    return {k: v.clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------- the offline default


def _backbone_only(model: onnx.ModelProto, output: str) -> onnx.ModelProto:
    """Keep the nodes `output` depends on (drops the saliency decoder); make `output` the graph output."""
    needed, kept = {output}, []
    for node in reversed(model.graph.node):
        if needed.intersection(node.output):
            kept.append(node)
            needed.update(name for name in node.input if name)
    initializers = [init for init in model.graph.initializer if init.name in needed]
    del model.graph.node[:], model.graph.initializer[:], model.graph.output[:]
    model.graph.node.extend(reversed(kept))
    model.graph.initializer.extend(initializers)
    model.graph.output.append(onnx.helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None))
    return model


def test_converted_weights_match_onnx_runtime(offline_weights: Path) -> None:
    graph = onnx.load(str(offline_default_onnx()))
    output = _onnx_dinov2.final_norm_output(graph)
    graph = _backbone_only(graph, output)
    image = graph.graph.input[0]
    side = image.type.tensor_type.shape.dim[-1].dim_value  # the only size the graph accepts (224)

    state_dict = load_file(offline_weights)
    patch = state_dict["patch_embed.proj.weight"].shape[-1]
    grid = side // patch
    # The graph resizes its grid with ONNX Resize (cubic, a=-0.75, half-pixel, no antialias): do the same.
    state_dict["pos_embed"] = resample_abs_pos_embed(state_dict["pos_embed"], (grid, grid), antialias=False)
    with torch.device("meta"):
        model = timm.create_model(OFFLINE_DEFAULT_ARCH, img_size=side, num_classes=0)
    model.load_state_dict(state_dict, strict=True, assign=True)

    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.eval().forward_features(x).numpy()  # (2, 1 + grid^2, D)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
    (theirs,) = session.run([output], {image.name: x.numpy()})
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= 1e-4


def test_offline_default_is_converted_once(
    offline_weights: Path, petlab_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_conversion(*args: object) -> None:
        raise AssertionError("converted again although the cache holds the file")

    before = offline_weights.stat().st_mtime_ns
    monkeypatch.setattr(_onnx_dinov2, "convert_onnx_dinov2", no_conversion)
    assert offline_default_weights() == offline_weights  # found through $PETLAB_CACHE
    assert offline_weights.stat().st_mtime_ns == before
    assert list(petlab_cache.iterdir()) == [offline_weights]  # no temporary file left behind


def test_default_spec_builds_the_labelled_offline_default(offline_weights: Path, petlab_cache: Path) -> None:
    spec = BackboneSpec()
    model, info = build_backbone(spec)
    assert info.description == OFFLINE_DEFAULT_DESCRIPTION
    assert "not the original Meta weights" in info.description
    assert (info.source, info.weights_path, info.new_head) == (OFFLINE_DEFAULT, str(offline_weights), True)
    assert info.patch_size * info.grid_size[0] == spec.img_size
    assert info.num_params == sum(p.numel() for p in model.parameters())
    assert info.num_tokens == model.pos_embed.shape[1]
    json.dumps(info.to_dict())  # recorded with runs

    stored = load_file(offline_weights)
    assert torch.equal(model.blocks[-1].attn.qkv.weight, stored[f"blocks.{info.depth - 1}.attn.qkv.weight"])
    assert all(p.requires_grad and not p.is_meta for p in model.parameters())
    logits = model.eval()(torch.randn(2, 3, spec.img_size, spec.img_size))
    assert logits.shape == (2, spec.num_classes) and torch.isfinite(logits).all()


# ---------------------------------------------------------------------------------------------------- the hub


def _unreachable() -> bool:
    return False


@pytest.mark.parametrize("offline_by", ["HF_HUB_OFFLINE", "no answer from the hub"])
def test_uncached_hub_name_fails_fast_and_says_what_to_do(
    offline_by: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    if offline_by == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(backbone, "_hub_reachable", _unreachable)
    pretrained_builds = []
    create = backbone._create

    def recording_create(spec: BackboneSpec, pretrained: bool = False) -> nn.Module:
        pretrained_builds.append(pretrained)
        return create(spec, pretrained)

    monkeypatch.setattr(backbone, "_create", recording_create)
    with pytest.raises(BackboneUnavailable) as caught:
        build_backbone(BackboneSpec(name=HUB_NAME, weights="hub", img_size=224))
    assert pretrained_builds == [False]  # the weightless check only: no download (and no retry loop) was tried
    assert not isinstance(caught.value, LocalEntryNotFoundError)
    message = str(caught.value)
    for part in (HUB_NAME, "go online once", "local file", OFFLINE_DEFAULT, OFFLINE_DEFAULT_ARCH):
        assert part in message


def test_cached_hub_weights_load_without_network(
    tiny_state_dict: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    name = f"{TINY}.augreg_in21k_ft_in1k"
    repo = get_pretrained_cfg(name).hf_hub_id
    folder = tmp_path / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (folder / "snapshots" / commit).mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    save_file(tiny_state_dict, folder / "snapshots" / commit / "model.safetensors")

    def no_network() -> bool:
        raise AssertionError("asked the network although the weights are cached")

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(backbone, "_hub_reachable", no_network)
    model, info = build_backbone(dataclasses.replace(TINY_SPEC, name=name, weights="hub"))
    assert info.source == "hub" and repo in info.description
    assert torch.equal(model.blocks[0].mlp.fc1.weight, tiny_state_dict["blocks.0.mlp.fc1.weight"])
    assert hf_constants.HF_HUB_OFFLINE is False  # offline mode was only forced while loading


# -------------------------------------------------------------------------------------- files and random init


def test_random_init_is_labelled() -> None:
    model, info = build_backbone(TINY_SPEC)
    assert info.source == "none" and "random" in info.description and info.weights_path is None
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, TINY_SPEC.num_classes)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_file_round_trip(suffix: str, tiny_state_dict: dict[str, torch.Tensor], tmp_path: Path) -> None:
    path = tmp_path / f"tiny{suffix}"
    if suffix == ".safetensors":
        save_file(tiny_state_dict, path)
    else:
        torch.save(tiny_state_dict, path)
    model, info = build_backbone(dataclasses.replace(TINY_SPEC, weights=str(path)), data_root=tmp_path)
    assert (info.source, info.weights_path, info.new_head) == ("file", str(path), False)
    loaded = model.state_dict()
    assert loaded.keys() == tiny_state_dict.keys()
    assert all(torch.equal(loaded[k], v) for k, v in tiny_state_dict.items())

    other_head, info = build_backbone(
        dataclasses.replace(TINY_SPEC, weights=str(path), num_classes=5), data_root=tmp_path
    )
    assert info.new_head and other_head.head.weight.shape[0] == 5
    assert torch.equal(other_head.blocks[0].attn.qkv.weight, tiny_state_dict["blocks.0.attn.qkv.weight"])


def _write_wrong_keys(path: Path, sd: dict[str, torch.Tensor]) -> None:
    save_file({"foo.weight": torch.zeros(2)}, path)


def _write_wrong_shape(path: Path, sd: dict[str, torch.Tensor]) -> None:
    save_file({**sd, "blocks.0.mlp.fc1.weight": torch.zeros(10, 10)}, path)


def _write_training_checkpoint(path: Path, sd: dict[str, torch.Tensor]) -> None:
    torch.save({"epoch": 3, "model": sd}, path)


def _write_pickled_module(path: Path, sd: dict[str, torch.Tensor]) -> None:
    torch.save(nn.Linear(2, 2), path)


def _write_garbage(path: Path, sd: dict[str, torch.Tensor]) -> None:
    path.write_bytes(b"not a tensor file")


def _write_nothing(path: Path, sd: dict[str, torch.Tensor]) -> None:
    pass


@pytest.mark.parametrize(
    ("filename", "write", "expected"),
    [
        ("absent.safetensors", _write_nothing, ["does not exist"]),
        ("keys.safetensors", _write_wrong_keys, ["missing", "'cls_token'", "unexpected 1: 'foo.weight'"]),
        ("shape.safetensors", _write_wrong_shape, ["shape mismatch", "blocks.0.mlp.fc1.weight (10, 10)"]),
        ("checkpoint.pth", _write_training_checkpoint, ["not a plain state dict", "'epoch'", "'model'"]),
        ("module.pth", _write_pickled_module, ["not a plain state dict", "weights_only"]),
        ("garbage.safetensors", _write_garbage, ["not a readable safetensors file"]),
        ("weights.npz", _write_garbage, ["unknown weights format"]),
    ],
)
def test_bad_weight_files_get_clear_errors(
    filename: str,
    write: Callable[[Path, dict[str, torch.Tensor]], None],
    expected: list[str],
    tiny_state_dict: dict[str, torch.Tensor],
    tmp_path: Path,
) -> None:
    path = tmp_path / filename
    write(path, tiny_state_dict)
    with pytest.raises(WeightsFileError) as caught:
        build_backbone(dataclasses.replace(TINY_SPEC, weights=str(path)), data_root=tmp_path)
    for part in [str(path), *expected]:
        assert part in str(caught.value)


# -------------------------------------------------------------------------------------------------- bad specs


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (dataclasses.replace(TINY_SPEC, name="vit_tiny_patch16_22"), "Did you mean: vit_tiny_patch16_224"),
        (dataclasses.replace(TINY_SPEC, name="resnet18"), "not a Vision Transformer"),
        (dataclasses.replace(TINY_SPEC, name="swin_tiny_patch4_window7_224", img_size=224), "`blocks`"),
        (
            dataclasses.replace(TINY_SPEC, img_size=40),
            "not a multiple of vit_tiny_patch16_224's patch size 16",
        ),
        (dataclasses.replace(TINY_SPEC, name=f"{TINY}.nope"), "unknown pretrained tag 'nope'"),
        (dataclasses.replace(TINY_SPEC, weights=OFFLINE_DEFAULT), f"fit only '{OFFLINE_DEFAULT_ARCH}'"),
    ],
)
def test_bad_specs_fail_before_any_weights(spec: BackboneSpec, expected: str) -> None:
    with pytest.raises(BackboneSpecError) as caught:
        build_backbone(spec)
    assert expected in str(caught.value)


@pytest.mark.parametrize("field", [{"img_size": 0}, {"num_classes": -1}, {"drop_path_rate": 1.0}, {"name": ""}])
def test_spec_rejects_impossible_values(field: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        BackboneSpec(**field)  # type: ignore[arg-type]
