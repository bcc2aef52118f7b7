"""The whole-brain path (issue 13): localisation in any orientation, per-side volumetry, DICOM series and
every bad input a clinic's files can bring. The localisation tests use the ICBM152 template inside nilearn."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from cdal_core.errors import CDALError
from cdal_core.synthetic import make_volume, to_image
from test_cli import assert_clean_error, cdal

LEFT_RAS, RIGHT_RAS = (-26.0, -23.0, -13.0), (26.0, -23.0, -13.0)


def _lps(ras):
    return (-ras[0], -ras[1], ras[2])


@pytest.fixture(scope="module")
def template():
    nilearn = pytest.importorskip("nilearn")
    path = Path(nilearn.__file__).parent / "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    if not path.exists():
        pytest.skip("nilearn without the ICBM152 template")
    return sitk.ReadImage(str(path), sitk.sitkFloat32)


def _moved_copy(template, degrees, spacing, orientation):
    """The template rotated about the brain's centre, resampled to ``spacing`` mm and stored with permuted and
    flipped axes (``orientation``), plus the map that says where a template point lies in the copy."""
    rotation = sitk.Euler3DTransform()
    rotation.SetCenter((0.0, 20.0, 10.0))
    rotation.SetRotation(*np.deg2rad(degrees))
    size = [int(n * s / spacing) for n, s in zip(template.GetSize(), template.GetSpacing())]
    moved = sitk.Resample(template, size, rotation, sitk.sitkLinear, template.GetOrigin(), [spacing] * 3,
                          template.GetDirection(), 0.0, sitk.sitkFloat32)
    return sitk.DICOMOrient(moved, orientation), rotation.GetInverse()


@pytest.mark.parametrize("degrees, spacing, orientation", [
    ((0.0, 0.0, 0.0), 1.0, "LAS"),          # plain, stored left-to-right flipped (like FSL/ds002748 files)
    ((12.0, -8.0, 10.0), 1.3, "PIR"),       # oblique head, thicker voxels, permuted + flipped axes
    ((-15.0, 5.0, 0.0), 0.8, "LPS"),
    ((32.0, 0.0, -6.0), 1.0, "RAS"),        # a head tilted forward by 32 degrees: needs the pose search
])
def test_locate_finds_both_hippocampi_in_a_moved_copy(template, degrees, spacing, orientation):
    from cdal_core.localise import locate
    image, template_to_copy = _moved_copy(template, degrees, spacing, orientation)
    loc = locate(image)
    assert loc.status == "ok", loc.reasons
    found = loc.to_dict()["centres_ras"]
    for side, ras in (("left", LEFT_RAS), ("right", RIGHT_RAS)):
        expected = np.asarray(_lps(template_to_copy.TransformPoint(_lps(ras))))
        assert np.linalg.norm(np.asarray(found[side]) - expected) < 4.0, (side, found[side], expected)
    # the subject's left is where the copy's own left lies, whatever the axes' order
    assert np.dot(np.asarray(found["right"]) - found["left"], [1, 0, 0]) > 30


def test_locate_refuses_what_is_not_a_brain():
    from cdal_core.localise import locate
    z, y, x = np.mgrid[:150, :190, :160]
    ball = (((z - 75) ** 2 + (y - 95) ** 2 + (x - 80) ** 2) < 60 ** 2).astype(np.float32) * 100
    loc = locate(sitk.GetImageFromArray(ball))
    assert loc.status == "doubtful" and loc.reasons
    noise = sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(
        np.random.default_rng(0).random((150, 190, 160)).astype(np.float32)), 4.0)
    assert locate(noise).status == "doubtful"


@pytest.fixture(scope="module")
def hippocampus_model():
    from cdal_core.model_io import list_models, load_model
    if "hippocampus" not in list_models():
        pytest.skip("the shipped hippocampus model is not installed")
    return load_model("hippocampus")


def test_whole_brain_gives_both_sides_with_volumes_from_the_label_map(template, hippocampus_model, monkeypatch):
    import threading
    from cdal_core.scan import segment_scan
    image = sitk.DICOMOrient(template, "LPI")
    calls = []
    monkeypatch.setenv("CDAL_THREADS", "2")  # both sides at once, one thread each
    result = segment_scan(image, hippocampus_model, seed=0,
                          progress=lambda f, m: calls.append((f, m, threading.current_thread().name)))
    assert any("locating" in m for _, m, _ in calls)
    side_calls = [c for c in calls if "hippocampus:" in c[1]]
    assert {m.split()[0] for _, m, _ in side_calls} == {"left", "right"}
    assert len({t for _, _, t in side_calls}) == 2                  # the sides ran on two threads
    fractions = [f for f, _, _ in calls]
    assert fractions == sorted(fractions)                           # one bar that never goes back
    monkeypatch.setenv("CDAL_THREADS", "1")                         # one side after the other
    serial = segment_scan(image, hippocampus_model, seed=0, with_attention=False)  # D draws no noise
    assert result.attention is not None and serial.attention is None
    for name in ("labels", "sides"):
        assert np.array_equal(sitk.GetArrayFromImage(getattr(result, name)),
                              sitk.GetArrayFromImage(getattr(serial, name))), name
    # the same call twice on one thread can differ by ~1e-21 where the variance is ~0 (vectorised float sums
    # depend on how buffers are aligned); other samples or seeds would differ by ~1e-2
    np.testing.assert_allclose(sitk.GetArrayFromImage(result.uncertainty), sitk.GetArrayFromImage(serial.uncertainty),
                               rtol=0, atol=1e-9)
    labels = sitk.GetArrayFromImage(result.labels)
    sides = sitk.GetArrayFromImage(result.sides)
    assert result.labels.GetSize() == image.GetSize() and result.labels.GetDirection() == image.GetDirection()
    assert set(np.unique(labels)) == {0, 1, 2}                    # the model's own label values
    assert np.array_equal(labels > 0, sides > 0) and set(np.unique(sides)) == {0, 1, 2}
    voxel = float(np.prod(image.GetSpacing()))
    rows = result.report["structures"]
    assert {(r["side"], r["name"]) for r in rows} == {(s, n) for s in ("left", "right")
                                                      for n in ("Anterior", "Posterior")}
    for row in rows:
        code = {"left": 1, "right": 2}[row["side"]]
        assert row["volume_mm3"] == pytest.approx(((sides == code) & (labels == row["label"])).sum() * voxel, abs=0.1)
    per_side = {s: sum(r["volume_mm3"] for r in rows if r["side"] == s) for s in ("left", "right")}
    assert all(2000 <= v <= 6500 for v in per_side.values()), per_side
    # the template is left-right symmetric: a model that learnt one side only (session 13's sagittal member made
    # the right posterior part 5.7 % smaller than the left here, alone 23 %) is caught; the shipped one: 1-2.3 %
    volume = {(r["side"], r["name"]): r["volume_mm3"] for r in rows}
    for name in ("Anterior", "Posterior"):
        left, right = volume[("left", name)], volume[("right", name)]
        assert abs(left - right) <= 0.04 * (left + right) / 2, (name, left, right)
    # left voxels lie on the subject's left (RAS x < 0 in template space)
    index = np.argwhere(sides == 1).mean(axis=0)[::-1]
    assert image.TransformContinuousIndexToPhysicalPoint(index.tolist())[0] > 0  # LPS x > 0 is the left
    assert result.report["localisation"]["status"] == "ok"
    # the quick look turned both boxes past the default 11 degrees: the template's hippocampi dip about 38
    pitches = result.report["localisation"]["box_pitch_deg"]
    assert set(pitches) == {"left", "right"} and all(-20 < p < -12 for p in pitches.values()), pitches
    assert result.report["review"] == [] and not any(r["review"] for r in rows)  # a clean T1: nothing to review


def test_a_t2_like_brain_is_segmented_but_every_structure_is_marked_for_review(template, hippocampus_model):
    """The template with its contrast inverted (bright fluid, dark white matter, as on T2) still registers and
    still gives plausible-looking volumes; the uncertainty is what gives it away."""
    from cdal_core.scan import format_report, segment_scan
    array = sitk.GetArrayFromImage(template)
    brain = array > np.percentile(array, 30)
    inverted = sitk.GetImageFromArray(np.where(brain, array.max() - array, 0).astype(np.float32))
    inverted.CopyInformation(template)
    result = segment_scan(inverted, hippocampus_model, seed=0)
    assert all(r["review"] for r in result.report["structures"])
    assert len(result.report["review"]) == 1 and "every structure" in result.report["review"][0]
    assert result.notes[-1] == result.report["review"][0]          # what Slicer's status line shows
    table = format_report(result.report)
    assert table.count("REVIEW") == 4 and "cdal: warning: review the whole result" in table


def test_a_crop_is_segmented_whole_with_side_unknown(tiny_model):
    from cdal_core.model_io import load_model
    from cdal_core.scan import segment_scan
    img, _ = make_volume(np.random.default_rng(1))
    result = segment_scan(to_image(img.astype(np.float32)), load_model(tiny_model), samples=2, seed=0)
    assert result.report["localisation"]["status"] == "not needed"
    assert {r["side"] for r in result.report["structures"]} <= {"unknown"}


def test_roi_wins_and_only_its_box_is_labelled(template, hippocampus_model):
    from cdal_core.scan import segment_scan
    roi = ((-44.0, -50.0, -32.0), (-8.0, 4.0, 6.0))             # around the left hippocampus, RAS mm
    result = segment_scan(template, hippocampus_model, roi=roi, seed=0)
    assert result.report["localisation"]["status"] == "roi"
    labelled = np.argwhere(sitk.GetArrayFromImage(result.labels) > 0)
    points = np.array([template.TransformIndexToPhysicalPoint([int(i) for i in p[::-1]]) for p in labelled[::50]])
    ras = points * [-1, -1, 1]
    assert len(labelled) and np.all(ras >= np.array(roi[0]) - 1) and np.all(ras <= np.array(roi[1]) + 1)


def test_parse_roi_rejects_garbage():
    from cdal_core.scan import parse_roi
    assert parse_roi("1,2,3,4,5,6") == ((1.0, 2.0, 3.0), (4.0, 5.0, 6.0))
    for bad in ("1,2,3", "a,b,c,d,e,f", "1,2,3,4,5,nan"):
        with pytest.raises(CDALError, match="six numbers"):
            parse_roi(bad)


# -- files as clinics keep them -------------------------------------------------------------------------------
def _write_dicom_series(image: sitk.Image, folder: Path, series_uid: str) -> None:
    """One file per slice with the tags a scanner writes (position, orientation, spacing, one series UID)."""
    folder.mkdir(parents=True)
    image = sitk.Cast(image, sitk.sitkInt16)
    direction = image.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        piece = image[:, :, k]
        tags = {"0008|0060": "MR", "0020|000e": series_uid, "0020|000d": series_uid + ".1",
                "0020|0013": str(k + 1), "0018|0050": str(image.GetSpacing()[2]),
                "0020|0037": "\\".join(str(v) for v in (direction[0], direction[3], direction[6],
                                                         direction[1], direction[4], direction[7])),
                "0020|0032": "\\".join(str(v) for v in image.TransformIndexToPhysicalPoint((0, 0, k))),
                "0008|0018": f"{series_uid}.{k + 1}"}
        for key, value in tags.items():
            piece.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(piece)


@pytest.fixture
def scan_image():
    img, _ = make_volume(np.random.default_rng(5))
    image = to_image((img * 800).astype(np.float32))
    image.SetOrigin((12.0, -30.0, 4.5))
    return image


def test_dicom_series_folder_and_folder_of_series(tiny_model, scan_image, tmp_path):
    _write_dicom_series(scan_image, tmp_path / "patients" / "T1_MPRAGE", "1.2.826.0.1.3680043.2.1125.1")
    _write_dicom_series(scan_image, tmp_path / "patients" / "T1_repeat", "1.2.826.0.1.3680043.2.1125.2")
    out = tmp_path / "out"
    proc = cdal("predict", "--model", tiny_model, "--input", tmp_path / "patients" / "T1_MPRAGE", "--output", out,
                "--samples", 2, "--device", "cpu")
    assert "T1_MPRAGE_seg.nii.gz" in proc.stdout
    seg = sitk.ReadImage(str(out / "T1_MPRAGE_seg.nii.gz"))
    assert seg.GetSize() == scan_image.GetSize()
    assert np.allclose(seg.GetOrigin(), scan_image.GetOrigin(), atol=1e-3)
    assert np.allclose(seg.GetSpacing(), scan_image.GetSpacing(), atol=1e-4)
    report = json.loads((out / "T1_MPRAGE_report.json").read_text())
    assert report["structures"] and report["localisation"]["status"] == "not needed"
    cdal("predict", "--model", tiny_model, "--input", tmp_path / "patients", "--output", tmp_path / "all",
         "--samples", 2, "--device", "cpu")
    assert {p.name for p in (tmp_path / "all").glob("*_seg.nii.gz")} == {"T1_MPRAGE_seg.nii.gz", "T1_repeat_seg.nii.gz"}


def test_thick_slices_are_refused_or_segmented_with_a_warning(tiny_model, scan_image, tmp_path):
    scan_image.SetSpacing((1.0, 1.0, 6.5))
    path = tmp_path / "clinical.nii.gz"
    sitk.WriteImage(scan_image, str(path))
    assert_clean_error(cdal("predict", "--model", tiny_model, "--input", path, "--output", tmp_path / "o",
                            check=False), "6.5 mm", "--allow-thick-slices")
    proc = cdal("predict", "--model", tiny_model, "--input", path, "--output", tmp_path / "o", "--samples", 2,
                "--allow-thick-slices")
    assert "6.5 mm" in proc.stderr and (tmp_path / "o" / "clinical_seg.nii.gz").exists()


def test_truncated_nifti_is_an_error_not_zeros(tiny_model, scan_image, tmp_path):
    path = tmp_path / "cut.nii.gz"
    sitk.WriteImage(scan_image, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert_clean_error(cdal("predict", "--model", tiny_model, "--input", path, "--output", tmp_path / "o",
                            check=False), "truncated or corrupt")


def test_nan_voxels_become_background_with_a_count(tiny_model, scan_image, tmp_path):
    array = sitk.GetArrayFromImage(scan_image).transpose(2, 1, 0).copy()   # nibabel order (i, j, k)
    array[0, 0, :3] = np.nan
    path = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(array, np.diag([-1.0, -1.0, 1.0, 1.0])), str(path))
    proc = cdal("predict", "--model", tiny_model, "--input", path, "--output", tmp_path / "o", "--samples", 2)
    assert "3 NaN/inf voxels replaced by background" in proc.stderr
    report = json.loads((tmp_path / "o" / "nan_report.json").read_text())
    assert any("3 NaN/inf" in w for w in report["warnings"])


def test_singular_orientation_is_refused_and_missing_orientation_warned(tiny_model, scan_image, tmp_path):
    array = sitk.GetArrayFromImage(scan_image).transpose(2, 1, 0).copy()
    header = nib.Nifti1Header()
    header.set_data_shape(array.shape)
    header.set_data_dtype(np.float32)
    header.set_sform(np.diag([1.0, 1.0, 0.0, 1.0]), code=2)
    header["qform_code"] = 0
    path = tmp_path / "singular.nii.gz"
    nib.save(nib.Nifti1Image(array, None, header), str(path))
    assert_clean_error(cdal("predict", "--model", tiny_model, "--input", path, "--output", tmp_path / "o",
                            check=False), "orientation", "singular")
    path = tmp_path / "nocode.nii"
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))
    raw = bytearray(path.read_bytes())
    raw[252:256] = b"\x00\x00\x00\x00"      # qform_code and sform_code (int16 at 252, 254): "unknown"
    path.write_bytes(bytes(raw))
    proc = cdal("predict", "--model", tiny_model, "--input", path, "--output", tmp_path / "o2", "--samples", 2)
    assert "no orientation" in proc.stderr


def test_a_bad_scan_in_a_folder_does_not_cost_the_others(tiny_model, scan_image, tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    sitk.WriteImage(scan_image, str(folder / "good.nii.gz"))
    sitk.WriteImage(scan_image, str(folder / "cut.nii.gz"))
    data = (folder / "cut.nii.gz").read_bytes()
    (folder / "cut.nii.gz").write_bytes(data[: len(data) // 3])
    proc = cdal("predict", "--model", tiny_model, "--input", folder, "--output", tmp_path / "o", "--samples", 2,
                check=False)
    assert proc.returncode == 2 and "truncated" in proc.stderr and "1 of 2 inputs" in proc.stderr
    assert (tmp_path / "o" / "good_seg.nii.gz").exists() and not (tmp_path / "o" / "cut_seg.nii.gz").exists()


def test_a_large_piece_cut_off_by_one_voxel_stays_and_islands_go():
    """The hippocampal head split from the body by a one-voxel gap is kept; small or farther islands are not."""
    from cdal_core.scan import _outside_largest_component
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[2:10, 2:10, 2:10] = 2                 # the body (512 voxels)
    labels[2:10, 11:15, 2:10] = 1                # the head, 256 voxels, one empty voxel away
    labels[15, 15, 15:17] = 1                    # a small island far away
    drop = _outside_largest_component(labels)
    assert not drop[5, 12, 5] and drop[15, 15, 15] and drop.sum() == 2
    farther = labels.copy()
    farther[2:10, 11:15, 2:10] = 0
    farther[2:10, 12:16, 2:10] = 1               # two empty voxels away: another structure
    assert _outside_largest_component(farther)[5, 13, 5]
    small = labels.copy()
    small[2:10, 11:15, 2:10] = 0
    small[2:4, 11, 2:4] = 1                      # near but small (4 voxels)
    assert _outside_largest_component(small)[2, 11, 2]


def _rod_scan(centre_lps: np.ndarray, dip_degrees: float) -> sitk.Image:
    """A 90 mm cube (1 mm, LPS axes) around ``centre_lps`` holding a bright rod that dips anteriorly."""
    z, y, x = np.mgrid[:90, :90, :90].astype(float)
    points = np.stack([x, y, z], -1) - 44.5                     # LPS mm from the centre
    dip = np.deg2rad(-dip_degrees)
    axis = np.array([0.0, -np.cos(dip), -np.sin(dip)])          # anterior and down, in LPS
    off_axis = points - (points @ axis)[..., None] * axis
    scan = sitk.GetImageFromArray((np.linalg.norm(off_axis, axis=-1) < 2.5).astype(np.float32) * 100)
    scan.SetOrigin((centre_lps - 44.5).tolist())
    return scan


def test_the_box_turns_so_that_the_hippocampus_dips_as_in_msd_crops():
    """In template-aligned boxes of real heads the hippocampus' long axis dips about 34.4 degrees below the axial
    plane, in MSD's crops 23.6: the default box turns nose-down, then a quick look turns it the rest of the way."""
    from cdal_core.localise import HIPPOCAMPUS_PITCH_DEG, MAX_PITCH_DEG, MSD_DIP_DEG, Region, dip_degrees, hippocampus_regions
    assert all(spec.pitch_deg == HIPPOCAMPUS_PITCH_DEG < 0 and spec.dip_deg == MSD_DIP_DEG
               for spec in hippocampus_regions())
    centre = np.asarray(_lps(LEFT_RAS))
    for dip in (-34.5, -29.0, -40.0):
        scan = _rod_scan(centre, dip)
        box = Region("left", sitk.Transform(3, sitk.sitkIdentity), centre, (40.0, 56.0, 40.0), 0.0, MSD_DIP_DEG)
        assert dip_degrees(sitk.GetArrayFromImage(box.crop(scan)) > 50) == pytest.approx(dip, abs=1.0)
        box = Region("left", sitk.Transform(3, sitk.sitkIdentity), centre, (40.0, 56.0, 40.0), HIPPOCAMPUS_PITCH_DEG,
                     MSD_DIP_DEG)
        seen = dip_degrees(sitk.GetArrayFromImage(box.crop(scan)) > 50)
        assert seen == pytest.approx(dip - HIPPOCAMPUS_PITCH_DEG, abs=1.0)
        turned = box.turned_to_dip(seen)
        assert dip_degrees(sitk.GetArrayFromImage(turned.crop(scan)) > 50) == pytest.approx(MSD_DIP_DEG, abs=1.0)
    assert box.turned_to_dip(-80.0).pitch_deg == -MAX_PITCH_DEG              # a wild estimate turns no further
    fixed = Region("left", sitk.Transform(3, sitk.sitkIdentity), centre, (40.0, 56.0, 40.0), 0.0, None)
    assert fixed.turned_to_dip(-40.0) is fixed                                # regions without a dip stay put
    assert dip_degrees(np.zeros((40, 56, 40), bool)) is None


