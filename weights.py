"""
Weight files: a reader can skip this file. The one torch.load of the project, the strict
state-dict loader, the weight hash that keys caches and samples to the weights that made
them, a safetensors reader, and the conversion of Hugging Face DINOv2 files to the official
key layout that our DINOv2 class uses.
"""
import hashlib
import json
import math
import os
import pickle
import zipfile

import torch


#################################################################################
#                              Strict weight loading                            #
#################################################################################

def read_weights(path, what, hint):
    """The one torch.load of the project (weights_only=True, on the CPU), for every .pt/.pth
    it reads. A missing, truncated or foreign file, or one that holds no dict, is a
    ValueError/FileNotFoundError of one line naming the file, what it should be (`what`)
    and how to get one (`hint`)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path} ({hint})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path} is not a readable {what} ({reason[:200]}); {hint}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not the dict of a {what}; {hint}")
    return state


def load_state_dict_strict(model, state, source):
    """load_state_dict that fails loudly, naming missing, unexpected and mis-shaped keys
    and the file they came from."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
                        for k in set(own) & set(state) if state[k].shape != own[k].shape)
    if missing or unexpected or mismatched:
        problems = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched)):
            if keys:
                shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
                problems.append(f"{label} keys: {shown}")
        raise RuntimeError(f"{source} does not match the model: " + "; ".join(problems)
                           + ". Check that the file and the model name/overrides belong together.")
    model.load_state_dict(state, strict=True)



def weights_hash(model):
    """sha256 of a model's config and of every weight and buffer it computes with: what
    a sample batch and a DiT's checkpoint record of the models they came from."""
    digest = hashlib.sha256(json.dumps(model.config, sort_keys=True, default=str).encode())
    return hash_weights(digest, model.state_dict().items()).hexdigest()


