import json

import numpy as np
import pytest
import SimpleITK as sitk

from cdal_core.data import (Case, Normalisation, check_volume, load_volume, read_msd_cases, slice_stack,
                            split_cases)
from cdal_core.errors import CDALError
from cdal_core.geometry import GridMapping, ModelGrid, orientation_code
from cdal_core.synthetic import make_volume, to_image


def test_normalisation_ignores_outliers():
    a = np.random.default_rng(0).normal(100, 10, (20, 20, 20)).astype(np.float32)
    b = a.copy()
    b.flat[:5] = 1e6
    na, nb = Normalisation()(a), Normalisation()(b)
    assert na.min() == 0 and na.max() == 1
    assert np.abs(na - nb)[np.unravel_index(np.arange(5, 8000), a.shape)].max() < 0.05


def test_normalisation_is_scale_invariant():
    a = np.random.default_rng(1).random((10, 10, 10)).astype(np.float32)
    assert np.allclose(Normalisation()(a), Normalisation()(a * 1e5 + 7), atol=1e-5)


@pytest.mark.parametrize("make, message", [
    (lambda: sitk.Image([10, 10], sitk.sitkFloat32), "2D"),
    (lambda: sitk.Image([10, 10, 1], sitk.sitkFloat32), "2D"),
    (lambda: sitk.Image([4, 4, 4, 4], sitk.sitkFloat32), "4 dimensions"),
    (lambda: sitk.Image([8, 8, 8], sitk.sitkVectorUInt8, 3), "RGB"),
    (lambda: sitk.Image([8, 8, 8], sitk.sitkFloat32), "constant"),
])
def test_check_volume_rejects(make, message):
    with pytest.raises(CDALError, match=message):
        check_volume(make(), 1)


def test_check_volume_rejects_nan():
    a = np.random.rand(6, 6, 6).astype(np.float32)
    a[1, 2, 3] = np.nan
    with pytest.raises(CDALError, match="NaN"):
        check_volume(sitk.GetImageFromArray(a), 1)


def test_permuted_and_flipped_inputs_give_identical_model_arrays():
    img, _ = make_volume(np.random.default_rng(0))
    ref = to_image(img.astype(np.float32))
    grid = ModelGrid("RAS", [1, 1, 1])
    base = GridMapping(ref, grid).model_array()
    for code in ("LPS", "LPI", "AIR", "SRA"):
        other = sitk.DICOMOrient(ref, code)
        assert orientation_code(other) == code
        mapping = GridMapping(other, grid)
        assert not mapping.resampled
        assert np.array_equal(mapping.model_array(), base)
        back = mapping.to_input(base)
        assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(other))
        assert back.GetDirection() == other.GetDirection() and back.GetOrigin() == other.GetOrigin()


def test_oblique_and_anisotropic_inputs_are_resampled_and_mapped_back():
    img, _ = make_volume(np.random.default_rng(1))
    ref = to_image(img.astype(np.float32))
    rot = sitk.Euler3DTransform()
    rot.SetRotation(0.15, -0.1, 0.25)
    oblique = sitk.Image(ref)
    oblique.SetDirection((np.asarray(rot.GetMatrix()).reshape(3, 3) @
                          np.asarray(ref.GetDirection()).reshape(3, 3)).flatten().tolist())
    m = GridMapping(oblique, ModelGrid("RAS", [1, 1, 1]))
    assert m.resampled and "oblique" in m.notes[0]
    back = m.to_input(m.model_array())
    assert back.GetSize() == oblique.GetSize() and back.GetDirection() == oblique.GetDirection()
    inner = (slice(4, -4),) * 3
    a, b = sitk.GetArrayFromImage(back)[inner], sitk.GetArrayFromImage(oblique)[inner].astype(np.float32)
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.95
    aniso = sitk.Image(ref)
    aniso.SetSpacing((0.8, 0.8, 2.0))
    m2 = GridMapping(aniso, ModelGrid("RAS", [1, 1, 1]))
    assert m2.resampled and m2.model_image.GetSpacing() == (1.0, 1.0, 1.0)
    assert m2.to_input(m2.model_array()).GetSize() == aniso.GetSize()


def test_slice_stack_context():
    v = np.arange(4 * 2 * 3).reshape(4, 2, 3).astype(np.float32)
    s = slice_stack(v, 0, 1)
    assert s.shape == (4, 3, 2, 3)
    assert np.array_equal(s[0, 0], v[0]) and np.array_equal(s[0, 2], v[1]) and np.array_equal(s[3, 2], v[3])


