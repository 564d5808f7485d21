#!/usr/bin/env python
"""Build tiny random Gemma 4 target/drafter checkpoints in the on-disk formats of the released models.

Every kind is a folder ``<out>/<kind>/`` holding ``target/`` and ``assistant/``:

========== ========================================================================================
kind       what
========== ========================================================================================
e2b        ``gemma4`` Gemma4ForConditionalGeneration, PLE, KV sharing, double-wide MLP, 4:1 pattern,
           tiny vision + audio towers; ``gemma4_assistant`` drafter with the centroid (masked) head
e2b-text   the e2b target saved as text-only ``Gemma4ForCausalLM`` (``gemma4_text``, keys ``model.*``)
           + the e2b drafter
moe        26B-A4B-like: MoE block, attention_k_eq_v, 2 sliding / 1 global KV heads, vision tower;
           dense-head drafter
dense      31B-like dense, attention_k_eq_v, 5:1; config keeps transformers' ``per_layer_config``
           form (no ``global_head_dim`` key) so loaders are tested on both forms
unified    12B ``gemma4_unified`` (Gemma4UnifiedForConditionalGeneration) + ``gemma4_unified_assistant``
e2b-mlx    e2b target converted by ``mlx_lm.convert`` (float32) + drafter in the mlx layout (float32)
moe-mlx    moe target converted by ``mlx_lm.convert`` (float32) + drafter in the mlx layout (float32)
moe-mlx-4bit  moe target, ``mlx_lm.convert`` 4-bit affine, group 64 (router 8-bit) + bf16 mlx drafter
e2b-mlx-4bit  e2b target, ``mlx_lm.convert`` 4-bit affine, group 32 + bf16 mlx drafter
agree      e2b-style pair built so greedy speculative decoding gets a mix of full/partial/zero acceptance
========== ========================================================================================

All HF checkpoints are float32 with fixed seeds; identity-initialised weights (norm scales,
``layer_scalar``, router scales) are randomised. ``config.json`` files are rewritten to look like
released ones (see ``scripts/FIXTURES.md``). Each target folder carries the same tiny Gemma-style
tokenizer (vocab 512, ``<turn|>`` = 106) and a ``generation_config.json``.

Usage: ``python scripts/make_fixtures.py [--out fixtures/] [--force] [--kinds e2b,moe]``.
A kind is skipped when ``<out>/<kind>/.complete`` exists with the kind's current version
(``FIXTURE_VERSION`` / ``KIND_VERSIONS``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path

FIXTURE_VERSION = 2
# per-kind overrides: bump a kind's version when only its recipe changes, so cached copies of
# that kind get rebuilt without rebuilding (and disturbing) the others
KIND_VERSIONS = {"agree": 3}


def kind_version(kind: str) -> int:
    return KIND_VERSIONS.get(kind, FIXTURE_VERSION)

VOCAB = 512
SLIDING_WINDOW = 32
S, F = "sliding_attention", "full_attention"
EOS_IDS = [1, 106]
TURN_OPEN, TURN_CLOSE = "<|turn>", "<turn|>"

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<|turn>{{ role }}\n{{ message['content'] | trim }}<turn|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)

# Target/drafter dimensions of every kind. These dicts are also written to <out>/manifest.json.
SPECS: dict[str, dict] = {
    "e2b": dict(
        seed=1,
        arch="Gemma4ForConditionalGeneration",
        target=dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=8,
            layer_types=[S, S, S, S, F, S, S, F],
            num_attention_heads=4,
            num_key_value_heads=1,
            num_global_key_value_heads=None,
            head_dim=32,
            global_head_dim=64,
            attention_k_eq_v=False,
            hidden_size_per_layer_input=32,
            vocab_size_per_layer_input=VOCAB,
            num_kv_shared_layers=3,
            use_double_wide_mlp=True,
            enable_moe_block=False,
            final_logit_softcapping=30.0,
            max_position_embeddings=131072,
            use_bidirectional_attention=None,
        ),
        towers=("vision", "audio"),
        producers={S: 3, F: 4},
        drafter=dict(
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=1,
            num_global_key_value_heads=None,
            attention_k_eq_v=False,
            use_ordered_embeddings=True,
            num_centroids=16,
            centroid_intermediate_top_k=4,
            max_position_embeddings=131072,
        ),
    ),
    "moe": dict(
        seed=3,
        arch="Gemma4ForConditionalGeneration",
        target=dict(
            hidden_size=128,
            intermediate_size=128,
            num_hidden_layers=8,
            layer_types=[S, S, S, S, S, F, S, F],
            num_attention_heads=4,
            num_key_value_heads=2,
            num_global_key_value_heads=1,
            head_dim=32,
            global_head_dim=64,
            attention_k_eq_v=True,
            hidden_size_per_layer_input=0,
            vocab_size_per_layer_input=VOCAB,
            num_kv_shared_layers=0,
            use_double_wide_mlp=False,
            enable_moe_block=True,
            num_experts=8,
            top_k_experts=2,
            moe_intermediate_size=64,
            final_logit_softcapping=30.0,
            max_position_embeddings=262144,
            use_bidirectional_attention="vision",
        ),
        towers=("vision",),
        producers={S: 6, F: 7},
        drafter=dict(
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_global_key_value_heads=1,
            attention_k_eq_v=True,
            use_ordered_embeddings=False,
            max_position_embeddings=262144,
        ),
    ),
    "dense": dict(
        seed=4,
        arch="Gemma4ForConditionalGeneration",
        config_form="per_layer_config",
        target=dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=6,
            layer_types=[S, S, S, S, S, F],
            num_attention_heads=8,
            num_key_value_heads=4,
            num_global_key_value_heads=2,
            head_dim=32,
            global_head_dim=64,
            attention_k_eq_v=True,
            hidden_size_per_layer_input=0,
            vocab_size_per_layer_input=VOCAB,
            num_kv_shared_layers=0,
            use_double_wide_mlp=False,
            enable_moe_block=False,
            final_logit_softcapping=30.0,
            max_position_embeddings=262144,
            use_bidirectional_attention="vision",
        ),
        towers=("vision",),
        producers={S: 4, F: 5},
        drafter=dict(
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=8,
            num_key_value_heads=4,
            num_global_key_value_heads=2,
            attention_k_eq_v=True,
            use_ordered_embeddings=False,
            max_position_embeddings=262144,
        ),
    ),
    "unified": dict(
        seed=5,
        arch="Gemma4UnifiedForConditionalGeneration",
        target=dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=6,
            layer_types=[S, S, S, S, S, F],
            num_attention_heads=4,
            num_key_value_heads=2,
            num_global_key_value_heads=1,
            head_dim=32,
            global_head_dim=64,
            attention_k_eq_v=True,
            num_kv_shared_layers=0,
            use_double_wide_mlp=False,
            final_logit_softcapping=30.0,
            max_position_embeddings=262144,
            use_bidirectional_attention="vision",
        ),
        towers=("vision", "audio"),
        producers={S: 4, F: 5},
        drafter=dict(
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_global_key_value_heads=1,
            attention_k_eq_v=True,
            use_ordered_embeddings=False,
            max_position_embeddings=262144,
        ),
    ),
}
SPECS["e2b-text"] = dict(SPECS["e2b"], arch="Gemma4ForCausalLM", towers=())
# The agree pair: e2b geometry, seeded separately, weights shaped by build_agree().
SPECS["agree"] = dict(SPECS["e2b"], seed=7)

# kind -> (source kind, quantize?, group size)
MLX_KINDS = {
    "e2b-mlx": ("e2b", False, None),
    "moe-mlx": ("moe", False, None),
    "moe-mlx-4bit": ("moe", True, 64),
    "e2b-mlx-4bit": ("e2b", True, 32),
}
ALL_KINDS = ["e2b", "e2b-text", "moe", "dense", "unified", *MLX_KINDS, "agree"]
DEPENDS = {"e2b-text": ["e2b"], **{k: [v[0]] for k, v in MLX_KINDS.items()}}

# Names (suffixes) of weights that transformers initialises to an identity.
IDENTITY_SUFFIXES = ("norm.weight", "layer_scalar", "router.scale", "router.per_expert_scale")
TOWER_PREFIXES = ("vision_tower", "audio_tower", "embed_vision", "embed_audio", "vision_embedder")

# Parameters of the agree pair (found by scripts/FIXTURES.md "agree" tuning; see build_agree()).
AGREE = dict(
    n_clusters=16,  # = drafter num_centroids; token_ordering groups tokens by cluster
    center_scale=1.0,  # cluster centre std (relative to token noise 1.0)
    branch_scale=0.075,  # target residual-branch output norms (post-attn/post-ffw/PLE) scale
    drafter_branch_scale=0.05,
    anti_scale=0.7,  # layer-0 anti-repeat attention branch scale
    misleading=0.0625,  # fraction of tokens per cluster for which the drafter proposes a wrong token
)


def log(msg: str) -> None:
    print(f"[make_fixtures] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------


def _tokenizer_corpus() -> list[str]:
    """A few stdlib source files (offline, stable enough) cut into 4-line chunks."""
    import string
    import textwrap

    files = [os.__file__, textwrap.__file__, string.__file__, json.__file__, argparse.__file__]
    chunks = []
    for f in files:
        lines = Path(f).read_text(encoding="utf-8").splitlines()
        chunks += ["\n".join(lines[i : i + 4]) for i in range(0, len(lines), 4)]
    chunks += ["The quick brown fox jumps over the lazy dog. " * 3, "Hello world! How are you today?"]
    return chunks


# Ids 0 <pad>, 1 <eos>, 2 <bos>, 3 <unk> come first; then these, so <|turn> is 105, <turn|> 106.
TOKENIZER_SPECIALS = ["<mask>", "[multimodal]"] + [f"<unused{i}>" for i in range(99)] + [TURN_OPEN, TURN_CLOSE]


def save_gemma_tokenizer(spm_model: bytes, dst: Path, vocab: int):
    """Write a trained sentencepiece BPE model (specials as above) into ``dst`` in the Gemma
    layout the loader reads: tokenizer.json (converted by transformers), tokenizer_config.json
    with the chat template, chat_template.jinja. Checks the vocabulary size and the turn ids
    the rest of the project relies on; returns the tokenizer as loaded back from ``dst``."""
    from transformers import AutoTokenizer

    tmp = dst / "_spm"
    tmp.mkdir(exist_ok=True)
    (tmp / "tokenizer.model").write_bytes(spm_model)
    (tmp / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GemmaTokenizer"}))
    # transformers converts the sentencepiece model to a tokenizers BPE (GemmaTokenizer layout)
    tok = AutoTokenizer.from_pretrained(str(tmp), add_bos_token=True)
    tok.save_pretrained(str(tmp / "out"))
    shutil.copy(tmp / "out" / "tokenizer.json", dst / "tokenizer.json")
    shutil.rmtree(tmp)
    cfg = {
        "add_bos_token": True,
        "add_eos_token": False,
        "backend": "tokenizers",
        "bos_token": "<bos>",
        "chat_template": CHAT_TEMPLATE,
        "eos_token": "<eos>",
        "extra_special_tokens": [TURN_OPEN, TURN_CLOSE],
        "mask_token": "<mask>",
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<pad>",
        "padding_side": "left",
        "tokenizer_class": "GemmaTokenizer",
        "unk_token": "<unk>",
    }
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    (dst / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    check = AutoTokenizer.from_pretrained(str(dst))
    assert len(check) == vocab, len(check)
    assert check.convert_tokens_to_ids([TURN_OPEN, TURN_CLOSE]) == [105, 106]
    return check


def build_tokenizer(dst: Path) -> None:
    """Gemma-style BPE tokenizer, vocab exactly 512: 0 <pad>, 1 <eos>, 2 <bos>, 3 <unk>, 4 <mask>,
    5 [multimodal], 6..104 <unused0..98>, 105 <|turn>, 106 <turn|>; adds <bos> by default."""
    import sentencepiece as spm

    dst.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_tokenizer_corpus()),
        model_writer=model,
        vocab_size=VOCAB,
        model_type="bpe",
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=TOKENIZER_SPECIALS,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        character_coverage=1.0,
        byte_fallback=False,  # 256 byte pieces do not fit a 512 vocab next to 107 specials
        split_digits=True,
        allow_whitespace_only_pieces=True,
        num_threads=1,
        minloglevel=2,
    )
    check = save_gemma_tokenizer(model.getvalue(), dst, VOCAB)
    assert check("hi").input_ids[0] == 2


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def copy_tokenizer(tok_dir: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        shutil.copy(tok_dir / name, dst / name)


# ----------------------------------------------------------------------------------------------
# HF model construction
# ----------------------------------------------------------------------------------------------


def _text_config_kwargs(t: dict, unified: bool) -> dict:
    kw = dict(t)
    kw.update(
        vocab_size=VOCAB,
        sliding_window=SLIDING_WINDOW,
        rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
        attention_bias=False,
    )
    if kw.get("num_global_key_value_heads") is None:
        kw.pop("num_global_key_value_heads", None)
    if unified:
        for k in ("hidden_size_per_layer_input", "vocab_size_per_layer_input", "enable_moe_block"):
            kw.pop(k, None)
    return kw


def build_target_config(spec: dict):
    import transformers as tf

    unified = spec["arch"].startswith("Gemma4Unified")
    tkw = _text_config_kwargs(spec["target"], unified)
    if spec["arch"] == "Gemma4ForCausalLM":
        return tf.Gemma4TextConfig(**tkw)
    towers = spec["towers"]
    if unified:
        text = tf.Gemma4UnifiedTextConfig(**tkw)
        vision = (
            tf.Gemma4UnifiedVisionConfig(
                patch_size=4, pooling_kernel_size=2, mm_embed_dim=32, mm_posemb_size=16, output_proj_dims=32
            )
            if "vision" in towers
            else None
        )
        audio = tf.Gemma4UnifiedAudioConfig(audio_embed_dim=64) if "audio" in towers else None
        return tf.Gemma4UnifiedConfig(text_config=text, vision_config=vision, audio_config=audio, eos_token_id=EOS_IDS)
    text = tf.Gemma4TextConfig(**tkw)
    vision = (
        tf.Gemma4VisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=16,
            position_embedding_size=64,
        )
        if "vision" in towers
        else None
    )
    # subsampling_conv_channels[0] must stay 128 (mel bins): transformers sizes input_proj_linear from it
    audio = (
        tf.Gemma4AudioConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            subsampling_conv_channels=[128, 32],
            output_proj_dims=64,
        )
        if "audio" in towers
        else None
    )
    return tf.Gemma4Config(text_config=text, vision_config=vision, audio_config=audio, eos_token_id=EOS_IDS)


def build_drafter_config(spec: dict):
    import transformers as tf

    unified = spec["arch"].startswith("Gemma4Unified")
    t, d = spec["target"], spec["drafter"]
    tkw = dict(
        vocab_size=VOCAB,
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_hidden_layers=4,
        layer_types=[S, S, S, F],
        num_attention_heads=d["num_attention_heads"],
        num_key_value_heads=d["num_key_value_heads"],
        head_dim=t["head_dim"],
        global_head_dim=t["global_head_dim"],
        attention_k_eq_v=d["attention_k_eq_v"],
        num_kv_shared_layers=4,
        use_double_wide_mlp=False,
        final_logit_softcapping=None,
        sliding_window=SLIDING_WINDOW,
        max_position_embeddings=d["max_position_embeddings"],
        rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
        use_bidirectional_attention=None,
    )
    if d.get("num_global_key_value_heads") is not None:
        tkw["num_global_key_value_heads"] = d["num_global_key_value_heads"]
    head = dict(
        backbone_hidden_size=t["hidden_size"],
        use_ordered_embeddings=d["use_ordered_embeddings"],
        tie_word_embeddings=True,
    )
    if d["use_ordered_embeddings"]:
        head.update(num_centroids=d["num_centroids"], centroid_intermediate_top_k=d["centroid_intermediate_top_k"])
    if unified:
        return tf.Gemma4UnifiedAssistantConfig(text_config=tf.Gemma4UnifiedTextConfig(**tkw), **head)
    tkw.update(hidden_size_per_layer_input=0, vocab_size_per_layer_input=0, enable_moe_block=False)
    return tf.Gemma4AssistantConfig(text_config=tf.Gemma4TextConfig(**tkw), **head)


def _is_tower(name: str) -> bool:
    return any(p in name for p in TOWER_PREFIXES)


def perturb_identities(model, gen, lo: float = 0.6, hi: float = 1.4) -> int:
    """Randomise every identity-initialised text weight (norm scales, layer_scalar, router scales)."""
    import torch

    n = 0
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if _is_tower(name) or not name.endswith(IDENTITY_SUFFIXES):
                continue
            # q/k norm scales set the attention logits (Gemma 4 uses scale 1.0): near 1 they
            # make softmax so sharp that these random models amplify float32 rounding ~3x per
            # layer; smaller (still non-identity) scales keep parity checks meaningful at 1e-4.
            a, b = (0.2, 0.45) if name.endswith(("q_norm.weight", "k_norm.weight")) else (lo, hi)
            t.copy_(torch.empty(t.shape, dtype=torch.float32).uniform_(a, b, generator=gen))
            n += 1
    return n


def finite_clip_buffers(model) -> None:
    """Audio clipped linears are initialised to +-inf; released checkpoints hold finite bounds."""
    import torch

    with torch.no_grad():
        for name, t in model.named_buffers():
            if name.endswith(("input_min", "output_min")):
                t.fill_(-100.0)
            elif name.endswith(("input_max", "output_max")):
                t.fill_(100.0)


def patch_kv_sharing_modes_for_build() -> None:
    """transformers 5.23 cannot even construct an all-KV-shared assistant (its kv_sharing_modes raises for an all-shared config).
    The one copy of the rule: tests/reference.py:patch_kv_sharing_modes calls this."""
    import transformers as tf

    def kv_sharing_modes(self):
        n = self.num_hidden_layers
        first = n - (self.num_kv_shared_layers or 0)
        modes = [None if i < first else "reuse" for i in range(n)]
        if first <= 0:
            return modes
        unshared = list(self.layer_types[:first])
        if first < n and set(unshared) != set(self.layer_types):
            raise ValueError("The set of layer types producing a cache is different than the set using them")
        for t in set(unshared):
            modes[first - 1 - unshared[::-1].index(t)] = "store"
        return modes

    for cls in (tf.Gemma4TextConfig, tf.Gemma4UnifiedTextConfig):
        cls.kv_sharing_modes = property(kv_sharing_modes)


def make_target(spec: dict, gen):
    import torch
    import transformers as tf

    cfg = build_target_config(spec)
    model = getattr(tf, spec["arch"])(cfg).to(torch.float32).eval()
    perturb_identities(model, gen)
    finite_clip_buffers(model)
    return model


def make_drafter(spec: dict, gen):
    import torch
    import transformers as tf

    cfg = build_drafter_config(spec)
    cls = tf.Gemma4UnifiedAssistantForCausalLM if spec["arch"].startswith("Gemma4Unified") else tf.Gemma4AssistantForCausalLM
    model = cls(cfg).to(torch.float32).eval()
    perturb_identities(model, gen)
    if model.masked_embedding is not None:
        with torch.no_grad():
            model.masked_embedding.token_ordering.copy_(torch.randperm(VOCAB, generator=gen))
    return model


# ----------------------------------------------------------------------------------------------
# saving in the released layout
# ----------------------------------------------------------------------------------------------


def _fix_text_config(tc: dict, t: dict, form: str) -> dict:
    """transformers 5.23 saves a derived ``per_layer_config``; released files carry the two keys."""
    tc = dict(tc)
    if form == "keys":
        tc.pop("per_layer_config", None)
        tc["global_head_dim"] = t["global_head_dim"]
        tc["num_global_key_value_heads"] = t.get("num_global_key_value_heads")
    tc["sliding_window"] = SLIDING_WINDOW
    return dict(sorted(tc.items()))


def rewrite_target_config(folder: Path, spec: dict) -> None:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    form = spec.get("config_form", "keys")
    if "text_config" in cfg:
        cfg["text_config"] = _fix_text_config(cfg["text_config"], spec["target"], form)
        # mlx-lm's gemma4 wrapper copies the top-level vocab_size into text_config (default 262144)
        cfg["vocab_size"] = VOCAB
    else:
        cfg = _fix_text_config(cfg, spec["target"], form)
    cfg["eos_token_id"] = list(EOS_IDS)
    cfg.pop("transformers_version", None)
    cfg["transformers_version"] = "5.23.0"
    path.write_text(json.dumps(dict(sorted(cfg.items())), indent=2) + "\n")


def rewrite_drafter_config(folder: Path, spec: dict) -> None:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    t = dict(spec["target"], num_global_key_value_heads=spec["drafter"].get("num_global_key_value_heads"))
    cfg["text_config"] = _fix_text_config(cfg["text_config"], t, spec.get("config_form", "keys"))
    path.write_text(json.dumps(dict(sorted(cfg.items())), indent=2) + "\n")


def write_generation_config(folder: Path) -> None:
    # Gemma-style sampling defaults (the values of the released Gemma 4 repos were not available).
    gc = {
        "bos_token_id": 2,
        "do_sample": True,
        "eos_token_id": list(EOS_IDS),
        "pad_token_id": 0,
        "temperature": 1.0,
        "top_k": 64,
        "top_p": 0.95,
        "transformers_version": "5.23.0",
    }
    (folder / "generation_config.json").write_text(json.dumps(gc, indent=2) + "\n")


def _rename_unified_keys(folder: Path) -> None:
    """Store the unified vision embedder under the released names (transformers renames on load:
    ``vision_embedder.patch_*`` -> ``embed_vision.patch_*``, ``embed_vision.embedding_projection`` ->
    ``embed_vision.multimodal_embedder.embedding_projection``)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = folder / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    out = {}
    for k, v in tensors.items():
        nk = k.replace("embed_vision.multimodal_embedder.embedding_projection", "embed_vision.embedding_projection")
        for p in ("patch_ln1", "patch_dense", "patch_ln2", "pos_embedding", "pos_norm"):
            nk = nk.replace(f"embed_vision.{p}", f"vision_embedder.{p}")
        out[nk] = v
    save_file(out, str(path), metadata=meta)


