"""fastspike.interop: models of the QCFS, group-neuron and Fast-SNN code bases
and SpikingJelly networks, imported exactly or refused (issue 18).

The stand-in modules below carry the source code bases' class names,
attributes and documented forward rules (written here, not copied). Oracles:
the imported quantized ANN equals the source ANN bit for bit; the SNN in
exact mode equals the source's own step-by-step simulation bit for bit at
T = 1, 2, 4, 8; the default (fast) SNN equals it up to float rounding.
Batches of 4: the layers must run the same kernels for T·B rows as for B.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastspike
from fastspike import interop
from fastspike.convert import ConversionError

STEPS = (1, 2, 4, 8)


def _bn(c):
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.3, 0.3)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.6, 1.4)
        bn.bias.uniform_(0.0, 0.4)
    return bn


def _x(seed=0, batch=4):
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------
# QCFS code base stand-ins


class MyFloor(nn.Module):
    """QCFS quantizer: x/up, ⌊x·t + ½⌋/t, clamp to [0, 1], ·up."""

    def __init__(self, up=8., t=32):
        super().__init__()
        self.up = nn.Parameter(torch.tensor([up]))
        self.t = t

    def forward(self, x):
        y = x / self.up
        y = torch.floor(y * self.t + 0.5) / self.t
        return torch.clamp(y, 0, 1) * self.up


class TCL(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Parameter(torch.Tensor([4.]))

    def forward(self, x):
        return self.up - F.relu(self.up - F.relu(x))


class ScaledNeuron(nn.Module):
    """QCFS's SNN neuron: a SpikingJelly IF node (threshold 1, soft reset) on x/scale,
    charged with 0.5 before the first step, spikes ·scale."""

    def __init__(self, scale=1.):
        super().__init__()
        self.scale = scale
        self.t = 0
        self.v = None

    def _if(self, x):
        self.v = self.v + x
        spike = ((self.v - 1.0) >= 0).to(x)
        self.v = self.v - spike * 1.0
        return spike

    def forward(self, x):
        x = x / self.scale
        if self.t == 0:
            self.v = torch.zeros_like(x)
            self._if(torch.ones_like(x) * 0.5)
        spikes = self._if(x)
        self.t += 1
        return spikes * self.scale

    def reset(self):
        self.t, self.v = 0, None


class QcfsVGG(nn.Module):
    def __init__(self, act=lambda: MyFloor(2.0, 4)):
        super().__init__()
        self.layer1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _bn(8), act(), nn.AvgPool2d(2))
        self.layer2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), _bn(8), act(), nn.AvgPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(8 * 2 * 2, 16), act(), nn.Linear(16, 5))

    def forward(self, x):
        return self.classifier(self.layer2(self.layer1(x)))


class QcfsBlock(nn.Module):
    def __init__(self, c, act):
        super().__init__()
        self.residual_function = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), _bn(c), act(),
                                               nn.Conv2d(c, c, 3, padding=1, bias=False), _bn(c))
        self.shortcut = nn.Sequential()
        self.relu = act()

    def forward(self, x):
        return self.relu(self.residual_function(x) + self.shortcut(x))


class QcfsResNet(nn.Module):
    def __init__(self, act=lambda: MyFloor(2.0, 4)):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), _bn(8), act())
        self.conv2_x = nn.Sequential(QcfsBlock(8, act), QcfsBlock(8, act))
        self.avg_pool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        out = self.avg_pool(self.conv2_x(self.conv1(x)))
        return self.fc(out.view(out.size(0), -1))


def _randomise_thresholds(model, attr="up"):
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            p = getattr(m, attr, None)
            if isinstance(p, nn.Parameter):
                p.copy_(torch.rand(p.shape, generator=gen) * 2 + 0.5)


def _replace(model, match, make):
    for name, child in list(model.named_children()):
        if match(child):
            setattr(model, name, make(child))
        else:
            _replace(child, match, make)
    return model


def qcfs_source_snn(ann):
    """The QCFS code base's conversion: every MyFloor -> ScaledNeuron(up)."""
    return _replace(copy.deepcopy(ann), lambda m: isinstance(m, MyFloor), lambda m: ScaledNeuron(m.up.item()))


def running_sums(snn, x, steps, reset):
    """QCFS/GN eval_snn: spikes = 0; spikes += model(img) at every step."""
    sums = []
    spikes = 0
    with torch.no_grad():
        for _ in range(steps):
            spikes += snn(x)
            sums.append(spikes.clone())
    reset(snn)
    return sums


def qcfs_reset(model):
    for m in model.modules():
        if isinstance(m, ScaledNeuron):
            m.reset()


@pytest.mark.parametrize("arch", [QcfsVGG, QcfsResNet])
def test_qcfs_ann_equals_source_exactly(arch):
    torch.manual_seed(0)
    ann = arch().eval()
    _randomise_thresholds(ann)
    qnet = interop.from_qcfs(ann).eval()
    quants = dict(fastspike.convert.quantizers(qnet))
    assert {n for n, m in ann.named_modules() if isinstance(m, MyFloor)} == set(quants)
    for name, q in quants.items():
        src = ann.get_submodule(name)
        assert q.levels == src.t and float(q.threshold().detach()) == float(src.up.detach())
    x = _x() * 3
    assert torch.equal(qnet(x), ann(x))


