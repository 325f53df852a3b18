"""llmrec: fine-tune and align large language models for recommendation and personalization."""

__version__ = "0.1.0"
