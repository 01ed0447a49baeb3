"""Checkpoints of quantized and converted networks: safe to load, atomic to write.

A checkpoint is a plain dict of tensors and primitive values, so it loads with
``torch.load(..., weights_only=True)`` (no pickled code runs) and rebuilds the
model from its recipe:

    {"format": "fastspike", "version": 1, "model": "digits_cnn", "num_classes": 10,
     "model_kwargs": {...}, "levels": 8, "preset": "qcfs",
     "state_dict": {...},                  # the quantized ANN's parameters and buffers
     "snn": None | {"time_steps": 4, "neuron": "signed", "group_size": None}}

A converted network is stored as its quantized ANN plus the conversion settings:
conversion is deterministic, so :func:`load_model` rebuilds the same SNN.
"""

from __future__ import annotations

import errno
import io
import os
import pickle
import re
import tempfile
import time
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from .convert import ConversionError, quantize, to_snn

__all__ = ["save_checkpoint", "load_checkpoint", "make_checkpoint", "build_quantized", "load_model",
           "CheckpointError"]

FORMAT = "fastspike"
VERSION = 1
_REQUIRED = ("model", "num_classes", "levels", "preset", "state_dict")
MAX_CLASSES = 1_000_000  # ImageNet-21k has 21,841; a larger count is a damaged file (and a huge classifier)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


_TMP_SUFFIX = ".fastspike-tmp"
_LEGACY_TMP = re.compile(r"\.tmp-[A-Za-z0-9_]{8}\.pt")  # the temporaries of earlier versions
_STALE_AFTER_S = 3600.0  # a temporary whose writer cannot be told: stale when not written to for this long


def _tmp_prefix(path: str) -> str:
    return f".{os.path.basename(path)}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale_temporaries(path: str) -> List[str]:
    """Removes the temporaries a killed :func:`save_checkpoint` of ``path`` left
    beside it (``.<name>.<pid>.<random>.fastspike-tmp``): those whose writing
    process is gone, or that nobody wrote to for an hour (another host's, or of
    an earlier version's naming, ``.tmp-XXXXXXXX.pt``). A save in progress in a
    live process keeps its file. Returns the paths removed."""
    folder = os.path.dirname(os.path.abspath(path))
    prefix, now, removed = _tmp_prefix(path), time.time(), []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        full = os.path.join(folder, name)
        try:
            if name.startswith(prefix) and name.endswith(_TMP_SUFFIX):
                pid_text = name[len(prefix):-len(_TMP_SUFFIX)].split(".", 1)[0]
                stale = (pid_text.isdigit() and not _pid_alive(int(pid_text))) or \
                    now - os.path.getmtime(full) > _STALE_AFTER_S
            elif _LEGACY_TMP.fullmatch(name):
                stale = now - os.path.getmtime(full) > _STALE_AFTER_S
            else:
                continue
            if stale and os.path.isfile(full):
                os.unlink(full)
                removed.append(full)
        except OSError:  # gone meanwhile, or not ours to remove
            continue
    return removed


def save_checkpoint(checkpoint: Dict[str, Any], path: str) -> None:
    """Writes ``checkpoint`` to ``path`` atomically: to a temporary file in the
    same folder, flushed to disk, then renamed over ``path``, so an interrupted
    save leaves the old file (or none), never a truncated one; a killed save's
    temporary is removed by the next save of the same path.

    Raises OSError naming ``path`` when it cannot be written (a folder, no
    permission, the disk full: "no space left on device (the disk is full)")."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, f"cannot write checkpoint {path!r}: it is a directory", path)
    remove_stale_temporaries(path)
    # Serialised in memory first: a failed write then raises the file system's own
    # error (ENOSPC, ...), not torch's "unexpected pos" from inside its zip writer.
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{_tmp_prefix(path)}{os.getpid()}.", suffix=_TMP_SUFFIX, dir=folder)
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        reason = err.strerror or str(err)
        if err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
            reason = f"{reason} (the disk is full)"
        raise type(err)(err.errno, f"cannot write checkpoint {path!r}: {reason}", path) from err
    except BaseException:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Loads a fastspike checkpoint with ``weights_only=True`` and checks its
    fields. Raises FileNotFoundError or :class:`CheckpointError` with the reason."""
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} is a directory, not a checkpoint file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"checkpoint {path!r} was refused: it holds more than tensors and plain "
                              f"values (loading it could run code), or it is not a checkpoint: {err}") from err
    except Exception as err:  # a truncated zip/pickle fails in many ways (KeyError, EOFError, ...)
        raise CheckpointError(f"checkpoint {path!r} cannot be read (truncated or not a torch file): {err}") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path!r} is not a fastspike checkpoint (no format='fastspike' "
                              "entry); make one with fastspike.checkpoint.save_checkpoint")
    missing = [k for k in _REQUIRED if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path!r} lacks {', '.join(missing)}")
    for key, types, what in (("state_dict", dict, "a dict of tensors"), ("model_kwargs", (dict, type(None)), "a dict"),
                             ("snn", (dict, type(None)), "a dict or None"), ("model", str, "a model name")):
        if not isinstance(ckpt.get(key), types):
            raise CheckpointError(f"checkpoint {path!r}: {key} must be {what}, got {type(ckpt.get(key)).__name__}")
    num_classes = ckpt["num_classes"]
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or not 1 <= num_classes <= MAX_CLASSES):
        raise CheckpointError(f"checkpoint {path!r}: num_classes must be an integer in [1, {MAX_CLASSES}], "
                              f"got {num_classes!r}")
    for key, value in ckpt["state_dict"].items():
        if not isinstance(key, str):
            raise CheckpointError(f"checkpoint {path!r}: state_dict keys must be parameter names (str), got "
                                  f"{type(key).__name__} {key!r}")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"checkpoint {path!r}: state_dict[{key!r}] must be a tensor, got "
                                  f"{type(value).__name__}")
    return ckpt


