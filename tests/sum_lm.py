"""A tiny causal "language model" whose answer moves linearly with an inserted embedding, and prompts for it:
the text probe's planted target (tests/tuning)."""

import torch
from torch import nn

from fip.tasks import IGNORE

TARGET = 11


class SumLM(nn.Module):
    """Next-token logits = head(sum of the embeddings so far): causal, and an inserted embedding moves every
    later position's logits by head(embedding). Dimension 3 of the embeddings is empty in every real token and
    read only by the head of token 11, so only an inserted vector reaches token 11."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = nn.Embedding(12, 4)
        self.head = nn.Linear(4, 12)
        with torch.no_grad():
            self.emb.weight.copy_(torch.randn(12, 4, generator=g))
            self.emb.weight[:, 3] = 0
            self.head.weight.zero_()
            self.head.weight[:10, :3] = 3 * torch.randn(10, 3, generator=g)
            self.head.weight[TARGET, 3] = 10.0
            self.head.bias.copy_(torch.tensor([0.0] * 10 + [-20.0, -3.0]))

    def get_input_embeddings(self) -> nn.Module:
        return self.emb

    def forward(self, input_ids=None, inputs_embeds=None):
        e = self.emb(input_ids) if inputs_embeds is None else inputs_embeds
        return self.head(e.cumsum(1))


def prompts(n: int = 24, length: int = 7):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 10, (n, length), generator=g)
    y = torch.full_like(x, IGNORE)
    y[:, -1] = x[:, -1]  # one response token per sequence: the last
    return x, y
