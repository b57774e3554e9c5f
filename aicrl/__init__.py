"""AICRL: image captioning with a pretrained CNN encoder and an attention LSTM decoder.

    from aicrl import Captioner
    model = Captioner.from_pretrained()          # the model shipped with the package
    print(model.caption(["photo.jpg"])[0].captions[0].text)
"""
__version__ = "0.1.0"
__all__ = ["Captioner"]


def __getattr__(name: str):
    # Imported on first use, so `aicrl --help` does not load torch.
    if name == "Captioner":
        from .model.captioner import Captioner

        return Captioner
    raise AttributeError(f"module 'aicrl' has no attribute {name!r}")