def _check_thresholds(qnet: nn.Module, path: str) -> None:
    """Every quantizer's λ (the SNN's thresholds) finite and > 0: NaN or negative
    ones would give a silently wrong quantized ANN and an SNN that cannot run."""
    from .quant import QuantReLU

    for name, module in qnet.named_modules():
        if isinstance(module, QuantReLU):
            with torch.no_grad():
                lam = module.threshold().detach().float()
            bad = ~(torch.isfinite(lam) & (lam > 0))
            if bool(bad.any()):
                raise CheckpointError(
                    f"checkpoint {path!r}: quantizer {name!r} has thresholds that are not finite and > 0 "
                    f"({int(bad.sum())} of {lam.numel()}, e.g. {lam.reshape(-1)[bad.reshape(-1)][0].item()}): "
                    "the file is damaged or its training diverged")


def build_quantized(ckpt: Dict[str, Any], path: str = "<checkpoint>") -> nn.Module:
    """The quantized ANN a checkpoint describes, with its weights loaded.

    Raises :class:`CheckpointError` (naming ``path``) when the recipe cannot be
    rebuilt: an unknown model name, model arguments or quantizer settings the
    builder refuses, or weights that do not fit the model.
    """
    from .models import available_models, get_model

    name = ckpt["model"]
    if name not in available_models():
        raise CheckpointError(f"checkpoint {path!r} names unknown model {name!r}; "
                              f"available: {', '.join(available_models())}")
    kwargs = ckpt.get("model_kwargs") or {}
    # Builders reject bad arguments with TypeError/ValueError: here they are a bad file.
    try:
        net = get_model(name, num_classes=ckpt["num_classes"], **kwargs)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path!r}: model {name!r} cannot be built with "
                              f"num_classes={ckpt['num_classes']!r}, model_kwargs={kwargs!r}: {err}") from err
    try:
        qnet = quantize(net, levels=ckpt["levels"], preset=ckpt["preset"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path!r}: cannot quantize {name!r} with levels={ckpt['levels']!r}, "
                              f"preset={ckpt['preset']!r}: {err}") from err
    try:
        result = qnet.load_state_dict(ckpt["state_dict"], strict=False)
    except RuntimeError as err:  # a tensor of the wrong shape
        detail = " ".join(str(err).split())  # torch's message spans several lines
        raise CheckpointError(f"checkpoint {path!r} does not match model {name!r}: {detail}") from err
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"checkpoint {path!r} does not match model {name!r}: missing "
            f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    _check_thresholds(qnet, path)
    return qnet.eval()


def load_model(path: str, time_steps: Optional[int] = None, neuron: Optional[str] = None,
               group_size: Optional[int] = None) -> nn.Module:
    """Loads a checkpoint as a runnable model: the quantized ANN, or, when the
    checkpoint holds conversion settings or ``time_steps`` is given, the SNN.

    Raises FileNotFoundError, :class:`CheckpointError` (an unusable file or
    conversion settings, stored or given) or :class:`~fastspike.ConversionError`.
    """
    return model_from_checkpoint(load_checkpoint(path), path, time_steps, neuron, group_size)


def model_from_checkpoint(ckpt: Dict[str, Any], path: str = "<checkpoint>",
                          time_steps: Optional[int] = None, neuron: Optional[str] = None,
                          group_size: Optional[int] = None) -> nn.Module:
    """:func:`load_model` for a checkpoint dict already in memory (so a caller
    can prove a checkpoint rebuilds before writing it); ``path`` names it in errors."""
    qnet = build_quantized(ckpt, path)
    snn = dict(ckpt.get("snn") or {})
    if time_steps is not None:
        snn["time_steps"] = time_steps
    if neuron is not None:
        snn["neuron"] = neuron
    if group_size is not None:
        snn["group_size"] = group_size
    if not snn.get("time_steps"):
        return qnet
    try:
        return to_snn(qnet, snn["time_steps"], snn.get("neuron", "if"), group_size=snn.get("group_size"))
    except ConversionError:
        raise  # the model itself does not convert: not a settings problem
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path!r}: conversion settings {snn} are invalid: {err}") from err


def make_checkpoint(model_name: str, num_classes: int, levels: int, preset: str, qnet: nn.Module,
                    model_kwargs: Optional[Dict[str, Any]] = None, snn: Optional[Dict[str, Any]] = None
                    ) -> Dict[str, Any]:
    """The checkpoint dict for a quantized ANN (and optional conversion settings)."""
    return {
        "format": FORMAT, "version": VERSION, "model": model_name, "num_classes": num_classes,
        "model_kwargs": dict(model_kwargs or {}), "levels": levels, "preset": preset,
        "state_dict": {k: v.detach().cpu() for k, v in qnet.state_dict().items()}, "snn": snn,
    }
