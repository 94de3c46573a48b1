"""Run a cdmoe condensed checkpoint in Hugging Face transformers (>= 5).

moe-condense writes this file into every checkpoint it makes, with an
"auto_map" entry in config.json, so that

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)

builds the architecture's own transformers model and swaps in, for each
layer listed in config.json's "condensed_layers", the condensed block that
cdmoe's engine computes:

    y = sum_i w_i * expert_{e_i}(x)  +  shared(x)

with fixed weights w_i and no router (Qwen2-MoE's shared expert keeps its
sigmoid gate).  A layer marked "folded": true is one dense SwiGLU MLP
(mlp.gate_proj / up_proj / down_proj) whose down-projection columns already
carry the weights.  Tensor names are those on disk; nothing is renamed.

Layers listed in "dropped_layers" (the paper's baselines, moe-condense
--method layerdrop|blockdrop) are removed: "mlp" leaves h + attn(h) (no MLP,
no post-attention norm), "block" passes h unchanged (no tensors at all).
Expert-pruned checkpoints (--method prune-freq|prune-reap) need nothing
here: they are plain models with fewer routed experts.

deepseek (DeepSeekMoE v1) has no transformers class: it is Llama attention
with DeepSeek's MoE MLP, built here on transformers' Llama model.
Written for cdmoe (moe-condense(1)); no other dependency than transformers.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers

# transformers 5 loads the per-expert tensors on disk into fused expert
# parameters, the layout the condensed blocks below mirror; older versions
# would leave them unloaded
if int(transformers.__version__.split(".")[0]) < 5:
    raise ImportError("modeling_cdmoe.py needs transformers >= 5 (found %s)" % transformers.__version__)
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaForCausalLM
from transformers.models.mixtral.modeling_mixtral import MixtralForCausalLM
from transformers.models.olmoe.modeling_olmoe import OlmoeForCausalLM
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeForCausalLM
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeForCausalLM


def condensed_layers(config):
    """{decoder layer index: {"experts": [...], "weights": [...], "folded": bool}}"""
    table = getattr(config, "condensed_layers", None) or {}
    return {int(layer): entry for layer, entry in table.items()}


def check_silu(config):
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError("modeling_cdmoe: hidden_act %r: only silu is supported" % config.hidden_act)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): a dense MLP, a shared expert, a DeepSeek expert."""

    def __init__(self, hidden, width):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class KeptExperts(nn.Module):
    """The kept routed experts in transformers 5's fused layout: gate_up_proj
    [K, 2*I, H] (gate rows first), down_proj [K, H, I].  transformers' loader
    stacks a layer's experts.{j}.* tensors in ascending j, so slot i holds the
    i-th smallest kept expert id."""

    def __init__(self, n, hidden, width):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n, 2 * width, hidden))
        self.down_proj = nn.Parameter(torch.empty(n, hidden, width))

    def forward(self, x, weights):
        y = torch.zeros_like(x)
        for i, w in enumerate(weights):
            gate, up = F.linear(x, self.gate_up_proj[i]).chunk(2, dim=-1)
            y = y + w * F.linear(F.silu(gate) * up, self.down_proj[i])
        return y


class CondensedBlock(nn.Module):
    """A condensed layer: kept experts with fixed weights, plus the shared
    experts (ungated, or Qwen2-MoE's sigmoid-gated shared expert).  Parameter
    names are those the loader produces from the checkpoint: experts.* (fused,
    or a ModuleDict keyed by the original expert id), the shared MLP under
    shared_name, shared_expert_gate."""

    def __init__(self, entry, hidden, width, fused, shared_name=None, shared_width=0, shared_gate=False):
        super().__init__()
        pairs = sorted(zip(entry["experts"], entry["weights"]))   # ascending expert id
        self.kept_ids = [int(e) for e, _ in pairs]
        self.kept_weights = [float(w) for _, w in pairs]
        self.experts = None
        if pairs and fused:
            self.experts = KeptExperts(len(pairs), hidden, width)
        elif pairs:
            self.experts = nn.ModuleDict({str(j): SwiGLU(hidden, width) for j in self.kept_ids})
        self.shared_name = shared_name if shared_width > 0 else None
        if self.shared_name:
            setattr(self, self.shared_name, SwiGLU(hidden, shared_width))
        if self.shared_name and shared_gate:
            self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)
        else:
            self.shared_expert_gate = None

    def kept(self, x):
        if isinstance(self.experts, KeptExperts):
            return self.experts(x, self.kept_weights)
        y = torch.zeros_like(x)
        for j, w in zip(self.kept_ids, self.kept_weights):
            y = y + w * self.experts[str(j)](x)
        return y

    def forward(self, hidden_states):
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        y = self.kept(x) if self.experts is not None else torch.zeros_like(x)
        if self.shared_name:
            s = getattr(self, self.shared_name)(x)
            if self.shared_expert_gate is not None:
                s = torch.sigmoid(self.shared_expert_gate(x)) * s
            y = y + s
        return y.reshape(hidden_states.shape)


