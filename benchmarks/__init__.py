"""Efficiency benchmarks of S2FT against its lower bound, full fine-tuning and LoRA."""
