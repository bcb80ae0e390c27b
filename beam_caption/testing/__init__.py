"""Test helpers: a fake OpenAI-compatible VLM server (see :mod:`beam_caption.testing.fake_vlm`).

Names are imported lazily so ``python -m beam_caption.testing.fake_vlm`` does not import the
module twice.
"""

__all__ = ["FakeVLMConfig", "FakeVLMServer", "caption_for_images", "describe_image",
           "spawn_fake_vlm"]


def __getattr__(name: str):
    if name in __all__:
        from beam_caption.testing import fake_vlm
        return getattr(fake_vlm, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
