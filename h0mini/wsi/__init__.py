"""Whole-slide images: tiling by µm/px, tissue detection, QC pictures, and cohorts of slides embedded
by any number of processes into one folder.

Reading slides needs ``pip install "h0mini[wsi]"`` (openslide-python with its binary library,
scipy); importing this package does not: readers are imported when a slide is opened.
"""

from .cohort import embed_slides
from .discover import find_slides
from .embed import SlideEmbeddings, embed_slide
from .grid import SlideRegion, SlideTiles, TilingPlan, plan_tiling, tile_slide
from .manifest import ManifestError, SlideSpec, read_manifest
from .qc import qc_image, save_qc_image
from .reader import Slide, open_slide
from .shard import Shard, resolve_shard
from .summary import SlideStatus

__all__ = [
    "embed_slide", "embed_slides", "tile_slide", "find_slides", "plan_tiling", "open_slide", "qc_image",
    "save_qc_image", "read_manifest", "resolve_shard", "ManifestError", "Shard", "Slide", "SlideEmbeddings",
    "SlideSpec", "SlideStatus", "SlideRegion", "SlideTiles", "TilingPlan",
]
