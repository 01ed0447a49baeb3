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

import os
import pickle
import tempfile
from typing import Any, Dict, Optional

import torch
from torch import nn

from .convert import ConversionError, quantize, to_snn

__all__ = ["save_checkpoint", "load_checkpoint", "make_checkpoint", "build_quantized", "load_model",
           "CheckpointError"]

FORMAT = "fastspike"
VERSION = 1
_REQUIRED = ("model", "num_classes", "levels", "preset", "state_dict")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


def save_checkpoint(checkpoint: Dict[str, Any], path: str) -> None:
    """Writes ``checkpoint`` to ``path`` atomically: to a temporary file in the
    same folder, flushed to disk, then renamed over ``path``, so an interrupted
    save leaves the old file (or none), never a truncated one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
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
    return ckpt


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
