"""The in-domain classifier: a small CNN that judges the colour and class of a generated image.

It is the evaluation tool for prompt alignment (our stand-in for the CLIP score) and its penultimate features give
the in-domain FID. Train it with `python -m imagine_flash.eval.classifier --out DIR --steps N`; the trained copy
ships in `imagine_flash/assets/classifier/` with a model card that states its measured test accuracy.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ..backend import set_threads

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "classifier"
DEFAULT_CONFIG = {"resolution": 16, "width": 32, "feature_dim": 256, "num_colors": 8, "num_classes": 10}


def _conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class InDomainClassifier(nn.Module):
    """Two 3x3-conv stages with pooling, one hidden layer (the features), and a colour head and a class head."""

    def __init__(self, resolution: int = 16, width: int = 32, feature_dim: int = 256, num_colors: int = 8,
                 num_classes: int = 10):
        super().__init__()
        self.config = dict(resolution=resolution, width=width, feature_dim=feature_dim, num_colors=num_colors,
                           num_classes=num_classes)
        w = width
        self.body = nn.Sequential(_conv(3, w), _conv(w, w), nn.MaxPool2d(2),            # (B, w, R/2, R/2)
                                  _conv(w, 2 * w), _conv(2 * w, 2 * w), nn.MaxPool2d(2))  # (B, 2w, R/4, R/4)
        self.hidden = nn.Sequential(nn.Flatten(), nn.Dropout(0.3),
                                    nn.Linear(2 * w * (resolution // 4) ** 2, feature_dim), nn.ReLU())
        self.color_head = nn.Linear(feature_dim, num_colors)
        self.class_head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, feature_dim) of images (B, 3, R, R) in [-1, 1], for the in-domain FID."""
        return self.hidden(self.body(x))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)
        return self.color_head(h), self.class_head(h)  # (B, 8), (B, 10)


