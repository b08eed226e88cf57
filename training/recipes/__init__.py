"""Pretraining recipes: how the default weights of the offline models are made, above the loaders that use them.

``backbone`` (``mergeserve pretrain``: ``vit_tiny_offline``), ``vilt_scenes`` and ``film_scenes`` (``mergeserve
pretrain-vqa``, :mod:`.vqa`). Importing this package registers each recipe's builder in
:data:`training.artifacts.BUILDERS`, where a loader (``create_backbone``, ``load_vilt``, ``load_film``) finds it
when its cached weights are missing: the loaders never import a recipe, so there is no import circle.
"""

from . import backbone, film_scenes, vilt_scenes, vqa  # noqa: F401  (register the builders)
