"""Part F for ONNX Runtime only: the decoder written node by node with ONNX Runtime's fused operators.

Same inputs and outputs as the exported part F (the manifest's contract), a fraction of its kernels:
SkipSimplifiedLayerNormalization (residual add + RMSNorm), RotaryEmbedding on the cos/sin that parts
D / E give, GroupQueryAttention over the cache buffers, QuickGelu for SiLU. `slimm.export.quantize`
then turns its MatMuls into MatMulNBits / MatMulInteger as it does the exported F's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from slimm.config import SliMMConfig

MS = "com.microsoft"
FUSED_OPSET = 21  # uint4 / uint8 block tensors of the quantized MatMuls need 21 (quantize.py)
# fp16: see the check in export.check_export_settings; the mixed ones quantize the fused F both ways
FUSED_PRECISIONS = ("fp32", "int8", "int4", "w8a8", "int4+w8a8", "int8+w8a8")
# the KV cache's element type: the export's float type, or int8 with static per-channel scales that
# GroupQueryAttention dequantizes as it reads (a quarter of float32's cache memory and bytes read)
KV_CACHES = ("float", "int8")
# the calibration's largest magnitude per channel, doubled: inputs unlike the calibration prompts
# (random token ids, noise images) reached 1.5x its peaks, and a clipped entry's error has no bound,
# where rounding's is half a step. Measured on the tiny v1 checkpoint's test prompts: 1.1x gave
# 11-15% logits error and other greedy tokens, 1.5x 3-7%, 2x 1.2-2% and the same tokens.
KV_SCALE_MARGIN = 2.0


class _Graph:
    """Nodes and initializers with generated unique names."""

    def __init__(self) -> None:
        self.nodes: list = []
        self.inits: list = []
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, arr: np.ndarray, hint: str = "c") -> str:
        from onnx import numpy_helper

        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(arr, order="C"), name))
        return name

    def ints(self, *values: int, hint: str = "i") -> str:
        return self.const(np.array(values, np.int64), hint)

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, outputs=None, domain: str = "", **attrs):
        from onnx import helper

        outs = outputs or [self.name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(
            helper.make_node(op_type, inputs, outs, name=self.name(op_type), domain=domain or None, **attrs)
        )
        return outs[0] if len(outs) == 1 else outs


def _weights(model) -> dict:
    """NumPy float32 weights of the fused-q/k/v model (`LanguageModel.fuse`: queries pre-scaled)."""

    def arr(t):
        return t.detach().float().numpy()

    lm = model.model
    layers = []
    for layer in lm.layers:
        a, m = layer.self_attn, layer.mlp
        if a.qkv_proj is None:
            raise ValueError("the fused decoder is built from a model with fused q/k/v (model.model.fuse())")
        layers.append(
            {
                "in_norm": arr(layer.input_layernorm.weight),
                "post_norm": arr(layer.post_attention_layernorm.weight),
                "qkv": arr(a.qkv_proj.weight).T,
                "qkv_bias": arr(a.qkv_proj.bias),
                "o": arr(a.o_proj.weight).T,
                "gate": arr(m.gate_proj.weight).T,
                "up": arr(m.up_proj.weight).T,
                "down": arr(m.down_proj.weight).T,
            }
        )
    return {"layers": layers, "norm": arr(lm.norm.weight), "lm_head": arr(model.output_weight()).T}


def calibrate_kv_scales(model, ckpt_dir: Path, new_tokens: int = 16) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer, the int8 cache's (key, value) scales, each (1, KV, 1, D): the largest magnitude
    each channel reached while `model` answered a few calibration prompts (text, and the synthetic
    shapes scenes as images and a video), widened by KV_SCALE_MARGIN, over 127.

    Keys are stored after the rotation, which mixes channel i with channel i + D/2 by the position's
    angle; the scale of both is the largest norm of that pair (which no rotation changes), so the
    scales hold at positions the calibration never reached."""
    import torch

    from slimm.backends.torch import TorchBackend
    from slimm.processing import Processor
    from slimm.synthetic import make_sample

    layers = model.model.layers
    t = model.config.text
    KV, D = t.num_key_value_heads, t.head_dim
    peaks = [[np.zeros((KV, D), np.float32), np.zeros((KV, D), np.float32)] for _ in layers]

    def hook(j):
        def record(_module, _inputs, out):
            _, k, v = out  # (B, KV, S, D) each, the new entries this layer writes to the cache
            k = k.detach().float()
            half = D // 2
            pair = torch.sqrt(k[..., :half] ** 2 + k[..., half:] ** 2)  # rotation-invariant
            kmax = pair.amax(dim=(0, 2)).repeat(1, 2).numpy()
            vmax = v.detach().float().abs().amax(dim=(0, 2)).numpy()
            np.maximum(peaks[j][0], kmax, out=peaks[j][0])
            np.maximum(peaks[j][1], vmax, out=peaks[j][1])

        return record

    handles = [layer.register_forward_hook(hook(j)) for j, layer in enumerate(layers)]
    try:
        runner = TorchBackend(model, Processor.from_pretrained(ckpt_dir))
        scenes = [make_sample(0, i, "train", q) for i, q in enumerate(("describe", "count", "motion"))]
        prompts = [
            ("Write a short story about a lighthouse keeper who finds a message in a bottle.", {}),
            (scenes[0].question, {"images": [scenes[0].image]}),
            (scenes[1].question, {"images": [scenes[1].image]}),
            (scenes[2].question, {"videos": [scenes[2].frames]}),
        ]
        with torch.no_grad():
            for text, media in prompts:
                inputs = runner.prepare(text, **media)
                runner.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    finally:
        for h in handles:
            h.remove()
    out = []
    for kmax, vmax in peaks:
        pair = tuple(
            (np.maximum(x, 1e-6) * KV_SCALE_MARGIN / 127.0).reshape(1, KV, 1, D).astype(np.float32)
            for x in (kmax, vmax)
        )
        out.append(pair)
    return out


