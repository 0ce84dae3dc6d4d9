"""
GPT-2, exactly as OpenAI built it, in one file: learned position embeddings, pre-LayerNorm blocks, causal
self-attention (F.scaled_dot_product_attention: flash attention on CUDA), a 4x MLP with tanh GELU, the head tied to the
token embedding, GPT-2's initialisation (N(0, 0.02), the residual projections scaled by 1/sqrt(2 n_layer)). The
vocabulary is padded from 50,257 to 50,304 (a multiple of 64) for faster matmuls; sampling never emits the padding ids.
GPT.from_pretrained loads OpenAI's weights (the hub's gpt2 ... gpt2-xl, or a save_pretrained directory) without
transformers; a test checks the logits against transformers' within 1e-4.

References:
1) OpenAI's GPT-2 TensorFlow code: https://github.com/openai/gpt-2/blob/master/src/model.py
2) Hugging Face transformers' PyTorch port: transformers/models/gpt2/modeling_gpt2.py
Parameter names follow transformers (transformer.h.0.attn.c_attn.weight, ...) so weights move both ways.
"""

import inspect
import json
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

GPT2_VOCAB_SIZE = 50257  # 50,000 BPE merges + 256 byte tokens + <|endoftext|>
# Hugging Face's Conv1D stores weights as (in, out); nn.Linear wants (out, in).
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@dataclass
class GPTConfig:
    block_size: int = 1024  # max sequence length
    # GPT-2's 50,257 tokens padded to 50,304 = 64 x 786: matmul kernels run fastest on sizes that are multiples of
    # 64, and the extra rows cost nothing (no token id points at them, so they only learn to be unlikely)
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    bias: bool = True  # biases in the Linears and LayerNorms (GPT-2 has them; nanoGPT can train without)
    gelu: str = "tanh"  # GPT-2's tanh approximation, or "exact" (nanoGPT's nn.GELU())


MODEL_SIZES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M params
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M params
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M params
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M params
}


