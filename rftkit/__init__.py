"""rftkit: reinforcement fine-tuning of open LLMs with LoRA."""
__version__ = "0.1.0"
