"""Masks exported as DICOM SEG on the DICOM planes their image was read from."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_r2au._reader import read_layers
from napari_r2au._writer import write_labels

pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")

UID = "1.2.826.0.1.3680043.9.9999"


def _series(folder, positions=(5.0, 0.0, 2.5)):
    """Classic single-frame CT slices from pydicom's CT_small, written out of patient order."""
    from pydicom.data import get_testdata_file

    source = get_testdata_file("CT_small.dcm")
    if source is None:
        pytest.skip("pydicom's test file is not installed")
    folder.mkdir()
    raw = pydicom.dcmread(source).pixel_array
    for index, z in enumerate(positions):
        dataset = pydicom.dcmread(source)
        dataset.ImageOrientationPatient, dataset.ImagePositionPatient = [1, 0, 0, 0, 1, 0], [0.0, 0.0, z]
        dataset.SOPInstanceUID, dataset.InstanceNumber = f"{UID}.{index}", index + 1
        dataset.PixelData = (raw + index).astype(raw.dtype).tobytes()
        dataset.save_as(folder / f"slice{index}.dcm")
    return folder


def _labels(shape):
    labels = np.zeros(shape, np.uint8)
    labels[0, 10:20, 10:40] = 1
    labels[2, 60:80, 30:50] = 3  # values need not be consecutive
    return labels


def test_a_mask_on_a_dicom_series_is_written_as_a_seg_that_maps_back_onto_its_slices(tmp_path):
    ((image, kwargs, _),) = read_layers(str(_series(tmp_path / "series")))
    sources = kwargs["metadata"]["dicom"]["sources"]
    assert [uid for _, _, uid in sources] == [f"{UID}.1", f"{UID}.2", f"{UID}.0"]  # patient order
    labels = _labels(image.shape)
    written = write_labels(str(tmp_path / "mask.dcm"), labels, {"metadata": kwargs["metadata"]})
    seg = hd.seg.segread(written[0])
    assert seg.SegmentationType == "BINARY" and seg.number_of_segments == 2
    assert seg.SeriesInstanceUID != pydicom.dcmread(sources[0][0]).SeriesInstanceUID  # a new series ...
    referenced = seg.ReferencedSeriesSequence[0]  # ... that refers to the image's
    assert referenced.SeriesInstanceUID == pydicom.dcmread(sources[0][0]).SeriesInstanceUID
    back = seg.get_pixels_by_source_instance(
        [uid for _, _, uid in sources], combine_segments=True, skip_overlap_checks=True
    )
    np.testing.assert_array_equal(back, np.where(labels == 3, 2, labels))  # segments numbered 1, 2
    descriptions = seg.SegmentSequence
    assert descriptions[1].SegmentLabel.endswith("label 3")
    # a mask no model made counts as drawn by hand
    assert {d.SegmentAlgorithmType for d in descriptions} == {"MANUAL"}
    assert seg.SeriesDescription == "napari-r2au mask"

    # saved next to its slices, the SEG opens with them as a mask over the stack, ready to be
    # corrected and exported again; opened on its own, it says what it is
    (tmp_path / "mask.dcm").rename(tmp_path / "series" / "mask.dcm")
    (again, _, kind), (mask, mask_kwargs, mask_kind) = read_layers(str(tmp_path / "series"))
    np.testing.assert_array_equal(again, image)
    assert kind == "image" and mask_kind == "labels" and mask_kwargs["name"] == "mask"
    np.testing.assert_array_equal(mask, np.where(labels == 3, 2, labels))
    assert mask_kwargs["scale"] == kwargs["scale"] and mask_kwargs["metadata"]["dicom"]["sources"] == sources
    write_labels(str(tmp_path / "again.dcm"), mask, {"metadata": mask_kwargs["metadata"]})
    ((series_only, _, _),) = read_layers(str(tmp_path / "series"), masks=False)  # r2au segment's read
    np.testing.assert_array_equal(series_only, image)
    with pytest.raises(ValueError, match="is a DICOM SEG"):
        read_layers(str(tmp_path / "series" / "mask.dcm"))