def _ellipsoids(image, blobs):
    """UInt8 labels on ``image``'s grid: for each (label, centre RAS, radii RAS mm), that label inside the ellipsoid."""
    shape = sitk.GetArrayViewFromImage(image).shape
    labels = np.zeros(shape, np.uint8)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    for value, centre, radii in blobs:
        middle = np.asarray(image.TransformPhysicalPointToIndex(_lps(centre)))[::-1]  # (k, j, i)
        lo = np.maximum(middle - 30, 0)
        hi = np.minimum(middle + 30, shape)
        k, j, i = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij")
        index = np.stack([i, j, k], -1).reshape(-1, 3) * np.asarray(image.GetSpacing())
        lps = np.asarray(image.GetOrigin()) + index @ direction.T
        ras = lps * [-1, -1, 1]
        inside = (((ras - centre) / radii) ** 2).sum(1) <= 1
        box = labels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].reshape(-1)
        box[inside] = value
        labels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = box.reshape(hi - lo)
    out = sitk.GetImageFromArray(labels)
    out.CopyInformation(image)
    return out


def _hippocampus_like(centre):
    """Anterior (1) in front of posterior (2), long along anterior-posterior, as a hippocampus is."""
    ahead, behind = np.add(centre, (0, 8, 0)), np.add(centre, (0, -8, 0))
    return [(1, ahead, (5.0, 9.0, 5.0)), (2, behind, (5.0, 9.0, 5.0))]


