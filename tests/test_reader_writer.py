"""The napari reader and writer: what they claim, round trips, and the optional extras."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from napari_r2au._reader import napari_get_reader, read_layers
from napari_r2au._writer import write_labels
from napari_r2au.io import write_png, write_tiff


def read(path) -> list[tuple]:
    reader = napari_get_reader(str(path))
    assert reader is not None, f"no reader for {path}"
    return reader(str(path))


@pytest.fixture
def labels() -> np.ndarray:
    out = np.zeros((40, 50), np.uint8)
    out[5:15, 10:30] = 1
    out[20:35, 5:8] = 2
    return out


def test_reader_claims_only_what_it_reads(tmp_path):
    for name in ("a.tif", "a.TIFF", "a.png", "a.jpg", "a.jpeg", "a.gif", "a.dcm", "a.nii", "a.nii.gz"):
        assert callable(napari_get_reader(str(tmp_path / name))), name
    for name in ("a.txt", "a.zarr", "a.gz", "a.json"):
        assert napari_get_reader(str(tmp_path / name)) is None, name
    assert napari_get_reader([str(tmp_path / "a.tif"), str(tmp_path / "b.png")]) is not None
    assert napari_get_reader([str(tmp_path / "a.tif"), str(tmp_path / "b.txt")]) is None


@pytest.mark.parametrize("suffix", [".tif", ".tiff", ".png"])
def test_labels_round_trip(tmp_path, labels, suffix):
    path = tmp_path / f"mask{suffix}"
    assert write_labels(str(path), labels.astype(np.int32), {}) == [str(path)]
    ((data, kwargs, kind),) = read(path)
    assert kind == "image" and kwargs["name"] == "mask" and not kwargs["rgb"]
    assert data.dtype == np.uint8  # labels are stored in the smallest type that holds them
    np.testing.assert_array_equal(data, labels)


def test_tiff_keeps_stacks_and_large_labels(tmp_path, labels):
    stack = np.stack([labels, labels.astype(np.int64) * 200])
    path = tmp_path / "stack.tif"
    write_labels(str(path), stack, {})
    ((data, _, _),) = read(path)
    assert data.dtype == np.uint16 and data.shape == (2, 40, 50)
    np.testing.assert_array_equal(data, stack)


def test_png_refuses_stacks_with_a_reason(tmp_path, labels):
    with pytest.raises(ValueError, match="save stacks as TIFF"):
        write_labels(str(tmp_path / "stack.png"), np.stack([labels, labels]), {})
    with pytest.raises(ValueError, match=r"\.tif"):
        write_labels(str(tmp_path / "mask.bmp"), labels, {})


def test_rgb_and_grey_images(tmp_path, rng):
    rgb = (rng.random((20, 30, 3)) * 255).astype(np.uint8)
    write_png(tmp_path / "colour.png", rgb)
    ((data, kwargs, kind),) = read(tmp_path / "colour.png")
    assert kind == "image" and kwargs["rgb"] and data.shape == (20, 30, 3)
    np.testing.assert_array_equal(data, rgb)
    grey_stack = (rng.random((4, 20, 30)) * 1000).astype(np.uint16)
    write_tiff(tmp_path / "grey.tif", grey_stack)
    ((data, kwargs, _),) = read(tmp_path / "grey.tif")
    assert not kwargs["rgb"]
    np.testing.assert_array_equal(data, grey_stack)


def test_manual_masks_open_as_labels_by_their_name_or_folder(tmp_path, rng):
    """DRIVE's 21_manual1.gif, PH2's masks/IMD002.png: references for Review, masks to correct."""
    mask = np.zeros((20, 30), np.uint8)
    mask[5:9, 3:20] = 255
    photo = (rng.random((20, 30)) * 255).astype(np.uint8)  # a grey picture: hundreds of values
    (tmp_path / "masks").mkdir()
    (tmp_path / "1st_manual").mkdir()
    cases = {
        "case_manual1.png": (mask, "labels"),
        "masks/case.png": (mask, "labels"),
        "1st_manual/21.png": (mask, "labels"),
        "case.png": (mask, "image"),
        "photo_mask.png": (photo, "image"),
        "rgb_seg.png": (np.stack([mask] * 3, -1), "image"),
    }
    for name, (array, kind) in cases.items():
        write_png(tmp_path / name, array)
        ((data, kwargs, got),) = read(tmp_path / name)
        assert got == kind, name
        np.testing.assert_array_equal(data, array)
    assert read(tmp_path / "masks/case.png")[0][1]["name"] == "case"


def test_an_exported_mask_opens_as_labels_with_its_record(tmp_path, labels):
    write_tiff(tmp_path / "case.tif", labels)
    record = {
        "format": "napari-r2au-mask",
        "format_version": 1,
        "mask_file": "case.tif",
        "model": "m",
        "model_sha256": "ab" * 32,
        "threshold": 0.4,
        "prediction_sha256": "cd" * 32,
        "scale": [2.0, 2.0],
        "translate": [1.0, 0.0],
    }
    (tmp_path / "case.json").write_text(json.dumps(record))
    ((data, kwargs, kind),) = read(tmp_path / "case.tif")
    assert kind == "labels" and kwargs["scale"] == (2.0, 2.0)
    info = kwargs["metadata"]["r2au"]
    assert info["model"] == "m" and info["threshold"] == 0.4 and info["mask_sha256"] == "cd" * 32
    # a JSON file that is not our sidecar changes nothing
    (tmp_path / "other.json").write_text(json.dumps({"format": "something else"}))
    write_tiff(tmp_path / "other.tif", labels)
    assert read(tmp_path / "other.tif")[0][2] == "image"


def test_missing_extras_say_what_to_install(tmp_path, labels, monkeypatch):
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom now raises ImportError
    monkeypatch.setitem(sys.modules, "nibabel", None)
    (tmp_path / "scan.dcm").write_bytes(b"")
    (tmp_path / "scan.nii.gz").write_bytes(b"")
    with pytest.raises(ImportError, match=r"napari-r2au\[dicom\]"):
        read(tmp_path / "scan.dcm")
    with pytest.raises(ImportError, match=r"napari-r2au\[nifti\]"):
        read(tmp_path / "scan.nii.gz")
    with pytest.raises(ImportError, match=r"napari-r2au\[nifti\]"):
        write_labels(str(tmp_path / "mask.nii"), labels, {})


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_round_trip_keeps_the_affine(tmp_path, suffix):
    nibabel = pytest.importorskip("nibabel")
    volume = np.zeros((30, 20, 5), np.uint8)  # NIfTI order: x, y, z
    volume[3:9, 4:12, 1:4] = 1
    affine = np.array([[0.8, 0, 0, -10], [0, 0.7, 0, 20], [0, 0, 2.5, 5], [0, 0, 0, 1]])
    source = tmp_path / f"scan{suffix}"
    image = nibabel.Nifti1Image(volume, affine)
    image.header.set_xyzt_units("mm")
    nibabel.save(image, str(source))

    ((data, kwargs, kind),) = read(source)
    assert kind == "image" and kwargs["name"] == "scan" and data.shape == (5, 20, 30)  # z, y, x
    np.testing.assert_allclose(kwargs["scale"], (2.5, 0.7, 0.8))
    assert kwargs["units"] == ("mm", "mm", "mm")  # the engine converts pixel sizes with them
    np.testing.assert_allclose(kwargs["metadata"]["nifti"]["affine"], affine)

    out = tmp_path / f"mask{suffix}"
    write_labels(str(out), data, {"metadata": kwargs["metadata"], "scale": kwargs["scale"]})
    written = nibabel.load(str(out))
    np.testing.assert_allclose(written.affine, affine)
    np.testing.assert_array_equal(np.asarray(written.dataobj), volume)


def test_nifti_without_a_source_affine_uses_the_layer_scale(tmp_path, labels):
    nibabel = pytest.importorskip("nibabel")
    out = tmp_path / "mask.nii.gz"
    write_labels(str(out), labels, {"scale": (2.0, 0.5), "translate": (10.0, 1.0)})
    written = nibabel.load(str(out))
    np.testing.assert_allclose(written.affine[:2, :2], np.diag([0.5, 2.0]))
    np.testing.assert_allclose(written.affine[:2, 3], [1.0, 10.0])
    np.testing.assert_array_equal(np.asarray(written.dataobj).T, labels)


def test_dicom_reads_pixels_and_spacing():
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    if path is None:
        pytest.skip("pydicom's test file is not installed")
    ((data, kwargs, kind),) = read(path)
    dataset = pydicom.dcmread(path)
    assert kind == "image" and data.shape == dataset.pixel_array.shape and not kwargs["rgb"]
    np.testing.assert_allclose(kwargs["scale"], [float(v) for v in dataset.PixelSpacing])
    assert kwargs["units"] == ("mm", "mm")
    assert kwargs["metadata"]["dicom"]["Modality"] == "CT"


@pytest.mark.gui
def test_napari_opens_and_saves_through_the_manifest(make_napari_viewer, tmp_path, labels):
    viewer = make_napari_viewer()
    write_tiff(tmp_path / "in.tif", labels)
    viewer.open(str(tmp_path / "in.tif"), plugin="napari-r2au")
    np.testing.assert_array_equal(viewer.layers["in"].data, labels)
    viewer.add_labels(labels, name="mask")
    viewer.layers.selection = {viewer.layers["mask"]}
    written = viewer.layers.save(str(tmp_path / "saved.png"), selected=True, plugin="napari-r2au")
    assert written == [str(tmp_path / "saved.png")]
    np.testing.assert_array_equal(read(tmp_path / "saved.png")[0][0], labels)


def test_a_dicom_series_opens_as_one_stack_in_patient_order(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    source = get_testdata_file("CT_small.dcm")
    if source is None:
        pytest.skip("pydicom's test file is not installed")
    template = pydicom.dcmread(source)
    raw = template.pixel_array
    files = []
    for z in (2, 0, 1):  # written out of order, with instance numbers that disagree with the positions
        dataset = pydicom.dcmread(source)
        dataset.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        dataset.ImagePositionPatient = [0.0, 0.0, 10.0 + 2.5 * z]
        dataset.InstanceNumber = 7 - z
        dataset.SOPInstanceUID = f"1.2.826.0.1.3680043.9.9999.{z}"
        dataset.PixelData = (raw + 100 * z).astype(raw.dtype).tobytes()
        files.append(tmp_path / "series" / f"slice{z}.dcm")
        files[-1].parent.mkdir(exist_ok=True)
        dataset.save_as(files[-1])
    slope, intercept = float(template.RescaleSlope), float(template.RescaleIntercept)
    for opened in (str(tmp_path / "series"), [str(p) for p in files]):  # a folder, or files opened as a stack
        assert napari_get_reader(opened) is not None
        ((data, kwargs, kind),) = napari_get_reader(opened)(opened)
        assert kind == "image" and data.shape == (3, *raw.shape)
        for z in range(3):
            np.testing.assert_allclose(data[z], (raw + 100 * z) * slope + intercept)
        np.testing.assert_allclose(kwargs["scale"], [2.5, *(float(v) for v in template.PixelSpacing)])
        assert kwargs["units"] == ("mm",) * 3
    assert napari_get_reader(str(tmp_path)) is None  # a folder without DICOM files is not ours
    bare = tmp_path / "bare"  # a PACS export: no extensions
    bare.mkdir()
    for path in files:
        (bare / f"IM{path.stem[-1]}").write_bytes(path.read_bytes())
    (bare / "README").write_text("not an image")
    ((data, _, _),) = napari_get_reader(str(bare))(str(bare))
    assert data.shape == (3, *raw.shape)
    other = pydicom.dcmread(files[0])
    other.SeriesInstanceUID = "1.2.3"
    other.save_as(tmp_path / "series" / "other.dcm")
    with pytest.raises(ValueError, match="different series"):
        read_layers(str(tmp_path / "series"))


_UID = "1.2.826.0.1.3680043.9.9999"


def _ct_small(pydicom):
    from pydicom.data import get_testdata_file

    source = get_testdata_file("CT_small.dcm")
    if source is None:
        pytest.skip("pydicom's test file is not installed")
    return source


def _enhanced_ct(
    pydicom,
    source,
    frames,
    positions,
    *,
    uid,
    slopes=None,
    instance=1,
    spacings=None,
    orientation=(1, 0, 0, 0, 1, 0),
):
    """An enhanced (multi-frame) CT built from pydicom's CT_small: spacing, positions and
    rescale live in functional groups (per frame before shared), none at the top level."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    dataset = pydicom.dcmread(source)
    dtype = dataset.pixel_array.dtype
    for keyword in (
        "PixelSpacing",
        "SliceThickness",
        "SpacingBetweenSlices",
        "RescaleSlope",
        "RescaleIntercept",
        "ImagePositionPatient",
        "ImageOrientationPatient",
    ):
        if keyword in dataset:
            delattr(dataset, keyword)

    def group(**items):
        out = Dataset()
        for sequence, values in items.items():
            item = Dataset()
            for key, value in values.items():
                setattr(item, key, value)
            setattr(out, sequence, Sequence([item]))
        return out

    slopes = slopes or [1.0] * len(frames)
    spacings = spacings or [[0.7, 0.8]] * len(frames)
    # shared: an intercept of -1000 that every frame's own -1024 must override
    dataset.SharedFunctionalGroupsSequence = Sequence(
        [
            group(
                PixelMeasuresSequence={"PixelSpacing": [9.0, 9.0], "SliceThickness": 5.0},
                PlaneOrientationSequence={"ImageOrientationPatient": list(orientation)},
                PixelValueTransformationSequence={"RescaleSlope": 1.0, "RescaleIntercept": -1000.0},
            )
        ]
    )
    dataset.PerFrameFunctionalGroupsSequence = Sequence(
        [
            group(
                PlanePositionSequence={"ImagePositionPatient": [0.0, 0.0, float(z)]},
                PixelMeasuresSequence={"PixelSpacing": list(spacing)},
                PixelValueTransformationSequence={"RescaleSlope": slope, "RescaleIntercept": -1024.0},
            )
            for z, slope, spacing in zip(positions, slopes, spacings)
        ]
    )
    dataset.NumberOfFrames = len(frames)
    dataset.InstanceNumber = instance
    dataset.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT Image Storage
    dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    dataset.SOPInstanceUID = f"{_UID}.{uid}"
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.PixelData = np.stack(frames).astype(dtype).tobytes()
    return dataset