@pytest.mark.parametrize("arch", [QcfsVGG, QcfsResNet])
def test_qcfs_exact_snn_equals_source_simulation(arch):
    torch.manual_seed(1)
    ann = arch().eval()
    _randomise_thresholds(ann)
    source = qcfs_source_snn(ann).eval()
    x = _x(1) * 3
    sums = running_sums(source, x, max(STEPS), qcfs_reset)
    qnet = interop.from_qcfs(ann)
    for steps in STEPS:
        exact = interop.to_snn(qnet, steps, exact=True)
        with torch.no_grad():
            assert torch.equal(exact(x), sums[steps - 1]), steps
        fast = interop.from_qcfs(ann, time_steps=steps)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), sums[steps - 1], rtol=1e-4, atol=1e-4 * steps)


def test_qcfs_tcl_and_scaled_neuron_need_levels_and_map_theta():
    torch.manual_seed(2)
    ann = QcfsVGG(act=TCL).eval()
    with pytest.raises(ConversionError, match="TCL.*levels=L"):
        interop.from_qcfs(ann)
    qnet = interop.from_qcfs(ann, levels=8)
    assert {float(q.threshold()) for _, q in fastspike.convert.quantizers(qnet)} == {4.0}
    snn = QcfsVGG(act=lambda: ScaledNeuron(1.5)).eval()
    x = _x(2) * 3
    sums = running_sums(snn, x, 4, qcfs_reset)
    imported = interop.from_qcfs(snn, levels=4, time_steps=4, exact=True)
    with torch.no_grad():
        assert torch.equal(imported(x), sums[3])


def test_qcfs_refusals_name_module_and_class():
    class ShiftNeuron(nn.Module):
        def forward(self, x):
            return x

    model = nn.Sequential(nn.Conv2d(3, 4, 3), ShiftNeuron(), nn.Conv2d(4, 4, 3), MyFloor(2.0, 4))
    with pytest.raises(ConversionError, match=r"'1' \(ShiftNeuron\)"):
        interop.from_qcfs(model)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), MyFloor(2.0, 4), nn.Conv2d(4, 4, 3), nn.ReLU())
    with pytest.raises(ConversionError, match="plain ReLU"):
        interop.from_qcfs(plain)
    with pytest.raises(ConversionError, match="no.*activation|none of the code base"):
        interop.from_qcfs(nn.Sequential(nn.Conv2d(3, 4, 3)))
    with pytest.raises(ConversionError, match="the model itself is a MyFloor; import the network that contains it"):
        interop.from_qcfs(MyFloor(2.0, 4))


# ---------------------------------------------------------------------------
# Group-neuron code base stand-ins


class QCFS(nn.Module):
    """The group-neuron code's quantizer: ⌊x·T/θ + p0⌋ (straight-through), clamp [0, T], ·θ/T."""

    def __init__(self, T):
        super().__init__()
        self.T = T
        self.v_threshold = nn.Parameter(torch.tensor(float(T)))
        self.p0 = torch.tensor(0.5)

    def forward(self, x):
        y = x * self.T / self.v_threshold + self.p0
        y = (y.floor() - y).detach() + y
        return torch.clamp(y, 0, self.T) * self.v_threshold / self.T


class GN(nn.Module):
    """Group neuron: m members share a membrane (kept per member, [m, ...]), starting at
    half a unit θ/m; member j fires at j·θ/m; reset by the spike count times θ/m."""

    def __init__(self, m=4, v_threshold=1.0):
        super().__init__()
        self.m = m
        self.v_threshold = v_threshold / m
        self.bias = torch.arange(1, m + 1, 1) * self.v_threshold
        self.v = self.v_threshold * 0.5

    def forward(self, x):
        if isinstance(self.v, float):
            self.v = torch.full_like(x, self.v).repeat(self.m, *[1] * x.dim())
            self.bias = self.bias.view(-1, *[1] * x.dim()).to(x)
        self.v = self.v + x
        spike = ((self.v - self.bias) >= 0).to(x).sum(dim=0)
        self.v = self.v - spike * self.v_threshold
        return spike * self.v_threshold

    def reset(self):
        self.v = self.v_threshold * 0.5


class CombinedNode(nn.Module):
    """The group-neuron code's IF neuron: v0 = θ·p0, v += x + bias, fire at θ, soft reset, spikes ·θ."""

    def __init__(self, bias=0.0, v_threshold=1.0, p0=0.5, v_reset=None):
        super().__init__()
        self.bias, self.v_threshold, self.p0, self.v_reset = bias, v_threshold, p0, v_reset
        self.v = v_threshold * p0

    def forward(self, x):
        if isinstance(self.v, float):
            self.v = torch.full_like(x, self.v)
        self.v = self.v + x + self.bias
        spike = ((self.v - self.v_threshold) >= 0).to(x)
        self.v = self.v - spike * self.v_threshold
        return spike * self.v_threshold

    def reset(self):
        self.v = self.v_threshold * self.p0


def gn_reset(model):
    for m in model.modules():
        if isinstance(m, (GN, CombinedNode)):
            m.reset()


def gn_source_snn(ann, members, sn_type):
    make = (lambda q: GN(members, q.v_threshold.item())) if sn_type == "gn" else (
        lambda q: CombinedNode(v_threshold=q.v_threshold.item()))
    return _replace(copy.deepcopy(ann), lambda m: isinstance(m, QCFS), make)