def test_training_crops_cut_a_labelled_head_where_inference_segments(template):
    """Fine-tuning on a whole head: each side's box as inference cuts it, image and labels on one grid, the
    labels near the box centre (the trainer centre-crops slices, so a whole head would show it no hippocampus)."""
    from cdal_core.model_io import read_card, resolve_model
    from cdal_core.localise import training_crops
    card = read_card(resolve_model("hippocampus"))
    labels = _ellipsoids(template, _hippocampus_like(LEFT_RAS) + _hippocampus_like(RIGHT_RAS))
    crops, warnings = training_crops(template, labels, card, name="icbm")
    assert warnings == [] and [c.side for c in crops] == ["left", "right"]
    for crop in crops:
        assert crop.image.GetSize() == (40, 56, 40) and crop.labels.GetSize() == crop.image.GetSize()
        assert crop.labels.GetOrigin() == crop.image.GetOrigin()
        assert crop.labels.GetDirection() == crop.image.GetDirection()
        array = sitk.GetArrayFromImage(crop.labels)
        assert set(np.unique(array)) == {0, 1, 2}
        centroid = np.argwhere(array > 0).mean(0)
        assert np.all(np.abs(centroid - (np.asarray(array.shape) - 1) / 2) < 8), (crop.side, centroid)
        # anterior in front of posterior on the crop's RAS grid (array axis 1 runs posterior -> anterior)
        assert np.argwhere(array == 1)[:, 1].mean() > np.argwhere(array == 2)[:, 1].mean()
        assert float(sitk.GetArrayViewFromImage(crop.image)[array > 0].mean()) > 0  # brain, not the fill


