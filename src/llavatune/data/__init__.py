"""Data: the record type, reading users' files, templates, images and encoding, plus the data commands.

``llavatune prepare`` (``data.prepare``), ``llavatune check`` (``data.check``) and ``llavatune synth``
(``data.synth``); the rest is library code that ``train``, ``eval`` and ``predict`` share (see docs/architecture.md).
"""
