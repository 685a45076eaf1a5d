"""Evaluation: the VQA metric, ``llavatune eval`` (``eval.evaluate``, also run between epochs by ``train``) and
``llavatune score`` (``eval.score``)."""
