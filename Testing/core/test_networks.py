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
    # sampling stops D at the attention block: the same maps, without the blocks after it
    partial = d.features(x, x, torch.rand(2) * 0 + 0.5, up_to=1)
    full = d(x, x, torch.full((2,), 0.5), return_features=True)[1]
    assert len(partial) == 2 and all(torch.equal(p, f) for p, f in zip(partial, full[:2]))


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


def test_modulate_bf16_channels_last_matches_broadcast():
    """The matmul path (bf16, channels-last) computes x * scale + shift like the plain broadcast."""
    from cdal_core.networks import modulate
    torch.manual_seed(0)
    x = torch.randn(6, 16, 8, 12)
    scale, shift = 1 + 0.1 * torch.randn(6, 16), 0.1 * torch.randn(6, 16)
    want = x * scale[:, :, None, None] + shift[:, :, None, None]
    x_cl = x.bfloat16().contiguous(memory_format=torch.channels_last)
    got = modulate(x_cl, scale.bfloat16(), shift.bfloat16())
    assert got.shape == x.shape and got.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(got.float(), want, atol=0.05, rtol=0.02)
    assert torch.equal(modulate(x, scale, shift), want)


def test_modulate_wide_rows_match_broadcast():
    """From 32 channels up the rows take a vectorised multiply-add instead of the diagonal matmul."""
    from cdal_core.networks import modulate
    torch.manual_seed(0)
    x = torch.randn(3, 64, 6, 5)
    scale, shift = 1 + 0.1 * torch.randn(3, 64), 0.1 * torch.randn(3, 64)
    want = x * scale[:, :, None, None] + shift[:, :, None, None]
    got = modulate(x.bfloat16().contiguous(memory_format=torch.channels_last), scale.bfloat16(), shift.bfloat16())
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(got.float(), want, atol=0.05, rtol=0.02)


def test_adaptive_group_norm_small_bf16_maps_match_the_plain_path():
    """Small bf16 channels-last maps on CPU take float32 moments + one affine (torch's kernel is slow there);
    the result must equal GroupNorm then modulation, and larger maps must keep the plain path."""
    import torch.nn.functional as F
    from cdal_core import networks
    torch.manual_seed(0)
    norm = networks.AdaptiveGroupNorm(32, 8)
    nn_init = torch.nn.init
    nn_init.normal_(norm.style.weight, std=0.3)
    nn_init.normal_(norm.style.bias, std=0.3)
    w = torch.randn(4, 8)
    for hw in ((6, 5), (28, 20)):
        x = 3 + 2 * torch.randn(4, 32, *hw)                     # a mean far from 0 tests the variance formula
        gamma, beta = norm.style(w).chunk(2, dim=1)
        want = F.group_norm(x, 8) * (1 + gamma[:, :, None, None]) + beta[:, :, None, None]
        x_cl = x.bfloat16().contiguous(memory_format=torch.channels_last)
        assert networks._fused_norm_on_cpu(x_cl)
        with torch.no_grad():
            got = norm(x_cl, w)
        assert got.dtype == torch.bfloat16 and got.is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(got.float(), want, atol=0.06, rtol=0.02), (got.float() - want).abs().max()
    big = torch.randn(1, 32, 32, 32).bfloat16().contiguous(memory_format=torch.channels_last)
    assert not networks._fused_norm_on_cpu(big)
    assert not networks._fused_norm_on_cpu(torch.randn(4, 32, 6, 5))           # contiguous: the plain path


def test_adaptive_group_norm_fused_float32_path_matches_the_plain_path_and_keeps_its_input():
    """Every float32 channels-last CPU map takes the fused path (moments + one affine); it must equal GroupNorm
    then modulation to float32 rounding, and must not touch its input (in float32 ``.float()`` is the input
    itself: an in-place square there once corrupted the caller's tensor)."""
    import torch.nn.functional as F
    from cdal_core import networks
    torch.manual_seed(0)
    for channels in (16, 64):  # below 32 channels the bf16 path uses a diagonal matmul, float32 never does
        norm = networks.AdaptiveGroupNorm(channels, 8)
        torch.nn.init.normal_(norm.style.weight, std=0.3)
        torch.nn.init.normal_(norm.style.bias, std=0.3)
        w = torch.randn(3, 8)
        for hw in ((6, 5), (56, 40)):
            x = (3 + 2 * torch.randn(3, channels, *hw)).contiguous(memory_format=torch.channels_last)
            before = x.clone()
            assert networks._fused_norm_on_cpu(x)
            with torch.no_grad():
                gamma, beta = norm.style(w).chunk(2, dim=1)
                want = F.group_norm(x.contiguous(), norm.norm.num_groups) * (1 + gamma[:, :, None, None]) \
                    + beta[:, :, None, None]
                got = norm(x, w)
            assert torch.equal(x, before)
            assert got.dtype == torch.float32 and got.is_contiguous(memory_format=torch.channels_last)
            assert torch.allclose(got, want, atol=2e-5, rtol=1e-5), (got - want).abs().max()


