"""Train: fit the classifier on the train split, keep the weights that score best on val."""

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset
from tqdm import tqdm

from brainmri import CLASS_NAMES
from brainmri.dataset import ImageSet, load_image_set
from brainmri.images import PreprocessConfig
from brainmri.model import ModelBundle, build_model, pick_device
from components.augment import AugmentConfig
from components.split import load_split


@dataclass(frozen=True)
class TrainConfig:
    """Every training knob; saved in the model's metadata."""

    backbone: str = "tiny_cnn"
    image_size: int = 64
    epochs: int = 15
    batch_size: int = 32
    learning_rate: float = 0.01
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    seed: int = 0
    device: str = "auto"


@dataclass
class TrainResult:
    """The saved bundle's folder and what each epoch measured."""

    model_dir: Path
    best_val_accuracy: float
    history: list[dict[str, float]] = field(default_factory=list)


class AugmentedImages(TorchDataset):
    """Cached uint8 images -> (augmented, normalised float tensor, label)."""

    def __init__(
        self, data: ImageSet, preprocess: PreprocessConfig, augment: AugmentConfig | None
    ) -> None:
        self.data = data
        self.augment = augment.transform() if augment else None
        self.normalize = preprocess.normalize()

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.data.images[i]
        if self.augment is not None:
            image = self.augment(image)
        return self.normalize(image), self.data.labels[i]


def _loader(
    dataset: TorchDataset, batch_size: int, shuffle: bool, device: torch.device, seed: int
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(seed),
    )


def accuracy_on(model: nn.Module, loader: DataLoader, device: torch.device) -> float:
    """Top-1 accuracy of ``model`` over ``loader``."""
    model.eval()
    correct = total = 0
    with torch.inference_mode(), torch.autocast(device.type, enabled=device.type == "cuda"):
        for images, labels in loader:
            images = images.to(device, non_blocking=True).contiguous(
                memory_format=torch.channels_last
            )
            predictions = model(images).argmax(dim=1).cpu()
            correct += int((predictions == labels).sum())
            total += len(labels)
    return correct / max(total, 1)


def train_model(
    dataset_dir: Path,
    split_csv: Path,
    out_dir: Path,
    config: TrainConfig,
    augment: AugmentConfig | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train on the ``train`` rows of ``split_csv``, select on ``val``, save a model bundle."""
    torch.manual_seed(config.seed)
    device = pick_device(config.device)
    class_names = list(CLASS_NAMES)
    preprocess = PreprocessConfig(image_size=config.image_size)
    frame = load_split(split_csv)
    sets = {
        name: load_image_set(
            dataset_dir,
            frame[frame["split"] == name],
            class_names,
            preprocess,
            desc=f"decode {name}",
        )
        for name in ("train", "val")
    }
    if len(sets["train"]) == 0 or len(sets["val"]) == 0:
        raise ValueError(f"{split_csv}: the train and val splits must both hold images")
    train_loader = _loader(
        AugmentedImages(sets["train"], preprocess, augment),
        config.batch_size,
        True,
        device,
        config.seed,
    )
    val_loader = _loader(
        AugmentedImages(sets["val"], preprocess, None),
        config.batch_size,
        False,
        device,
        config.seed,
    )

    model = build_model(config.backbone, len(class_names)).to(
        device, memory_format=torch.channels_last
    )
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=config.learning_rate,
        epochs=config.epochs,
        steps_per_epoch=len(train_loader),
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")

    history: list[dict[str, float]] = []
    best_accuracy, best_state = -1.0, None
    for epoch in range(1, config.epochs + 1):
        model.train()
        started, seen, loss_sum = time.perf_counter(), 0, 0.0
        bar = tqdm(
            train_loader,
            desc=f"epoch {epoch}/{config.epochs}",
            unit="batch",
            disable=not progress,
            leave=False,
        )
        for images, labels in bar:
            images = images.to(device, non_blocking=True).contiguous(
                memory_format=torch.channels_last
            )
            labels = labels.to(device, non_blocking=True)
            with torch.autocast(device.type, enabled=device.type == "cuda"):
                loss = loss_fn(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            seen += len(labels)
            loss_sum += loss.item() * len(labels)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}")
        val_accuracy = accuracy_on(model, val_loader, device)
        elapsed = time.perf_counter() - started
        history.append(
            {
                "epoch": epoch,
                "train_loss": loss_sum / seen,
                "val_accuracy": val_accuracy,
                "images_per_s": seen / elapsed,
            }
        )
        print(json.dumps(history[-1]), flush=True)
        if val_accuracy > best_accuracy:
            best_accuracy, best_state = val_accuracy, copy.deepcopy(model.state_dict())

    model.load_state_dict(best_state)
    bundle = ModelBundle(
        model.to(memory_format=torch.contiguous_format),
        config.backbone,
        class_names,
        preprocess,
        {
            "train_config": asdict(config),
            "history": history,
            "best_val_accuracy": best_accuracy,
            "augment": asdict(augment) if augment else None,
        },
    )
    bundle.save(out_dir)
    return TrainResult(Path(out_dir), best_accuracy, history)