def test_a_mask_on_an_enhanced_multiframe_file_follows_the_files_frame_order(tmp_path):
    from tests.test_reader_writer import _ct_small, _enhanced_ct

    source = _ct_small(pydicom)
    raw = pydicom.dcmread(source).pixel_array
    _enhanced_ct(pydicom, source, [raw] * 3, positions=[20, 17, 14], uid=7).save_as(tmp_path / "enhanced.dcm")
    ((image, kwargs, _),) = read_layers(str(tmp_path / "enhanced.dcm"))
    assert [frame for _, frame, _ in kwargs["metadata"]["dicom"]["sources"]] == [2, 1, 0]
    labels = _labels(image.shape)
    write_labels(str(tmp_path / "mask.dcm"), labels, {"metadata": kwargs["metadata"]})
    seg = hd.seg.segread(tmp_path / "mask.dcm")
    back = seg.get_pixels_by_source_frame(
        f"{UID}.7", [1, 2, 3], combine_segments=True, skip_overlap_checks=True
    )
    np.testing.assert_array_equal(
        back, np.where(labels == 3, 2, labels)[::-1]
    )  # file frame k = stack plane 2-k
    (tmp_path / "series").mkdir()
    (tmp_path / "enhanced.dcm").rename(tmp_path / "series" / "enhanced.dcm")
    (tmp_path / "mask.dcm").rename(tmp_path / "series" / "mask.dcm")
    _, (mask, _, kind) = read_layers(str(tmp_path / "series"))
    assert kind == "labels"
    np.testing.assert_array_equal(mask, np.where(labels == 3, 2, labels))  # back in the stack's order


def test_a_seg_is_refused_without_its_dicom_sources_and_nothing_is_written(tmp_path):
    folder = _series(tmp_path / "series")
    ((image, kwargs, _),) = read_layers(str(folder))
    labels = _labels(image.shape)
    target = tmp_path / "mask.dcm"
    with pytest.raises(ValueError, match="not made on an image opened from DICOM"):
        write_labels(str(target), labels, {"metadata": {}})
    with pytest.raises(ValueError, match="one mask plane per image plane"):
        write_labels(str(target), labels[:2], {"metadata": kwargs["metadata"]})
    (folder / "slice1.dcm").rename(tmp_path / "moved.dcm")
    with pytest.raises(ValueError, match="is gone"):
        write_labels(str(target), labels, {"metadata": kwargs["metadata"]})
    other = pydicom.dcmread(tmp_path / "moved.dcm")
    other.SOPInstanceUID = f"{UID}.99"  # another instance in the same place
    other.save_as(folder / "slice1.dcm")
    with pytest.raises(ValueError, match="no longer holds"):
        write_labels(str(target), labels, {"metadata": kwargs["metadata"]})
    assert not target.exists() and list(tmp_path.glob(".*.part")) == []


def test_r2au_segment_writes_a_seg_for_a_dicom_series(tmp_path, capsys):
    import torch

    from napari_r2au import create_model
    from napari_r2au.cli import main
    from napari_r2au.model_files import build_metadata, save_model, user_models_dir

    torch.manual_seed(0)
    liver = {
        "category": {"scheme": "SCT", "value": "91723000", "meaning": "Anatomical Structure"},
        "type": {"scheme": "SCT", "value": "10200004", "meaning": "Liver"},
    }
    meta = build_metadata(
        name="grey",
        architecture="r2au_net",
        segment_property=liver,
        arch_args={"in_channels": 1, "out_channels": 1, "base_width": 4, "t": 2},
    )
    model = save_model(create_model("r2au_net", in_channels=1, base_width=4), user_models_dir(), meta)
    folder = _series(tmp_path / "series")
    assert (
        main(
            [
                "segment",
                str(folder),
                "-m",
                "grey",
                "-o",
                str(tmp_path / "out"),
                "--dicom-seg",
                "--threshold",
                "0.0",
            ]
        )
        == 0
    )
    seg = hd.seg.segread(tmp_path / "out" / "series_seg.dcm")
    description = seg.SegmentSequence[0]
    assert description.SegmentAlgorithmType == "AUTOMATIC"
    identification = description.SegmentationAlgorithmIdentificationSequence[0]
    assert identification.AlgorithmName == "grey"
    assert identification.AlgorithmVersion == json.loads(model.read_text())["weights_sha256"][:16]
    assert seg.NumberOfFrames == 3  # threshold 0: every slice holds mask
    # what the model segments, as it says (a model without codes: the generic "Tissue")
    assert description.SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Liver"
    assert description.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
    from napari_r2au.model_files import ModelFileError, validate_metadata

    with pytest.raises(ModelFileError, match="segment_property must be"):
        validate_metadata(dict(meta, segment_property={"type": liver["type"]}))
    # one file of the series: a SEG on that one instance
    assert (
        main(
            [
                "segment",
                str(folder / "slice0.dcm"),
                "-m",
                "grey",
                "-o",
                str(tmp_path / "one"),
                "--dicom-seg",
                "--threshold",
                "0.0",
            ]
        )
        == 0
    )
    one = hd.seg.segread(tmp_path / "one" / "slice0_seg.dcm")
    assert one.NumberOfFrames == 1
    assert (
        one.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == f"{UID}.0"
    )
    # a TIFF has no series to refer to
    from napari_r2au.io import write_tiff

    write_tiff(tmp_path / "plain.tif", np.zeros((32, 32), np.uint8))
    assert (
        main(["segment", str(tmp_path / "plain.tif"), "-m", "grey", "-o", str(tmp_path / "x"), "--dicom-seg"])
        == 1
    )
    assert "needs DICOM input" in capsys.readouterr().err