def test_an_enhanced_multiframe_dicom_reads_spacing_order_and_rescale_from_its_functional_groups(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    source = _ct_small(pydicom)
    raw = pydicom.dcmread(source).pixel_array
    frames = [raw + 100 * k for k in range(3)]
    # stored feet-first: frame k lies at z = 20 - 3k, so patient order is frames 2, 1, 0
    dataset = _enhanced_ct(pydicom, source, frames, positions=[20, 17, 14], slopes=[1.0, 2.0, 0.5], uid=1)
    dataset.save_as(tmp_path / "enhanced.dcm")
    ((data, kwargs, kind),) = read(tmp_path / "enhanced.dcm")
    assert kind == "image" and data.shape == (3, *raw.shape) and data.dtype == np.float32
    for z, k in enumerate([2, 1, 0]):
        np.testing.assert_allclose(data[z], frames[k] * [1.0, 2.0, 0.5][k] - 1024.0)
    np.testing.assert_allclose(kwargs["scale"], [3.0, 0.7, 0.8])  # the frames' spacing, not the shared 9
    assert kwargs["units"] == ("mm",) * 3 and kwargs["metadata"]["dicom"]["frames"] == 3

    # a series split over two multi-frame files is one stack, interleaved by position even
    # where the instance numbers say otherwise
    series = tmp_path / "series"
    series.mkdir()
    _enhanced_ct(pydicom, source, frames[:2], positions=[10, 14], uid=2, instance=1).save_as(series / "a.dcm")
    _enhanced_ct(pydicom, source, frames[2:], positions=[12], uid=3, instance=0).save_as(series / "b.dcm")
    ((data, kwargs, _),) = read_layers(str(series))
    np.testing.assert_allclose(data, np.stack([frames[0], frames[2], frames[1]]) - 1024.0)
    np.testing.assert_allclose(kwargs["scale"], [2.0, 0.7, 0.8])
    assert kwargs["metadata"]["dicom"]["files"] == 2

    # a localizer among axial slices has no place in one stack: a clear error, not a scrambled volume
    _enhanced_ct(pydicom, source, frames[:1], positions=[30], uid=4, orientation=(1, 0, 0, 0, 0, -1)).save_as(
        series / "localizer.dcm"
    )
    with pytest.raises(ValueError, match="different orientations"):
        read_layers(str(series))


def test_dicom_planes_that_do_not_form_one_volume_are_refused_or_kept_in_their_order(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    source = _ct_small(pydicom)
    raw = pydicom.dcmread(source).pixel_array
    frames = [raw + 100 * k for k in range(4)]

    def refused(name, match, **kwargs):
        _enhanced_ct(pydicom, source, **kwargs).save_as(tmp_path / name)
        with pytest.raises(ValueError, match=match):
            read(tmp_path / name)

    # frames at one position (a time series) keep their frame order and get no z spacing
    _enhanced_ct(pydicom, source, frames[:3], positions=[5, 5, 5], uid=1).save_as(tmp_path / "cine.dcm")
    ((data, kwargs, _),) = read(tmp_path / "cine.dcm")
    np.testing.assert_allclose(data, np.stack(frames[:3]) - 1024.0)
    assert kwargs["scale"] == (1.0, 0.7, 0.8) and kwargs["units"] == ("pixel", "mm", "mm")
    one_place = tmp_path / "one_place"  # classic files at one position: by instance number, not file name
    one_place.mkdir()
    for uid, (name, instance) in enumerate([("a", 2), ("b", 1)]):
        dataset = pydicom.dcmread(source)
        dataset.ImageOrientationPatient, dataset.ImagePositionPatient = [1, 0, 0, 0, 1, 0], [0.0, 0.0, 5.0]
        dataset.InstanceNumber, dataset.SOPInstanceUID = instance, f"{_UID}.10{uid}"
        dataset.PixelData = frames[uid].astype(raw.dtype).tobytes()
        dataset.save_as(one_place / f"{name}.dcm")
    ((data, _, _),) = read_layers(str(one_place))
    assert data[0][0, 0] == (frames[1][0, 0] * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept))
    assert data[1][0, 0] == (frames[0][0, 0] * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept))
    # two time points of two slices, several spacings, fewer frame groups than frames
    refused("dynamic.dcm", "4 planes at 2 positions", frames=frames, positions=[0, 5, 0, 5], uid=2)
    refused(
        "spacings.dcm",
        "different pixel spacings",
        frames=frames[:2],
        positions=[0, 5],
        uid=3,
        spacings=[[0.7, 0.8], [1.4, 1.6]],
    )
    short = _enhanced_ct(pydicom, source, frames[:3], positions=[0, 5, 10], uid=4)
    del short.PerFrameFunctionalGroupsSequence[2]
    short.save_as(tmp_path / "short.dcm")
    with pytest.raises(ValueError, match="3 frames but 2 per-frame functional groups"):
        read(tmp_path / "short.dcm")

    # ultrasound clips: multi-frame files without positions are not one volume
    clips = tmp_path / "clips"
    clips.mkdir()
    for uid in (5, 6):
        clip = _enhanced_ct(pydicom, source, frames[:2], positions=[0, 0], uid=uid)
        del clip.SharedFunctionalGroupsSequence, clip.PerFrameFunctionalGroupsSequence
        clip.save_as(clips / f"clip{uid}.dcm")
    with pytest.raises(ValueError, match="without plane positions"):
        read_layers(str(clips))
    ((data, kwargs, _),) = read(clips / "clip5.dcm")  # one clip opens, frames in order
    np.testing.assert_array_equal(data, np.stack(frames[:2]))


