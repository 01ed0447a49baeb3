"""Pass of to_snn: eval-mode BatchNorm folds into the conv/linear before it."""

from __future__ import annotations

from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .graph import _called_once, _finish, _fresh_name, _module, _owns_its_parameters

def fold_batch_norms(gm: fx.GraphModule) -> fx.GraphModule:
    """Folds each eval-mode BatchNorm whose input is a conv/linear used only by
    it into that layer's weights and bias. Only into a layer that runs torch's
    own forward and _conv_forward on its own parameters (a subclass or
    parametrization that transforms its weight, weight standardisation in an
    overridden _conv_forward, would transform the folded one, and a tied weight
    read elsewhere would change there: such a BN stays, as the per-channel
    affine map it is; see graph._owns_its_parameters); a layer called at several sites gets a copy for this
    site, so the others keep the unfolded weights. Linear + BatchNorm1d is not
    folded (on [B, N, C] the BN normalises N, not the linear's outputs)."""
    for node in list(gm.graph.nodes):
        bn = _module(gm, node)
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not bn.track_running_stats:
            continue
        source = node.args[0]
        layer = _module(gm, source) if isinstance(source, fx.Node) else None
        if layer is None or len(source.users) != 1 or not _owns_its_parameters(gm, source.target, layer):
            continue
        if isinstance(layer, nn.modules.conv._ConvNd) and not isinstance(layer, nn.modules.conv._ConvTransposeNd):
            fuse = fuse_conv_bn_eval
        else:
            # Not Linear + BatchNorm1d: on a [B, N, C] input the BN normalises dim 1 while
            # the fold would scale the linear's C outputs. Kept, it is an exact affine op.
            continue
        fused = fuse(layer.eval(), bn.eval())  # a new module: the layer itself is untouched
        if _called_once(gm, source):
            parent, _, attr = source.target.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, attr, fused)
        else:
            name = _fresh_name(gm, source.target.replace(".", "_") + "_bn")
            gm.add_submodule(name, fused)
            source.target = name
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
    return _finish(gm)

