"""A word-level ``tokenizers`` tokenizer over the zoo vocabulary, wrapped as ``PreTrainedTokenizerFast``.

One word (split on whitespace) = one token; ``encode`` prepends ``<bos>``. ``encode_words`` is the same map
done in plain Python (used by the data pipeline; the tests check both agree).
"""

from __future__ import annotations

from functools import lru_cache

from .tasks import vocabulary

__all__ = ["make_tokenizer", "word_ids", "encode_words", "BOS", "PAD", "EOS"]

PAD, BOS, EOS = 0, 1, 2


@lru_cache(maxsize=1)
def word_ids() -> dict[str, int]:
    """Word → id for the fixed vocabulary."""
    return {w: i for i, w in enumerate(vocabulary())}


def encode_words(text: str, *, bos: bool = True) -> list[int]:
    """``text.split()`` mapped to ids (``<bos>`` first when ``bos``); an unknown word raises KeyError."""
    ids = word_ids()
    return ([BOS] if bos else []) + [ids[w] for w in text.split()]


def make_tokenizer():
    """The ``transformers.PreTrainedTokenizerFast`` (save it with ``save_pretrained``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=dict(word_ids()), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", BOS)])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", padding_side="right")