def hash_weights(digest, named_tensors):
    """Feeds (name, tensor) pairs into a hashlib digest: name, shape, dtype and the raw
    bytes, so that a file keyed by the digest changes whenever a weight does. Keys the
    latent cache (latents.py) and the sample shards (sample.py) to the weights that made them."""
    for name, tensor in named_tensors:
        digest.update(f"{name} {tuple(tensor.shape)} {tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest


def named_weights_file(path, flag, what, url):
    """An official weight file passed by a flag, or one line naming the flag, what the file
    is and where the official one is published."""
    if path is None:
        raise FileNotFoundError(f"{flag}: no file given; pass the path of {what} (official file: {url}).")
    return read_weights(path, f"{what} ({flag})", f"official file: {url}")


#################################################################################
#                           DINOv2 weight loading                               #
#################################################################################

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


def read_safetensors(path):
    """Reads a .safetensors file: an 8-byte little-endian header length, a JSON header
    naming each tensor's dtype, shape and byte range, then the raw bytes. A file that breaks
    the format is a ValueError naming the file and the problem, before anything is allocated."""
    def broken(problem):
        return ValueError(f"{path} is not a valid safetensors file: {problem} (expected a Hugging Face "
                          f"model.safetensors; download it again)")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if size < 8 or header_len > size - 8:
            raise broken(f"its header length {header_len} exceeds the file's {size} bytes")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise broken("its header is not JSON") from None
        data = bytearray(f.read())
    state = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in _SAFETENSORS_DTYPES:
            raise broken(f"tensor {name} has dtype {info.get('dtype')}, not one of {sorted(_SAFETENSORS_DTYPES)}")
        start, end = info["data_offsets"]
        dtype = _SAFETENSORS_DTYPES[info["dtype"]]
        if not 0 <= start <= end <= len(data) or (end - start) != math.prod(info["shape"]) * dtype.itemsize:
            raise broken(f"tensor {name}'s byte range {start}..{end} does not fit its shape {info['shape']} "
                         f"or the file's {len(data)} data bytes")
        tensor = torch.frombuffer(data, dtype=dtype, offset=start, count=(end - start) // dtype.itemsize) \
            if end > start else torch.empty(0, dtype=dtype)
        state[name] = tensor.reshape(info["shape"]).clone()
    return state


def convert_hf_dinov2(state):
    """Converts a Hugging Face Dinov2Model / Dinov2WithRegistersModel state dict to the
    official key layout. Both the hub files' names (attention.attention.query, ...) and
    newer transformers' names (attention.q_proj, mlp.gate_proj, ...) are accepted; split
    projections are fused back (q, k, v into qkv; gate, up into w12)."""
    state = {k.removeprefix("dinov2."): v for k, v in state.items()}
    renames = {
        "embeddings.cls_token": "cls_token", "embeddings.mask_token": "mask_token",
        "embeddings.position_embeddings": "pos_embed", "embeddings.register_tokens": "register_tokens",
        "embeddings.patch_embeddings.projection.": "patch_embed.proj.", "layernorm.": "norm.",
    }
    block_renames = {
        "attention.output.dense.": "attn.proj.", "attention.o_proj.": "attn.proj.",
        "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
        "mlp.weights_in.": "mlp.w12.", "mlp.weights_out.": "mlp.w3.", "mlp.down_proj.": "mlp.w3.",
    }
    # Split projections that the official layout keeps fused: name -> (fused name, part, parts).
    fused = {"attention.attention.query.": ("attn.qkv.", 0, 3), "attention.q_proj.": ("attn.qkv.", 0, 3),
             "attention.attention.key.": ("attn.qkv.", 1, 3), "attention.k_proj.": ("attn.qkv.", 1, 3),
             "attention.attention.value.": ("attn.qkv.", 2, 3), "attention.v_proj.": ("attn.qkv.", 2, 3),
             "mlp.gate_proj.": ("mlp.w12.", 0, 2), "mlp.up_proj.": ("mlp.w12.", 1, 2)}
    out, fused_parts = {}, {}
    for key, value in state.items():
        new_key = key
        if key.startswith("encoder.layer."):
            index, rest = key.removeprefix("encoder.layer.").split(".", 1)
            split = [(n, f) for n, f in fused.items() if rest.startswith(n)]
            if split:
                name, (fused_name, part, parts) = split[0]
                target = f"blocks.{index}.{fused_name}{rest[len(name):]}"
                fused_parts.setdefault(target, [None] * parts)[part] = value
                continue
            for old, new in block_renames.items():
                if rest.startswith(old):
                    rest = new + rest[len(old):]
                    break
            new_key = f"blocks.{index}.{rest}"
        else:
            for old, new in renames.items():
                if key.startswith(old):
                    new_key = new + key[len(old):]
                    break
        out[new_key] = value  # a key we do not know stays as is, so strict loading names it
    for key, parts in fused_parts.items():
        if any(p is None for p in parts):
            raise RuntimeError(f"Hugging Face DINOv2 weights lack one of the parts of {key}")
        out[key] = torch.cat(parts, dim=0)
    return out


def read_dinov2_weights(path):
    """A state dict in the official key layout from an official .pth, or from a Hugging
    Face model.safetensors / pytorch_model.bin."""
    hint = "pass the path of an official dinov2_*_pretrain.pth or a Hugging Face model.safetensors"
    if path.endswith(".safetensors"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"DINOv2 weight file not found: {path} ({hint})")
        return official_dinov2_layout(read_safetensors(path), path)
    return official_dinov2_layout(read_weights(path, "DINOv2 weight file", hint), path)


def official_dinov2_layout(state, path="the weights"):
    """An already loaded DINOv2 state dict in the official key layout (HF ports converted);
    a ValueError when it holds no DINOv2 (a DiT or tokenizer checkpoint, say)."""
    if any(k.startswith(("embeddings.", "dinov2.embeddings.")) for k in state):
        state = convert_hf_dinov2(state)
    if "patch_embed.proj.weight" not in state:
        kind = "a train_diffusion.py (LightningDiT) checkpoint" if "model_config" in state else \
            "a tokenizer checkpoint of stage 1-3" if "tokenizer_config" in state else \
            f"no DINOv2 weights (keys {sorted(state)[:5]}...)"
        raise ValueError(f"{path} is {kind}, but DINOv2 encoder weights were expected (an official "
                         f"dinov2_*_pretrain.pth, a Hugging Face model.safetensors or a stage-0 checkpoint)")
    return state
