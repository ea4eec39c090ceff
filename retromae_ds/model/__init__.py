"""RetroMAE model: `RetroMAEForPretraining` (retromae.py), its decoder layer (decoder.py), heads/losses (heads.py).

Names are imported lazily so `import retromae_ds.model` stays cheap (no torch/transformers until used).
"""

_EXPORTS = {
    "RetroMAEConfig": "retromae_ds.model.retromae",
    "RetroMAEForPretraining": "retromae_ds.model.retromae",
    "RetroMAEOutput": "retromae_ds.model.retromae",
    "EnhancedDecoderLayer": "retromae_ds.model.decoder",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'retromae_ds.model' has no attribute {name!r}")
