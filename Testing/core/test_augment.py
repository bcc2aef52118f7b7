"""Batched augmentation: the geometry of its affine, its ranges, and that a seed fixes the batch."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cdal_core.augment import BatchAugmentation, affine_theta, augment_batch, build_augmentation

SETTINGS = {"flip_axis": 1, "probability": 0.3, "rotate_degrees": 15, "scale": 0.15, "translate": 4}


def _dot(h, w, row, col):
    img = torch.zeros(1, 1, h, w)
    img[0, 0, row, col] = 1.0
    return img


def _warp(img, angle=0.0, zoom=(1.0, 1.0), shift=(0.0, 0.0)):
    theta = affine_theta(torch.tensor([angle]), torch.tensor([zoom]), torch.tensor([shift]), *img.shape[-2:])
    grid = F.affine_grid(theta, list(img.shape), align_corners=False)
    out = F.grid_sample(img, grid, mode="nearest", align_corners=False)
    return divmod(int(out.flatten().argmax()), img.shape[-1]), float(out.sum())


def test_affine_shift_moves_content_by_whole_pixels():
    # the output pixel p samples the input at p + shift: content moves by -shift
    assert _warp(_dot(24, 16, 10, 9), shift=(3.0, -2.0)) == ((12, 6), 1.0)


def test_affine_rotation_is_about_the_centre_in_pixels_on_a_non_square_slice():
    # input dot at (x, y) = (4.5, 0.5) from the centre of a 24x16 slice; after 90 degrees it sits at
    # R^-1 (4.5, 0.5) = (0.5, -4.5): column 8, row 7; a normalised-coordinate rotation would stretch it
    assert _warp(_dot(24, 16, 12, 12), angle=np.pi / 2) == ((7, 8), 1.0)


def test_zoom_of_two_doubles_distances_from_the_centre_and_the_dot():
    # dot at (x, y) = (2.5, 0.5): its cell [2, 3) x [0, 1) is seen by output pixels (4.5 | 5.5, 0.5 | 1.5)
    assert _warp(_dot(24, 16, 12, 10), zoom=(2.0, 2.0)) == ((12, 12), 4.0)


def _batch(n=64):
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.random((n, 3, 40, 32)).astype(np.float32))
    labels = torch.zeros(n, 40, 32, dtype=torch.long)
    labels[:, 12:28, 10:22], labels[:, 16:22, 12:18] = 1, 2
    return images, labels


def test_batched_augmentation_keeps_shapes_ranges_and_labels():
    aug = build_augmentation({**SETTINGS, "backend": "batched"})
    assert isinstance(aug, BatchAugmentation)
    images, labels = _batch()
    out_i, out_l = aug(images, labels, torch.Generator().manual_seed(0))
    assert out_i.shape == images.shape and out_l.shape == labels.shape and out_l.dtype == torch.long
    assert out_i.min() >= 0 and out_i.max() <= 1
    assert set(out_l.unique().tolist()) <= {0, 1, 2}
    changed = (out_l != labels).flatten(1).any(dim=1).float().mean()
    assert 0.4 < changed < 1.0  # affine at p = 0.7 (plus flips): most slices move, not all
    area = (out_l > 0).float().mean() / (labels > 0).float().mean()
    assert 0.8 < area < 1.25  # scale within +-15 %


def test_batched_augmentation_is_fixed_by_its_seed_and_off_when_told():
    aug = BatchAugmentation(SETTINGS)
    images, labels = _batch(8)
    a = aug(images, labels, torch.Generator().manual_seed(3))
    b = aug(images, labels, torch.Generator().manual_seed(3))
    c = aug(images, labels, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    off = BatchAugmentation({"probability": 0.0, "affine_probability": 0.0})
    same_i, same_l = off(images, labels, torch.Generator().manual_seed(3))
    assert torch.equal(same_l, labels) and torch.allclose(same_i, images, atol=1e-5)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend"):
        build_augmentation({"backend": "gpu"})


def test_gpu_benchmark_runs_on_cpu_and_reports_every_row(tmp_path):
    """benchmarks/bench_gpu.py cannot be run on a GPU in CI; this keeps it working on CPU (tiny settings)."""
    import json
    import subprocess
    import sys
    from core_settings import ROOT
    out = tmp_path / "gpu.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--device", "cpu", "--batch", "4",
                    "--steps", "1", "--warmup", "0", "--volumes", "1", "--repeats", "1", "--json", str(out)],
                   check=True, capture_output=True, text=True, timeout=600)
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"training, fp32, batched augmentation", "training, fp32, monai augmentation",
                         "inference T=2 x 5, bf16", "inference T=2 x 5, fp32"}
    assert all(r.get("slices_per_s", r.get("volumes_per_s")) > 0 for r in rows.values())


@pytest.mark.parametrize("backend", ["batched", "monai"])
def test_flip_across_slices_reverses_the_context_slices_of_about_half_the_batch(backend):
    # channels 0, 1, 2 = slices below, at and above the plane; everything else off
    settings = {"backend": backend, "probability": 0.0, "affine_probability": 0.0, "flip_across_slices": True}
    images = torch.stack([torch.full((8, 6), v) for v in (0.1, 0.5, 0.9)])[None].repeat(64, 1, 1, 1)
    labels = torch.randint(0, 3, (64, 8, 6))
    transform = build_augmentation(settings)
    if backend == "batched":
        out_i, out_l = transform(images, labels, torch.Generator().manual_seed(0))
    else:
        out_i, out_l = (torch.from_numpy(a) for a in augment_batch(transform, images.numpy(), labels.numpy(), seed=0))
    reversed_ = torch.isclose(out_i, images.flip(1)).flatten(1).all(1)
    kept = torch.isclose(out_i, images).flatten(1).all(1)
    assert bool((reversed_ | kept).all()), "every slice is either unchanged or has its context reversed"
    assert 16 <= int(reversed_.sum()) <= 48
    assert torch.equal(out_l.long(), labels), "a mirror across the slicing plane leaves the slice's labels alone"
    # without the setting nothing is reversed
    settings["flip_across_slices"] = False
    plain = build_augmentation(settings)
    out = plain(images, labels, torch.Generator().manual_seed(0))[0] if backend == "batched" else torch.from_numpy(
        augment_batch(plain, images.numpy(), labels.numpy(), seed=0)[0])
    assert torch.isclose(out, images).all()


def _symmetries(x):
    """The 8 flips and quarter turns of the last two axes, in a fixed order."""
    out = []
    for t in (x, x.transpose(-1, -2)):
        out += [t, t.flip(-2), t.flip(-1), t.flip(-2).flip(-1)]
    return out


@pytest.mark.parametrize("backend", ["batched", "monai"])
def test_dihedral_draws_all_eight_symmetries_and_moves_the_labels_with_the_image(backend):
    settings = {"backend": backend, "probability": 0.0, "affine_probability": 0.0, "dihedral": True}
    pattern = torch.rand(8, 8, generator=torch.Generator().manual_seed(3))   # no symmetry of its own
    images = pattern[None, None].repeat(64, 1, 1, 1)
    labels = (pattern > 0.5).long()[None].repeat(64, 1, 1)
    transform = build_augmentation(settings)
    if backend == "batched":
        out_i, out_l = transform(images, labels, torch.Generator().manual_seed(0))
    else:
        out_i, out_l = (torch.from_numpy(a) for a in augment_batch(transform, images.numpy(), labels.numpy(), seed=0))
    seen = set()
    for img, lab in zip(out_i[:, 0], out_l.long()):
        which = [k for k, s in enumerate(_symmetries(pattern)) if torch.allclose(img, s, atol=1e-5)]
        assert len(which) == 1, "every slice is one symmetry of the input"
        assert torch.equal(lab, _symmetries(labels[0])[which[0]]), "its labels took the same symmetry"
        seen.add(which[0])
    assert len(seen) == 8


def test_dihedral_refuses_slices_that_are_not_square():
    from cdal_core.config import TrainConfig
    from cdal_core.errors import CDALError
    transform = BatchAugmentation({"dihedral": True})
    with pytest.raises(ValueError, match="square"):
        transform(torch.rand(2, 1, 8, 6), torch.zeros(2, 8, 6, dtype=torch.long), torch.Generator())
    with pytest.raises(CDALError, match="square slices"):
        TrainConfig.from_dict({"train_size": [64, 48], "augmentation": {"dihedral": True}})
    TrainConfig.from_dict({"train_size": [64, 64], "augmentation": {"dihedral": True}})
    with pytest.raises(CDALError, match="extra_views"):
        TrainConfig.from_dict({"train_size": [64, 64], "augmentation": {"dihedral": True},
                               "extra_views": [{"axis": 2, "size": [64, 64]}]})
    with pytest.raises(CDALError, match="true or false"):
        TrainConfig.from_dict({"train_size": [64, 64], "augmentation": {"dihedral": "no"}})


def test_dihedral_counts_both_in_plane_axes_as_mirrored():
    from cdal_core.geometry import mirrored_volume_axes
    assert mirrored_volume_axes({"dihedral": True}, slice_axis=0) == {1, 2}
    assert mirrored_volume_axes({"flip_axis": 1}, slice_axis=0) == {2}


def test_hed_jitter_is_the_identity_at_rest_and_scales_a_stain_along_its_own_colour():
    from cdal_core.augment import RGB_FROM_HED, hed_jitter
    # Ruifrok & Johnston (2001): haematoxylin, eosin, DAB
    assert torch.allclose(RGB_FROM_HED, torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]]))
    images = torch.rand(4, 3, 5, 5).clamp_min(0.01)
    same = hed_jitter(images, torch.ones(4, 3), torch.zeros(4, 3))
    assert torch.allclose(same, images, atol=1e-5)
    # a pixel of haematoxylin alone: 1.5 x its density is 1.5 x its optical density, the same hue
    od = 0.4 * RGB_FROM_HED[0]
    pixel = torch.pow(10.0, -od)[None, :, None, None]
    out = hed_jitter(pixel, torch.tensor([[1.5, 1.0, 1.0]]), torch.zeros(1, 3))
    assert torch.allclose(-torch.log10(out[0, :, 0, 0]), 1.5 * od, atol=1e-5)
    # eosin added to it moves the colour along eosin's direction only
    out = hed_jitter(pixel, torch.ones(1, 3), torch.tensor([[0.0, 0.1, 0.0]]))
    assert torch.allclose(-torch.log10(out[0, :, 0, 0]) - od, 0.1 * RGB_FROM_HED[1], atol=1e-5)


def test_stain_jitter_changes_colours_per_slice_keeps_labels_and_needs_rgb_and_batches():
    from cdal_core.config import TrainConfig
    from cdal_core.errors import CDALError
    settings = {"backend": "batched", "probability": 0.0, "affine_probability": 0.0, "stain_jitter": 0.05}
    images = torch.rand(1, 3, 16, 16).repeat(8, 1, 1, 1) * 0.8 + 0.1
    labels = torch.randint(0, 2, (8, 16, 16))
    out_i, out_l = build_augmentation(settings)(images, labels, torch.Generator().manual_seed(0))
    assert torch.equal(out_l, labels)
    change = (out_i - images).abs().flatten(1).mean(1)
    assert bool((change > 1e-3).all()) and float(change.std()) > 1e-4, "every slice changed, each its own way"
    assert float(out_i.min()) >= 0 and float(out_i.max()) <= 1
    with pytest.raises(CDALError, match="RGB"):
        TrainConfig.from_dict({"network": {"image_channels": 1},
                               "augmentation": {"stain_jitter": 0.05, "backend": "batched"}})
    with pytest.raises(CDALError, match="batched"):
        TrainConfig.from_dict({"network": {"image_channels": 3}, "augmentation": {"stain_jitter": 0.05}})
    with pytest.raises(ValueError, match="batched"):
        build_augmentation({"stain_jitter": 0.05})
    with pytest.raises(CDALError, match="context slice"):
        TrainConfig.from_dict({"network": {"image_channels": 3, "context_slices": 1},
                               "augmentation": {"stain_jitter": 0.05, "backend": "batched"}})
    for bad in (0.8, -0.1, "0.05"):
        with pytest.raises(CDALError, match="from 0 to 0.5"):
            TrainConfig.from_dict({"network": {"image_channels": 3},
                                   "augmentation": {"stain_jitter": bad, "backend": "batched"}})