def test_training_crops_say_what_they_leave_out(template):
    from cdal_core.model_io import read_card, resolve_model
    from cdal_core.localise import training_crops
    card = read_card(resolve_model("hippocampus"))
    frontal = [(1, (0.0, 50.0, 20.0), (12.0, 12.0, 12.0))]  # far from both hippocampi
    labels = _ellipsoids(template, _hippocampus_like(LEFT_RAS) + frontal)
    crops, warnings = training_crops(template, labels, card, name="icbm")
    assert [c.side for c in crops] == ["left"]
    assert any("no labels in the right hippocampus box" in w for w in warnings), warnings
    assert any("of the labelled volume lies outside the boxes" in w for w in warnings), warnings
    crop_sized, _ = make_volume(np.random.default_rng(0))
    small = to_image(crop_sized.astype(np.float32))
    small_labels = sitk.Cast(small > float(np.median(crop_sized)), sitk.sitkUInt8)
    crops, warnings = training_crops(small, small_labels, card)
    assert warnings == [] and len(crops) == 1 and crops[0].side is None and crops[0].image is small


def test_cdal_crop_says_when_no_scan_has_labels_in_the_boxes(template, tmp_path):
    """Labels far from both hippocampi leave nothing to train on: one clear error, not an empty dataset that
    the trainer would only call "no training cases"."""
    heads = tmp_path / "heads"
    for folder in ("imagesTr", "labelsTr"):
        (heads / folder).mkdir(parents=True)
    sitk.WriteImage(template, str(heads / "imagesTr" / "icbm.nii.gz"))
    frontal = [(1, (0.0, 50.0, 20.0), (12.0, 12.0, 12.0))]
    sitk.WriteImage(_ellipsoids(template, frontal), str(heads / "labelsTr" / "icbm.nii.gz"))
    (heads / "dataset.json").write_text(json.dumps({
        "name": "heads", "labels": {"0": "background", "1": "Anterior", "2": "Posterior"}, "numTraining": 1,
        "training": [{"image": "./imagesTr/icbm.nii.gz", "label": "./labelsTr/icbm.nii.gz"}]}))
    crops = tmp_path / "crops"
    refused = cdal("crop", "--model", "hippocampus", "--data", heads, "--out", crops, check=False)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert lines[-1].startswith("cdal: error:") and "none of its 1 scans has labels inside the boxes" in lines[-1]
    # before it, the warnings that say why, per scan and side
    assert any(ln.startswith("cdal: warning:") and "no labels in the left hippocampus box" in ln for ln in lines)
    assert not crops.exists(), "the empty folders are gone: the corrected re-run may use the same --out"