@pytest.mark.parametrize("arch", [QcfsVGG, QcfsResNet])
def test_gn_ann_equals_source_exactly(arch):
    torch.manual_seed(4)
    ann = arch(act=lambda: QCFS(8)).eval()
    _randomise_thresholds(ann, "v_threshold")
    qnet = interop.from_gn(ann)
    x = _x(4) * 3
    assert torch.equal(qnet(x), ann(x))
    # QuantReLU's own order (z/λ·L) rounds differently from z·L/λ somewhere on a dense grid
    plain = fastspike.quantize(nn.Sequential(nn.ReLU()), levels=3)
    q = QCFS(3)
    with torch.no_grad():
        q.v_threshold.fill_(0.7)
        plain.quant_0.set_threshold(torch.tensor(0.7))
    z = torch.linspace(0, 1, 100001)
    assert torch.equal(interop.from_gn(nn.Sequential(q))(z), q(z))


@pytest.mark.parametrize("arch", [QcfsVGG, QcfsResNet])
@pytest.mark.parametrize("sn_type", ["gn", "if"])
def test_gn_exact_snn_equals_source_simulation(arch, sn_type):
    torch.manual_seed(5)
    levels = 8
    ann = arch(act=lambda: QCFS(levels)).eval()
    _randomise_thresholds(ann, "v_threshold")
    qnet = interop.from_gn(ann)
    x = _x(5) * 3
    for steps in STEPS:
        members = levels // steps if sn_type == "gn" else 1
        source = gn_source_snn(ann, members, sn_type).eval()
        sums = running_sums(source, x, steps, gn_reset)
        group = "auto" if sn_type == "gn" else None
        exact = interop.to_snn(qnet, steps, exact=True, group_size=group)
        with torch.no_grad():
            assert torch.equal(exact(x), sums[-1]), (steps, sn_type)
            fast = interop.to_snn(qnet, steps, group_size=group)
            torch.testing.assert_close(fast(x), sums[-1], rtol=1e-4, atol=1e-4 * steps)
        # the spiking model itself imports to the same SNN
        imported = interop.from_gn(source, levels=levels, time_steps=steps, exact=True)
        with torch.no_grad():
            assert torch.equal(imported(x), sums[-1])


def test_gn_refusals():
    q = QCFS(4)
    q.p0 = torch.tensor(0.3)
    with pytest.raises(ConversionError, match=r"'1' \(QCFS\).*p0=0.3"):
        interop.from_gn(nn.Sequential(nn.Conv2d(3, 3, 1), q))
    with pytest.raises(ConversionError, match=r"'1' \(CombinedNode\).*bias"):
        interop.from_gn(nn.Sequential(nn.Conv2d(3, 3, 1), CombinedNode(bias=0.1)), levels=4)
    with pytest.raises(ValueError, match="does not divide"):
        interop.to_snn(interop.from_gn(nn.Sequential(nn.Conv2d(3, 3, 1), QCFS(8))), 3, group_size="auto")


# ---------------------------------------------------------------------------
# Fast-SNN code base stand-ins


def act_quantization(b, power):
    """A Fast-SNN-style activation quantizer function (x, α): uniform levels
    round(clamp(x/α, 0, 1)·(2^b − 1))/(2^b − 1)·α, or nearest power-of-two sums (APoT)."""
    levels = 2 ** b - 1
    grid = torch.tensor(sorted({0.0, 1.0, 0.5, 0.25, 0.75, 0.125, 0.625, 0.375}))

    def apply(x, alpha):
        y = x.div(alpha).clamp(min=0, max=1)
        if power:
            idx = (y.reshape(-1, 1) - grid.reshape(1, -1)).abs().argmin(dim=1)
            y = grid[idx].reshape(y.shape)
        else:
            y = y.mul(levels).round().div(levels)
        return y.mul(alpha)
    return apply


class QuantReLU(nn.ReLU):
    def __init__(self, inplace=False, bit=4, power=False):
        super().__init__(inplace)
        self.bit = bit
        self.act_alq = act_quantization(bit, power)
        self.act_alpha = nn.Parameter(torch.tensor(8.0))

    def forward(self, x):
        return self.act_alq(F.relu(x, inplace=self.inplace), self.act_alpha)


class weight_quantize_fn(nn.Module):
    """Weights normalised by their mean and std, clipped at ±wgt_alpha, on a 3-bit grid."""

    def __init__(self):
        super().__init__()
        self.wgt_alpha = nn.Parameter(torch.tensor(3.0))

    def forward(self, weight):
        w = weight.add(-weight.data.mean()).div(weight.data.std()).div(self.wgt_alpha).clamp(-1, 1)
        return w.mul(7).round().div(7).mul(self.wgt_alpha)