def test_images_a_seg_cannot_describe_give_a_clear_error(tmp_path):
    from tests.test_reader_writer import _ct_small, _enhanced_ct

    source = _ct_small(pydicom)
    raw = pydicom.dcmread(source).pixel_array
    clip = _enhanced_ct(pydicom, source, [raw] * 2, positions=[0, 0], uid=5)
    del clip.SharedFunctionalGroupsSequence, clip.PerFrameFunctionalGroupsSequence, clip.FrameOfReferenceUID
    clip.SOPClassUID = clip.file_meta.MediaStorageSOPClassUID = (
        "1.2.840.10008.5.1.4.1.1.3.1"  # US multi-frame
    )
    clip.save_as(tmp_path / "clip.dcm")
    ((image, kwargs, _),) = read_layers(str(tmp_path / "clip.dcm"))
    with pytest.raises(ValueError, match="no DICOM SEG can be made on these images"):
        write_labels(
            str(tmp_path / "seg.dcm"), np.ones(image.shape, np.uint8), {"metadata": kwargs["metadata"]}
        )
    assert not (tmp_path / "seg.dcm").exists()


def test_a_seg_of_a_run_on_some_slices_refers_to_those_slices_only(tmp_path):
    from napari_r2au.postprocess import mask_checksums

    ((image, kwargs, _),) = read_layers(str(_series(tmp_path / "series")))
    sources = kwargs["metadata"]["dicom"]["sources"]
    labels = np.zeros(image.shape, np.uint8)
    labels[1, 20:30, 20:30] = 1  # Segment ran on slice 1 only
    whole, slices = mask_checksums(labels)
    info = {
        "model": "tiny",
        "model_sha256": "ab" * 32,
        "slices": [1],
        "mask_sha256": whole,
        "slice_sha256": slices,
    }
    meta = {"metadata": {"r2au": dict(info, dicom={"sources": sources})}}
    write_labels(str(tmp_path / "one.dcm"), labels, meta)
    (tmp_path / "one.dcm").rename(tmp_path / "series" / "one.dcm")  # reopened: only slice 1 has mask
    _, (mask, _, _) = read_layers(str(tmp_path / "series"))
    np.testing.assert_array_equal(mask, labels)
    (tmp_path / "series" / "one.dcm").rename(tmp_path / "one.dcm")
    seg = hd.seg.segread(tmp_path / "one.dcm")
    referenced = [
        item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    ]
    assert referenced == [sources[1][2]] and seg.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"
    labels[2, :3, :3] = 1  # then a person drew on slice 2: it holds a result too
    write_labels(str(tmp_path / "two.dcm"), labels, meta)
    seg = hd.seg.segread(tmp_path / "two.dcm")
    referenced = {
        item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    }
    assert (
        referenced == {sources[1][2], sources[2][2]}
        and seg.SegmentSequence[0].SegmentAlgorithmType == "SEMIAUTOMATIC"
    )


def test_a_seg_on_a_2d_colour_photograph_reads_back(tmp_path):
    from pydicom.data import get_testdata_file

    photo = get_testdata_file("SC_rgb_rle.dcm")  # RGB secondary capture: pixel spacing, no slice thickness
    if photo is None:
        pytest.skip("pydicom's test file is not installed")
    ((image, kwargs, _),) = read_layers(photo)
    assert kwargs["rgb"] and image.ndim == 3
    labels = np.zeros(image.shape[:2], np.uint8)
    labels[10:40, 20:60] = 1
    write_labels(
        str(tmp_path / "photo.dcm"),
        labels,
        {"metadata": {"r2au": {"model": "m", "dicom": {"sources": kwargs["metadata"]["dicom"]["sources"]}}}},
    )
    seg = hd.seg.segread(tmp_path / "photo.dcm")
    back = seg.get_pixels_by_source_instance([pydicom.dcmread(photo).SOPInstanceUID], combine_segments=True)
    np.testing.assert_array_equal(back[0], labels)