def test_whole_heads_are_refused_for_training_and_cdal_crop_makes_them_trainable(template, tmp_path):
    """`cdal finetune` on labelled whole heads would centre-crop each head and never see a hippocampus: it is
    refused before any work, naming `cdal crop`, which cuts the boxes inference segments; those then train."""
    whole = tmp_path / "heads"
    for folder in ("imagesTr", "labelsTr"):
        (whole / folder).mkdir(parents=True)
    sitk.WriteImage(template, str(whole / "imagesTr" / "icbm.nii.gz"))
    labels = _ellipsoids(template, _hippocampus_like(LEFT_RAS) + _hippocampus_like(RIGHT_RAS))
    sitk.WriteImage(labels, str(whole / "labelsTr" / "icbm.nii.gz"))
    (whole / "dataset.json").write_text(json.dumps({
        "name": "heads", "labels": {"0": "background", "1": "Anterior", "2": "Posterior"}, "numTraining": 1,
        "training": [{"image": "./imagesTr/icbm.nii.gz", "label": "./labelsTr/icbm.nii.gz"}]}))
    config = tmp_path / "small.json"
    config.write_text(json.dumps({"batch_size": 2, "val_fraction": 0.0, "log_every": 1}))
    run = tmp_path / "run"
    refused = cdal("finetune", "--model", "hippocampus", "--data", whole, "--out", run, "--config", config,
                   "--max-steps", 1, "--device", "cpu", check=False)
    assert_clean_error(refused, "whole head", "cdal crop --model hippocampus")
    assert not (run / "config.json").exists(), "a refused start leaves nothing that blocks the corrected re-run"

    crops = tmp_path / "crops"
    made = cdal("crop", "--model", "hippocampus", "--data", whole, "--out", crops)
    assert "icbm: left, right" in made.stdout, made.stdout
    meta = json.loads((crops / "dataset.json").read_text())
    assert meta["numTraining"] == 2 and meta["labels"]["1"] == "Anterior"
    for entry in meta["training"]:
        image = sitk.ReadImage(str(crops / entry["image"]))
        label = sitk.ReadImage(str(crops / entry["label"]))
        assert image.GetSize() == label.GetSize() == (40, 56, 40)
        assert set(np.unique(sitk.GetArrayViewFromImage(label))) == {0, 1, 2}
    again = cdal("crop", "--model", "hippocampus", "--data", whole, "--out", crops, check=False)
    assert_clean_error(again, "not empty")
    cdal("finetune", "--model", "hippocampus", "--data", crops, "--out", run, "--config", config,
         "--max-steps", 1, "--device", "cpu")
    assert (run / "model" / "model.json").exists()