class QuantConv2d(nn.Conv2d):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight_quant = weight_quantize_fn()

    def forward(self, x):
        return F.conv2d(x, self.weight_quant(self.weight), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


class first_conv(nn.Conv2d):
    def forward(self, x):
        top = self.weight.data.max()
        wq = self.weight.div(top).mul(127).round().div(127).mul(top)
        return F.conv2d(x, (wq - self.weight).detach() + self.weight, self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


class last_fc(nn.Linear):
    def forward(self, x):
        top = self.weight.data.max()
        wq = self.weight.div(top).mul(127).round().div(127).mul(top)
        return F.linear(x, (wq - self.weight).detach() + self.weight, self.bias)


class IF(nn.Module):
    def __init__(self):
        super().__init__()
        self.act_alpha = nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        return x


class Dummy(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block
        self.idem = False

    def forward(self, x):
        return x if self.idem else self.block(x)


def fast_snn_integrate(x, threshold, steps, sign):
    """Fast-SNN's loop over T of a [B, T, ...] charge: membrane from θ/2, fire at θ,
    negative spike when v ≤ −1e-3 and the neuron has fired more than it took back."""
    membrane = 0.5 * threshold
    sum_spikes = 0
    train = torch.zeros_like(x)
    for dt in range(steps):
        membrane = membrane + x[:, dt]
        spikes = membrane >= threshold
        membrane = torch.where(spikes, membrane - threshold, membrane)
        spikes = spikes.float()
        sum_spikes = sum_spikes + spikes
        inhibit = 0
        if sign:
            inhibit = (membrane <= -1e-3) & (sum_spikes > 0)
            membrane = torch.where(inhibit, membrane + threshold, membrane)
            inhibit = inhibit.float()
            sum_spikes = sum_spikes - inhibit
        train[:, dt] = spikes - inhibit
    return train * threshold


class Spiking(nn.Module):
    def __init__(self, block, T):
        super().__init__()
        self.block, self.T, self.is_first, self.idem, self.sign = block, T, False, False, True

    def forward(self, x):
        if self.is_first:
            x = x.unsqueeze(1).repeat(1, self.T, *[1] * (x.dim() - 1))
        shape = [x.shape[0], x.shape[1]]
        y = self.block(x.flatten(0, 1))
        y = y.reshape(shape + list(y.shape[1:]))
        return fast_snn_integrate(y, self.block[2].act_alpha.data, self.T, self.sign)


class last_Spiking(nn.Module):
    def __init__(self, block, T):
        super().__init__()
        self.block, self.T, self.idem = block, T, False

    def forward(self, x):
        shape = [x.shape[0], x.shape[1]]
        y = self.block(x.flatten(0, 1))
        return y.reshape(shape + list(y.shape[1:])).sum(dim=1)


class FastVGG(nn.Module):
    """Fast-SNN's VGG pattern: Dummy(Sequential(layer, BN, QuantReLU)) ..., or its
    spiking twin with Spiking(Sequential(layer, BN, IF), T) (same state-dict keys)."""

    def __init__(self, spiking_steps=None, power=False):
        super().__init__()
        def block(layer, bn):
            if spiking_steps is None:
                return Dummy(nn.Sequential(layer, bn, QuantReLU(inplace=True, power=power)))
            return Spiking(nn.Sequential(layer, bn, IF()), spiking_steps)
        self.layer1 = block(first_conv(3, 8, 3, stride=1, padding=1), _bn(8))
        self.layer2 = block(QuantConv2d(8, 8, 3, stride=2, padding=1), _bn(8))
        bn1d = nn.BatchNorm1d(16)
        with torch.no_grad():
            bn1d.running_var.uniform_(0.5, 2.0)
            bn1d.bias.uniform_(0, 0.3)
        self.layer3 = block(nn.Linear(8 * 4 * 4, 16), bn1d)
        if spiking_steps is None:
            self.flat = Dummy(nn.Flatten(1))
            self.layer4 = Dummy(last_fc(16, 5))
        else:
            self.flat = Dummy(nn.Flatten(2))
            self.layer4 = last_Spiking(last_fc(16, 5), spiking_steps)
            self.layer1.is_first = True

    def forward(self, x):
        x = self.layer2(self.layer1(x))
        return self.layer4(self.layer3(self.flat(x)))


def _fast_ann(seed):
    torch.manual_seed(seed)
    ann = FastVGG().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in ann.modules():
            if isinstance(m, QuantReLU):
                m.act_alpha.fill_(float(torch.rand((), generator=gen)) * 2 + 0.5)
    return ann


def fast_source_snn(ann, steps, sign=True):
    snn = FastVGG(spiking_steps=steps).eval()
    missing = snn.load_state_dict(ann.state_dict(), strict=False)
    assert not missing.unexpected_keys
    for m in snn.modules():
        if isinstance(m, Spiking):
            m.sign = sign
    return snn


def test_fastsnn_ann_equals_source_exactly():
    ann = _fast_ann(6)
    qnet = interop.from_fastsnn(ann)
    quants = dict(fastspike.convert.quantizers(qnet))
    assert set(quants) == {"layer1.block.2", "layer2.block.2", "layer3.block.2"}
    assert all(q.levels == 15 and q.preset == "fastsnn" and q.signed for q in quants.values())
    assert not any(type(m).__name__ in ("QuantConv2d", "first_conv", "last_fc") for m in qnet.modules())
    x = _x(6) * 3
    with torch.no_grad():
        assert torch.equal(qnet(x), ann(x))


@pytest.mark.parametrize("sign", [True, False])
def test_fastsnn_exact_snn_equals_source_simulation(sign):
    ann = _fast_ann(7)
    x = _x(7) * 3
    for steps in STEPS:
        source = fast_source_snn(ann, steps, sign)
        with torch.no_grad():
            expected = source(x.clone())
            for model in (ann, source):  # from the ANN, and from the spiking model itself
                qnet = interop.from_fastsnn(model)
                if model is ann and not sign:
                    for _, q in fastspike.convert.quantizers(qnet):
                        q.signed = False
                assert torch.equal(interop.to_snn(qnet, steps, exact=True)(x), expected), (steps, sign)
                torch.testing.assert_close(interop.to_snn(qnet, steps)(x), expected, rtol=1e-4, atol=1e-4 * steps)


def test_fastsnn_refuses_apot_levels():
    ann = FastVGG(power=True)
    with pytest.raises(ConversionError, match=r"'layer1.block.2' \(QuantReLU\).*APoT"):
        interop.from_fastsnn(ann)


# The other QuantReLU of the Fast-SNN code base (CIFAR10_res, CIFAR10_resnet18, ImageNet,
# object detection/backbone, semantic segmentation: models/quant_layer.py there): no act_alq; it
# keeps bit and power and, for bit < 32, quantizes uniformly with a straight-through round
# (power=False, its default) or to APoT levels (power=True); bit = 32 is a plain ReLU without
# act_alpha. Stand-ins in a namespace, so that the class names are the code base's.


def uniform_ste(x, alpha, bit):
    """round(clamp(x/α, 0, 1)·(2^bit − 1))/(2^bit − 1)·α with the rounding straight-through
    ((round(d) − d).detach() + d), the order of the code base's uniform_quantization."""
    d = (x / alpha).clamp(0, 1) * (2 ** bit - 1)
    d = (d.round() - d).detach() + d
    return d / (2 ** bit - 1) * alpha


class fastsnn_res:
    class QuantReLU(nn.ReLU):
        def __init__(self, inplace=False, bit=5, power=False):
            super().__init__(inplace)
            self.bit, self.power = bit, power
            if bit < 32:
                self.act_alpha = nn.Parameter(torch.tensor(6.0))

        def forward(self, x):
            x = F.relu(x, inplace=self.inplace)
            if self.bit == 32:
                return x
            if self.power:  # nearest of the non-uniform grid {0, 1/8, 1/4, 1/2, 5/8, 3/4, 1}
                grid = torch.tensor([0.0, 0.125, 0.25, 0.5, 0.625, 0.75, 1.0], dtype=x.dtype)
                y = (x / self.act_alpha).clamp(0, 1)
                return grid[(y.reshape(-1, 1) - grid).abs().argmin(dim=1)].reshape(y.shape) * self.act_alpha
            return uniform_ste(x, self.act_alpha, self.bit)

    class QuantAvgPool2d(nn.AvgPool2d):
        def __init__(self, kernel_size, stride, bit=5, power=False):
            super().__init__(kernel_size, stride)
            self.bit, self.power = bit, power
            if bit < 32:
                self.act_alpha = nn.Parameter(torch.tensor(6.0))

        def forward(self, x):
            x = F.avg_pool2d(x, self.kernel_size, self.stride)
            return x if self.bit == 32 else uniform_ste(x, self.act_alpha, self.bit)

    class QuantConv2d(nn.Conv2d):
        """Weights normalised, clipped at ±weight_alpha and projected to a non-uniform grid (APoT)."""

        def __init__(self, *args, bit=5, **kwargs):
            super().__init__(*args, **kwargs)
            self.bit = bit
            self.weight_alpha = nn.Parameter(torch.tensor(3.0))

        def forward(self, x):
            w = self.weight
            if self.bit < 32:
                w = w.add(-w.mean()).div(w.std()).div(self.weight_alpha).clamp(-1, 1)
                grid = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=w.dtype)
                wq = grid[(w.abs().reshape(-1, 1) - grid).abs().argmin(dim=1)].reshape(w.shape) * w.sign()
                w = ((wq - w).detach() + w) * self.weight_alpha
            return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Oneway(nn.Module):
    def __init__(self, conv, bn, relu):
        super().__init__()
        self.conv, self.bn, self.relu, self.idem = conv, bn, relu, False

    def forward(self, x):
        return x if self.idem else self.relu(self.bn(self.conv(x)))


class Twoways(nn.Module):
    def __init__(self, conv, bn, relu, downsample=None):
        super().__init__()
        self.conv, self.bn, self.relu, self.downsample, self.idem = conv, bn, relu, downsample, False

    def forward(self, x, identity):
        if self.idem:
            return x
        x = self.bn(self.conv(x))
        if self.downsample is not None:
            identity = self.downsample(identity)
        x += identity
        return self.relu(x)


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride, bit, power):
        super().__init__()
        conv = lambda a, b, s: fastsnn_res.QuantConv2d(a, b, 3, stride=s, padding=1, bias=False, bit=bit)
        relu = lambda: fastsnn_res.QuantReLU(inplace=True, bit=bit, power=power)
        down = None
        if stride != 1 or cin != cout:
            down = nn.Sequential(fastsnn_res.QuantConv2d(cin, cout, 1, stride=stride, bias=False, bit=bit), _bn(cout))
        self.idem, self.inter = False, False
        self.part1 = Oneway(conv(cin, cout, stride), _bn(cout), relu())
        self.part2 = Twoways(conv(cout, cout, 1), _bn(cout), relu(), down)

    def forward(self, x):
        if self.idem:
            return x
        out = self.part1(x)
        return out if self.inter else self.part2(out, x)


class ResNetCifar(nn.Module):
    """Fast-SNN's ResNet_Cifar pattern (CIFAR10_res/models/resnet.py), two blocks."""

    def __init__(self, bit=3, power=False, pool_bit=None):
        super().__init__()
        self.layer0 = Dummy(nn.Sequential(first_conv(3, 8, 3, stride=1, padding=1, bias=False), _bn(8),
                                          fastsnn_res.QuantReLU(inplace=True, bit=bit, power=power)))
        self.layer1 = nn.Sequential(BasicBlock(8, 8, 1, bit, power), BasicBlock(8, 16, 2, bit, power))
        pool = (nn.AvgPool2d(4, stride=1) if pool_bit is None
                else fastsnn_res.QuantAvgPool2d(4, stride=1, bit=pool_bit))
        self.layer4 = Dummy(nn.Sequential(pool, nn.Flatten(1), last_fc(16, 5)))

    def forward(self, x):
        return self.layer4(self.layer1(self.layer0(x)))


def _res_ann(seed, **kwargs):
    torch.manual_seed(seed)
    ann = ResNetCifar(**kwargs).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in ann.modules():
            if hasattr(m, "act_alpha"):  # float32 values, as trained
                m.act_alpha.fill_(float(torch.rand((), generator=gen)) * 2 + 0.5)
    return ann.double()


_RES_RELUS = {"layer0.block.2", "layer1.0.part1.relu", "layer1.0.part2.relu", "layer1.1.part1.relu",
              "layer1.1.part2.relu"}


@pytest.mark.parametrize("bit", [2, 3, 5])
@pytest.mark.parametrize("pool_bit", [None, 4, 32])
def test_fastsnn_resnet_quantrelu_without_act_alq_equals_source_exactly(bit, pool_bit):
    """Red-team finding: this QuantReLU (no act_alq) was refused ("cannot map ... (QuantReLU)"), so
    ResNet_Cifar, which the README names, and the ImageNet/detection models did not import."""
    ann = _res_ann(11 + bit, bit=bit, pool_bit=pool_bit)
    qnet = interop.from_fastsnn(ann)
    quants = dict(fastspike.convert.quantizers(qnet))
    pool_q = {"layer4.block.0.1"} if pool_bit not in (None, 32) else set()
    assert set(quants) == _RES_RELUS | pool_q
    for name, q in quants.items():
        bits = pool_bit if name in pool_q else bit
        src = ann.get_submodule(name.removesuffix(".1") if name in pool_q else name)
        assert q.levels == 2 ** bits - 1 and q.preset == "fastsnn" and q.rule == "fastsnn" and q.signed
        assert float(q.threshold().detach()) == float(src.act_alpha.detach())
    assert not any(type(m).__name__ in ("QuantConv2d", "QuantReLU", "QuantAvgPool2d", "first_conv", "last_fc")
                   for m in qnet.modules())
    x = _x(11).double() * 3
    with torch.no_grad():
        y = ann(x.clone())
        assert torch.equal(qnet(x), y)
        # every level is hit somewhere, so the check above is not vacuous
        levels_hit = qnet.get_submodule("layer0.block.2")(torch.linspace(-1, 4, 1001, dtype=torch.float64))
        assert torch.unique(levels_hit).numel() == 2 ** bit


@pytest.mark.parametrize("bit", [2, 3])
def test_fastsnn_resnet_group_neuron_snn_at_one_step_equals_quantized_ann(bit):
    """The sharp oracle: group neurons with m = L at T = 1 compute each quantizer exactly, so the
    SNN of the imported ResNet equals its quantized ANN (float64, up to ~1e-15; a level flipped by a
    wrongly mapped α or L shows as ~1e-2)."""
    ann = _res_ann(21 + bit, bit=bit)
    qnet = interop.from_fastsnn(ann)
    levels = 2 ** bit - 1
    x = _x(21).double() * 3
    with torch.no_grad():
        y_q = qnet(x)
        assert torch.equal(y_q, ann(x.clone()))
        snet = interop.to_snn(qnet, 1, group_size=levels).double()
        y_s = snet(x)
    assert y_s.shape == y_q.shape
    assert ((y_s - y_q).norm() / y_q.norm()).item() < 1e-9


def test_fastsnn_quantrelu_without_act_alq_refusals_name_module_and_reason():
    with pytest.raises(ConversionError, match=r"'layer0\.block\.2' \(QuantReLU\).*APoT.*power=False"):
        interop.from_fastsnn(_res_ann(30, bit=3, power=True))
    with pytest.raises(ConversionError, match=r"'layer0\.block\.2' \(QuantReLU\) has bit=32.*full-precision"):
        interop.from_fastsnn(_res_ann(31, bit=32))
    # a look-alike whose forward is not the uniform grid its bit and act_alpha say (here α is off by 1%)
    # is refused, not mapped to the wrong levels
    ann = _res_ann(32, bit=3)
    ann.layer0.block[2].forward = lambda x: uniform_ste(F.relu(x), ann.layer0.block[2].act_alpha * 1.01, 3)
    with pytest.raises(ConversionError, match=r"'layer0\.block\.2' \(QuantReLU, bit=3, power=False\) does not "
                                              r"compute Fast-SNN's uniform quantization"):
        interop.from_fastsnn(ann)


# ---------------------------------------------------------------------------
# SpikingJelly, the real package

sj = pytest.importorskip("spikingjelly.activation_based", reason="spikingjelly is not installed")


def _sj_modules():
    from spikingjelly.activation_based import functional, layer, neuron
    return functional, layer, neuron


def _sj_net(step_mode):
    functional, layer, neuron = _sj_modules()
    torch.manual_seed(8)
    net = nn.Sequential(
        layer.Conv2d(3, 8, 3, padding=1, bias=False), layer.BatchNorm2d(8),
        neuron.IFNode(v_reset=None), layer.AvgPool2d(2),
        layer.Conv2d(8, 8, 3, padding=1), neuron.IFNode(v_threshold=0.75, v_reset=None),
        layer.MaxPool2d(2), layer.Flatten(), layer.Linear(8 * 2 * 2, 5),
        neuron.IFNode(v_reset=None),
    )
    with torch.no_grad():
        net[1].running_var.uniform_(0.5, 2.0)
        net[1].bias.uniform_(0.1, 0.5)
    functional.set_step_mode(net, step_mode)
    return net.eval()


@pytest.mark.parametrize("step_mode", ["m", "s"])
def test_spikingjelly_if_network_equals_spikingjelly(step_mode):
    functional, _, _ = _sj_modules()
    net = _sj_net(step_mode)
    imported = interop.from_spikingjelly(net)
    for steps in STEPS:
        x_seq = torch.rand(steps, 4, 3, 8, 8, generator=torch.Generator().manual_seed(steps)) * 2
        with torch.no_grad():
            functional.reset_net(net)
            if step_mode == "m":
                expected = net(x_seq)
            else:
                expected = torch.stack([net(x_seq[t]) for t in range(steps)])
            functional.reset_net(net)
            assert torch.equal(imported(x_seq), expected), steps


class _OwnTimeLoop(nn.Module):
    """SpikingJelly's usual classifier wrapper: forward repeats the encoding T times itself
    (single-step net) and returns the firing rate, or reduces the multi-step output over T."""

    def __init__(self, net, steps, how):
        super().__init__()
        self.net, self.steps, self.how = net, steps, how

    def forward(self, x):
        if self.how == "loop":
            return sum(self.net(x) for _ in range(self.steps)) / self.steps
        if self.how == "repeat":
            return self.net(x.unsqueeze(0).repeat(self.steps, *[1] * x.dim()).flatten(0, 1))
        return self.net(x).mean(0)  # "mean": a rate over dim 0


@pytest.mark.parametrize("how,pattern", [("loop", "ran twice in one forward"),
                                         ("repeat", r"returned a tensor of shape \[16, 5\]"),
                                         ("mean", r"returned a tensor of shape \[5\]")])
def test_spikingjelly_network_that_handles_time_itself_is_refused(how, pattern):
    """Such a forward would run every imported neuron over all T steps of the merged batch once
    per loop turn, or mix samples when its output is reshaped: never silently."""
    net = _sj_net("s")
    imported = interop.from_spikingjelly(_OwnTimeLoop(net, 2, how))
    with torch.no_grad(), pytest.raises(ConversionError, match=pattern) as info:
        imported(torch.rand(2, 4, 3, 8, 8))
    assert "handle T itself" in str(info.value)


def _sj_if():
    _, _, neuron = _sj_modules()
    from spikingjelly.activation_based import surrogate
    return neuron.IFNode(v_reset=None, detach_reset=True, surrogate_function=surrogate.Sigmoid())


def test_spikingjelly_layers_with_state_across_steps_are_refused_by_name():
    """Red-team finding: SynapseFilter, Delay and recurrent containers ran per merged row, losing
    (and leaking across calls) their state over time, silently."""
    _, layer, _ = _sj_modules()
    for name, net in [("SynapseFilter", nn.Sequential(layer.Linear(6, 6), layer.SynapseFilter(tau=2.0), _sj_if())),
                      ("Delay", nn.Sequential(layer.Linear(6, 6), layer.Delay(1), _sj_if())),
                      ("LinearRecurrentContainer",
                       nn.Sequential(layer.Linear(6, 6), layer.LinearRecurrentContainer(_sj_if(), 6, 6)))]:
        with pytest.raises(ConversionError, match=rf"'1' \({name}\) keeps state from one time step to the next"):
            interop.from_spikingjelly(net)


def test_spikingjelly_dropout_keeps_one_mask_over_time():
    _, layer, _ = _sj_modules()
    imported = interop.from_spikingjelly(nn.Sequential(layer.Dropout(0.5), layer.Dropout2d(0.5)))
    x_seq = torch.rand(3, 4, 5, 6, 6) + 0.5
    assert torch.equal(imported.eval()(x_seq), x_seq)
    y = imported.train()(x_seq)
    dropped = y == 0
    assert dropped.any() and not dropped.all()
    assert torch.equal(dropped, dropped[:1].expand_as(dropped))  # the same neurons dropped at every step


class _Tokens(nn.Module):
    """A single-step network that merges tokens into the batch before BatchNorm1d and the neuron."""

    def __init__(self):
        super().__init__()
        self.fc, self.bn, self.sn = nn.Linear(4, 4), nn.BatchNorm1d(4), _sj_if()

    def forward(self, x):
        s = self.sn(self.bn(self.fc(x).flatten(0, 1)))
        return s.view(x.shape[0], -1, 4), s.mean()


def test_spikingjelly_neuron_on_tokens_merged_into_the_batch_equals_spikingjelly():
    """Rows that are a multiple of T·B (later dims merged, time-major) are exact; a scalar output is
    returned as computed over all steps (red-team: both were refused for a while)."""
    functional, _, _ = _sj_modules()
    torch.manual_seed(0)
    net = _Tokens().eval()
    imported = interop.from_spikingjelly(net)
    x_seq = torch.rand(3, 2, 5, 4) * 2
    with torch.no_grad():
        functional.reset_net(net)
        expected = torch.stack([net(x_seq[t])[0] for t in range(3)])
        got, rate = imported(x_seq)
    assert torch.equal(got, expected) and rate.dim() == 0 and rate == expected.mean()


def test_spikingjelly_ann2snn_output_equals_spikingjelly():
    functional, _, _ = _sj_modules()
    from spikingjelly.activation_based import ann2snn
    torch.manual_seed(9)
    ann = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AvgPool2d(2),
                        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5)).eval()
    data = [(torch.rand(4, 3, 8, 8), torch.zeros(4, dtype=torch.long)) for _ in range(2)]
    if hasattr(ann2snn, "recipes"):  # 2.x
        snn = ann2snn.Converter(ann2snn.recipes.RateCodingRecipe(data, mode="max")).convert(ann).eval()
    else:  # 0.0.0.0.14
        snn = ann2snn.Converter(mode="max", dataloader=data)(ann).eval()
    assert any(type(m).__name__ == "VoltageScaler" for m in snn.modules())
    imported = interop.from_spikingjelly(snn)
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    for steps in STEPS:
        with torch.no_grad():
            functional.reset_net(snn)
            expected = torch.stack([snn(x) for _ in range(steps)])
            functional.reset_net(snn)
            got = imported(x.unsqueeze(0).expand(steps, *x.shape))
        assert torch.equal(got, expected), steps