def test_fast_group_norm_matches_torchs_and_takes_the_fused_path_where_torch_is_slow(monkeypatch):
    """The encoder's and output layer's norms: the same result as nn.GroupNorm (affine weights included) on
    channels-last float32 maps and small bf16 maps, through ``group_norm_modulate``; torch's kernel elsewhere."""
    import torch.nn.functional as F
    from cdal_core import networks
    torch.manual_seed(0)
    norm = networks.FastGroupNorm(8, 32)
    torch.nn.init.normal_(norm.weight, std=0.5)
    torch.nn.init.normal_(norm.bias, std=0.5)
    fused = []
    real = networks.group_norm_modulate
    monkeypatch.setattr(networks, "group_norm_modulate", lambda *a, **k: fused.append(1) or real(*a, **k))
    x = 3 + 2 * torch.randn(5, 32, 28, 20)
    want = F.group_norm(x, 8, norm.weight, norm.bias)
    with torch.no_grad():
        got = norm(x.contiguous(memory_format=torch.channels_last))
        assert got.is_contiguous(memory_format=torch.channels_last) and len(fused) == 1
        assert torch.allclose(got, want, atol=2e-5, rtol=1e-5), (got - want).abs().max()
        small_bf16 = norm(x.bfloat16().contiguous(memory_format=torch.channels_last))
        assert small_bf16.dtype == torch.bfloat16 and len(fused) == 2
        assert torch.allclose(small_bf16.float(), want, atol=0.06, rtol=0.02)
        assert torch.equal(norm(x), torch.nn.GroupNorm.forward(norm, x)) and len(fused) == 2  # contiguous


def test_one_time_step_for_the_batch_equals_per_sample_time():
    """Sampling passes one t for the whole batch, which the blocks fold into conv1's bias."""
    torch.manual_seed(0)
    g = Generator(SMALL).eval()
    block = g.down_blocks[0][0]
    with torch.no_grad():
        x, w = torch.randn(4, block.conv1.in_channels, 8, 8), torch.randn(4, SMALL.latent_dim)
        temb = torch.randn(1, block.time.in_features)
        folded = block(x, temb, w)
        per_sample = block(x, temb.expand(4, -1), w)
        assert torch.allclose(folded, per_sample, atol=1e-5)
        assert not torch.allclose(folded, block(x, temb + 1, w), atol=1e-3)
        g.out_conv.weight.normal_()
        img, x_t, z = torch.randn(2, 3, 16, 16), torch.randn(4, 3, 16, 16), torch.randn(4, SMALL.latent_dim)
        feats, tau = g.encode(img), torch.full((1,), 0.5)
        assert torch.allclose(g.decode(x_t, tau, z, feats), g.decode(x_t, tau.expand(4), z, feats), atol=1e-5)


class _HalfEmptyGenerator(Generator):
    """Predicts certain background for slices whose image is negative, the base network elsewhere."""

    def encode(self, image):
        return [image.mean(dim=(1, 2, 3), keepdim=True)] + super().encode(image)[1:]

    def decode(self, x_t, t, z, image_features):
        self.decoded_rows.append(x_t.shape[0])
        k = x_t.shape[0] // image_features[0].shape[0]
        empty = (image_features[0].flatten() < 0).repeat_interleave(k)
        out = torch.tanh(x_t)  # any non-constant prediction
        background = torch.full_like(out, -1.0)
        background[:, 0] = 1.0
        return torch.where(empty[:, None, None, None], background, out)


def test_early_exit_stops_surely_empty_slices_after_the_first_step():
    g = _HalfEmptyGenerator(SMALL).eval()
    g.decoded_rows = []
    img = torch.cat([-torch.ones(2, 3, 16, 16), torch.ones(3, 3, 16, 16)])
    out = sample(g, img, DiffusionSchedule(2), 4, torch.Generator().manual_seed(0), early_exit=0.05)
    assert g.decoded_rows == [5 * 4, 3 * 4]  # step 2: all slices; step 1: only the 3 non-empty ones
    assert torch.equal(out.labels[:2], torch.zeros(2, 16, 16, dtype=torch.long))
    assert out.variance[:2].abs().max() == 0 and out.variance[2:].max() > 0
    g.decoded_rows = []
    full = sample(g, img, DiffusionSchedule(2), 4, torch.Generator().manual_seed(0))
    assert g.decoded_rows == [20, 20]
    assert torch.equal(full.labels[:2], out.labels[:2])
    d = Discriminator(SMALL).eval()
    with_d = sample(g, img, DiffusionSchedule(2), 4, torch.Generator().manual_seed(0), d, early_exit=0.05)
    assert with_d.attention.shape == (5, 16, 16) and torch.isfinite(with_d.attention).all()


