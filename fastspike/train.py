"""Training: quantization-aware training of a quantized ANN, and the same loop for SNNs.

    from fastspike.train import TrainConfig, train_model
    qnet = fastspike.quantize(net, levels=8)
    history = train_model(qnet, train_set, TrainConfig(epochs=30, optimizer="sgd", lr=0.1),
                          val_set=test_set, checkpoint="run.pt")
    history = train_model(qnet, train_set, same_config, checkpoint="run.pt", resume=True)  # after a crash

One loop serves every case: a float ANN, a quantized ANN (any :class:`~fastspike.quant.QuantReLU`
preset; its thresholds are trained with the weights), and a converted SNN trained end to end
through the fused surrogate backward (:func:`fastspike.finetune.train_snn`).

What it guarantees:

* **Deterministic data order.** The loop owns the sampler (that is why it takes a Dataset, not a
  DataLoader): the order of epoch ``e`` is a permutation seeded by ``(seed, e)``, the same in every
  run, so a resumed run sees exactly the batches the uninterrupted one would have seen.
* **Checkpoint and resume.** After every epoch the model, optimizer, schedule, grad scaler, RNG
  state and history are written atomically (:func:`fastspike.checkpoint.save_checkpoint`) as plain
  tensors and numbers, loadable with ``weights_only=True``. Resuming restores all of them, so an
  interrupted run ends with bit-identical weights.
* **Data parallel under torchrun.** When ``WORLD_SIZE`` > 1 the process group is initialised from
  the environment (gloo on CPU, nccl on GPU), the model is wrapped in DistributedDataParallel and
  every rank reads its share of each global batch (``batch_size`` is the global batch). With a
  model without BatchNorm (BN statistics stay per rank, as usual with DDP) the result equals one
  process on the same global batch up to float summation order. Only rank 0 writes checkpoints.
* **Mixed precision on GPU**: autocast (bfloat16 where supported, else float16 with a grad
  scaler); off on the CPU.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from .checkpoint import load_checkpoint, make_checkpoint, save_checkpoint

__all__ = ["TrainConfig", "train_model", "ResumeError", "make_optimizer", "make_schedule", "init_distributed",
           "make_loader", "classification_accuracy", "OPTIMIZERS", "SCHEDULES"]

OPTIMIZERS = ("sgd", "adamw", "adam")
SCHEDULES = ("cosine", "constant")

LossFn = Callable[[Any, Any], torch.Tensor]


class ResumeError(ValueError):
    """The checkpoint given to resume from cannot continue this run (other settings, no state).
    ``changes``: the settings that differ, as (name, saved value, value of this run)."""

    def __init__(self, message: str, changes: Sequence[Tuple[str, Any, Any]] = ()):
        super().__init__(message)
        self.changes = list(changes)


@dataclass
class TrainConfig:
    """The recipe knobs of :func:`train_model` (and of the layer-wise fine-tuning).

    Attributes:
        epochs: passes over the training set.
        batch_size: the global batch; under torchrun each rank takes batch_size / world_size.
        optimizer: "sgd" (momentum, optional Nesterov), "adamw" (decoupled weight decay) or "adam".
        lr: peak learning rate.
        momentum: SGD momentum.
        nesterov: SGD Nesterov momentum.
        weight_decay: L2 (sgd, adam) or decoupled (adamw) weight decay.
        schedule: "cosine" (annealed to 0 over all steps, stepped every batch) or "constant".
        label_smoothing: of the default cross-entropy loss.
        amp: mixed precision; None means on for CUDA and off on the CPU (where it is refused).
        seed: seeds the global RNG at the start of a fresh run and the data order of every epoch.
        workers: DataLoader worker processes.
        drop_last: drop each epoch's last incomplete batch.
    """

    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    label_smoothing: float = 0.0
    amp: Optional[bool] = None
    seed: int = 0
    workers: int = 0
    drop_last: bool = False

    def validate(self) -> None:
        """Raises ValueError naming the first field with an impossible value."""
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be finite and > 0, got {self.lr!r}")
        if not (0 <= self.momentum < 1):
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be finite and >= 0, got {self.weight_decay!r}")
        if not (0 <= self.label_smoothing < 1):
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers!r}")


# ---------------------------------------------------------------------------
# Building blocks (shared with fastspike.finetune)


def make_optimizer(params, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer ``config.optimizer`` over ``params`` with the config's knobs."""
    params = list(params)
    if not params:
        raise ValueError("there are no parameters to train (all have requires_grad=False)")
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                               weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