def fused_decoder(model, cfg: SliMMConfig, inputs: list, outputs: list, kv_scales=None):
    """The fused part F as an onnx.ModelProto (float32 weights inside: save it with external data).

    `inputs` / `outputs` are the manifest's tensors for F (slimm.export.manifest.io_spec).
    `kv_scales` (calibrate_kv_scales): an int8 cache, its past entries read through these scales by
    GroupQueryAttention and the new entries written out quantized with them."""
    from onnx import TensorProto, helper

    t = cfg.text
    H, KV, D, d = (
        t.num_attention_heads,
        t.num_key_value_heads,
        t.head_dim,
        t.hidden_size,
    )
    eps = float(t.rms_norm_eps)
    w = _weights(model)
    g = _Graph()
    I64, F32 = TensorProto.INT64, TensorProto.FLOAT

    # ---- once per step: lengths, the attention bias, the rotary tables --------------------------------
    shape_cur = g.op("Shape", ["cur_mask"])
    B = g.op("Slice", [shape_cur, g.ints(0), g.ints(1)])  # (1,)
    S = g.op("Slice", [shape_cur, g.ints(1), g.ints(2)])
    T = g.op("Slice", [g.op("Shape", ["past_mask"]), g.ints(1), g.ints(2)])
    S0, T0 = (g.op("Squeeze", [x, g.ints(0)]) for x in (S, T))  # scalars
    one, zero = g.const(np.array(1, np.int64)), g.const(np.array(0, np.int64))
    # a row's length = one past its last real cache slot (the host writes new entries there); rows
    # left out of a decode step may be full: clamped so that GroupQueryAttention stays in the buffer
    slots = g.op("Range", [one, g.op("Add", [T0, one]), one])  # 1..T
    lens = g.op("ReduceMax", [g.op("Mul", ["past_mask", slots]), g.ints(1)], keepdims=0)  # (B,)
    lens = g.op("Min", [lens, g.op("Sub", [T0, S0])])
    seqlens_k = g.op("Cast", [g.op("Sub", [g.op("Add", [lens, S0]), one])], to=TensorProto.INT32)
    total = g.op("Add", [g.op("ReduceMax", [lens], keepdims=0), S0])  # scalar: longest row + S
    total32 = g.op("Cast", [total], to=TensorProto.INT32)
    # bias over key positions 0..total-1: cache slots by past_mask, the current tokens (at lens..) by
    # cur_mask; GroupQueryAttention applies the causal limit itself
    cols = g.op("Unsqueeze", [g.op("Range", [zero, total, one]), g.ints(0)])  # (1, total)
    lens_col = g.op("Unsqueeze", [lens, g.ints(1)])  # (B, 1)
    in_past = g.op("Less", [cols, lens_col])
    past = g.op("Slice", ["past_mask", g.ints(0), g.op("Unsqueeze", [total, g.ints(0)]), g.ints(1)])
    cur_idx = g.op("Clip", [g.op("Sub", [cols, lens_col]), zero, g.op("Sub", [S0, one])])
    cur = g.op("GatherElements", ["cur_mask", cur_idx], axis=1)
    allowed = g.op("Cast", [g.op("Where", [in_past, past, cur])], to=TensorProto.BOOL)
    neg = g.const(np.array(np.finfo(np.float32).min, np.float32))  # finite: a padded row stays finite
    bias = g.op("Where", [allowed, g.const(np.array(0.0, np.float32)), neg])  # (B, total)
    bias = g.op("Unsqueeze", [bias, g.ints(1, 2)])  # (B, 1, 1, total)
    bias_shape = g.op("Concat", [B, g.ints(1), S, g.op("Unsqueeze", [total, g.ints(0)])], axis=0)
    bias = g.op("Expand", [bias, bias_shape])  # (B, 1, S, total)
    # the rotary tables are this step's own cos/sin, one row per token (M-RoPE positions included):
    # RotaryEmbedding looks token (b, s) up at row b*S + s
    half = g.ints(D // 2)
    tables = []
    for x in ("cos", "sin"):
        flat = g.op("Reshape", [x, g.ints(-1, D)])
        tables.append(g.op("Slice", [flat, g.ints(0), half, g.ints(1)]))  # (B*S, D/2)
    BS = g.op("Mul", [B, S])
    rows = g.op("Range", [zero, g.op("Squeeze", [BS, g.ints(0)]), one])
    pos_ids = g.op("Reshape", [rows, g.op("Concat", [B, S], axis=0)])  # (B, S)
    bsd = g.op("Shape", ["inputs_embeds"])

    def deepstack_add(x: str, j: int) -> str:
        """DeepStack slice for layer j added at the visual tokens (prefill; decode adds zeros)."""
        k = (j - cfg.local_features_start) // cfg.local_features_interval
        if not cfg.use_deepstack or j < cfg.local_features_start or k >= cfg.num_deepstack:
            return x
        flat = g.op("Reshape", [x, g.ints(-1, d)])
        sl = g.op("Gather", ["deepstack", g.const(np.array(k, np.int64))], axis=0)  # (L, d)
        idx = g.op("Unsqueeze", ["visual_pos", g.ints(1)])
        flat = g.op("ScatterND", [flat, idx, sl], reduction="add")
        return g.op("Reshape", [flat, bsd])

    def linear(x: str, weight: np.ndarray, hint: str, bias: np.ndarray | None = None) -> str:
        y = g.op("MatMul", [x, g.const(weight, hint)])
        return y if bias is None else g.op("Add", [y, g.const(bias, hint + "_bias")])

    # ---- the layers ---------------------------------------------------------------------------------------
    h = deepstack_add("inputs_embeds", 0)
    x = g.op(
        "SimplifiedLayerNormalization", [h, g.const(w["layers"][0]["in_norm"], "norm0")], axis=-1, epsilon=eps
    )
    resid = h
    mlp_out = None
    for j, lw in enumerate(w["layers"]):
        if j:
            x, resid = g.op(
                "SkipSimplifiedLayerNormalization",
                [deepstack_add(mlp_out, j), resid, g.const(lw["in_norm"], f"in_norm{j}")],
                outputs=[g.name("x"), "", "", g.name("resid")],
                domain=MS,
                epsilon=eps,
            )[::3]
        qkv = linear(x, lw["qkv"], f"qkv{j}", lw["qkv_bias"])
        q, k, v = g.op("Split", [qkv, g.ints(H * D, KV * D, KV * D)], n_out=3, axis=-1)
        q = g.op("RotaryEmbedding", [q, pos_ids, *tables], domain=MS, num_heads=H)
        k = g.op("RotaryEmbedding", [k, pos_ids, *tables], domain=MS, num_heads=KV)
        gqa_in = [q, k, v, f"past_key.{j}", f"past_value.{j}", seqlens_k, total32, "", "", "", bias]
        quant = {}
        if kv_scales is not None:
            scales = [g.const(x, f"{n}_scale{j}") for n, x in zip("kv", kv_scales[j], strict=True)]
            gqa_in += ["", *scales]  # no head_sink
            quant = dict(k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL", kv_cache_bit_width=8)
        attn = g.op(
            "GroupQueryAttention",
            gqa_in,
            n_out=3,
            domain=MS,
            num_heads=H,
            kv_num_heads=KV,
            scale=1.0,  # the queries are pre-scaled (LanguageModel.fuse)
            **quant,
        )[0]
        for i, (new, out) in enumerate(((k, f"present_key.{j}"), (v, f"present_value.{j}"))):
            heads = g.op("Reshape", [new, g.ints(0, 0, KV, D)])  # (B, S, KV, D)
            if kv_scales is None:
                g.op("Transpose", [heads], outputs=[out], perm=[0, 2, 1, 3])  # (B, KV, S, D)
                continue
            heads = g.op("Transpose", [heads], perm=[0, 2, 1, 3])
            # symmetric int8 as GroupQueryAttention stores it: round(x / scale), saturated
            steps = g.op("Round", [g.op("Div", [heads, scales[i]])])
            lo, hi = g.const(np.array(-128, np.float32)), g.const(np.array(127, np.float32))
            g.op("Cast", [g.op("Clip", [steps, lo, hi])], outputs=[out], to=TensorProto.INT8)
        o = linear(attn, lw["o"], f"o{j}")
        x, resid = g.op(
            "SkipSimplifiedLayerNormalization",
            [o, resid, g.const(lw["post_norm"], f"post_norm{j}")],
            outputs=[g.name("x"), "", "", g.name("resid")],
            domain=MS,
            epsilon=eps,
        )[::3]
        gate = g.op("QuickGelu", [linear(x, lw["gate"], f"gate{j}")], domain=MS, alpha=1.0)  # SiLU
        mlp_out = linear(g.op("Mul", [gate, linear(x, lw["up"], f"up{j}")]), lw["down"], f"down{j}")

    # ---- the last position: final norm and lm_head ---------------------------------------------------------
    last = [
        g.op("Slice", [y, g.ints(-1), g.ints(np.iinfo(np.int64).max), g.ints(1)]) for y in (mlp_out, resid)
    ]
    final = g.op(
        "SkipSimplifiedLayerNormalization",
        [*last, g.const(w["norm"], "norm")],
        domain=MS,
        epsilon=eps,
    )
    logits = g.op("MatMul", [g.op("Squeeze", [final, g.ints(1)]), g.const(w["lm_head"], "lm_head")])
    g.op("Identity", [logits], outputs=["logits"])
    g.op("ArgMax", [logits], outputs=["next_token"], axis=-1, keepdims=0)

    dtypes = {"float32": F32, "int64": I64, "float16": TensorProto.FLOAT16, "int8": TensorProto.INT8}

    def info(tensor):
        return helper.make_tensor_value_info(tensor.name, dtypes[tensor.dtype], tensor.dims)

    graph = helper.make_graph(
        g.nodes, "SliMM_F_fused", [info(x) for x in inputs], [info(x) for x in outputs], g.inits
    )
    model_proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", FUSED_OPSET), helper.make_opsetid(MS, 1)],
        producer_name="slimm",
    )
    model_proto.ir_version = 10
    return model_proto


def contrib_ops(path: str | Path) -> list[str]:
    """Op types of ONNX Runtime's own domain (com.microsoft) in a model file: what only ONNX Runtime runs."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return sorted({node.op_type for node in model.graph.node if node.domain == MS})
