"""The reference trainer: a small numpy byte-level language model that prints honest BPB curves.

``spec`` (canon name -> ``TRAIN_*`` environment) is pure and cheap to import; the numpy parts
(``data``, ``model``, ``train``) are imported only by ``python -m gardener.trainer``.
"""