def test_a_slice_sent_twice_counts_once_and_uneven_slices_are_flagged(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    source = _ct_small(pydicom)
    raw = pydicom.dcmread(source).pixel_array
    folder = tmp_path / "series"
    folder.mkdir()
    for z, position in enumerate([0.0, 2.5, 5.0, 10.0]):  # slice 7.5 missing
        dataset = pydicom.dcmread(source)
        dataset.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        dataset.ImagePositionPatient = [0.0, 0.0, position]
        dataset.InstanceNumber = 10 - z  # falls as z rises, as some scanners number them
        dataset.SOPInstanceUID = f"{_UID}.{z}"
        dataset.PixelData = (raw + 100 * z).astype(raw.dtype).tobytes()
        dataset.save_as(folder / f"IM{z}.dcm")
    (folder / "IM1_again.dcm").write_bytes((folder / "IM1.dcm").read_bytes())  # re-sent by the PACS
    ((data, kwargs, _),) = read_layers(str(folder))
    slope, intercept = (
        float(pydicom.dcmread(source).RescaleSlope),
        float(pydicom.dcmread(source).RescaleIntercept),
    )
    np.testing.assert_allclose(data, np.stack([raw + 100 * z for z in range(4)]) * slope + intercept)
    assert kwargs["scale"][0] == pytest.approx(2.5) and kwargs["metadata"]["dicom"]["z_steps_mm"] == [
        2.5,
        5.0,
    ]


def test_dicom_colour_and_inverted_grey_are_shown_as_meant(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    palette, clip = get_testdata_file("examples_palette.dcm"), get_testdata_file("SC_rgb_rle_2frame.dcm")
    if palette is None or clip is None:
        pytest.skip("pydicom's test files are not installed")
    ((data, kwargs, _),) = read(palette)
    stored = pydicom.dcmread(palette).pixel_array
    assert (
        data.shape == (*stored.shape, 3)
        and kwargs["rgb"]
        and "PALETTE" in kwargs["metadata"]["dicom"]["converted"]
    )
    assert len(np.unique(data.reshape(-1, 3), axis=0)) > 1
    ((data, kwargs, _),) = read(clip)  # an RGB multi-frame file: a stack of colour planes
    assert data.shape == (2, 100, 100, 3) and kwargs["rgb"]

    xray = pydicom.dcmread(_ct_small(pydicom))
    stored = np.arange(128 * 128, dtype=np.uint16).reshape(128, 128) % 4096
    xray.PixelRepresentation, xray.BitsStored, xray.PhotometricInterpretation = 0, 12, "MONOCHROME1"
    del xray.RescaleSlope, xray.RescaleIntercept
    xray.PixelData = stored.tobytes()
    xray.save_as(tmp_path / "xray.dcm")
    ((data, kwargs, _),) = read(tmp_path / "xray.dcm")
    np.testing.assert_array_equal(data, 4095 - stored)
    assert "MONOCHROME1" in kwargs["metadata"]["dicom"]["converted"]


def test_compressed_dicom_decodes_with_the_dicom_extra():
    pytest.importorskip("pydicom")
    import gdcm  # noqa: F401  the dicom extra brings it: PACS exports are often JPEG-compressed
    from pydicom.data import get_testdata_file

    plain, lossless = get_testdata_file("MR_small.dcm"), get_testdata_file("MR_small_jpeg_ls_lossless.dcm")
    jpeg2000 = get_testdata_file("MR_small_jp2klossless.dcm")
    if None in (plain, lossless, jpeg2000):
        pytest.skip("pydicom's test files are not installed")
    expected = read(plain)[0][0]
    for path in (lossless, jpeg2000):
        np.testing.assert_array_equal(read(path)[0][0], expected)


def test_a_missing_extra_is_shown_in_napari_only_through_napari(tmp_path, monkeypatch):
    """The command line and the trainer only raise; napari's reader entry point also notifies."""
    from napari_r2au import _reader

    monkeypatch.setitem(sys.modules, "pydicom", None)
    (tmp_path / "scan.dcm").write_bytes(b"")
    shown: list[str] = []
    monkeypatch.setattr(_reader, "notify_missing_extra", lambda exc: shown.append(str(exc)))
    with pytest.raises(ImportError, match=r"napari-r2au\[dicom\]"):
        read_layers(str(tmp_path / "scan.dcm"))
    assert shown == []
    reader = napari_get_reader(str(tmp_path / "scan.dcm"))
    with pytest.raises(ImportError, match=r"napari-r2au\[dicom\]"):
        reader(str(tmp_path / "scan.dcm"))
    assert len(shown) == 1 and "pip install" in shown[0]
