"""Tests of airreg.networks: G and D as in the paper (section 2.1), sized by the presets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from airreg.config import preset
from airreg.networks import AirBody, Discriminator, Generator, ResidualBlock, parameter_count


def inputs(config, batch=2, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, *config.grid.size)
    return torch.rand(shape, generator=gen) * scale, torch.rand(shape, generator=gen) * scale


@pytest.mark.parametrize("dof", [3, 6])
@pytest.mark.parametrize("seed,scale", [(0, 1.0), (1, 100.0), (2, -5.0)])
def test_untrained_generator_outputs_exactly_identity(dof, seed, scale):
    config = preset("tiny", dof)
    torch.manual_seed(seed)
    g = Generator(config)
    out = g(*inputs(config, batch=3, seed=seed, scale=scale))
    assert out.shape == (3, dof)
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("name", ["tiny", "default"])
@pytest.mark.parametrize("dof", [3, 6])
def test_output_shapes(name, dof):
    config = preset(name, dof)
    mr, trus = inputs(config, batch=2)
    g, d = Generator(config), Discriminator(config)
    assert g(mr, trus).shape == (2, dof)
    critic = d(mr, trus)
    assert critic.shape == (2,)
    assert torch.isfinite(critic).all()


def test_generator_output_is_scaled_to_degrees_and_mm():
    for dof in (3, 6):
        config = preset("tiny", dof)
        g = Generator(config)
        with torch.no_grad():
            g.head.bias.fill_(1.0)
        out = g(*inputs(config, batch=1))[0]
        torch.testing.assert_close(out, torch.tensor(config.parameter_scale, dtype=torch.float32))
        assert config.parameter_scale[0] == 25.0 and config.parameter_scale[-1] == 5.0


def test_discriminator_depends_on_its_input():
    config = preset("tiny")
    torch.manual_seed(0)
    d = Discriminator(config)
    mr, trus = inputs(config, batch=2)
    assert not torch.allclose(d(mr, trus)[0], d(mr, torch.zeros_like(trus))[0])


def test_parameter_counts_differ_by_preset():
    counts = {name: parameter_count(Generator(preset(name))) for name in ("tiny", "default", "paper")}
    assert counts["tiny"] < counts["default"] < counts["paper"]
    # D has the same body and one output instead of dof
    for name in ("tiny", "default"):
        config = preset(name)
        g, d = Generator(config), Discriminator(config)
        assert parameter_count(g) - parameter_count(d) == (config.dof - 1) * (config.hidden + 1)


def convs(module: nn.Module) -> list[nn.Conv2d]:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("name", ["default", "paper"])
def test_layer_structure_follows_the_paper(name):
    config = preset(name)
    for net in (Generator(config), Discriminator(config)):
        body = net.body
        assert isinstance(body, AirBody)
        layers = convs(body)
        slices = config.grid.size[0]
        first = layers[0]
        assert first.in_channels == 2 * slices  # MR and TRUS stacks, slices as channels
        assert first.out_channels == config.width
        assert first.kernel_size == (3, 3) and first.dilation == (2, 2) and first.stride == (1, 1)
        strided = [c for c in layers if c.stride == (2, 2)]
        assert len(strided) == 2 and all(c.kernel_size == (3, 3) for c in strided)
        assert layers[1] is strided[0] and layers[2] is strided[1]
        blocks = [m for m in body.modules() if isinstance(m, ResidualBlock)]
        assert len(blocks) == 1 and len(convs(blocks[0])) == 3
        assert all(c.kernel_size == (3, 3) and c.out_channels == config.width for c in convs(blocks[0]))
        last = layers[-1]
        assert last.kernel_size == (1, 1) and last.out_channels == 8
        assert len(layers) == 1 + 2 + 3 + 1
        fcs = [m for m in net.modules() if isinstance(m, nn.Linear)]
        assert [f.out_features for f in fcs] == [256, config.dof if isinstance(net, Generator) else 1]
    if name == "paper":
        assert config.width == 128 and config.grid.size[1:] == (256, 256)


def test_residual_block_has_a_skip_connection():
    block = ResidualBlock(4)
    for conv in convs(block):
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
    x = torch.rand(1, 4, 5, 5)
    torch.testing.assert_close(block(x), torch.relu(x))  # zero body: output is the input through the ReLU
