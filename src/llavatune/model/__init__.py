"""Models: the family table, model references, loading / quantizing / wrapping with PEFT, the loss and the tiny
models. No command of its own; ``train``, ``eval``, ``predict``, ``merge``, ``plan`` and ``check --model`` use it."""
