"""lit_gen: train image diffusion teachers and distill them into few-step and one-step students."""

__version__ = "0.1.0"
