"""The old name of :mod:`llavatune.data.shapes` (the built-in shapes VQA set), kept only until the branches that
still import it are merged; import ``llavatune.data.shapes``."""

from llavatune.data.shapes import *  # noqa: F401,F403
from llavatune.data.shapes import LAYOUT_FILES, make_shapes_vqa  # noqa: F401