def test_a_crop_refused_part_way_leaves_nothing_that_blocks_the_corrected_rerun(synthetic_dir, tmp_path):
    """A bad label in the third scan stopped `cdal crop` after two scans' crops were written; the re-run after
    the fix was told that --out "exists and is not empty"."""
    import shutil
    from cdal_core.cli import crop_dataset
    from cdal_core.errors import CDALError
    from cdal_core.model_io import read_card, resolve_model
    card = read_card(resolve_model("hippocampus"))
    data = tmp_path / "data"
    shutil.copytree(synthetic_dir, data)
    third = sorted((data / "labelsTr").glob("*.nii.gz"))[2]
    good = third.read_bytes()
    label = sitk.ReadImage(str(third))
    sitk.WriteImage(sitk.Cast(label, sitk.sitkUInt8) * 0 + 7, str(third))  # a label value the model does not have
    out = tmp_path / "crops"
    with pytest.raises(CDALError, match="7"):
        crop_dataset(data, out, card)
    assert not out.exists()
    third.write_bytes(good)
    written, cases = crop_dataset(data, out, card)
    assert cases == 6 and written == 6 and (out / "dataset.json").exists()


def test_macos_resource_forks_in_a_scan_folder_are_not_scans(synthetic_dir, tmp_path):
    import shutil
    from cdal_core.inputs import list_inputs
    folder = tmp_path / "scans"
    folder.mkdir()
    shutil.copy(synthetic_dir / "imagesTr" / "case_000.nii.gz", folder / "case_000.nii.gz")
    (folder / "._case_000.nii.gz").write_bytes(b"\x00\x05\x16\x07 Mac OS X resource fork")
    assert [item.path.name for item in list_inputs(folder)] == ["case_000.nii.gz"]
