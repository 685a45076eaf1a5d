"""Training: ``llavatune train`` (``train.run``, the recipe), its options (``train.train_config``) and the
``Trainer`` subclass (``train.llava_trainer``)."""