def test_spikingjelly_refusals():
    _, layer, neuron = _sj_modules()
    lif = nn.Sequential(layer.Linear(4, 4), neuron.LIFNode(v_reset=None))
    with pytest.raises(ConversionError, match=r"'1' \(LIFNode\)"):
        interop.from_spikingjelly(lif)
    hard = nn.Sequential(layer.Linear(4, 4), neuron.IFNode())
    with pytest.raises(ConversionError, match=r"'1' \(IFNode\).*hard reset"):
        interop.from_spikingjelly(hard)
    with pytest.raises(ConversionError, match="the model itself is a IFNode"):
        interop.from_spikingjelly(neuron.IFNode(v_reset=None))
    # gradients through a neuron whose surrogate fastspike computes otherwise: refused when asked
    net = interop.from_spikingjelly(nn.Sequential(layer.Linear(4, 4), neuron.IFNode(v_reset=None)))
    with pytest.raises(ConversionError, match=r"'1' \(IFNode\).*detach_reset"):
        net(torch.rand(2, 3, 4)).sum().backward()
    approx = interop.from_spikingjelly(nn.Sequential(layer.Linear(4, 4), neuron.IFNode(v_reset=None)),
                                       approximate=True)
    approx(torch.rand(2, 3, 4)).sum().backward()


