"""Pass of quantize: max-pools move before the quantizer they follow, or
become average pools (warning) or are refused (strict)."""

from __future__ import annotations

import warnings
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..quant import QuantReLU
from .graph import ConversionError, _finish, _module, _replace_with_module

# ---------------------------------------------------------------------------
# Pass: max-pools

# Windowed and adaptive max-pools (module -> dims); an adaptive one has an output size
# instead of a window and becomes an adaptive average pool where it cannot move.
_WINDOW_MAX_POOLS = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}
_ADAPTIVE_MAX_POOLS = {nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3}
_MAX_POOL_MODULES = tuple(_WINDOW_MAX_POOLS) + tuple(_ADAPTIVE_MAX_POOLS)
_WINDOW_MAX_POOL_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, torch.max_pool1d, torch.max_pool2d,
                              torch.max_pool3d}
# (torch.adaptive_max_pool1d is not one: it always returns (values, indices).)
_ADAPTIVE_MAX_POOL_FUNCTIONS = {F.adaptive_max_pool1d: 1, F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 3}
_MAX_POOL_FUNCTIONS = _WINDOW_MAX_POOL_FUNCTIONS | set(_ADAPTIVE_MAX_POOL_FUNCTIONS)
_AVG_POOL_FOR = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
_ADAPTIVE_AVG_POOL_FOR = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}


def _max_pool_settings(gm: fx.GraphModule, node: fx.Node) -> Optional[Dict[str, Any]]:
    """kernel_size, stride, padding, dilation, ceil_mode, dims of a max-pool node; for
    an adaptive one output_size, dims (and adaptive=True)."""
    m = _module(gm, node) if node.op == "call_module" else None
    if isinstance(m, tuple(_ADAPTIVE_MAX_POOLS)):
        return dict(adaptive=True, output_size=m.output_size, dims=_ADAPTIVE_MAX_POOLS[type(m)],
                    return_indices=m.return_indices)
    if node.op == "call_function" and node.target in _ADAPTIVE_MAX_POOL_FUNCTIONS:
        values = dict(zip(["input", "output_size", "return_indices"], node.args))
        values.update(node.kwargs)
        return dict(adaptive=True, output_size=values["output_size"], dims=_ADAPTIVE_MAX_POOL_FUNCTIONS[node.target],
                    return_indices=values.get("return_indices", False))
    if isinstance(m, tuple(_WINDOW_MAX_POOLS)):
        return dict(kernel_size=m.kernel_size, stride=m.stride, padding=m.padding,
                    dilation=m.dilation, ceil_mode=m.ceil_mode, dims=_WINDOW_MAX_POOLS[type(m)],
                    return_indices=m.return_indices)
    if node.op == "call_function" and node.target in _WINDOW_MAX_POOL_FUNCTIONS:
        names = ["input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"]
        values = dict(zip(names, node.args))
        values.update(node.kwargs)
        dims = int(getattr(node.target, "__name__", "max_pool2d")[-2])
        return dict(kernel_size=values["kernel_size"], stride=values.get("stride") or values["kernel_size"],
                    padding=values.get("padding", 0), dilation=values.get("dilation", 1),
                    ceil_mode=values.get("ceil_mode", False), dims=dims,
                    return_indices=values.get("return_indices", False))
    return None


def move_max_pools(gm: fx.GraphModule, strict: bool = False) -> fx.GraphModule:
    """Moves each max-pool that directly follows a quantizer before it;
    replaces the others by average pools (warning) or refuses them (strict)."""
    for node in list(gm.graph.nodes):
        settings = _max_pool_settings(gm, node)
        if settings is None:
            continue
        if settings["return_indices"]:
            raise ConversionError(f"node '{node.name}' is a max-pool returning indices, which has no "
                                  "spiking equivalent; remove return_indices or the unpooling that uses them")
        source = node.args[0]
        if (isinstance(source, fx.Node) and isinstance(_module(gm, source), QuantReLU)
                and len(source.users) == 1):
            # max_pool(q(x)) == q(max_pool(x)): q is monotone and elementwise.
            node.replace_input_with(source, source.args[0])
            node.replace_all_uses_with(source)
            source.args = (node,)
            source.prepend(node)  # keep topological order: the pool now runs first
            continue
        if strict:
            raise ConversionError(
                f"node '{node.name}' is a max-pool that does not directly follow a ReLU, so it cannot "
                "be moved before the activation and has no exact spiking equivalent; replace it with "
                "average pooling and fine-tune, or call quantize(..., strict=False) to have it replaced")
        if settings.get("adaptive"):
            warnings.warn(f"fastspike: adaptive max-pool node '{node.name}' does not follow a ReLU; it is "
                          "replaced by an adaptive average pool of the same output size (pass strict=True to "
                          "refuse instead)", stacklevel=3)
            _replace_with_module(gm, node, "avgpool", _ADAPTIVE_AVG_POOL_FOR[settings["dims"]](settings["output_size"]))
            continue
        if settings["dilation"] not in (1, (1,) * settings["dims"]):
            raise ConversionError(f"node '{node.name}' is a dilated max-pool, which has no average-pool "
                                  "equivalent; replace it by hand before converting")
        warnings.warn(f"fastspike: max-pool node '{node.name}' does not follow a ReLU; it is replaced by "
                      "an average pool with the same window (pass strict=True to refuse instead)",
                      stacklevel=3)
        _replace_with_module(gm, node, "avgpool", _AVG_POOL_FOR[settings["dims"]](
            settings["kernel_size"], settings["stride"], settings["padding"], settings["ceil_mode"]))
    return _finish(gm)
