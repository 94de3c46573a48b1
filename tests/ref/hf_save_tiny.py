"""Write tiny checkpoints with transformers' own save_pretrained, for the C
checkpoint reader to open (tests/unit/test_checkpoint.c runs this when torch +
transformers are importable).  Usage: hf_save_tiny.py OUTDIR

For each of qwen2_moe, qwen3_moe, olmoe, mixtral (F32) and qwen3_moe in BF16
(sharded): OUTDIR/<name>/ plus OUTDIR/<name>/sums.txt with one line per tensor:
"name sum_of_float64_values".  Nothing here is committed output."""
import os
import sys

import torch
import transformers
from transformers import (MixtralConfig, MixtralForCausalLM, OlmoeConfig, OlmoeForCausalLM,
                          Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)
from safetensors import safe_open

transformers.logging.set_verbosity_error()
torch.manual_seed(0)
out = sys.argv[1]
common = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=300, eos_token_id=2, bos_token_id=1)
models = [
    ("qwen2_moe", Qwen2MoeConfig, Qwen2MoeForCausalLM,
     dict(moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=24,
          decoder_sparse_step=1, mlp_only_layers=[1]), torch.float32, None),
    ("qwen3_moe", Qwen3MoeConfig, Qwen3MoeForCausalLM,
     dict(moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, head_dim=16), torch.float32, None),
    ("olmoe", OlmoeConfig, OlmoeForCausalLM, dict(num_experts=4, num_experts_per_tok=2), torch.float32, None),
    ("mixtral", MixtralConfig, MixtralForCausalLM, dict(num_local_experts=4, num_experts_per_tok=2),
     torch.float32, None),
    ("qwen3_moe_bf16", Qwen3MoeConfig, Qwen3MoeForCausalLM,
     dict(moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2), torch.bfloat16, "20KB"),
]
for name, C, M, extra, dtype, shard in models:
    m = M(C(**common, **extra)).to(dtype)
    with torch.no_grad():  # make norms and biases non-trivial
        for k, p in m.named_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    d = os.path.join(out, name)
    if shard:
        m.save_pretrained(d, max_shard_size=shard)
    else:
        m.save_pretrained(d)
    with open(os.path.join(d, "sums.txt"), "w") as f:
        for fn in sorted(os.listdir(d)):
            if fn.endswith(".safetensors"):
                with safe_open(os.path.join(d, fn), "pt") as st:
                    for k in st.keys():
                        f.write(f"{k} {st.get_tensor(k).double().sum().item():.17g}\n")
