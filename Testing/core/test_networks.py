import pytest
import torch

from cdal_core.networks import Discriminator, Generator, NetworkConfig, attention_map, normalise_attention
from cdal_core.sampler import sample
from cdal_core.schedule import DiffusionSchedule

SMALL = NetworkConfig(base_channels=8, channel_mults=(1, 2, 4), latent_dim=8, time_dim=16, disc_channels=8,
                      context_slices=1)


def test_generator_shapes_and_range():
    g = Generator(SMALL)
    out = g(torch.randn(2, 3, 24, 16), torch.rand(2), torch.randn(2, 8), torch.randn(2, 3, 24, 16))
    assert out.shape == (2, 3, 24, 16)
    assert out.abs().max() <= 1


def test_encode_once_decode_equals_forward():
    torch.manual_seed(0)
    g = Generator(SMALL)
    with torch.no_grad():  # make the (zero-initialised) output layer non-trivial
        g.out_conv.weight.normal_()
    x, tau, z, img = torch.randn(2, 3, 16, 16), torch.rand(2), torch.randn(2, 8), torch.randn(2, 3, 16, 16)
    assert torch.allclose(g(x, tau, z, img), g.decode(x, tau, z, g.encode(img)), atol=1e-6)


def test_latent_and_image_change_the_output():
    torch.manual_seed(0)
    g = Generator(SMALL)
    for p in g.parameters():  # zero-inits would hide the dependencies
        torch.nn.init.normal_(p, std=0.2)
    x, tau, img = torch.randn(1, 3, 16, 16), torch.rand(1), torch.randn(1, 3, 16, 16)
    z1, z2 = torch.randn(1, 8), torch.randn(1, 8)
    assert not torch.allclose(g(x, tau, z1, img), g(x, tau, z2, img))
    assert not torch.allclose(g(x, tau, z1, img), g(x, tau, z1, img + 1))


def test_discriminator_features_and_attention():
    d = Discriminator(SMALL)
    x = torch.randn(2, 3, 64, 64)
    logit, feats = d(x, x, torch.rand(2), return_features=True)
    assert logit.shape == (2,)
    assert [f.shape[-1] for f in feats] == [32, 16, 8, 4]
    a = attention_map(feats, 1, (64, 64))
    assert a.shape == (2, 1, 64, 64)
    # the attention is the channel mean of block 1 (16x16), upsampled; not that of another block
    expected = torch.nn.functional.interpolate(feats[1].mean(1, keepdim=True), size=(64, 64), mode="bilinear")
    assert torch.allclose(a, expected, atol=1e-6)
    assert not torch.allclose(attention_map(feats, 2, (64, 64)), a)
    assert normalise_attention(a).abs().amax(dim=(1, 2, 3)).tolist() == pytest.approx([1.0, 1.0])


def test_config_round_trip_and_unknown_keys():
    assert NetworkConfig.from_dict(SMALL.to_dict()) == SMALL
    with pytest.raises(ValueError, match="unknown"):
        NetworkConfig.from_dict({"widht": 3})


def test_sampler_shapes_seeding_and_single_encoding():
    torch.manual_seed(0)
    g = Generator(SMALL).eval()
    with torch.no_grad():
        g.out_conv.weight.normal_(std=0.5)
    calls = []
    g.encoder.register_forward_hook(lambda *a: calls.append(1))
    img = torch.randn(3, 3, 16, 16)
    s = DiffusionSchedule(2)
    a = sample(g, img, s, num_samples=4, rng=torch.Generator().manual_seed(5))
    assert len(calls) == 1  # one encoder pass for 3 slices x 4 samples x 2 steps
    assert a.probabilities.shape == (3, 3, 16, 16) and a.labels.shape == (3, 16, 16)
    assert torch.allclose(a.probabilities.sum(1), torch.ones(3, 16, 16), atol=1e-5)
    assert a.variance.shape == (3, 16, 16) and (a.variance >= 0).all() and a.variance.max() > 0
    b = sample(g, img, s, num_samples=4, rng=torch.Generator().manual_seed(5))
    c = sample(g, img, s, num_samples=4, rng=torch.Generator().manual_seed(6))
    assert torch.equal(a.probabilities, b.probabilities)
    assert not torch.equal(a.probabilities, c.probabilities)
    one = sample(g, img, s, num_samples=1, rng=torch.Generator().manual_seed(5))
    assert one.variance.abs().max() == 0


def test_sampler_returns_attention_with_discriminator():
    g, d = Generator(SMALL).eval(), Discriminator(SMALL).eval()
    out = sample(g, torch.randn(2, 3, 32, 32), DiffusionSchedule(2), 3, torch.Generator().manual_seed(0), d)
    assert out.attention.shape == (2, 32, 32) and (out.attention >= 0).all()


def test_shared_features_equal_copied_features():
    torch.manual_seed(0)
    g = Generator(SMALL).eval()
    with torch.no_grad():
        g.out_conv.weight.normal_()
        img = torch.randn(2, 3, 16, 16)
        x, tau, z = torch.randn(6, 3, 16, 16), torch.rand(6), torch.randn(6, 8)
        feats = g.encode(img)
        copied = [f.repeat_interleave(3, dim=0) for f in feats]
        assert torch.allclose(g.decode(x, tau, z, feats), g.decode(x, tau, z, copied), atol=1e-6)
