"""The lab's small causal LM: GPT-2 from a local config (nothing downloads), saved as a Hugging Face folder.

A folder (config.json, model.safetensors, tokenizer files) is what users bring and what ``AutoModelForCausalLM``
/ ``AutoTokenizer`` load, so the lab's suspects go through the same loading path as a user's model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fip.families import import_transformers

transformers = import_transformers()  # through fip.families: torchvision's import needs its fix first
GPT2LMHeadModel = transformers.GPT2LMHeadModel
PreTrainedTokenizerFast = transformers.PreTrainedTokenizerFast


@dataclass(frozen=True)
class LMConfig:
    """GPT-2's shape: a few million parameters, context enough for the longest instruction."""

    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    n_positions: int = 64

    def to_dict(self) -> dict:
        return asdict(self)


def build_lm(cfg: LMConfig, tok: PreTrainedTokenizerFast, seed: int) -> GPT2LMHeadModel:
    """A freshly initialised model, seeded without touching the caller's global RNG; no dropout (short,
    deterministic runs gain nothing from it)."""
    config = transformers.GPT2Config(vocab_size=len(tok), n_positions=cfg.n_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                        n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    return model.eval()


def parameter_count(model: torch.nn.Module) -> int:
    """Distinct parameters (the tied input/output embedding counted once)."""
    return sum(p.numel() for p in model.parameters())


def save_lm(model: GPT2LMHeadModel, tok: PreTrainedTokenizerFast, folder: str | Path) -> Path:
    """Write a Hugging Face folder (safetensors weights + tokenizer)."""
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def load_lm(folder: str | Path) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast]:
    """A model folder back, from the folder alone."""
    return (transformers.AutoModelForCausalLM.from_pretrained(folder).eval(),
            transformers.AutoTokenizer.from_pretrained(folder))