def _manual_seg(sources, pixels, *, labelmap=False, segments=1):
    """A SEG made by another tool (highdicom directly): MANUAL segments, or a label map."""
    from pydicom.sr.codedict import codes

    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=n,
            segment_label=f"s{n}",
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for n in range(1, segments + 1)
    ]
    kind = hd.seg.SegmentationTypeValues.LABELMAP if labelmap else hd.seg.SegmentationTypeValues.BINARY
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixels,
        segmentation_type=kind,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=1,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="elsewhere",
        manufacturer_model_name="x",
        software_versions="1",
        device_serial_number="1",
    )


def test_segs_from_elsewhere_open_over_their_series_and_a_bad_one_never_blocks_the_image(
    tmp_path, recwarn, monkeypatch
):
    folder = _series(tmp_path / "series")
    ((image, kwargs, _),) = read_layers(str(folder))
    sources = kwargs["metadata"]["dicom"]["sources"]
    headers = [pydicom.dcmread(path) for path, _, _ in sources]
    labels = np.zeros(image.shape, np.uint8)
    labels[0, 10:30, 10:30], labels[2, 40:50, 40:50] = 1, 2
    # another SOP class, on slices 0 and 2 only
    _manual_seg([headers[0], headers[2]], labels[[0, 2]], labelmap=True, segments=2).save_as(
        folder / "labelmap.dcm"
    )
    broken = pydicom.dcmread(folder / "labelmap.dcm")
    broken.Rows = 64  # its frames no longer fit its pixel data
    broken.save_as(folder / "broken.dcm")
    (_, _, _), (placed, placed_kwargs, kind) = read_layers(str(folder))
    assert kind == "labels" and placed_kwargs["name"] == "labelmap"
    np.testing.assert_array_equal(placed, labels)
    # skipped with a warning; the image opened
    assert any("broken.dcm" in str(w.message) for w in recwarn.list)
    # napari's reader says it in the viewer too (the decoding itself knows nothing of napari)
    import napari.utils.notifications

    from napari_r2au._reader import napari_get_reader

    shown = []
    monkeypatch.setattr(napari.utils.notifications, "show_warning", shown.append)
    assert len(napari_get_reader(str(folder))(str(folder))) == 2
    assert any("broken.dcm" in message for message in shown)

    # reopened and exported again unedited, a person's SEG stays MANUAL and covers its slices
    info = placed_kwargs["metadata"]["r2au"]
    assert info["algorithm_type"] == "MANUAL" and info["slices"] == [0, 2] and "slice_sha256" not in info
    edited = placed.copy()
    edited[1, :5, :5] = 1  # drawn on a slice the SEG did not cover: the re-export adds it
    write_labels(str(tmp_path / "again.dcm"), edited, {"metadata": placed_kwargs["metadata"]})
    again = hd.seg.segread(tmp_path / "again.dcm")
    referenced = {
        i.ReferencedSOPInstanceUID for i in again.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    }
    assert referenced == {sources[z][2] for z in (0, 1, 2)}
    assert {d.SegmentAlgorithmType for d in again.SegmentSequence} == {"MANUAL"}


