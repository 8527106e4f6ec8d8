import pickle
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from skimage import data as skimage_data

from tlkit.data.augment import eval_transform
from tlkit.errors import WeightsUnavailableError
from tlkit.model.backbones import (
    BundledBackbone,
    bundled_backbones,
    bundled_state_dict,
    create_backbone,
    layer_groups,
    preprocessing,
)

CAT_CLASSES = range(281, 286)  # ImageNet tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def imagenet_top1(model: torch.nn.Module, photos: list[np.ndarray], size: int) -> list[int]:
    transform = eval_transform(preprocessing(model, size))
    batch = torch.stack([transform(image=photo)["image"] for photo in photos])
    with torch.no_grad():
        return model(batch).argmax(dim=1).tolist()


@pytest.mark.parametrize("bundled", bundled_backbones(), ids=lambda bundled: bundled.architecture)
def test_bundled_weights_recognise_imagenet_photos(bundled: BundledBackbone):
    """Each package's tensors map one to one, in order, onto timm's architecture, and the
    loaded model, at its own input size, sees a cat and an espresso."""
    with torch.device("meta"):  # the names and shapes only
        timm_keys = timm.create_model(bundled.architecture).state_dict()
    state_dict = bundled_state_dict(bundled.architecture)
    assert list(state_dict) == list(timm_keys)
    assert [tensor.shape for tensor in state_dict.values()] == [
        tensor.shape for tensor in timm_keys.values()
    ]
    model = timm.create_model(
        bundled.architecture, pretrained=True, pretrained_cfg_overlay={"state_dict": state_dict}
    ).eval()
    photos = [skimage_data.chelsea(), skimage_data.coffee()]
    cat, coffee = imagenet_top1(model, photos, bundled.input_size)
    assert cat in CAT_CLASSES
    assert coffee == ESPRESSO


def test_bundled_table_agrees_with_timm():
    """Input size and parameter count as recorded; cheapest first; mean = std = 0.5."""
    found = bundled_backbones()
    assert [bundled.architecture for bundled in found] == [
        "tf_efficientnet_lite0",
        "tf_efficientnet_lite1",
        "tf_efficientnet_lite2",
    ]
    for bundled in found:
        with torch.device("meta"):
            backbone = create_backbone(bundled.architecture, "none")
        assert sum(parameter.numel() for parameter in backbone.parameters()) == bundled.parameters
        expected = preprocessing(bundled.architecture)
        assert expected.input_size == bundled.input_size
        assert expected.mean == expected.std == (0.5, 0.5, 0.5)
    costs = [(bundled.multiply_adds, bundled.imagenet_top1) for bundled in found]
    assert costs == sorted(costs)  # each step costs more and is more accurate


def test_bundled_backbone_gives_the_pretrained_features():
    full = timm.create_model(
        "tf_efficientnet_lite0",
        pretrained=True,
        pretrained_cfg_overlay={"state_dict": bundled_state_dict("tf_efficientnet_lite0")},
    ).eval()
    backbone = create_backbone("tf_efficientnet_lite0", "bundled").eval()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = full.forward_head(full.forward_features(images), pre_logits=True)
        assert torch.allclose(backbone(images), expected, atol=1e-6)
    assert "state_dict" not in backbone.pretrained_cfg


def test_bundled_weights_for_another_model_is_a_clear_error():
    with pytest.raises(WeightsUnavailableError, match="bundled weights exist for"):
        create_backbone("resnet18", "bundled")


def test_hub_without_network_is_an_error_that_says_how_to_get_weights():
    with pytest.raises(WeightsUnavailableError, match="--pretrained bundled"):
        create_backbone("resnet18", "hub")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_file_loads_through_timm(tmp_path: Path, suffix: str):
    source = create_backbone("resnet18", "none")
    state = {key: value.contiguous() for key, value in source.state_dict().items()}
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)  # a training checkpoint's layout
    loaded = create_backbone("resnet18", str(path))
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_a_weights_file_saved_under_a_wrapper_prefix_loads(tmp_path: Path):
    """DDP and torch.compile prefix every key (`module.`, `_orig_mod.`): timm's
    `clean_state_dict` removes them, for safetensors as for torch files."""
    source = create_backbone("resnet18", "none")
    state = {f"module.{key}": value.contiguous() for key, value in source.state_dict().items()}
    save_file(state, str(tmp_path / "ddp.safetensors"))
    loaded = create_backbone("resnet18", str(tmp_path / "ddp.safetensors"))
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[f"module.{key}"]), key


def test_a_weights_file_that_does_not_fill_the_model_is_an_error(tmp_path: Path):
    """timm loads a file non-strictly once it drops the classifier: a file of other key names
    would leave every tensor random, and one of another model fails deep in load_state_dict.
    Both are one clear error that names the file."""
    state = create_backbone("resnet18", "none").state_dict()
    renamed = {f"encoder.{key}": value.contiguous() for key, value in state.items()}
    save_file(renamed, str(tmp_path / "renamed.safetensors"))
    with pytest.raises(WeightsUnavailableError, match=r"leaves \d+ of resnet18's .* random"):
        create_backbone("resnet18", str(tmp_path / "renamed.safetensors"))
    partial = {key: value.contiguous() for key, value in state.items() if "layer4" not in key}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(WeightsUnavailableError, match="first: layer4"):
        create_backbone("resnet18", str(tmp_path / "partial.safetensors"))
    torch.save(create_backbone("resnet50", "none").state_dict(), tmp_path / "r50.pth")
    with pytest.raises(WeightsUnavailableError, match="does not fit resnet18.*size mismatch"):
        create_backbone("resnet18", str(tmp_path / "r50.pth"))


class _RunsCodeOnLoad:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_weights_file_is_never_unpickled(tmp_path: Path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "malicious.pth"
    path.write_bytes(pickle.dumps({"state_dict": _RunsCodeOnLoad(marker)}))
    with pytest.raises(WeightsUnavailableError, match="weights_only"):
        create_backbone("resnet18", str(path))
    assert not marker.exists()


def test_missing_weights_file_and_unknown_model_are_clear_errors(tmp_path: Path):
    with pytest.raises(WeightsUnavailableError, match="neither 'hub'"):
        create_backbone("resnet18", str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="unknown timm model 'resnet_eighteen'"):
        create_backbone("resnet_eighteen", "none")


@pytest.mark.parametrize(
    "name, groups, stem",
    [
        ("tf_efficientnet_lite0", 8, "conv_stem.weight"),
        ("resnet18", 5, "conv1.weight"),
        ("convnext_atto", 5, "stem.0.weight"),  # head.norm joins the last stage
        ("vit_tiny_patch16_224", 13, "patch_embed.proj.weight"),
    ],
)
def test_layer_groups_are_stages_stem_first(name: str, groups: int, stem: str):
    backbone = create_backbone(name, "none")
    found = layer_groups(backbone)
    assert len(found) == groups
    assert stem in found[0]
    names = [parameter for group in found for parameter in group]
    assert sorted(names) == sorted(name for name, _ in backbone.named_parameters())


def test_preprocessing_comes_from_the_pretrained_config():
    lite = preprocessing("tf_efficientnet_lite0", 64)
    assert lite.mean == (0.5, 0.5, 0.5) and lite.std == (0.5, 0.5, 0.5)
    assert lite.input_size == 64 and lite.crop_pct == 0.875
    resnet = preprocessing("resnet50")
    assert resnet.mean == pytest.approx((0.485, 0.456, 0.406))
    assert resnet.input_size == 224