@torch.no_grad()
def classify(model: InDomainClassifier, images: torch.Tensor, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted (colour, class) indices of images (N, 3, R, R) in [-1, 1]."""
    was_training = model.training
    model.eval()
    colors, classes = [], []
    for i in range(0, len(images), batch):
        color_logits, class_logits = model(images[i:i + batch].float())
        colors.append(color_logits.argmax(1))
        classes.append(class_logits.argmax(1))
    model.train(was_training)
    return torch.cat(colors), torch.cat(classes)


def alignment(model: InDomainClassifier, images: torch.Tensor, colors: torch.Tensor, classes: torch.Tensor) -> dict:
    """Prompt alignment: the fraction of images whose judged colour / class matches the prompt's."""
    color_pred, class_pred = classify(model, images)
    return {"color_acc": (color_pred == torch.as_tensor(colors)).float().mean().item(),
            "class_acc": (class_pred == torch.as_tensor(classes)).float().mean().item()}


def load_classifier(path: str | Path | None = None) -> InDomainClassifier:
    """The classifier saved in a folder (config.json + classifier.safetensors); by default the shipped one."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else ASSET_DIR
    weights = path / "classifier.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"no classifier in {path}: train one with "
                                f"`python -m imagine_flash.eval.classifier --out {path} --steps 2000`")
    config = json.loads((path / "config.json").read_text())
    model = InDomainClassifier(**{k: config[k] for k in DEFAULT_CONFIG})
    model.load_state_dict(load_file(weights))
    return model.eval()


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random horizontal flip, and Gaussian noise (sigma up to 0.2) on half the batch, for robustness to samples."""
    flip = torch.rand(len(x), generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    sigma = 0.2 * torch.rand(len(x), generator=g) * (torch.rand(len(x), generator=g) < 0.5)
    return x + sigma[:, None, None, None] * torch.randn(x.shape, generator=g)


def _model_card(command: str, config: dict, metrics: dict) -> str:
    return f"""# In-domain classifier (coloured Fashion-MNIST, {config['resolution']}x{config['resolution']})

The evaluation tool for prompt alignment: judges the colour (8 palette colours) and the class (10 Fashion-MNIST
classes) of an image in [-1, 1]. Its {config['feature_dim']}-d penultimate features give the in-domain FID.

- **Command:** `{command}`
- **Seed:** {metrics['seed']}   **Steps:** {metrics['steps']} (batch {metrics['batch_size']}, Adam, lr {metrics['lr']} with cosine decay)
- **Data:** `ColoredFashion("train", resolution={config['resolution']}, seed={metrics['seed']})`, 60,000 images;
  augmentation: random horizontal flip, Gaussian noise (sigma ~ U[0, 0.2]) on half of each batch.
- **Evaluation:** `ColoredFashion("test", resolution={config['resolution']}, seed={metrics['seed']})`, all {metrics['test_images']:,} images, no augmentation.
- **Measured test colour accuracy:** {100 * metrics['color_acc']:.2f}%
- **Measured test class accuracy:** {100 * metrics['class_acc']:.2f}%
- **Training time:** {metrics['train_seconds'] / 60:.1f} min on {metrics['threads']} CPU thread(s), torch {metrics['torch']}
- **Architecture:** `InDomainClassifier(**config.json)`, {metrics['parameters']:,} parameters; weights in `classifier.safetensors`.

These numbers were written by the training run itself (see `metrics.json`); `tests/test_eval.py` checks that the
shipped weights reproduce them.
"""


def train_classifier(out_dir: str | Path, steps: int, seed: int = 0, resolution: int = 16, batch_size: int = 256,
                     lr: float = 2e-3, command: str | None = None) -> dict:
    """Train on the train split, measure on the whole test split, save weights, config, metrics and model card."""
    from safetensors.torch import save_file

    from ..data.fashion import ColoredFashion

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    command = command or (f"python -m imagine_flash.eval.classifier --out {out_dir} --steps {steps} --seed {seed} "
                          f"--resolution {resolution}")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    train = ColoredFashion("train", resolution, seed)
    test = ColoredFashion("test", resolution, seed)
    config = dict(DEFAULT_CONFIG, resolution=resolution)
    model = InDomainClassifier(**config)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))

    t0 = time.time()
    perm, pos = torch.randperm(len(train), generator=g), 0
    model.train()
    for step in range(steps):
        # Epochs of shuffled batches, reshuffled when a batch would run past the end.
        if pos + batch_size > len(perm):
            perm, pos = torch.randperm(len(train), generator=g), 0
        idx = perm[pos:pos + batch_size]
        pos += batch_size
        x = _augment(train.images[idx], g)
        color_logits, class_logits = model(x)
        loss = F.cross_entropy(color_logits, train.colors[idx]) + F.cross_entropy(class_logits, train.classes[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - t0:.0f}s", flush=True)
    train_seconds = time.time() - t0

    model.eval()
    acc = alignment(model, test.images, test.colors, test.classes)
    metrics = {"color_acc": acc["color_acc"], "class_acc": acc["class_acc"], "test_images": len(test),
               "steps": steps, "seed": seed, "batch_size": batch_size, "lr": lr, "train_seconds": train_seconds,
               "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
               "parameters": sum(p.numel() for p in model.parameters()), "command": command}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "classifier.safetensors")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "README.md").write_text(_model_card(command, config, metrics))
    print(f"test colour accuracy {100 * acc['color_acc']:.2f}%  class accuracy {100 * acc['class_acc']:.2f}%  "
          f"({train_seconds / 60:.1f} min)")
    return metrics


def main_train(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m imagine_flash.eval.classifier",
                                description="Train the in-domain colour/class classifier.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (the shipped one: src/imagine_flash/assets/classifier)")
    p.add_argument("--steps", type=int, default=2000, help="optimiser steps of batch 256")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    set_threads(args.threads)
    command = (f"python -m imagine_flash.eval.classifier --out {args.out} --steps {args.steps} --seed {args.seed} "
               f"--resolution {args.resolution} --threads {args.threads}")
    return train_classifier(args.out, args.steps, args.seed, args.resolution, command=command)


if __name__ == "__main__":
    main_train()
