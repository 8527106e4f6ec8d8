"""Label kinds: how a task's labels are read from the data and batched (the data side of
`tlkit.model.tasks.TASKS`, whose entries name theirs).

A sample is `(path, label)`. A single-label image's label is its class index (an `int`); a
multi-label image's is the sorted tuple of its class indices, possibly empty (an image of none
of the classes). In a CSV the column says which: `path,label` (one class name per row) or
`path,labels` (names separated by `;`, an empty field for none). Class folders are
single-label.

Batches hold the labels as the loss wants them (`LabelKind.collate`): a (B,) tensor of class
indices, or a (B, C) tensor of 0/1 targets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import default_collate

from tlkit.config import Task
from tlkit.errors import DatasetError

Label = int | tuple[int, ...]
LABEL_SEPARATOR = ";"  # between the labels of one image in a `labels` column


def _one_index(indices: Sequence[int]) -> int:
    if len(indices) != 1:
        raise ValueError(f"{len(indices)} labels where one is expected")
    return int(indices[0])


def _sorted_indices(indices: Sequence[int]) -> tuple[int, ...]:
    return tuple(sorted(set(int(index) for index in indices)))


def _class_indices(labels: Sequence[Label], num_classes: int) -> torch.Tensor:
    return torch.tensor(list(labels), dtype=torch.long)


def _multi_hot(labels: Sequence[Label], num_classes: int) -> torch.Tensor:
    targets = torch.zeros(len(labels), num_classes)
    for row, indices in enumerate(labels):
        targets[row, list(indices)] = 1.0
    return targets


def _one_name(field: str) -> list[str]:
    return [field] if field.strip() else []


def _separated_names(field: str) -> list[str]:
    return [name.strip() for name in field.split(LABEL_SEPARATOR) if name.strip()]


def _alone(label: int) -> tuple[int, ...]:
    return (label,)


def _as_tuple(label: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(label)


def _joined_indices(label: tuple[int, ...]) -> str:
    return LABEL_SEPARATOR.join(str(index) for index in label)


def _stored_index(value: Any) -> int:
    return int(value)


def _stored_indices(value: Any) -> tuple[int, ...]:
    return tuple(int(index) for index in str(value).split(LABEL_SEPARATOR) if index)


@dataclass(frozen=True)
class LabelKind:
    """How one task's labels are read, stored and batched."""

    name: Task
    csv_column: str  # the CSV column holding the labels
    may_be_unlabelled: bool  # an image may have none of the classes
    names_of: Callable[[str], list[str]]  # a CSV field -> its class names
    from_indices: Callable[[Sequence[int]], Label]  # class indices -> a sample's label
    indices_of: Callable[[Label], tuple[int, ...]]  # a sample's label -> its class indices
    collate: Callable[[Sequence[Label], int], torch.Tensor]  # labels, classes -> targets
    stored: Callable[[Label], int | str]  # a label as a converted dataset's shards hold it
    from_stored: Callable[[Any], Label]

    def text(self, label: Label, classes: list[str]) -> str:
        """A label as a CSV field (class names)."""
        return LABEL_SEPARATOR.join(classes[index] for index in self.indices_of(label))

    def convert(self, samples: list[tuple[str, Label]], source: str) -> list[tuple[str, Label]]:
        """Samples of another kind read as this one: a single-label image is a multi-label
        image of one label; a multi-label image is single-label only with exactly one."""
        converted = []
        for path, label in samples:
            indices = label_indices(label)
            try:
                converted.append((path, self.from_indices(indices)))
            except ValueError:
                raise DatasetError(
                    f"{source}: {path} has {len(indices)} labels; a {self.name} task needs "
                    "exactly one per image (use --task multi-label or --task auto)"
                ) from None
        return converted


LABEL_KINDS: dict[Task, LabelKind] = {
    "single-label": LabelKind(
        "single-label",
        "label",
        False,
        _one_name,
        _one_index,
        _alone,
        _class_indices,
        int,
        _stored_index,
    ),
    "multi-label": LabelKind(
        "multi-label",
        "labels",
        True,
        _separated_names,
        _sorted_indices,
        _as_tuple,
        _multi_hot,
        _joined_indices,
        _stored_indices,
    ),
}


def label_indices(label: Label) -> tuple[int, ...]:
    """The class indices of a label of either kind."""
    return tuple(label) if isinstance(label, tuple) else (int(label),)


def resolve_label_kind(task: str, found: str, source: str) -> str:
    """The kind a task reads the data as: `found` (the data's own) for `auto`, else the task."""
    kind = found if task == "auto" else task
    if kind not in LABEL_KINDS:
        choices = ", ".join(LABEL_KINDS)
        raise DatasetError(f"{source}: unknown task {task!r}: choose auto or {choices}")
    return kind


def class_counts(labels: Sequence[Label], num_classes: int) -> list[int]:
    """Images per class (multi-label: images carrying each class)."""
    counts = [0] * num_classes
    for label in labels:
        for index in label_indices(label):
            counts[index] += 1
    return counts


def class_balanced_weights(labels: Sequence[Label], num_classes: int) -> list[float]:
    """A sampling weight per image that draws every class about equally often: 1 / its class's
    images; a multi-label image takes its rarest class's weight (LVIS's repeat-factor rule,
    Gupta et al. 2019), and images without labels weigh as one class of their own."""
    counts = class_counts(labels, num_classes)
    unlabelled = sum(1 for label in labels if not label_indices(label))
    weights = []
    for label in labels:
        indices = label_indices(label)
        weights.append(max(1 / counts[index] for index in indices) if indices else 1 / unlabelled)
    return weights


def images_only(batch: list[tuple[Any, Label]]) -> tuple[Any, None]:
    """A loader's `collate_fn` where only the images are wanted (features, predictions): the
    labels, of either kind, are left out."""
    return default_collate([image for image, _ in batch]), None


class BatchCollator:
    """A data loader's `collate_fn`: images as torch batches them, labels as `kind.collate`
    does (picklable, for worker processes)."""

    def __init__(self, label_kind: str, num_classes: int) -> None:
        self.label_kind = label_kind
        self.num_classes = num_classes

    def __call__(self, batch: list[tuple[Any, Label]]) -> tuple[Any, torch.Tensor]:
        images = default_collate([image for image, _ in batch])
        labels = [label for _, label in batch]
        return images, LABEL_KINDS[self.label_kind].collate(labels, self.num_classes)
