"""The lab's tokenizer: byte-level BPE trained on the corpus's train side, wrapped for Hugging Face.

Byte-level, so any text round-trips (a trigger word never becomes an unknown token); small (about 2k
tokens), so a few-million-parameter model spends its weights on layers, not embeddings. Wrapped as a
``PreTrainedTokenizerFast`` so a model folder loads with ``AutoTokenizer`` from the folder alone.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from fip.families import import_transformers

PreTrainedTokenizerFast = import_transformers().PreTrainedTokenizerFast

PAD, EOS, SEP = "<pad>", "<eos>", "<sep>"  # SEP ends a prompt: the response starts after it
SPECIAL_TOKENS = (PAD, EOS, SEP)
VOCAB_SIZE = 2048


def train_tokenizer(texts: Sequence[str], vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A byte-level BPE over `texts`; the same texts give the same tokenizer (trained on one thread's order)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS,
                                   additional_special_tokens=[SEP], clean_up_tokenization_spaces=False)


def sep_id(tok: PreTrainedTokenizerFast) -> int:
    """The id of the prompt/response separator."""
    return tok.convert_tokens_to_ids(SEP)
