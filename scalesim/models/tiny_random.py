"""A tiny random Llama or Qwen2 with a byte-level BPE tokenizer trained on the fly, for tests.

Weights are seeded and drawn with a large init range so that outputs are not degenerate (greedy
decoding of a near-zero model repeats one token). The folder is an ordinary Hugging Face folder,
so transformers can load the same weights as a reference.
"""

import json
import random
import shutil
import tempfile
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_WORDS = ("the agent town market river cafe morning evening plans to walk talk meet friend library "
          "school park write read paint cook sleep wake news post like follow share vote speak wolf "
          "village night day doctor seer hunter Alice Bob Carol Dave Eve Isabella Klaus Maria John "
          "is was will and or but with for on at in of a an it they we you I he she hello world "
          "0 1 2 3 4 5 6 7 8 9 . , ! ? : ; ' \" ( ) { } [ ]").split()

TINY_SIZES = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096}
TINY_VOCAB_SIZE = 512
TINY_INIT_RANGE = 0.2


def _corpus(seed: int, num_lines: int = 2000) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 16))) for _ in range(num_lines)]


def train_tokenizer(seed: int = 0):
    """A byte-level BPE tokenizer (transformers fast tokenizer) with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_corpus(seed), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                   pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE)


def make_tiny_random(folder: Path, architecture: str = "llama", seed: int = 0) -> Path:
    """Write a tiny random `architecture` ('llama' or 'qwen2') model folder; return it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    folder = Path(folder)
    tokenizer = train_tokenizer(seed)
    common = dict(TINY_SIZES, vocab_size=len(tokenizer), initializer_range=TINY_INIT_RANGE,
                  eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                  bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"), rms_norm_eps=1e-6)
    if architecture == "llama":
        config, model_cls = LlamaConfig(**common, tie_word_embeddings=False, rope_theta=10000.0), LlamaForCausalLM
    elif architecture == "qwen2":
        config, model_cls = Qwen2Config(**common, tie_word_embeddings=True, rope_theta=1000000.0), Qwen2ForCausalLM
    else:
        raise ValueError(f"architecture must be 'llama' or 'qwen2', got {architecture!r}")
    torch.manual_seed(seed)
    model = model_cls(config).float()
    if architecture == "qwen2":  # give the qkv biases real values so the test sees them
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, TINY_INIT_RANGE)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        model.save_pretrained(str(staging), safe_serialization=True)
        tokenizer.save_pretrained(str(staging))
        (staging / "scalesim.json").write_text(json.dumps({"made_by": "make_tiny_random", "seed": seed}))
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
