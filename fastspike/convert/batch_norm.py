"""Pass of to_snn: eval-mode BatchNorm folds into the conv/linear before it."""

from __future__ import annotations

from torch import fx, nn
from torch.nn.utils import parametrize
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .graph import _called_once, _finish, _fresh_name, _module, _plain_torch_forward

def fold_batch_norms(gm: fx.GraphModule) -> fx.GraphModule:
    """Folds each eval-mode BatchNorm whose input is a conv/linear used only by
    it into that layer's weights and bias. Only into a layer that runs torch's
    own forward on its own parameters (a subclass or parametrization that
    transforms its weight would transform the folded one, and a tied weight
    read elsewhere would change there: such a BN stays, as the per-channel
    affine map it is); a layer called at several sites gets a copy for this
    site, so the others keep the unfolded weights. Linear + BatchNorm1d is not
    folded (on [B, N, C] the BN normalises N, not the linear's outputs)."""
    for node in list(gm.graph.nodes):
        bn = _module(gm, node)
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not bn.track_running_stats:
            continue
        source = node.args[0]
        layer = _module(gm, source) if isinstance(source, fx.Node) else None
        if layer is None or len(source.users) != 1 or not _foldable(gm, source.target, layer):
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


def _foldable(gm: fx.GraphModule, target: str, layer: nn.Module) -> bool:
    """Folding changes ``layer``'s weight and bias: only where nothing else sees
    them. The layer runs torch's own forward on its own parameters (no
    parametrization or weight-norm hook recomputing them), and no other module
    or graph node reads those parameters (weight tying, F.conv_transpose2d(z,
    self.enc.weight))."""
    if not _plain_torch_forward(layer) or parametrize.is_parametrized(layer) or layer._forward_pre_hooks:
        return False
    own = {id(p) for p in layer.parameters()}
    for name, p in gm.named_parameters(remove_duplicate=False):
        if id(p) in own and not name.startswith(target + "."):
            return False
    return not any(n.op == "get_attr" and str(n.target).startswith(target + ".") for n in gm.graph.nodes)
