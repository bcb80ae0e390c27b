"""beam_caption: caption large image collections with OpenAI-compatible VLMs on Apache Beam."""

__version__ = "0.1.0"

DEFAULT_SYSTEM_PROMPT = (
    "You are an image caption generator. Your task is to generate a concise and informative "
    "caption for the given image content."
)
