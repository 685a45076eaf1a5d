"""llavatune: fine-tune LLaVA-style vision-language models on your own image-question data."""

__version__ = "0.1.0"