# ---------------------------------------------------------------------------
# Accuracy at every T from one run


def test_accuracy_at_every_step_from_one_run_equals_separate_runs():
    from fastspike.evaluate import accuracy_at_steps, prefix_readouts
    torch.manual_seed(10)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _bn(8), nn.ReLU(), nn.AvgPool2d(2),
                        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    qnet = fastspike.quantize(net, levels=8, threshold=1.5).eval()
    batches = [(_x(s) * 2, torch.randint(0, 5, (4,), generator=torch.Generator().manual_seed(s)))
               for s in range(3)]
    one_run = fastspike.to_snn(qnet, max(STEPS), neuron="signed", readout="sequence")
    acc = accuracy_at_steps(one_run, batches, STEPS)
    with torch.no_grad():
        for steps in STEPS:
            separate = fastspike.to_snn(qnet, steps, neuron="signed")
            hits = sum(int((separate(x).argmax(1) == y).sum()) for x, y in batches)
            assert acc[steps] == hits / 12
            x = batches[0][0]
            assert torch.equal(prefix_readouts(one_run(x), [steps])[steps], separate(x))
        # the source's running sum (QCFS, GN): the exact mode's readout at every T from one run
        ann = QcfsVGG().eval()
        q = interop.from_qcfs(ann)
        seq = interop.to_snn(q, max(STEPS), exact=True, readout="sequence")(x)
        sums = prefix_readouts(seq, STEPS, "running-sum")
        for steps in STEPS:
            assert torch.equal(sums[steps], interop.to_snn(q, steps, exact=True)(x))
    with pytest.raises(ValueError, match="readout='sequence'"):
        accuracy_at_steps(fastspike.to_snn(qnet, 2), batches, [1, 2])
    with pytest.raises(ValueError, match=r"in \[1, 8\]"):
        prefix_readouts(torch.zeros(8, 2, 5), [9])
