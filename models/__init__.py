"""Vision models built from the registered attentions: backbones, the zoo, CrossViT, the matcher's network.

>>> from attnbench import models
>>> models.available()[:3]
['swin_t', 'pvt_v2_b0', 'quadtree_b_b0']
>>> model = models.create("pyramid_swin", tiny=True, num_classes=4)
"""

from .backbone import Backbone, BackboneConfig, StageConfig
from .crossvit import CrossViT, CrossViTConfig
from .video import VideoBackbone, VideoConfig, create_video, video_available, video_entry
from .zoo import Entry, Published, available, config, create, entry

__all__ = [
    "Backbone",
    "BackboneConfig",
    "CrossViT",
    "CrossViTConfig",
    "Entry",
    "Published",
    "StageConfig",
    "VideoBackbone",
    "VideoConfig",
    "available",
    "config",
    "create",
    "create_video",
    "entry",
    "video_available",
    "video_entry",
]
