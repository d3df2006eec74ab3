"""MedLLM Day-1: a reproducible, evidence-first medical LLM fine-tuning pipeline."""
__version__ = "0.1.0"
