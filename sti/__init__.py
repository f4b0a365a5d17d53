"""STI: Speedy Transformer Inference.

Runs BERT-family encoders and LLaMA-family decoders with a NumPy runtime. Importing ``sti``
is cheap: the heavy pieces load on first use.

    >>> import sti
    >>> enc = sti.Encoder.load("minilm")
    >>> enc.embed(["a sentence"]).shape
    (1, 384)
"""

__version__ = "0.1.0"

__all__ = ["Encoder", "Generator", "STIError", "load_checkpoint"]


def __getattr__(name):
    if name in ("Encoder", "Generator"):
        from sti import api

        return getattr(api, name)
    if name == "STIError":
        from sti.errors import STIError

        return STIError
    if name == "load_checkpoint":
        from sti.loaders import load_checkpoint

        return load_checkpoint
    raise AttributeError(f"module 'sti' has no attribute {name!r}")