class _RecordingGenerator(_HalfEmptyGenerator):
    """The half-empty generator that also keeps every step's x0 prediction."""

    def decode(self, x_t, t, z, image_features):
        out = super().decode(x_t, t, z, image_features)
        self.predictions.append(out.clone())
        return out


def test_step_weights_pool_every_steps_prediction_of_x0():
    from cdal_core.sampler import x0_to_probabilities
    g = _RecordingGenerator(SMALL).eval()
    img = torch.cat([-torch.ones(2, 3, 16, 16), torch.ones(3, 3, 16, 16)])
    k, sched = 4, DiffusionSchedule(2)

    def run(**kw):
        g.decoded_rows, g.predictions = [], []
        return sample(g, img, sched, k, torch.Generator().manual_seed(0), early_exit=0.05, **kw)

    last = run()
    assert torch.equal(run(step_weights=[0.0, 1.0]).probabilities, last.probabilities)  # Algorithm 2
    pooled = run(step_weights=[1.0, 3.0])
    first, second = (x0_to_probabilities(p).view(-1, k, 3, 16, 16) for p in g.predictions)
    busy = (first[2:] + 3 * second) / 4  # the 3 slices that ran both steps
    assert torch.allclose(pooled.probabilities[2:], busy.mean(dim=1), atol=1e-6)
    assert not torch.allclose(pooled.probabilities[2:], last.probabilities[2:], atol=1e-3)
    assert torch.equal(pooled.probabilities[:2], last.probabilities[:2])  # stopped early: its one prediction
    assert torch.allclose(pooled.variance[2:], (busy - busy.mean(dim=1, keepdim=True)).square().mean(1).sum(1),
                          atol=1e-6)
    with pytest.raises(ValueError, match="one weight per step"):
        run(step_weights=[1.0])


def test_encoder_block_equals_monais_unet_res_block():
    """The encoder's own block replaces MONAI's UnetResBlock (start-up time): same state-dict keys, so shipped
    weights load unchanged, and the same outputs on random weights, stride 1 and 2, with and without the
    1x1 residual branch, contiguous and channels-last."""
    from monai.networks.blocks import UnetResBlock
    from cdal_core.networks import EncoderResBlock
    torch.manual_seed(0)
    for in_ch, out_ch, stride in ((3, 16, 1), (16, 16, 1), (16, 32, 2), (64, 128, 2)):
        groups = 8
        ref = UnetResBlock(2, in_ch, out_ch, kernel_size=3, stride=stride,
                           norm_name=("group", {"num_groups": groups})).eval()
        for p in ref.parameters():  # random affine norms too (they start at 1 and 0)
            torch.nn.init.normal_(p, std=0.5)
        mine = EncoderResBlock(in_ch, out_ch, stride, groups).eval()
        assert list(mine.state_dict()) == list(ref.state_dict())
        mine.load_state_dict(ref.state_dict())
        x = torch.randn(2, in_ch, 24, 16)
        with torch.no_grad():
            got = mine(x)
            assert torch.equal(got, ref(x)), (in_ch, out_ch, stride)
            # channels-last: FastGroupNorm's fused path, equal to float32 rounding
            got = mine(x.contiguous(memory_format=torch.channels_last))
            want = ref(x.contiguous(memory_format=torch.channels_last))
            assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (in_ch, out_ch, stride, (got - want).abs().max())


def test_expanding_the_context_keeps_the_predictions_until_fine_tuned():
    """tools/expand_context.py: the copy that sees 2 slices either side predicts what the 1-slice model did (the
    old weights sit on the middle channels, the outer neighbours weigh zero), whatever those neighbours hold; a
    misplaced block of weights would read the wrong slices and change the output."""
    from core_settings import load_tool
    torch.manual_seed(0)
    cfg = NetworkConfig(base_channels=8, channel_mults=(1, 2), context_slices=1, num_classes=3)
    small = Generator(cfg).eval()
    with torch.no_grad():  # a non-zero output layer, so that the comparison means something
        small.out_conv.weight.normal_(0, 0.1)
    grown = load_tool("expand_context").expanded_generator(small, 2).eval()
    assert grown.cfg.in_channels == 5 and small.cfg.in_channels == 3
    x, z, t = torch.randn(2, 3, 16, 16), torch.randn(2, cfg.latent_dim), torch.tensor([0.5])
    image = torch.randn(2, 5, 16, 16)
    with torch.no_grad():
        want = small(x, t, z, image[:, 1:4])
        assert torch.allclose(grown(x, t, z, image), want, atol=1e-6)
        assert not torch.allclose(small(x, t, z, image[:, 0:3]), want, atol=1e-3)  # the slices do matter