def save_target(model, folder: Path, spec: dict, tok_dir: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    (folder / "generation_config.json").unlink(missing_ok=True)
    rewrite_target_config(folder, spec)
    write_generation_config(folder)
    copy_tokenizer(tok_dir, folder)
    if spec["arch"].startswith("Gemma4Unified"):
        _rename_unified_keys(folder)


def save_drafter(model, folder: Path, spec: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    # The released assistants ship no generation_config.json that we know of, so num_assistant_tokens lives in config.json.
    (folder / "generation_config.json").unlink(missing_ok=True)
    rewrite_drafter_config(folder, spec)


# ----------------------------------------------------------------------------------------------
# kinds
# ----------------------------------------------------------------------------------------------


def _gen(seed: int):
    import torch

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1000)
    return g


def build_hf_kind(kind: str, out: Path, tok_dir: Path) -> dict:
    spec = SPECS[kind]
    gen = _gen(spec["seed"])
    target = make_target(spec, gen)
    drafter = make_drafter(spec, gen)
    save_target(target, out / "target", spec, tok_dir)
    save_drafter(drafter, out / "assistant", spec)
    return {}


def build_e2b_text(out: Path, root: Path, tok_dir: Path) -> dict:
    """Same weights as e2b, saved as Gemma4ForCausalLM (model_type gemma4_text, keys model.*)."""
    import torch
    import transformers as tf
    from safetensors import safe_open

    spec = SPECS["e2b-text"]
    src = root / "e2b" / "target" / "model.safetensors"
    prefix = "model.language_model."
    with safe_open(str(src), "pt") as f:
        sd = {"model." + k[len(prefix) :]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    model = tf.Gemma4ForCausalLM(build_target_config(spec)).to(torch.float32).eval()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    assert not missing and not unexpected, (missing, unexpected)
    save_target(model, out / "target", spec, tok_dir)
    shutil.copytree(root / "e2b" / "assistant", out / "assistant")
    return {}


def write_mlx_drafter(src: Path, dst: Path, dtype: str) -> None:
    """Drafter in the mlx-community layout (what mlx-vlm writes): HF key names, ``lm_head.weight``
    dropped, ``masked_embedding.token_ordering`` as int32, float weights in ``dtype``."""
    import mlx.core as mx

    dst.mkdir(parents=True, exist_ok=True)
    weights = mx.load(str(src / "model.safetensors"))
    out = {}
    for k, v in weights.items():
        if k == "lm_head.weight":
            continue
        if k.endswith("masked_embedding.token_ordering"):
            v = v.astype(mx.int32)
        elif mx.issubdtype(v.dtype, mx.floating):
            v = v.astype(getattr(mx, dtype))
        out[k] = v
    mx.save_safetensors(str(dst / "model.safetensors"), out, metadata={"format": "mlx"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["dtype"] = dtype
    if "text_config" in cfg:
        cfg["text_config"]["dtype"] = dtype
    (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def build_mlx_kind(kind: str, out: Path, root: Path) -> dict:
    import contextlib

    from mlx_lm.convert import convert

    src_kind, quantize, group = MLX_KINDS[kind]
    src = root / src_kind
    tgt = out / "target"
    kw = dict(quantize=True, q_bits=4, q_group_size=group) if quantize else {}
    with contextlib.redirect_stdout(io.StringIO()):
        convert(str(src / "target"), str(tgt), **kw)
    # mlx-lm's save keeps generation_config.json only via the tokenizer copy; make sure it is there
    if not (tgt / "generation_config.json").exists():
        shutil.copy(src / "target" / "generation_config.json", tgt / "generation_config.json")
    write_mlx_drafter(src / "assistant", out / "assistant", "bfloat16" if quantize else "float32")
    return {"quantized": quantize, "q_group_size": group}


# ---- agree --------------------------------------------------------------------------------------


def build_agree(out: Path, tok_dir: Path, params: dict | None = None) -> dict:
    """e2b-style pair whose drafter often proposes what the target will say.

    * Token embeddings are clustered (n_clusters = drafter num_centroids); ``token_ordering`` lists
      the tokens cluster by cluster, so the centroid head's clusters are the embedding clusters.
    * Target residual-branch output norms (post_attention_layernorm, post_feedforward_layernorm,
      post_per_layer_input_norm) are scaled down by ``branch_scale``: the final hidden is dominated
      by the token's own embedding, so the target tends to repeat its previous token, and the
      (context-dependent) branches decide when it does not.
    * The drafter's pre-projection maps the token-embedding half through an orthonormal projection
      ``Q`` (hidden half ~0), its residual branches are scaled down, its embedding table is
      ``E_target @ Q^T`` and its centroids are the cluster means of that table, so it proposes
      "repeat the token you were given".
    """
    import torch

    p = dict(AGREE, **(params or {}))
    spec = SPECS["agree"]
    gen = _gen(spec["seed"])
    target = make_target(spec, gen)
    drafter = make_drafter(spec, gen)
    t, d = spec["target"], spec["drafter"]
    H, Hd, C = t["hidden_size"], d["hidden_size"], p["n_clusters"]
    assert C == d["num_centroids"]
    lm = target.model.language_model
    with torch.no_grad():
        std = lm.embed_tokens.weight.std().item()
        perm = torch.randperm(VOCAB, generator=gen)
        cluster_of = torch.empty(VOCAB, dtype=torch.long)
        cluster_of[perm] = torch.arange(VOCAB) // (VOCAB // C)
        centers = torch.randn(C, H, generator=gen) * p["center_scale"]
        noise = torch.randn(VOCAB, H, generator=gen)
        E = (centers[cluster_of] + noise) * std / (1 + p["center_scale"] ** 2) ** 0.5
        lm.embed_tokens.weight.copy_(E)
        for layer in lm.layers:
            for nm in ("post_attention_layernorm", "post_feedforward_layernorm", "post_per_layer_input_norm"):
                getattr(layer, nm).weight.mul_(p["branch_scale"])
        # layer 0 attention = "anti-repeat" head: uniform attention over the sliding window (q = 0),
        # V = projection of the token embedding, o_proj = minus the same projection, so the more
        # often a token occurs among the last W tokens, the less likely the target repeats it.
        l0 = lm.layers[0]
        hd0 = l0.self_attn.head_dim
        pq, _ = torch.linalg.qr(torch.randn(H, hd0, generator=gen))  # [H, hd0]
        l0.self_attn.q_proj.weight.zero_()
        l0.self_attn.v_proj.weight.copy_(pq.T / l0.input_layernorm.weight[None, :])
        l0.self_attn.o_proj.weight.zero_()
        l0.self_attn.o_proj.weight[:, :hd0] = -pq
        l0.post_attention_layernorm.weight.mul_(p["anti_scale"] / p["branch_scale"])
        # drafter
        q, _ = torch.linalg.qr(torch.randn(H, Hd, generator=gen))  # [H, Hd], orthonormal columns
        Q = q.T  # [Hd, H]
        pre = drafter.pre_projection.weight  # [Hd, 2H]
        pre[:, :H] = Q
        pre[:, H:].mul_(0.1)
        # "misleading" tokens: inside each cluster, a fraction of the drafter's table rows is
        # rotated among themselves, so for those tokens the drafter proposes a wrong neighbour
        # (zero-acceptance rounds); everywhere else it proposes "repeat".
        src = torch.arange(VOCAB)
        m = VOCAB // C
        n_bad = int(round(p["misleading"] * m))
        if n_bad >= 2:
            for c in range(C):
                members = perm[c * m : c * m + n_bad]
                src[members] = members.roll(1)
        Ed = E[src] @ Q.T  # [V, Hd]
        drafter.model.embed_tokens.weight.copy_(Ed * (std / Ed.std()))
        for layer in drafter.model.layers:
            for nm in ("post_attention_layernorm", "post_feedforward_layernorm"):
                getattr(layer, nm).weight.mul_(p["drafter_branch_scale"])
        me = drafter.masked_embedding
        me.token_ordering.copy_(perm)  # cluster c = perm[c*m:(c+1)*m]
        cent = drafter.model.embed_tokens.weight[perm].view(C, m, Hd).mean(1)
        me.centroids.weight.copy_(cent / cent.norm(dim=-1, keepdim=True) * drafter.model.embed_tokens.weight.norm(dim=-1).mean())
    save_target(target, out / "target", spec, tok_dir)
    save_drafter(drafter, out / "assistant", spec)
    return {"agree_params": p}


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------


def _manifest_entry(kind: str) -> dict:
    if kind in MLX_KINDS:
        src, quant, group = MLX_KINDS[kind]
        return {"source": src, "format": "mlx", "quantized": quant, "q_group_size": group}
    spec = SPECS[kind]
    return {
        "format": "hf",
        "arch": spec["arch"],
        "seed": spec["seed"],
        "config_form": spec.get("config_form", "keys"),
        "vocab_size": VOCAB,
        "sliding_window": SLIDING_WINDOW,
        "target": spec["target"],
        "drafter": spec["drafter"],
        "producers": spec["producers"],
        "towers": list(spec["towers"]),
    }


def _is_complete(folder: Path) -> bool:
    marker = folder / ".complete"
    if not marker.exists():
        return False
    try:
        return json.loads(marker.read_text()).get("version") == kind_version(folder.name)
    except (OSError, ValueError):
        return False


def build(out: Path | str = "fixtures", kinds: list[str] | None = None, force: bool = False) -> Path:
    """Build the requested kinds (default: all) under ``out``; returns ``out`` as a Path.

    Safe to call from concurrent processes: an exclusive lock on ``<out>/.lock`` serialises builds."""
    import fcntl

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return _build_locked(out, kinds, force)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _build_locked(out: Path, kinds: list[str] | None, force: bool) -> Path:
    wanted = list(kinds or ALL_KINDS)
    unknown = [k for k in wanted if k not in ALL_KINDS]
    if unknown:
        raise SystemExit(f"unknown kinds {unknown}; known: {ALL_KINDS}")
    # add dependencies first
    order: list[str] = []
    for k in wanted:
        for dep in DEPENDS.get(k, []):
            if dep not in order:
                order.append(dep)
        if k not in order:
            order.append(k)
    order.sort(key=ALL_KINDS.index)

    todo = [k for k in order if force or not _is_complete(out / k)]
    if todo:
        import torch

        torch.set_num_threads(min(2, os.cpu_count() or 1))
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        patch_kv_sharing_modes_for_build()
        tok_dir = out / "_tokenizer"
        if force or not (tok_dir / ".complete").exists():
            if tok_dir.exists():
                shutil.rmtree(tok_dir)
            build_tokenizer(tok_dir)
            (tok_dir / ".complete").write_text(json.dumps({"version": FIXTURE_VERSION}))
    for kind in order:
        folder = out / kind
        if kind not in todo:
            continue
        t0 = time.time()
        if folder.exists():
            shutil.rmtree(folder)
        tmp = out / f".{kind}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        if kind in MLX_KINDS:
            info = build_mlx_kind(kind, tmp, out)
        elif kind == "e2b-text":
            info = build_e2b_text(tmp, out, tok_dir)
        elif kind == "agree":
            info = build_agree(tmp, tok_dir)
        else:
            info = build_hf_kind(kind, tmp, tok_dir)
        entry = dict(_manifest_entry(kind), **info, version=kind_version(kind))
        (tmp / ".complete").write_text(json.dumps(entry, indent=2) + "\n")
        tmp.rename(folder)
        log(f"built {kind} in {time.time() - t0:.1f}s")
    manifest = {k: _manifest_entry(k) for k in ALL_KINDS if _is_complete(out / k)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="fixtures/", help="output folder (default fixtures/)")
    ap.add_argument("--force", action="store_true", help="rebuild kinds that already exist")
    ap.add_argument("--kinds", default=None, help=f"comma-separated subset of {','.join(ALL_KINDS)}")
    args = ap.parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()] if args.kinds else None
    t0 = time.time()
    build(args.out, kinds, args.force)
    log(f"done in {time.time() - t0:.1f}s -> {Path(args.out).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
