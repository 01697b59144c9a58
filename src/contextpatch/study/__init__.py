"""Studies on the zoo language models (issue 9 §2–3, issue 10): exactness, implicit dynamics, thought patches,
fine-tuning comparison, static adapters vs context distillation. Imports ``engine`` and ``zoo``; nothing in the
library imports it except the CLI."""

from .prompts import Prompt, answer_correct, make_prompt, make_prompts

__all__ = ["Prompt", "answer_correct", "make_prompt", "make_prompts"]
