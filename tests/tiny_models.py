"""Tiny randomly initialised HF models and data written by the tests, in the layouts the clip8 and math
suites read from local paths (nothing downloaded)."""

import json

import numpy as np
from PIL import Image


def bytes_to_unicode():
    """GPT-2 / CLIP byte-level alphabet: every byte as a printable character."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def tiny_clip(folder, image_size=32):
    """A 2-layer CLIP (vision + text) with a character-level CLIP tokenizer and a processor config."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in bytes_to_unicode().values():
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            max_position_embeddings=64,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            **small,
        ),
        vision_config=dict(image_size=image_size, patch_size=8, **small),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "CLIPImageProcessor",
                "crop_size": {"height": image_size, "width": image_size},
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
            }
        )
    )
    for name in ("vocab.json", "merges.txt"):
        (folder / name).unlink(missing_ok=True)  # the saved tokenizer files are what load
    return folder


def image_folders(root, datasets, classes=("red_square", "green_circle", "blue"), n=(6, 3)):
    """``root/<dataset>/{train,test}/<class>/*.png``: solid colours with noise, class-dependent."""
    rng = np.random.default_rng(0)
    for d in datasets:
        for split, count in zip(("train", "test"), n, strict=True):
            for ci, c in enumerate(classes):
                folder = root / d / split / c
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(count):
                    img = np.zeros((40, 48, 3), np.uint8) + rng.integers(0, 60, (40, 48, 3), dtype=np.uint8)
                    img[..., ci] = 200
                    Image.fromarray(img).save(folder / f"{i}.png")
    return root


def tiny_llama(folder, texts, vocab_size=200, **config):
    """A 2-layer Llama and a byte-level BPE tokenizer trained on ``texts``; ``config`` overrides
    ``LlamaConfig`` fields (e.g. a larger ``initializer_range``, so that a few LoRA steps move the loss)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **config,
    )
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def gsm8k_jsonl(root, task, pairs, repeat=1):
    """``root/<task>/{train,test}.jsonl`` with ``{"question", "answer"}`` rows, answers ending in ####."""
    folder = root / task
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"question": q, "answer": f"{a} #### {a}"} for q, a in pairs] * repeat
    for split in ("train", "test"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root
