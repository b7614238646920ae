"""Slide files the tests write for themselves: a DICOM WSI (one .dcm per level, as scanners export it)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image


def write_dicom_wsi(folder: Path, level0: np.ndarray, mpp: float, downsamples: Sequence[int] = (1, 2),
                    tile: int = 224) -> Path:
    """A DICOM WSI series (VL Whole Slide Microscopy, TILED_FULL, uncompressed RGB), one instance file
    per level in ``folder``, as OpenSlide 4 reads it (any file of the series opens the slide)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    wsi_class = "1.2.840.10008.5.1.4.1.1.77.1.6"
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    for number, factor in enumerate(downsamples, start=1):
        image = Image.fromarray(level0)
        if factor > 1:
            image = image.resize((level0.shape[1] // factor, level0.shape[0] // factor), Image.Resampling.BOX)
        pixels = np.asarray(image)
        height, width = pixels.shape[:2]
        across, down = -(-width // tile), -(-height // tile)
        padded = np.full((down * tile, across * tile, 3), 255, np.uint8)
        padded[:height, :width] = pixels
        frames = [padded[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] for r in range(down) for c in range(across)]
        instance = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = wsi_class
        meta.MediaStorageSOPInstanceUID = instance
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = wsi_class, instance
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality, ds.InstanceNumber = "SM", number
        ds.ImageType = ["ORIGINAL" if factor == 1 else "DERIVED", "PRIMARY", "VOLUME",
                        "NONE" if factor == 1 else "RESAMPLED"]
        ds.DimensionOrganizationType = "TILED_FULL"
        ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = width, height
        ds.TotalPixelMatrixFocalPlanes = 1
        ds.NumberOfFrames = len(frames)
        ds.Rows = ds.Columns = tile
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        measures = pydicom.Dataset()
        measures.PixelSpacing = [mpp * factor / 1000, mpp * factor / 1000]  # mm, rows then columns
        measures.SliceThickness = 0.001
        shared = pydicom.Dataset()
        shared.PixelMeasuresSequence = DicomSequence([measures])
        ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
        ds.PixelData = np.stack(frames).tobytes()
        ds.save_as(folder / f"level-{number}.dcm", enforce_file_format=True)
    return folder