def test_msd_reader_catches_lies(synthetic_dir, tmp_path):
    cases, labels = read_msd_cases(synthetic_dir)
    assert labels == {0: "background", 1: "Anterior", 2: "Posterior"} and len(cases) == 6
    meta = json.loads((synthetic_dir / "dataset.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    for sub in ("imagesTr", "labelsTr"):
        (bad / sub).symlink_to(synthetic_dir / sub)
    meta["numTraining"] = 99
    (bad / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(CDALError, match="numTraining=99"):
        read_msd_cases(bad)
    meta["numTraining"] = 7
    meta["training"].append({"image": "./imagesTr/nope.nii.gz", "label": "./labelsTr/nope.nii.gz"})
    (bad / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(CDALError, match="do not exist"):
        read_msd_cases(bad)
    (bad / "dataset.json").write_text("{not json")
    with pytest.raises(CDALError, match="not a valid MSD"):
        read_msd_cases(bad)


def test_a_dataset_one_folder_down_is_named(synthetic_dir, tmp_path):
    """A user who hands in ``MoNuSeg/`` for ``MoNuSeg/train/`` is told where the data is."""
    parent = tmp_path / "MoNuSeg"
    (parent / "train" / "images").mkdir(parents=True)
    with pytest.raises(CDALError, match=r"images/ and masks/.*did you mean .*MoNuSeg/train\?"):
        read_msd_cases(parent)
    (tmp_path / "Task04").mkdir()
    (tmp_path / "Task04" / "Task04_Hippocampus").symlink_to(synthetic_dir)
    with pytest.raises(CDALError, match=r"did you mean .*Task04_Hippocampus\?"):
        read_msd_cases(tmp_path / "Task04")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CDALError) as err:
        read_msd_cases(tmp_path / "empty")
    assert "did you mean" not in str(err.value)


def test_labels_outside_the_classes_are_rejected(synthetic_dir):
    cases, _ = read_msd_cases(synthetic_dir)
    with pytest.raises(CDALError, match="label values"):
        load_volume(cases[0], ModelGrid(), Normalisation(), num_classes=2)


def test_split_is_fixed_and_disjoint():
    cases = [Case(f"c{i}", None, None) for i in range(20)]
    tr, va = split_cases(cases, 0.25, seed=1)
    tr2, va2 = split_cases(cases, 0.25, seed=1)
    assert [c.name for c in va] == [c.name for c in va2] and len(va) == 5
    assert not {c.name for c in tr} & {c.name for c in va}
    _, named = split_cases(cases, 0.25, 1, ["c3", "c4"])
    assert [c.name for c in named] == ["c3", "c4"]
    with pytest.raises(CDALError, match=r"names 1 case\(s\) not in the data \(first: zz\)"):
        split_cases(cases, 0.25, 1, ["zz"])


def test_oblique_padding_does_not_shift_the_normalisation(tmp_path):
    """Resampling pads the model grid; load_volume must still scale intensities by the scan's own percentiles,
    fitted before the padding, and pad with the scan's dark level."""
    img, _ = make_volume(np.random.default_rng(4))
    ref = to_image((img.astype(np.float32) + 500.0))  # a dark level far from 0
    rot = sitk.Euler3DTransform()
    rot.SetRotation(0.35, 0.0, 0.0)
    oblique = sitk.Image(ref)
    oblique.SetDirection((np.asarray(rot.GetMatrix()).reshape(3, 3) @
                          np.asarray(ref.GetDirection()).reshape(3, 3)).flatten().tolist())
    path = tmp_path / "oblique.nii.gz"
    sitk.WriteImage(oblique, str(path))
    grid, norm = ModelGrid("RAS", [1, 1, 1]), Normalisation()
    volume = load_volume(Case("oblique", path, None), grid, norm, num_classes=3)

    scan = sitk.ReadImage(str(path))
    params = norm.fit(sitk.GetArrayViewFromImage(scan))          # the scan's own voxels, no padding
    mapping = GridMapping(scan, grid, fill=params.lo)
    assert mapping.resampled
    np.testing.assert_allclose(volume.image, norm.apply(mapping.model_array(), params), atol=1e-6)
    assert np.mean(volume.image == 0) > 0.05                      # the padding maps to 0
    # what fitting on the padded grid would give differs, so the comparison above can fail
    padded = GridMapping(scan, grid, fill=0.0).model_array()
    assert np.abs(volume.image - norm.apply(padded, norm.fit(padded))).max() > 0.05


def test_histogram_standardisation_maps_contrast_onto_the_training_landmarks():
    rng = np.random.default_rng(5)
    train = [rng.beta(2, 5, (10, 10, 10)).astype(np.float32) for _ in range(4)]
    landmarks = Normalisation.learn_landmarks(train)
    norm = Normalisation(landmarks=landmarks)
    smooth_template = rng.beta(5, 2, (12, 12, 12)).astype(np.float32) * 900 + 50  # other contrast and range
    out = norm(smooth_template)
    from cdal_core.data import LANDMARK_PERCENTILES
    assert np.allclose(np.percentile(out, LANDMARK_PERCENTILES), landmarks, atol=0.02)
    assert norm.to_dict()["landmarks"] == landmarks
    assert Normalisation.from_dict(norm.to_dict()).landmarks == landmarks
    plain = Normalisation()(smooth_template)
    assert not np.allclose(np.percentile(plain, LANDMARK_PERCENTILES), landmarks, atol=0.05)


def test_a_nifti_whose_qform_and_sform_disagree_on_left_right_is_flagged(tmp_path):
    """Readers differ in which header orientation they use, so such a file has two left/rights: for a tool that
    reports left and right hippocampi, the user must hear of it."""
    import nibabel as nib
    import numpy as np
    from cdal_core.inputs import ScanInput, read_scan
    voxels = np.random.default_rng(0).normal(100, 20, (40, 48, 36)).astype(np.float32)
    flipped = nib.Nifti1Image(voxels, np.eye(4))
    flipped.set_qform(np.diag([-1.0, 1.0, 1.0, 1.0]), code=1)
    flipped.set_sform(np.eye(4), code=1)
    nib.save(flipped, tmp_path / "flipped.nii.gz")
    warnings = read_scan(ScanInput(tmp_path / "flipped.nii.gz", "flipped")).warnings
    assert any("disagree (qform LAS, sform RAS)" in w and "left/right" in w for w in warnings), warnings
    agreeing = nib.Nifti1Image(voxels, np.eye(4))
    agreeing.set_qform(np.eye(4), code=1)
    nib.save(agreeing, tmp_path / "agreeing.nii.gz")
    assert not read_scan(ScanInput(tmp_path / "agreeing.nii.gz", "agreeing")).warnings