def make_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig,
                  total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Cosine annealing over ``total_steps`` batches, or a constant rate."""
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, total_steps))
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def init_distributed(device: torch.device) -> Tuple[int, int, torch.device, bool]:
    """(rank, world_size, device, initialised_here) from the torchrun environment.

    Outside torchrun (``WORLD_SIZE`` unset or 1) this is (0, 1, device, False). Under torchrun the
    process group is initialised unless it already is (gloo on the CPU, nccl on CUDA, each rank on
    ``cuda:LOCAL_RANK``); ``initialised_here`` says whether the caller should destroy it.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return rank, world, device, False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device, False
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device, True


def make_loader(dataset: Dataset, config: TrainConfig, rank: int = 0, world: int = 1,
                collate_fn: Optional[Callable] = None) -> Tuple[DataLoader, DistributedSampler]:
    """A loader whose order is a permutation seeded by (config.seed, epoch) (call
    ``sampler.set_epoch``); rank r of ``world`` reads every world-th index of it, so the ranks'
    per-step batches together are exactly one process's global batch. n mod world samples are
    left out per epoch under DDP (never duplicated)."""
    if isinstance(dataset, DataLoader):
        raise TypeError("train_set must be a Dataset, got a DataLoader: the training loop owns the "
                        "sampler (deterministic order for resume, sharding for DDP); pass "
                        "loader.dataset and set TrainConfig.batch_size instead")
    if config.batch_size % world != 0:
        raise ValueError(f"batch_size must be divisible by the number of processes ({world}), "
                         f"got {config.batch_size}")
    if len(dataset) < world:
        raise ValueError(f"train_set has {len(dataset)} samples, fewer than the {world} processes")
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=config.seed,
                                 drop_last=world > 1)
    loader = DataLoader(dataset, config.batch_size // world, sampler=sampler, collate_fn=collate_fn,
                        num_workers=config.workers, drop_last=config.drop_last)
    return loader, sampler


def _to_device(batch: Any, device: torch.device) -> Any:
    return pytree.tree_map(lambda t: t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t,
                           batch)


def _is_classification(out: Any, target: Any) -> bool:
    return (isinstance(out, torch.Tensor) and isinstance(target, torch.Tensor) and out.dim() == 2
            and target.dim() == 1 and not target.is_floating_point() and len(target) == len(out))


@torch.no_grad()
@torch.no_grad()  # scoring only: no autograd graph for the validation passes
def classification_accuracy(model: nn.Module, dataset: Dataset, batch_size: int = 256,
                            device: Optional[torch.device] = None, rank: int = 0, world: int = 1) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on ``dataset`` of (input, class) pairs; under DDP
    every rank scores every world-th sample and the counts are summed over ranks."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    indices = range(rank, len(dataset), world)
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    loader = DataLoader(torch.utils.data.Subset(dataset, list(indices)), batch_size)
    for x, y in loader:
        counts[0] += (model(x.to(device)).argmax(1) == y.to(device)).sum()
        counts[1] += y.numel()
    if world > 1:
        dist.all_reduce(counts)
    model.train(was_training)
    return (counts[0] / counts[1].clamp(min=1)).item()


def _amp_settings(config: TrainConfig, device: torch.device) -> Tuple[bool, torch.dtype]:
    enabled = config.amp if config.amp is not None else device.type == "cuda"
    if enabled and device.type != "cuda":
        raise ValueError(f"amp (mixed precision) is for CUDA devices, got device {device}")
    dtype = torch.bfloat16 if enabled and torch.cuda.is_bf16_supported() else torch.float16
    return enabled, dtype


def _quant_recipe(model: nn.Module) -> Dict[str, Any]:
    """levels and preset of the model's quantizers (None for a float network)."""
    from .quant import QuantReLU

    quants = [m for m in model.modules() if isinstance(m, QuantReLU)]
    if not quants:
        return {"levels": None, "preset": None}
    return {"levels": quants[0].levels, "preset": quants[0].preset}