class NoMLP(nn.Module):
    """LayerDrop: the MLP block is gone; the residual passes (h + 0)."""

    def forward(self, hidden_states):
        return torch.zeros_like(hidden_states)


class DroppedBlock(nn.Module):
    """BlockDrop: the whole decoder layer is gone; h passes unchanged."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def replace_dropped(model, config):
    """Remove what config.json's "dropped_layers" names ({layer: "mlp" | "block"})."""
    for layer, kind in (getattr(config, "dropped_layers", None) or {}).items():
        layer = int(layer)
        if kind == "block":
            model.model.layers[layer] = DroppedBlock()
        elif kind == "mlp":
            model.model.layers[layer].mlp = NoMLP()
            model.model.layers[layer].post_attention_layernorm = nn.Identity()
        else:
            raise ValueError("modeling_cdmoe: dropped_layers: layer %d: %r is not mlp or block" % (layer, kind))


def folded_width(config, entry, shared_width):
    return shared_width + len(entry["experts"]) * expert_width(config)


def expert_width(config):
    width = getattr(config, "moe_intermediate_size", None)
    return width if width else config.intermediate_size


def replace_condensed(model, config, fused, shared_name=None, shared_width=0, shared_gate=False):
    """Swap the MLP of every condensed layer of model.model.layers."""
    check_silu(config)
    H = config.hidden_size
    for layer, entry in condensed_layers(config).items():
        if entry.get("folded"):
            block = SwiGLU(H, folded_width(config, entry, shared_width))
        else:
            block = CondensedBlock(entry, H, expert_width(config), fused, shared_name, shared_width,
                                   shared_gate)
        model.model.layers[layer].mlp = block
    replace_dropped(model, config)


class CdmoeQwen2MoeForCausalLM(Qwen2MoeForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        replace_condensed(self, config, True, "shared_expert",
                          getattr(config, "shared_expert_intermediate_size", 0) or 0, shared_gate=True)


class CdmoeQwen3MoeForCausalLM(Qwen3MoeForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        replace_condensed(self, config, True)


class CdmoeOlmoeForCausalLM(OlmoeForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        replace_condensed(self, config, True)


class CdmoeMixtralForCausalLM(MixtralForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        replace_condensed(self, config, True)


# ---- DeepSeekMoE v1 ------------------------------------------------------------


class DeepseekConfig(LlamaConfig):
    """DeepSeekMoE v1's config.json: Llama's fields plus n_routed_experts,
    n_shared_experts, moe_intermediate_size, num_experts_per_tok,
    first_k_dense_replace, moe_layer_freq, norm_topk_prob (kept as extra
    attributes)."""
    model_type = "deepseek"


class DeepseekMoE(nn.Module):
    """A routed DeepSeekMoE v1 layer: softmax over the routed experts, top-k
    (renormalised when norm_topk_prob), weighted sum, plus the shared experts."""

    def __init__(self, config):
        super().__init__()
        H, I = config.hidden_size, config.moe_intermediate_size
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = bool(getattr(config, "norm_topk_prob", False))
        self.experts = nn.ModuleList(SwiGLU(H, I) for _ in range(config.n_routed_experts))
        self.gate = nn.Linear(H, config.n_routed_experts, bias=False)
        n_shared = getattr(config, "n_shared_experts", None) or 0
        self.shared_experts = SwiGLU(H, I * n_shared) if n_shared else None

    def forward(self, hidden_states):
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        scores = self.gate(x).softmax(dim=-1)
        weights, chosen = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        if self.top_k > 1 and self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            if token.numel():
                y.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.reshape(hidden_states.shape)


def deepseek_is_moe(config, layer):
    return (getattr(config, "n_routed_experts", None) is not None
            and layer >= (getattr(config, "first_k_dense_replace", 0) or 0)
            and layer % (getattr(config, "moe_layer_freq", 1) or 1) == 0)


class CdmoeDeepseekForCausalLM(LlamaForCausalLM):
    config_class = DeepseekConfig

    def __init__(self, config):
        super().__init__(config)
        check_silu(config)
        for layer in range(config.num_hidden_layers):
            if deepseek_is_moe(config, layer):
                self.model.layers[layer].mlp = DeepseekMoE(config)
        n_shared = getattr(config, "n_shared_experts", None) or 0
        replace_condensed(self, config, False, "shared_experts", n_shared * config.moe_intermediate_size)
