"""``contextpatch.zoo``: small language models that really learn in context, with their task language,
data, training and evaluation. Independent of ``contextpatch.engine`` (transformers, tokenizers, torch, numpy).

>>> from contextpatch import zoo
>>> zoo.list_models()
['icl-gpt2', 'icl-llama']
"""

from .evaluate import evaluate, evaluate_model, load_zoo_model
from .registry import RECIPES, list_models, path, recipe
from .tasks import FAMILIES, Example, FactsTask, FunctionTask, InstructionTask, vocabulary
from .tokenizer import make_tokenizer
from .train import TrainConfig, train

__all__ = ["FAMILIES", "Example", "FactsTask", "FunctionTask", "InstructionTask", "RECIPES", "TrainConfig",
           "evaluate", "evaluate_model", "list_models", "load_zoo_model", "make_tokenizer", "path", "recipe", "train",
           "vocabulary"]