def _run_identity(model: nn.Module, checkpoint_meta: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """What a resumed run must share with the saved one beyond the optimizer recipe:
    the quantizers' levels and preset and the caller's checkpoint_meta entries."""
    return {**_quant_recipe(model), **dict(checkpoint_meta or {})}


def _same(saved: Any, current: Any) -> bool:
    """Equality of checkpoint values after a save and load (tuples may come back as lists)."""
    if isinstance(saved, (list, tuple)) and isinstance(current, (list, tuple)):
        return len(saved) == len(current) and all(_same(a, b) for a, b in zip(saved, current))
    if isinstance(saved, dict) and isinstance(current, dict):
        return saved.keys() == current.keys() and all(_same(saved[k], current[k]) for k in saved)
    if isinstance(saved, torch.Tensor) or isinstance(current, torch.Tensor):
        return isinstance(saved, torch.Tensor) and isinstance(current, torch.Tensor) and torch.equal(saved, current)
    return saved == current


def _rng_state(device: torch.device) -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ---------------------------------------------------------------------------
# The loop


def train_model(
    model: nn.Module,
    train_set: Dataset,
    config: Optional[TrainConfig] = None,
    *,
    loss_fn: Optional[LossFn] = None,
    val_set: Optional[Dataset] = None,
    collate_fn: Optional[Callable] = None,
    device: Optional[torch.device] = None,
    checkpoint: Optional[str] = None,
    resume: bool = False,
    checkpoint_meta: Optional[Mapping[str, Any]] = None,
    on_epoch_end: Optional[Callable[[int, Dict[str, float]], None]] = None,
    progress: bool = True,
    desc: str = "train",
) -> List[Dict[str, float]]:
    """Trains ``model`` in place for ``config.epochs`` epochs and returns one dict per epoch
    (``epoch``, ``loss``, ``lr`` and, for classification, ``accuracy``; ``val_accuracy`` with
    ``val_set``).

    Args:
        model: any module: a float ANN, a quantized ANN (:func:`fastspike.quantize`) or an SNN
            (:func:`fastspike.to_snn`; see :func:`fastspike.finetune.train_snn`). Every parameter
            with ``requires_grad`` is trained. Initialise it before the call (the call seeds the
            global RNG with ``config.seed`` at the start of a fresh run).
        train_set: a Dataset of (input, target) pairs; batched here (see :func:`make_loader`).
        config: the recipe (:class:`TrainConfig`; defaults if None).
        loss_fn: ``loss_fn(output, target)``; default cross-entropy with
            ``config.label_smoothing``. Targets are moved to the device (tensors in nested
            lists/dicts too).
        val_set: classification Dataset scored after every epoch (``val_accuracy``).
        collate_fn: for the loader (e.g. :func:`fastspike.data.collate_scenes`).
        device: where to train (default: the model's device); under torchrun with CUDA each rank
            uses ``cuda:LOCAL_RANK``.
        checkpoint: path written atomically after every epoch (rank 0 only).
        resume: continue from ``checkpoint`` (which must exist) with the same config.
        checkpoint_meta: entries stored with the checkpoint, e.g. ``{"model": "digits_cnn",
            "num_classes": 10, "model_kwargs": {}}`` so that :func:`fastspike.checkpoint.load_model`
            can rebuild the network (default: the model's class name); ``levels`` and ``preset`` are
            read off the model.
        on_epoch_end: called as ``on_epoch_end(epoch, record)`` after the epoch's checkpoint is
            written (an exception there stops training with the checkpoint intact).
        progress: show a tqdm bar (rank 0) with loss and accuracy.
        desc: the bar's label.
    """
    config = config or TrainConfig()
    config.validate()
    if loss_fn is not None and config.label_smoothing > 0:
        raise ValueError(f"label_smoothing={config.label_smoothing} applies to the default "
                         "cross-entropy loss; with a loss_fn, smooth inside it")
    if resume and checkpoint is None:
        raise ValueError("resume=True needs checkpoint=<path of the run to continue>")
    if loss_fn is None:
        def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(out, target, label_smoothing=config.label_smoothing)

    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    rank, world, device, owns_group = init_distributed(device)
    try:
        return _train(model, train_set, config, loss_fn, val_set, collate_fn, device, rank, world,
                      checkpoint, resume, checkpoint_meta, on_epoch_end, progress, desc)
    finally:
        if owns_group:
            dist.destroy_process_group()


def _train(model, train_set, config, loss_fn, val_set, collate_fn, device, rank, world, checkpoint, resume,
           checkpoint_meta, on_epoch_end, progress, desc) -> List[Dict[str, float]]:
    model.to(device)
    amp, amp_dtype = _amp_settings(config, device)
    loader, sampler = make_loader(train_set, config, rank, world, collate_fn)
    if len(loader) == 0:
        raise ValueError(f"train_set gives no batch of {config.batch_size // world} per process "
                         f"({len(train_set)} samples, drop_last={config.drop_last})")
    optimizer = make_optimizer((p for p in model.parameters() if p.requires_grad), config)
    schedule = make_schedule(optimizer, config, config.epochs * len(loader))
    scaler = torch.amp.GradScaler(device.type, enabled=amp and amp_dtype == torch.float16)
    recipe = {k: v for k, v in asdict(config).items() if k not in ("workers",)}  # workers may change
    history: List[Dict[str, float]] = []
    start_epoch = 0
    if resume:
        state = load_checkpoint(checkpoint)
        training = state.get("training")
        if not training:
            raise ResumeError(f"checkpoint {checkpoint!r} holds no training state to resume from")
        changes = [(k, training["config"].get(k), recipe[k]) for k in sorted(recipe)
                   if training["config"].get(k) != recipe[k]]
        # The model and its quantizers (levels, preset), and whatever else the caller
        # identifies its run by (checkpoint_meta: model name, classes, data, ...), must
        # be those of the interrupted run too: otherwise the remaining epochs would
        # train another network than the uninterrupted run (an entry the saved state
        # lacks, from an older version, is not compared).
        changes += [(k, state[k], v) for k, v in sorted(_run_identity(model, checkpoint_meta).items())
                    if k in state and not _same(state[k], v)]
        if training["world_size"] != world:
            changes.append(("world_size", training["world_size"], world))
        if changes:
            what = ", ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changes)
            raise ResumeError(f"resume needs the run's settings; checkpoint {checkpoint!r} differs in {what}",
                              changes)
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(training["optimizer"])
        schedule.load_state_dict(training["schedule"])
        scaler.load_state_dict(training["scaler"])
        _set_rng_state(training["rng"], device)
        history = list(training["history"])
        start_epoch = training["epoch"]
    else:
        torch.manual_seed(config.seed)
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    show = progress and rank == 0
    steps_left = (config.epochs - start_epoch) * len(loader)
    with tqdm(total=steps_left, desc=desc, leave=False, mininterval=1.0, disable=not show) as bar:
        for epoch in range(start_epoch, config.epochs):
            sampler.set_epoch(epoch)
            net.train()
            # loss sum, correct, samples: kept on the device so that steps need no sync.
            totals = torch.zeros(3, dtype=torch.float64, device=device)
            classify = False  # accuracy is shown and recorded only for classifiers
            for step, (x, target) in enumerate(loader):
                x, target = _to_device(x, device), _to_device(target, device)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                    out = net(x)
                    loss = loss_fn(out, target)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                schedule.step()
                n = len(x)
                totals[0] += loss.detach().double() * n
                totals[2] += n
                if _is_classification(out, target):
                    classify = True
                    totals[1] += (out.detach().argmax(1) == target).sum()
                bar.update()
                if show and (step % 10 == 0 or step == len(loader) - 1):
                    shown = {"acc": f"{(totals[1] / totals[2]).item():.3f}"} if classify else {}
                    bar.set_postfix(epoch=epoch + 1, loss=f"{(totals[0] / totals[2]).item():.3f}", **shown)
            if world > 1:
                dist.all_reduce(totals)
            record = {"epoch": epoch + 1, "loss": (totals[0] / totals[2]).item(),
                      "lr": optimizer.param_groups[0]["lr"]}
            if classify:
                record["accuracy"] = (totals[1] / totals[2]).item()
            if val_set is not None:
                record["val_accuracy"] = classification_accuracy(model, val_set, device=device, rank=rank,
                                                                 world=world)
            history.append(record)
            if checkpoint is not None and rank == 0:
                # A model outside fastspike.models is stored under its class name: resumable, not rebuildable.
                meta = {"model": type(model).__name__, "num_classes": None, "model_kwargs": {}, **_quant_recipe(model),
                        **dict(checkpoint_meta or {})}
                ckpt = make_checkpoint(meta.pop("model"), meta.pop("num_classes"), meta.pop("levels"),
                                       meta.pop("preset"), model, meta.pop("model_kwargs"), meta.pop("snn", None))
                ckpt.update(meta)
                ckpt["training"] = {
                    "epoch": epoch + 1, "config": recipe, "world_size": world,
                    "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                    "scaler": scaler.state_dict(), "rng": _rng_state(device), "history": history,
                }
                save_checkpoint(ckpt, checkpoint)
            if world > 1:
                dist.barrier()  # no rank runs ahead of the checkpoint
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, record)
    model.eval()
    return history