class KVCache:
    """Keys and values of every layer, allocated once for all the positions a generation reaches: n_layer x
    (B, nh, length, hs), length <= block_size. A new token then costs one position of compute, and a step's tensors
    have the same shapes at every position: what lets torch.compile capture the one-token step once, as a CUDA graph
    on a GPU (the way gpt-fast does it)."""

    def __init__(self, config, batch_size, length, dtype=torch.float32, device="cpu"):
        shape = (batch_size, config.n_head, length, config.n_embd // config.n_head)
        # zeros, not empty: the positions not yet written are masked out, but a NaN there would leak through 0 * NaN
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        for t in self.k + self.v:
            torch._dynamo.mark_static_address(t)  # a CUDA graph may read and write these tensors in place
        # row p: the positions a token at position p may see, 0 .. p
        self.causal_mask = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        self.batch_size, self.length = batch_size, length

    def update(self, layer, pos, k, v):
        """Store one layer's keys/values k, v (B, nh, T, hs) at the positions pos (T,); return all of that layer's
        keys and values (B, nh, length, hs), the positions after pos still unwritten (and masked out)."""
        self.k[layer].index_copy_(2, pos, k)
        self.v[layer].index_copy_(2, pos, v)
        return self.k[layer], self.v[layer]


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        # query, key, value for all heads in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_SCALE_INIT = True
        self.n_head = config.n_head
        self.n_embd = config.n_embd

    def forward(self, x, kv_cache=None, layer=0, pos=None):
        B, T, C = x.size()  # batch size, sequence length, embedding dimensionality (n_embd)
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if kv_cache is None:
            # flash attention on CUDA: the (T, T) attention matrix is never materialised
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # sampling: these tokens' keys/values join the cache, and the token at position p sees keys 0 .. p
            k, v = kv_cache.update(layer, pos, k, v)  # (B, nh, length, hs)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=kv_cache.causal_mask[pos])  # mask (T, length)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh" if config.gelu == "tanh" else "none")  # GPT-2 used the tanh one
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_SCALE_INIT = True

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None, layer=0, pos=None):
        # pre-LayerNorm: the residual stream itself is never normalised, so gradients flow straight through
        x = x + self.attn(self.ln_1(x), kv_cache, layer, pos)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embeddings
                wpe=nn.Embedding(config.block_size, config.n_embd),  # learned position embeddings
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying (as in GPT-2): one matrix turns token ids into vectors at the bottom and vectors into token
        # scores at the top; tokens that mean alike should be alike at both ends, and it saves 38M parameters
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "RESIDUAL_SCALE_INIT", False):
                # the projections that write into the residual stream: each block adds to it twice, so the stream's
                # variance grows with depth; 1/sqrt(2 n_layer) keeps it where it started (GPT-2 paper, section 2.3)
                std *= (2 * self.config.n_layer) ** -0.5
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=True):
        """Parameter count; the position embeddings are left out by default (the token embeddings count: the head)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, T):
        """Training FLOPs per token at context T: 6N for the matmuls (2 forward, 4 backward per weight) plus the
        attention scores, 12 x layers x heads x head size x T (the PaLM paper's appendix B). For MFU in train.py."""
        L, H, Q = self.config.n_layer, self.config.n_head, self.config.n_embd // self.config.n_head
        return 6 * self.num_params() + 12 * L * H * Q * T

    def hidden_states(self, idx, kv_cache=None, pos=None):
        """Everything but the head: the final LayerNorm's output (B, T, n_embd) for the tokens idx (B, T) at the
        positions pos (T,), 0 .. T-1 unless given (a step of sampling gives where it continues the cache)."""
        B, T = idx.size()
        assert T <= self.config.block_size, f"sequence of {T} tokens > block_size {self.config.block_size}"
        if pos is None:
            pos = torch.arange(T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, n_embd)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, kv_cache, layer, pos)
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None, kv_cache=None, pos=None):
        logits = self.lm_head(self.hidden_states(idx, kv_cache, pos))  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    # ----------------------------------------------------------------------------------------------------------------
    # GPT-2's own weights, from the Hugging Face hub or a transformers directory

    @classmethod
    def from_pretrained(cls, name_or_path):
        """Load GPT-2 weights: a Hugging Face hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a local directory
        written by transformers' save_pretrained (config.json + model.safetensors or pytorch_model.bin)."""
        if os.path.isdir(name_or_path):
            directory = name_or_path
        elif name_or_path in MODEL_SIZES:
            directory = _download_from_hub(name_or_path)
        else:
            raise ValueError(f"unknown model {name_or_path!r}: not a directory, nor one of {', '.join(MODEL_SIZES)}")
        with open(os.path.join(directory, "config.json")) as f:
            hf = json.load(f)
        activation = hf.get("activation_function", "gelu_new")
        if activation not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
            raise ValueError(f"{directory}: activation {activation!r} is not a GELU")
        config = GPTConfig(
            block_size=hf["n_positions"],
            vocab_size=hf["vocab_size"],
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            n_embd=hf["n_embd"],
            gelu="exact" if activation == "gelu" else "tanh",
        )
        if os.path.exists(os.path.join(directory, "model.safetensors")):
            from safetensors.torch import load_file

            sd_hf = load_file(os.path.join(directory, "model.safetensors"))
        elif os.path.exists(os.path.join(directory, "pytorch_model.bin")):
            sd_hf = torch.load(os.path.join(directory, "pytorch_model.bin"), map_location="cpu", weights_only=True)
        else:
            raise FileNotFoundError(f"{directory}: neither model.safetensors nor pytorch_model.bin found")

        model = cls(config)
        sd = model.state_dict()
        loaded = set()
        for key, tensor in sd_hf.items():
            if key.endswith((".attn.bias", ".attn.masked_bias")) or key == "lm_head.weight":
                continue  # causal-mask buffers of old transformers versions; the head is tied to wte
            name = key if key.startswith("transformer.") else "transformer." + key  # the hub's gpt2 files lack it
            if name not in sd:
                raise ValueError(f"{directory}: unexpected weight {key!r}")
            if name.endswith(CONV1D_WEIGHTS):
                tensor = tensor.t()
            if tensor.shape != sd[name].shape:
                raise ValueError(
                    f"{directory}: weight {key!r} has shape {tuple(tensor.shape)}, expected {tuple(sd[name].shape)}"
                )
            with torch.no_grad():
                sd[name].copy_(tensor)
            loaded.add(name)
        missing = set(sd) - loaded - {"lm_head.weight"}
        if missing:
            raise ValueError(f"{directory}: missing weights {sorted(missing)[:3]}")
        return model

    # ----------------------------------------------------------------------------------------------------------------
    # training helpers

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, eps=1e-8):
        # decay the matrices (matmul weights, embeddings); never the biases and LayerNorm gains
        params = [p for p in self.parameters() if p.requires_grad]
        decay_params = [p for p in params if p.dim() >= 2]
        nodecay_params = [p for p in params if p.dim() < 2]
        optim_groups = [
            {"params": decay_params, "weight_decay": weight_decay},
            {"params": nodecay_params, "weight_decay": 0.0},
        ]
        # the fused kernel updates all parameters in one launch instead of a loop of small ones
        use_fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        extra = dict(fused=True) if use_fused else dict()
        return torch.optim.AdamW(optim_groups, lr=learning_rate, betas=betas, eps=eps, **extra)

    # ----------------------------------------------------------------------------------------------------------------
    # sampling

    def decode_step(self, idx, pos, kv_cache):
        """The next token's logits (B, vocab_size) after the tokens idx (B, 1) at position pos (1,), which join
        kv_cache. Every shape is the same at every position, so this compiles once for a whole sample."""
        return self(idx, kv_cache=kv_cache, pos=pos)[0][:, -1, :]

    def compiled_decoder(self, batch_size, length, backend="inductor"):
        """decode_step compiled, and the one KVCache it always runs on: a CUDA graph replays the same tensors. Kept
        on the model for the next samples (a model that only samples: a training run never calls this)."""
        weight = self.lm_head.weight
        key = (batch_size, length, weight.device, backend)
        if getattr(self, "_decoder_key", None) != key:
            mode = "reduce-overhead" if weight.is_cuda and backend == "inductor" else None  # CUDA graphs
            step = torch.compile(self.decode_step, mode=mode, fullgraph=True, backend=backend)
            cache = KVCache(self.config, batch_size, length, weight.dtype, weight.device)
            self._decoder, self._decoder_key = (step, cache), key
        return self._decoder

    @torch.no_grad()  # not inference_mode: the compiled step keeps its cache, which later calls write again
    def generate_stream(
        self,
        idx,
        max_new_tokens,
        temperature=1.0,
        top_k=None,
        top_p=None,
        generator=None,
        use_cache=True,
        compile=False,
    ):
        """Yield max_new_tokens new tokens, one (B, 1) tensor at a time, continuing the prompts idx (B, T).
        With the cache the prompt is read once, then each step processes one token; compile=True runs that step
        compiled (the prompt itself is read uncompiled: its length varies), with inductor, or with the torch.compile
        backend compile names. When the context is full the window
        slides, every position moves, and the cached keys are stale: each step then re-reads the window."""
        (B, T), block_size = idx.size(), self.config.block_size
        length = min(block_size, T + max_new_tokens)  # the positions this generation reaches
        if compile:
            decode_step, kv_cache = self.compiled_decoder(
                B, length, compile if isinstance(compile, str) else "inductor"
            )
        else:
            decode_step = self.decode_step
            kv_cache = KVCache(self.config, B, length, self.lm_head.weight.dtype, idx.device) if use_cache else None
        context, new = idx, None
        cached = 0  # positions in the cache, and the same number on the device, as the compiled step's input:
        pos = torch.zeros(1, dtype=torch.long, device=idx.device)  # where the next token goes
        for _ in range(max_new_tokens):
            if kv_cache is not None and new is not None and cached < block_size:
                logits = decode_step(new, pos, kv_cache)  # (B, vocab_size)
                cached += 1
                pos += 1
            else:
                window = context[:, -block_size:]
                logits = self(window, kv_cache=kv_cache)[0][:, -1, :]  # (B, vocab_size)
                cached = window.size(1)
                pos.fill_(cached)
            new = sample_next_token(logits, temperature, top_k, top_p, generator)  # (B, 1)
            context = torch.cat((context, new), dim=1)
            yield new

    def generate(self, idx, max_new_tokens, **kwargs):
        """The prompts idx (B, T) followed by max_new_tokens sampled tokens: (B, T + max_new_tokens)."""
        return torch.cat([idx, *self.generate_stream(idx, max_new_tokens, **kwargs)], dim=1)


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick one token per row from logits (B, vocab_size). temperature 0 means greedy."""
    logits = logits.to(torch.float32, copy=True)  # edited below: never the caller's tensor
    logits[:, GPT2_VOCAB_SIZE:] = float("-inf")  # the padding rows of the vocabulary are not tokens
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth_largest = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits.masked_fill_(logits < kth_largest, float("-inf"))  # not logits[mask] = ...: that waits for the GPU
    if top_p is not None and top_p < 1.0:
        # keep the smallest set of most likely tokens whose probabilities add up to top_p
        sorted_logits, sorted_idx = torch.sort(logits, descending=True)
        sorted_probs = F.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of the more likely tokens
        sorted_logits.masked_fill_(before >= top_p, float("-inf"))  # the most likely token always stays (before = 0)
        logits = torch.full_like(logits, float("-inf")).scatter(-1, sorted_idx, sorted_logits)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def _download_from_hub(name):
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(repo_id=name, filename="config.json")
        hf_hub_download(repo_id=name, filename="model.safetensors")
    except Exception as e:  # the hub client raises many kinds of network errors
        raise RuntimeError(
            f"could not fetch {name!r} from the Hugging Face hub ({type(e).__name__}); "
            "with no network, pass a local directory written by transformers' save_pretrained"
        ) from e
    return os.path.dirname(path)