def test_a_models_seg_reopened_keeps_its_provenance_and_frames_without_mask(tmp_path):
    from tests.test_reader_writer import _ct_small, _enhanced_ct

    source = _ct_small(pydicom)
    raw = pydicom.dcmread(source).pixel_array
    folder = tmp_path / "series"
    folder.mkdir()
    _enhanced_ct(pydicom, source, [raw] * 3, positions=[20, 17, 14], uid=8).save_as(folder / "enhanced.dcm")
    ((image, kwargs, _),) = read_layers(str(folder))
    labels = np.zeros(image.shape, np.uint8)
    labels[2, 5:15, 5:15] = 1  # stack plane 2 is the file's frame 0: frames 2 and 3 hold no mask
    meta = {"r2au": {"model": "tiny", "model_sha256": "cd" * 32, "dicom": kwargs["metadata"]["dicom"]}}
    meta["r2au"]["mask_sha256"] = __import__("napari_r2au.postprocess").postprocess.mask_checksum(labels)
    write_labels(str(folder / "auto.dcm"), labels, {"metadata": meta})
    _, (placed, placed_kwargs, _) = read_layers(str(folder))
    np.testing.assert_array_equal(placed, labels)
    info = placed_kwargs["metadata"]["r2au"]
    assert (
        info["algorithm_type"] == "AUTOMATIC"
        and info["model"] == "tiny"
        and info["algorithm_version"] == "cd" * 8
    )
    write_labels(str(tmp_path / "unedited.dcm"), placed, {"metadata": placed_kwargs["metadata"]})
    unedited = hd.seg.segread(tmp_path / "unedited.dcm")
    identification = unedited.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert unedited.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"
    assert (identification.AlgorithmName, identification.AlgorithmVersion) == ("tiny", "cd" * 8)


def test_a_folder_of_series_with_their_segs_is_training_data(tmp_path):
    from napari_r2au.postprocess import mask_checksums
    from napari_r2au.training.data import DataError, dicom_samples, series_of, split
    from napari_r2au.training.trainer import TrainConfig, load_samples, train

    root = tmp_path / "cases"
    root.mkdir()
    for case in ("case1", "case2"):
        folder = _series(root / case)
        ((image, kwargs, _),) = read_layers(str(folder))
        labels = np.zeros(image.shape, np.uint8)
        labels[1, 30:60, 40:80] = 1  # a run on slice 1 only: the SEG covers that slice
        whole, slices = mask_checksums(labels)
        info = {
            "model": "tiny",
            "slices": [1],
            "mask_sha256": whole,
            "slice_sha256": slices,
            "dicom": kwargs["metadata"]["dicom"],
        }
        write_labels(str(folder / "mask.dcm"), labels, {"metadata": {"r2au": info}})
    config = TrainConfig(
        in_channels=1,
        data={"kind": "dicom", "root": str(root)},
        base_width=4,
        patch_size=32,
        batch_size=2,
        steps=2,
        val_every=2,
        val_images=1,
        output_dir=str(tmp_path / "run"),
        normalization={"kind": "scale", "min": -160, "max": 240, "clip": True},
    )
    samples = load_samples(config)
    assert [s.name for s in samples] == ["case1[1]", "case2[1]"]
    owner = samples[0].raw if samples[0].raw.base is None else samples[0].raw.base
    assert owner.nbytes == samples[0].raw.nbytes  # its own slice, not a view that keeps the series alive
    assert [s.name for s in split(samples, 0, 0, ["case2"])[1]] == ["case2[1]"]  # a series by its name
    train_part, val_part = split(samples, 1, 0, by_series=True)
    assert {series_of(s) for s in train_part}.isdisjoint(series_of(s) for s in val_part)
    # z-scores: a slice is normalized with its whole series' statistics, as Segment normalizes the series
    from napari_r2au.engine import normalization_statistics

    zscored = dicom_samples(root)[0]
    mean, std = normalization_statistics(image, 1, "ZYX")
    np.testing.assert_allclose(zscored.statistics, (mean, std))
    np.testing.assert_allclose(zscored.image, (zscored.raw - mean) / std, rtol=1e-5, atol=1e-5)
    with pytest.raises(DataError, match="resizing by"):
        dicom_samples(root, pixel_size=0.5, pixel_size_unit="um")  # a unit slip, not a 1300x resize
    one = dicom_samples(root, class_map={1: 1}, normalization={"kind": "scale"})
    assert int(one[0].mask.sum()) == 30 * 40  # segment numbers: 0 needs no entry
    assert int(samples[0].mask.sum()) == 30 * 40 and samples[0].image.shape[:2] == image.shape[1:]
    spacing = float(kwargs["scale"][-1])
    halved = dicom_samples(
        root, pixel_size=2 * spacing, pixel_size_unit="mm", normalization={"kind": "scale"}
    )  # resized to 2x the pixel size
    assert halved[0].mask.shape == (64, 64) and int(halved[0].mask.sum()) == 15 * 20
    result = train(config)
    assert result.steps == 2 and result.best is not None and result.best.is_file()

    (root / "case2" / "mask.dcm").unlink()
    with pytest.raises(DataError, match="case2: 0 DICOM SEG files"):
        load_samples(config)
