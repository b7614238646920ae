"""Whole-slide images: tiling by µm/px, tissue detection, QC pictures and resumable, shardable embedding.

Reading slides needs ``pip install "h0mini[wsi]"`` (openslide-python with its binary library,
scipy); importing this package does not: readers are imported when a slide is opened.
"""

from .discover import find_slides
from .embed import SlideEmbeddings, SlideStatus, embed_slide, embed_slides
from .grid import SlideRegion, SlideTiles, TilingPlan, plan_tiling, tile_slide
from .qc import qc_image, save_qc_image
from .reader import Slide, open_slide
from .shard import Shard, resolve_shard

__all__ = [
    "embed_slide", "embed_slides", "tile_slide", "find_slides", "plan_tiling", "open_slide", "qc_image",
    "save_qc_image", "resolve_shard", "Shard", "Slide", "SlideEmbeddings", "SlideStatus", "SlideRegion",
    "SlideTiles", "TilingPlan",
]
