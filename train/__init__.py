"""Training harness: LLaMA from configs, C4 streaming, the torchrun loop. Imports apollo/, never the reverse."""
