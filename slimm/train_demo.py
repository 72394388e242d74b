"""Train the demo SliMM (DeepStack v1) on the synthetic shapes task of slimm.synthetic, with torch on
the CPU, seeded, and write it as a checkpoint in the released format with the real Qwen tokenizer.

    python -m slimm.train_demo --out DIR --seed 0 [--steps N] [--minutes 20] [--package ASSET_DIR]

On a shared machine run it as `OMP_WAIT_POLICY=PASSIVE nice -n 10 python -m slimm.train_demo ...`:
idle OpenMP threads then sleep instead of spinning, which also keeps the CPU-time cap honest.

Only the token rows the task uses are trained: the model is built with a compact vocabulary of those
rows, and the checkpoint's 151936-row embedding (tied to the output layer) holds them at their real
ids and zeros everywhere else, so the shipped weights compress to almost nothing but the layers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from slimm.config import SliMMConfig, load_config
from slimm.processing import QWEN2_VL_CHAT_TEMPLATE, Processor
from slimm.synthetic import (
    COLOURS,
    KINDS,
    MAX_COUNT,
    QUESTION_TYPES,
    Sample,
    all_texts,
    make_sample,
    number_word,
)

DIRECTIONS = ("left", "right", "up", "down")
SIDES = ("left", "right", "top", "bottom")

VARIANT = "v1"  # DeepStack: four slices of each visual token's sub-patches added in LLM layers 1..4
LLM = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=5, num_attention_heads=2, num_key_value_heads=2
)
VISION = dict(depth=4, embed_dim=64, num_heads=2)
MAX_PIXELS = 28 * 28 * 64  # larger images are shrunk to at most 64 LLM tokens: the task's scale
ANSWER_TOKENS_MAX = 16  # longest answer ("A yellow triangle left of a green circle.") with room


@dataclass
class TrainSettings:
    # ~0.38 s of CPU per step at one thread with the vision steps (~0.2 s each): 19.8 of the 20 minutes
    # on a 2-core AMD EPYC (a slower machine stops a little earlier, with a warning)
    steps: int = 2800
    batch: int = 16
    # 2e-3 kept the look-up from settling (colour questions alone learnt only as the short cosine
    # schedule of a 300-step run brought it down to ~1e-3); 4e-3 blew the visual tokens up
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.01
    # cap on the work done: process CPU time / threads, which is the wall time on an idle machine
    # (on a shared machine the wall time is longer; it is logged too; spinning OpenMP threads inflate
    # the CPU time unless OMP_WAIT_POLICY=PASSIVE). Stops early with a warning.
    minutes: float = 20.0
    # the cap is per thread. One: two ran a step in 0.5 s against 0.3 s (ops this small gain nothing
    # from a second thread but its wake-ups), and one leaves the other core of a 2-core machine free
    threads: int = 1
    log_every: int = 10
    eval_every: int = 250  # teacher-forced held-out check on `eval_n` samples (cheap, batched)
    eval_n: int = 120
    # question types drawn for training, by weight (counting is the hardest to learn: drawn 1.2 as
    # often as colour and joining at 0.2, it reached 60% held out; 2.0 and 0.15, 78%)
    type_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 2.0, 1.2, 0.8)
    # a curriculum: the share of the steps after which each question type joins. Drawn together from
    # the start, the types kept each other at chance for thousands of steps (measured: colour
    # questions alone 0.70 teacher-forced after 300 steps; colour with describe 0.20 after 300; all
    # six 0.20-0.35 after 6000). Colour first builds the look-up the others reuse (find the cell a
    # word names, read what it holds); each later type then only adds what it reads.
    join_at: tuple[float, ...] = (0.0, 0.1, 0.2, 0.15, 0.4, 0.3)  # QUESTION_TYPES order
    # steps that train the vision tower and merger alone on the cell targets, before the language
    # model joins: the look-up then learns against visual tokens that already say what they hold
    vision_steps: int = 600
    vision_lr: float = 2e-3
    aux_weight: float = 1.0  # the per-cell loss (AUX_HEADS) beside the answer loss
    focus_weight: float = 1.0  # the attention losses (LOOKUP_LAYER, READ_LAYER) beside the answer loss


# ---- the checkpoint around the weights ---------------------------------------------------------------


def checkpoint_files(seed: int) -> dict[str, dict]:
    """config.json, generation_config.json, preprocessor_config.json of the trained demo model."""
    from slimm.demo import demo_configs

    files = demo_configs(VARIANT, "tiny")
    cfg = files["config.json"]
    cfg.update(LLM, torch_dtype="float32")
    cfg["vision_config"].update(VISION)
    files["preprocessor_config.json"]["max_pixels"] = MAX_PIXELS
    return files


def write_checkpoint_files(out: Path, seed: int) -> None:
    """Everything of a checkpoint but model.safetensors, through slimm.demo's writers."""
    from slimm.demo import copy_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    for name, content in checkpoint_files(seed).items():
        (out / name).write_text(json.dumps(content, indent=2))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": QWEN2_VL_CHAT_TEMPLATE}, indent=2))
    copy_tokenizer(out)


# ---- the compact vocabulary --------------------------------------------------------------------------


@dataclass
class CompactVocab:
    ids: np.ndarray  # (n,) real token ids, sorted; compact id i <-> real id ids[i]
    frozen: np.ndarray  # (n,) bool: rows that stay zero (padding and the visual placeholders)
    vocab_size: int  # the checkpoint's full vocabulary

    def to_compact(self, real: list[int] | np.ndarray) -> np.ndarray:
        real = np.asarray(real, dtype=np.int64)
        pos = np.searchsorted(self.ids, real)
        bad = (pos >= len(self.ids)) | (self.ids[np.minimum(pos, len(self.ids) - 1)] != real)
        if bad.any():
            raise ValueError(
                f"token ids {sorted(set(real[bad].tolist()))[:10]} are not in the demo vocabulary"
            )
        return pos


def task_vocab(processor: Processor, cfg: SliMMConfig) -> CompactVocab:
    """Every token a prompt or an answer of the task can hold (the chat template around each
    question with an image and with a video, each answer, the stop tokens)."""
    tok = processor.tokenizer
    used: set[int] = set(cfg.eos_token_id) | {cfg.pad_token_id}
    for text in all_texts():
        used.update(tok.encode(text))
        for media in ("image", "video"):
            messages = [{"role": "user", "content": [{"type": media}, {"type": "text", "text": text}]}]
            used.update(tok.encode(processor.apply_chat_template(messages, add_generation_prompt=True)))
    ids = np.array(sorted(used), dtype=np.int64)
    # never looked up for a real token: padding is masked out, placeholders are overwritten by vision
    frozen = np.isin(ids, [cfg.pad_token_id, cfg.image_token_id, cfg.video_token_id])
    return CompactVocab(ids, frozen, cfg.text.vocab_size)


def compact_config(cfg: SliMMConfig, vocab: CompactVocab) -> SliMMConfig:
    """The same model with the vocabulary cut to the task's rows and the special ids renumbered."""
    remap = {
        name: int(vocab.to_compact([getattr(cfg, name)])[0])
        for name in ("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id")
    }
    text = dataclasses.replace(cfg.text, vocab_size=len(vocab.ids))
    return dataclasses.replace(cfg, text=text, **remap)


# ---- samples to batches ------------------------------------------------------------------------------


@dataclass
class Encoded:
    prompt: np.ndarray  # compact ids of the chat prompt, placeholders expanded
    answer: np.ndarray  # compact ids of the answer and the stop token
    pixels: np.ndarray | None
    grid: np.ndarray | None
    is_video: bool
    cells: np.ndarray | None = None  # (L, len(AUX_HEADS)) per visual token, IGNORE where unknown
    visual_at: np.ndarray | None = None  # (L,) positions of the visual tokens in `prompt`
    # over the sequence prompt + answer (N positions): where each position's query looks
    look: np.ndarray | None = None  # (N, L) bool, in LOOKUP_LAYER: the visual tokens a word names
    sink: np.ndarray | None = None  # (N,) bool: <|vision_start|> too, as much as each of those tokens
    read: np.ndarray | None = None  # (N, N) bool, in READ_LAYER: the question words an answer reads


def encode(
    processor: Processor, vocab: CompactVocab, sample: Sample, stop_id: int, spatial_merge: int = 2
) -> Encoded:
    media = "video" if sample.frames is not None else "image"
    messages = [{"role": "user", "content": [{"type": media}, {"type": "text", "text": sample.question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    if media == "video":
        inputs = processor(text=[text], videos=[sample.frames])
        pixels, grid = inputs["pixel_values_videos"], inputs["video_grid_thw"]
    else:
        inputs = processor(text=[text], images=[sample.image])
        pixels, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    answer = processor.tokenizer.encode(sample.answer) + [stop_id]
    cells = cell_targets(sample, grid[0], spatial_merge)
    real = np.concatenate([inputs["input_ids"][0], answer])
    words = [processor.tokenizer.decode([int(i)]).strip().lower() for i in real]
    prompt_len = len(inputs["input_ids"][0])
    visual_at = np.nonzero(np.isin(real[:prompt_len], (processor.image_token_id, processor.video_token_id)))[
        0
    ]
    question_at = int(visual_at.max()) + 1  # after the visual tokens
    look = look_targets(sample, words, prompt_len, question_at, cells, grid[0], spatial_merge)
    return Encoded(
        vocab.to_compact(inputs["input_ids"][0]),
        vocab.to_compact(answer),
        pixels,
        grid,
        media == "video",
        cells,
        visual_at,
        look,
        np.array([w.endswith("s") and w[:-1] in KINDS for w in words]) & look.any(axis=1),
        read_targets(sample, words, prompt_len, question_at),
    )


# what each visual token (one 28 x 28 cell after the merger, per temporal step for a video) is taught
# to say about itself while training, through a linear head that is not part of the checkpoint: the
# kind and colour of the shape whose centre falls in the cell (each shape is then named by exactly one
# token), how many shapes of that kind the image holds, which half of the image the cell lies in, and
# for a video which way the shape in the cell moves (the two frames of a temporal patch show it). A
# dense signal straight into the vision tower: with the answer loss alone it reaches the vision tower
# too weakly, and the model learns the question's priors before it learns to look.
AUX_HEADS = (
    ("kind", 1 + len(KINDS)),
    ("colour", 1 + len(COLOURS)),
    ("count", 1 + MAX_COUNT),  # shapes of the centred shape's kind (up to MAX_COUNT of any one kind)
    ("x_half", 2),
    ("y_half", 2),
    ("motion", 1 + len(DIRECTIONS)),
    ("layout", 2),  # two-shape scenes: side by side / one above the other (centre cells only)
    ("first", 2),  # two-shape scenes: the left (upper) shape / the other, the order "describe" names them
    ("kind_linear", 1 + len(KINDS)),  # kind and colour again, by a linear layer: a plain, fixed target
    ("colour_linear", 1 + len(COLOURS)),
    ("side", 1 + len(SIDES)),  # two-shape scenes: the answer to "Where is" this shape
)
IGNORE = -100
SHAPE_HEADS = (
    "kind",
    "colour",
    "count",
    "kind_linear",
    "colour_linear",
    "side",
)  # about the shape a token holds
# the kind and colour heads score a visual token against the embeddings of the words that name them
# (" triangle", " red", as in "A red triangle left of ..."), next to a learned "none" row: the token
# that shows a red triangle then points where the question's words point, so the language model's
# attention finds it by the word itself instead of first learning how one space maps onto the other
WORD_HEADS = {
    "kind": [" " + k for k in KINDS],
    "colour": [" " + c for c in COLOURS],
    # the answers' own words: what the token says is then the answer's output row itself (the output
    # layer is the embedding), read out as directly as a colour
    "count": [number_word(n).capitalize() for n in range(1, MAX_COUNT + 1)],
    "side": [w.capitalize() for w in SIDES],
    "motion": [w.capitalize() for w in DIRECTIONS],
}
WORD_SCALE = 10.0  # cosine similarities to logits


def shape_cell(shape, size: tuple[int, int], rows: int, cols: int) -> tuple[int, int]:
    """(row, col) of the merged visual token (LLM token) that holds `shape`'s centre in an image of
    `size` (width, height) split into rows x cols tokens."""
    (cx, cy), (w, h) = shape.centre, size
    return min(rows - 1, int(cy // (h / rows))), min(cols - 1, int(cx // (w / cols)))


def cell_targets(sample: Sample, grid_thw: np.ndarray, merge: int) -> np.ndarray:
    """(t * rows * cols, len(AUX_HEADS)) targets in the merger's token order (t, row, col)."""
    gt, gh, gw = (int(v) for v in grid_thw)
    rows, cols = gh // merge, gw // merge
    frames = sample.frames if sample.frames is not None else [sample.image]
    w, h = frames[0].size
    cw, ch = w / cols, h / rows
    xs, ys = (np.arange(cols) + 0.5) * cw, (np.arange(rows) + 0.5) * ch
    out = np.full((gt, rows, cols, len(AUX_HEADS)), IGNORE, dtype=np.int64)
    for t in range(gt):
        cell = out[t]
        cell[:, :, :3] = 0
        if sample.frames is None:
            shapes = sample.shapes
        else:  # the video's one shape, found in the first frame of this temporal patch
            first = frames[t * (len(frames) // gt)]
            shapes = [dataclasses.replace(sample.shapes[0], box=_box_of(first))]
            cell[:, :, 5] = 0
            direction = DIRECTIONS.index(sample.answer.rstrip(".").lower())
            for f in frames[t * (len(frames) // gt) : (t + 1) * (len(frames) // gt)]:
                x0, y0, x1, y1 = _box_of(f)
                r0, r1 = int(y0 // ch), min(rows - 1, int((y1 - 1) // ch))
                c0, c1 = int(x0 // cw), min(cols - 1, int((x1 - 1) // cw))
                cell[r0 : r1 + 1, c0 : c1 + 1, 5] = 1 + direction
        if sample.type != "count" and len(shapes) == 2:
            cell[:, :, 10] = 0
        for sh in shapes:
            r, c = shape_cell(sh, (w, h), rows, cols)
            cell[r, c, 0] = 1 + KINDS.index(sh.kind)
            cell[r, c, 1] = 1 + list(COLOURS).index(sh.colour)
            cell[r, c, 2] = sum(o.kind == sh.kind for o in shapes)
        if sample.type != "count" and len(shapes) == 2:
            horizontal = shapes[0].box[2] <= w / 2 <= shapes[1].box[0]
            for i, sh in enumerate(shapes):
                r, c = shape_cell(sh, (w, h), rows, cols)
                cell[r, c, 6] = 0 if horizontal else 1
                cell[r, c, 7] = i
                cell[r, c, 10] = 1 + SIDES.index((("left", "right") if horizontal else ("top", "bottom"))[i])
        cell[:, :, 3] = np.where(xs < w / 2, 0, 1)[None, :]
        cell[:, :, 4] = np.where(ys < h / 2, 0, 1)[:, None]
        cell[:, np.abs(xs - w / 2) < 1e-6, 3] = IGNORE  # the middle column of an odd grid: neither half
        cell[np.abs(ys - h / 2) < 1e-6, :, 4] = IGNORE
    out[..., 8:10] = out[..., 0:2]
    if sample.frames is not None:  # no question asks a video's shape: its moving, cell-straddling kind
        out[..., [0, 1, 2, 8, 9]] = IGNORE  # and colour are left out
    return out.reshape(-1, len(AUX_HEADS))


def _box_of(frame) -> tuple[int, int, int, int]:
    """Bounding box of what is not background (the corner pixel's colour) in a scene."""
    a = np.asarray(frame)
    ys, xs = np.nonzero((a != a[0, 0]).any(axis=2))
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


# Where the language model looks, taught to two attention heads (head 0 of two layers). The look-up
# a question asks for (find the shape it names, read what that shape's token says) is split in two
# one-hop steps, each of which a head can learn from the token embeddings alone:
# - LOOKUP_LAYER: every word that names shapes (" triangle", " red", " triangles", in the question or
#   in a "describe" answer) looks at the visual tokens of the shapes it names, whose kind and colour
#   were taught to point where those words' embeddings point (WORD_HEADS): a match of a word with
#   itself. The word's position then holds what its shapes' tokens say (colour, kind, count, which
#   side). In a "describe" answer, "A" and "a" look at the first (left / upper) and the second shape;
#   for a video, the position that answers looks at the tokens the shape passes through.
# - READ_LAYER: the position that gives the answer's key word ("Red", "triangle", "Left", "Two")
#   looks at the question's words that name the shapes, and reads what they found.
# Taught the other way round (the answer position first gathering the question's words, then looking
# at the cells with what it gathered: two hops from one position), the second head put about 0.6 of
# its attention on the right cells after 1000 steps and the look-up stayed the weak link (71% held out).
# Counting: "triangles" looks at every triangle and, as much as at each, at <|vision_start|> (see
# focus_loss). The vision tower alone counts badly: without a token that is always there once, its
# attention gives the average of the triangles' tokens, the same for one as for three (its per-cell
# count head stays near 0.8 however long it trains). Counting is still the weak type (78% held out).
LOOKUP_LAYER = 1
READ_LAYER = 2
NAMES = set(KINDS) | set(COLOURS) | {k + "s" for k in KINDS}


def _named(sample: Sample, word: str) -> list:
    return [s for s in sample.shapes if word in (s.kind, s.colour, s.kind + "s")]


def look_targets(
    sample: Sample,
    words: list[str],
    prompt_len: int,
    question_at: int,
    cells: np.ndarray,
    grid_thw: np.ndarray,
    merge: int,
) -> np.ndarray:
    """(len(words), L) bool: the visual tokens each position of prompt + answer (spelling `words`)
    looks at in LOOKUP_LAYER (none for most)."""
    gt, gh, gw = (int(v) for v in grid_thw)
    rows, cols = gh // merge, gw // merge
    out = np.zeros((len(words), gt * rows * cols), dtype=bool)
    if sample.frames is not None:  # motion: the position that answers, at every cell the shape passes
        out[prompt_len - 1] = cells[:, 5] > 0
        return out

    def cell(shape) -> int:
        r, c = shape_cell(shape, sample.image.size, rows, cols)
        return r * cols + c

    for p in range(question_at, len(words)):  # the question and the answer (the template names nothing)
        for shape in _named(sample, words[p]):
            out[p, cell(shape)] = True
    if sample.type == "describe":  # "A" and "a" name the first and the second shape
        answer = words[prompt_len:]
        out[prompt_len + answer.index("a"), cell(sample.shapes[0])] = True
        out[prompt_len + len(answer) - 1 - answer[::-1].index("a"), cell(sample.shapes[1])] = True
    return out


def read_targets(sample: Sample, words: list[str], prompt_len: int, question_at: int) -> np.ndarray:
    """(len(words), len(words)) bool: the position that predicts the answer's key word looks at the
    question's words that name shapes (nothing for "describe" and motion, which name nothing)."""
    out = np.zeros((len(words), len(words)), dtype=bool)
    if sample.type in ("describe", "motion"):
        return out
    answer = words[prompt_len:]
    key = next(i for i, w in enumerate(answer) if w not in ("the", "a", ""))
    named = [p for p in range(question_at, prompt_len) if words[p] in NAMES]
    out[prompt_len - 1 + key, named] = True
    return out


def collate(items: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompt+answer rows; `targets` at `rows`/`cols` are the tokens predicted there."""
    seqs = [np.concatenate([e.prompt, e.answer]) for e in items]
    S = max(len(s) for s in seqs)
    ids = np.full((len(items), S), pad_id, dtype=np.int64)
    mask = np.zeros((len(items), S), dtype=np.int64)
    rows, cols, targets = [], [], []
    for b, (e, s) in enumerate(zip(items, seqs, strict=True)):
        ids[b, S - len(s) :] = s
        mask[b, S - len(s) :] = 1
        first = S - len(e.answer)  # position of the first answer token
        rows += [b] * len(e.answer)
        cols += list(range(first - 1, S - 1))  # the position before each answer token predicts it
        targets += e.answer.tolist()
    batch = {
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.from_numpy(mask),
        "rows": torch.tensor(rows),
        "cols": torch.tensor(cols),
        "targets": torch.tensor(targets),
        "answer_of": torch.tensor([b for b, e in enumerate(items) for _ in e.answer]),
    }
    batch["cells"] = torch.from_numpy(np.concatenate([e.cells for e in items]))  # row order = token order
    # the positions taught where to look, and where: (rows, cols) of each query, (Q, S) key masks
    for name in ("look", "read"):
        q_rows, q_cols, masks = [], [], []
        for b, (e, seq) in enumerate(zip(items, seqs, strict=True)):
            pad = S - len(seq)
            targets_of = getattr(e, name)
            for p in np.nonzero(targets_of.any(axis=1))[0]:
                m = np.zeros(S, dtype=bool)
                if name == "look":
                    m[pad + e.visual_at] = targets_of[p]
                    m[pad + e.visual_at[0] - 1] = e.sink[p]  # <|vision_start|>
                else:
                    m[pad:] = targets_of[p]
                q_rows.append(b)
                q_cols.append(pad + p)
                masks.append(m)
        batch[name + "_rows"] = torch.tensor(q_rows, dtype=torch.long)
        batch[name + "_cols"] = torch.tensor(q_cols, dtype=torch.long)
        batch[name] = torch.from_numpy(np.array(masks, dtype=bool).reshape(len(masks), S))
    for key, video in (("", False), ("_videos", True)):
        chosen = [e for e in items if e.is_video == video]
        if chosen:
            batch["pixel_values" + key] = torch.from_numpy(np.concatenate([e.pixels for e in chosen]))
            batch[("video" if video else "image") + "_grid_thw"] = torch.from_numpy(
                np.concatenate([e.grid for e in chosen])
            )
    return batch


# ---- the model ---------------------------------------------------------------------------------------


def init_weights(model: torch.nn.Module, vocab: CompactVocab, seed: int) -> None:
    """GPT-2-style initialisation, seeded; residual output projections scaled down by depth."""
    gen = torch.Generator().manual_seed(seed)
    n_layers = model.config.text.num_hidden_layers + model.config.vision.depth
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0 if name.endswith("weight") else 0.0)  # norms' scales, biases
                continue
            std = 0.02
            if name.endswith(("o_proj.weight", "down_proj.weight", "attn.proj.weight", "fc2.weight")):
                std /= math.sqrt(2 * n_layers)
            p.copy_(torch.randn(p.shape, generator=gen) * std)
        model.model.embed_tokens.weight[torch.from_numpy(vocab.frozen)] = 0.0


def forward_answers(model, batch: dict[str, torch.Tensor], with_visual: bool = False):
    """Logits (A, n) at the answer positions over the compact rows (and, with `with_visual`, the
    image tokens as the merger wrote them into the sequence, in prompt order)."""
    cfg = model.config
    ids, mask = batch["input_ids"], batch["attention_mask"]
    h, slices, visual_pos = model.embed(
        ids,
        batch.get("pixel_values"),
        batch.get("image_grid_thw"),
        batch.get("pixel_values_videos"),
        batch.get("video_grid_thw"),
    )
    position_ids, _ = model.rope_index(ids, batch.get("image_grid_thw"), batch.get("video_grid_thw"), mask)
    cos, sin = model.model.rope(position_ids, h.dtype)
    hidden, _, _ = model.model(
        h,
        cos,
        sin,
        *model.empty_cache(ids.shape[0]),
        mask,
        slices,
        visual_pos,
        cfg.local_features_start,
        cfg.local_features_interval,
    )
    picked = hidden[batch["rows"], batch["cols"]]  # (A, d)
    logits = picked @ model.model.embed_tokens.weight.T  # (A, n)
    if not with_visual:
        return logits
    visual = (ids == cfg.image_token_id) | (ids == cfg.video_token_id)
    return logits, h[visual]


class AttentionTap:
    """Keeps the inputs of one decoder layer's attention at each forward pass (training only), so that
    the attention of its head 0 at the answer positions can be taught where to look (LOOKUP_LAYER, READ_LAYER)."""

    def __init__(self, attn: torch.nn.Module) -> None:
        self.attn = attn
        self.args: tuple | None = None
        attn.register_forward_pre_hook(self._keep)

    def _keep(self, module, args) -> None:
        self.args = args

    def log_probs(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Head 0's log attention (A, S) of the query at (rows, cols) over the sequence."""
        x, cos, sin, bias = self.args[:4]  # bias (B, 1, 1, S, S): no cache while training
        # the loss trains this head's query and key projections only. Through the residual stream too,
        # it steered the heads (0.9 of the attention on the right cells) but the answers fell to one
        # colour for all (0.25-0.30 after 800 steps, against 0.65-0.70 without it); detached, colour
        # 0.85 and shape 0.45 after 600 steps (against 0.65 and 0.30)
        x = x.detach()
        q, k, _ = self.attn.project(x, cos, sin)  # (B, H, S, D) scaled, (B, KV, S, D)
        scores = (q[rows, 0, cols, None, :] * k[rows, 0]).sum(-1) + bias[rows, 0, 0, cols]  # (A, S)
        return torch.log_softmax(scores.float(), dim=-1)


def focus_loss(log_probs: torch.Tensor, focus: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Cross-entropy of the attention against an even spread over the focus positions, averaged
    over the rows that have some; and the attention mass on them (for the log).
    Even, not just all on them: "How many triangles" looks at every triangle and, as much as at
    each, at <|vision_start|>, so the share that lands on the triangles (1/2, 2/3, 3/4) says how
    many there are. Taught only to look at the triangles, the head gave their average, which is
    the same for one triangle as for three."""
    has = focus.any(dim=1)
    if not has.any():
        return torch.zeros(()), 0.0
    lp, on = log_probs[has], focus[has]
    ce = -lp.masked_fill(~on, 0.0).sum(dim=-1) / on.sum(dim=-1)
    mass = lp.masked_fill(~on, float("-inf")).logsumexp(dim=-1).exp()
    return ce.mean(), float(mass.detach().mean())


class CellHead(torch.nn.Module):
    """AUX_HEADS scores of visual tokens: WORD_HEADS by cosine against the word embeddings (and a
    learned "none" row), the rest by a linear layer. Training only; not part of the checkpoint."""

    def __init__(self, hidden: int, embed: torch.nn.Embedding, word_rows: dict[str, list[int]]) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(hidden, sum(n for _, n in AUX_HEADS))
        self.embed = [embed]  # not a submodule: the model owns it
        self.word_rows = {k: torch.tensor(v) for k, v in word_rows.items()}
        self.none = torch.nn.ParameterDict(
            {k: torch.nn.Parameter(torch.randn(hidden) * 0.02) for k in word_rows}
        )

    def forward(self, visual: torch.Tensor) -> torch.Tensor:
        scores = self.linear(visual)
        v = F.normalize(visual, dim=-1)
        start, parts = 0, []
        for name, n in AUX_HEADS:
            if name in self.word_rows:
                table = torch.cat([self.none[name][None], self.embed[0].weight[self.word_rows[name]]])
                parts.append(WORD_SCALE * v @ F.normalize(table, dim=-1).T)
            else:
                parts.append(scores[:, start : start + n])
            start += n
        return torch.cat(parts, dim=1)


def aux_loss(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the AUX_HEADS groups of `scores` (L, sum of sizes) against (L, heads)."""
    total, start = torch.zeros(()), 0
    holds = targets[:, 0] > 0  # the tokens that hold a shape: a few among many empty ones
    for i, (name, n) in enumerate(AUX_HEADS):
        t = targets[:, i]
        if name in SHAPE_HEADS:  # the shape tokens weigh as much as all the empty ones together
            for part in (holds, ~holds):
                if (t[part] != IGNORE).any():
                    ce = F.cross_entropy(scores[part, start : start + n], t[part], ignore_index=IGNORE)
                    total = total + ce / 2
        elif (t != IGNORE).any():
            total = total + F.cross_entropy(scores[:, start : start + n], t, ignore_index=IGNORE)
        start += n
    return total / len(AUX_HEADS)


def cell_accuracy(scores: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Per AUX_HEADS group: the share of visual tokens with a target whose best score is it (for
    kind, colour and count, of the tokens that hold a shape)."""
    out, start = {}, 0
    for i, (name, n) in enumerate(AUX_HEADS):
        has = targets[:, i] != IGNORE
        if name in SHAPE_HEADS:
            has &= targets[:, 0] > 0
        if has.any():
            pred = scores[has, start : start + n].argmax(-1)
            out[name] = float((pred == targets[has, i]).float().mean())
        start += n
    return out


def full_vocab_loss(
    logits: torch.Tensor, targets: torch.Tensor, n_zero_rows: int, answer_of: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy over all 151936 rows: every row outside the compact table is zero in the
    checkpoint and scores exactly 0, so together they weigh log(n_zero_rows) in the softmax.
    Each sample weighs the same, whatever its answer's length: averaged over tokens, the long
    "describe" answers and the trivial tokens ("." and the stop token) drowned the one token a
    colour or shape question turns on, and those types stayed at chance for thousands of steps."""
    zero = torch.full((logits.shape[0], 1), math.log(n_zero_rows))
    ce = F.cross_entropy(torch.cat([logits, zero], dim=1), targets, reduction="none")
    n = int(answer_of.max()) + 1
    per_token = torch.bincount(answer_of, minlength=n).to(ce.dtype)[answer_of]
    return (ce / per_token).sum() / n


def exact_matches(logits: torch.Tensor, batch: dict[str, torch.Tensor], n_rows: int) -> torch.Tensor:
    """Per sample: every answer token beats every other row, the zero rows (score 0) included,
    which is what greedy decoding needs to produce the answer."""
    zero = torch.zeros((logits.shape[0], 1))
    ok = (torch.cat([logits, zero], dim=1).argmax(-1) == batch["targets"]).float()
    per = torch.zeros(n_rows).index_add_(0, batch["answer_of"], 1.0 - ok)
    return per == 0


def full_state_dict(model, vocab: CompactVocab) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors: the compact embedding scattered into the full vocabulary."""
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    compact = state["model.embed_tokens.weight"]
    full = torch.zeros((vocab.vocab_size, compact.shape[1]), dtype=compact.dtype)
    full[torch.from_numpy(vocab.ids)] = compact
    state["model.embed_tokens.weight"] = full
    return state


# ---- training ----------------------------------------------------------------------------------------


def lr_at(step: int, s: TrainSettings) -> float:
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(out: str | Path, seed: int = 0, settings: TrainSettings | None = None, log=print) -> dict:
    """Train and write the checkpoint to `out` (atomically); returns the training record."""
    s = settings or TrainSettings()
    torch.set_num_threads(s.threads)
    torch.manual_seed(seed)
    out = Path(out)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write_checkpoint_files(tmp, seed)
    processor = Processor.from_pretrained(tmp)
    full_cfg = load_config(tmp)
    vocab = task_vocab(processor, full_cfg)
    cfg = compact_config(full_cfg, vocab)
    stop_id = full_cfg.eos_token_id[0]  # <|im_end|>
    pad_id = int(vocab.to_compact([full_cfg.pad_token_id])[0])
    n_zero_rows = vocab.vocab_size - len(vocab.ids)  # rows outside the compact table, all zero

    from slimm.model.slimm import SliMMForConditionalGeneration

    model = SliMMForConditionalGeneration(cfg)
    init_weights(model, vocab, seed)
    model.train()
    emb = model.model.embed_tokens.weight
    keep = torch.from_numpy(~vocab.frozen).float()[:, None]
    emb.register_hook(lambda g: g * keep)  # frozen rows never move: they stay exactly zero
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed_tokens" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed_tokens" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": s.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=s.lr,
        betas=(0.9, 0.98),
    )
    word_rows = {
        name: [int(vocab.to_compact(processor.tokenizer.encode(w))[0]) for w in words]
        for name, words in WORD_HEADS.items()
    }
    aux_head = CellHead(cfg.text.hidden_size, model.model.embed_tokens, word_rows)
    opt.add_param_group({"params": list(aux_head.parameters()), "weight_decay": 0.0})
    look_tap = AttentionTap(model.model.layers[LOOKUP_LAYER].self_attn)
    read_tap = AttentionTap(model.model.layers[READ_LAYER].self_attn)
    n_params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    log(
        f"demo model: {VARIANT} DeepStack, LLM {LLM['num_hidden_layers']}x{LLM['hidden_size']}, vision "
        f"{VISION['depth']}x{VISION['embed_dim']}, {n_params / 1e6:.2f}M weights + {len(vocab.ids)} token "
        f"rows; {s.steps} steps of {s.batch}, {s.threads} threads"
    )

    start, cpu_start = time.monotonic(), time.process_time()  # the cap counts the vision steps too
    if s.vision_steps:
        pretrain_vision(model, aux_head, processor, vocab, stop_id, pad_id, seed, s, log)
    type_rng = np.random.default_rng([seed, 7])
    weights = np.asarray(s.type_weights, dtype=np.float64) / sum(s.type_weights)
    heldout_samples = [make_sample(seed, i, "heldout") for i in range(s.eval_n)]
    merge = cfg.vision.spatial_merge_size
    heldout = [encode(processor, vocab, x, stop_id, merge) for x in heldout_samples]
    heldout_types = [x.type for x in heldout_samples]
    record: dict = {"seed": seed, "settings": dataclasses.asdict(s), "log": []}
    step = 0
    for step in range(s.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, s)
        now = np.where(step >= np.asarray(s.join_at) * s.steps, weights, 0.0)
        qtypes = type_rng.choice(len(QUESTION_TYPES), s.batch, p=now / now.sum())
        samples = [
            make_sample(seed, step * s.batch + j, "train", QUESTION_TYPES[q]) for j, q in enumerate(qtypes)
        ]
        batch = collate([encode(processor, vocab, x, stop_id, merge) for x in samples], pad_id)
        logits, visual = forward_answers(model, batch, with_visual=True)
        answer_loss = full_vocab_loss(logits, batch["targets"], n_zero_rows, batch["answer_of"])
        aux = aux_loss(aux_head(visual), batch["cells"])
        loss = answer_loss + s.aux_weight * aux
        look_mass = read_mass = 0.0
        if s.focus_weight:
            look, look_mass = focus_loss(
                look_tap.log_probs(batch["look_rows"], batch["look_cols"]), batch["look"]
            )
            read, read_mass = focus_loss(
                read_tap.log_probs(batch["read_rows"], batch["read_cols"]), batch["read"]
            )
            loss = loss + s.focus_weight * (look + read)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        opt.step()
        elapsed = time.monotonic() - start
        work = (time.process_time() - cpu_start) / s.threads
        if step % s.log_every == 0 or step == s.steps - 1:
            acc = exact_matches(logits.detach(), batch, len(samples)).float().mean().item()
            log(
                f"step {step:5d}  loss {answer_loss.item():.4f}  cells {aux.item():.4f}  look {look_mass:.2f} read {read_mass:.2f}  "
                f"grad {grad_norm:.2f}  "
                f"batch exact {acc:.2f}  "
                f"{elapsed:7.1f}s wall  {work:7.1f}s cpu/thread"
            )
            record["log"].append(
                {
                    "step": step,
                    "loss": round(answer_loss.item(), 5),
                    "cells_loss": round(aux.item(), 5),
                    "seconds": round(elapsed, 1),
                    "cpu": round(work, 1),
                }
            )
        if (step + 1) % s.eval_every == 0 or step == s.steps - 1:
            hits, cells = heldout_exact(model, heldout, pad_id, aux_head)
            acc = float(hits.float().mean())
            by_type = {
                t: float(hits[[i for i, x in enumerate(heldout_types) if x == t]].float().mean())
                for t in QUESTION_TYPES
            }
            log(
                f"step {step:5d}  held-out exact match (teacher-forced, {len(heldout)}): {acc:.3f}  "
                + " ".join(f"{t} {a:.2f}" for t, a in by_type.items())
            )
            log("           cells: " + " ".join(f"{k} {v:.2f}" for k, v in cells.items()))
            record["log"].append({"step": step, "heldout_exact": round(acc, 4)})
        if work > s.minutes * 60:
            log(f"warning: stopping at step {step}: the {s.minutes}-minute cap is reached")
            break
    record.update(
        steps_done=step + 1,
        seconds=round(time.monotonic() - start, 1),
        cpu_seconds_per_thread=round((time.process_time() - cpu_start) / s.threads, 1),
    )
    model.eval()
    save_file(full_state_dict(model, vocab), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "training.json").write_text(json.dumps(record, indent=1))
    (tmp / "README.md").write_text(
        f"# SliMM demo model (DeepStack {VARIANT}, seed {seed})\n\n"
        "Trained by `python -m slimm.train_demo` on the synthetic shapes task of `slimm.synthetic`:\n"
        "colours, shapes, positions and counts of shapes in an image, and which way a shape moves in a\n"
        "short video. It knows nothing else. training.json holds the settings and the loss curve.\n"
    )
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return record


def pretrain_vision(model, aux_head, processor, vocab, stop_id, pad_id, seed, s: TrainSettings, log) -> None:
    """The vision tower, the merger and the cell heads alone, on the cell targets of samples drawn
    from their own stream (no language model in the pass: a step costs a fraction of a full one)."""
    params = list(model.visual.parameters()) + list(aux_head.parameters())
    opt = torch.optim.AdamW(params, lr=s.vision_lr, betas=(0.9, 0.98), weight_decay=0.0)
    merge = model.config.vision.spatial_merge_size
    cfg = model.config
    for step in range(s.vision_steps):
        lr = s.vision_lr * min(1.0, (step + 1) / s.warmup) * (0.1 + 0.9 * (1 - step / s.vision_steps))
        for group in opt.param_groups:
            group["lr"] = lr
        samples = [make_sample(seed + 1000, step * s.batch + j, "train") for j in range(s.batch)]
        batch = collate([encode(processor, vocab, x, stop_id, merge) for x in samples], pad_id)
        ids = batch["input_ids"]
        h, _, _ = model.embed(
            ids,
            batch.get("pixel_values"),
            batch.get("image_grid_thw"),
            batch.get("pixel_values_videos"),
            batch.get("video_grid_thw"),
        )
        visual = h[(ids == cfg.image_token_id) | (ids == cfg.video_token_id)]
        scores = aux_head(visual)
        loss = aux_loss(scores, batch["cells"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0 or step == s.vision_steps - 1:
            acc = cell_accuracy(scores.detach(), batch["cells"])
            log(
                f"vision {step:5d}  cells {loss.item():.4f}  "
                + " ".join(f"{k} {v:.2f}" for k, v in acc.items())
            )


@torch.no_grad()
def heldout_exact(
    model, encoded: list[Encoded], pad_id: int, aux_head, batch: int = 40
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per sample: greedy decoding would give exactly the answer (teacher-forced check, batched);
    and the cell heads' accuracy on the same samples' visual tokens."""
    was_training = model.training
    model.eval()
    hits, scores, targets = [], [], []
    for i in range(0, len(encoded), batch):
        chunk = encoded[i : i + batch]
        b = collate(chunk, pad_id)
        logits, visual = forward_answers(model, b, with_visual=True)
        hits.append(exact_matches(logits, b, len(chunk)))
        scores.append(aux_head(visual))
        targets.append(b["cells"])
    model.train(was_training)
    return torch.cat(hits), cell_accuracy(torch.cat(scores), torch.cat(targets))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m slimm.train_demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--seed", type=int, default=0)
    d = TrainSettings()
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument(
        "--minutes",
        type=float,
        default=d.minutes,
        help="cap on training: CPU time / threads (idle-machine minutes)",
    )
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--eval-n", type=int, default=500, help="held-out questions decoded at the end (0: none)")
    p.add_argument("--package", help="also pack the weights into this asset directory (slimm.trained_demo)")
    a = p.parse_args(argv)
    settings = dataclasses.replace(
        d,
        steps=a.steps,
        batch=a.batch,
        lr=a.lr,
        minutes=a.minutes,
        threads=a.threads,
        eval_every=min(d.eval_every, a.steps),
    )
    record = train(a.out, a.seed, settings)
    print(f"trained {record['steps_done']} steps in {record['seconds'] / 60:.1f} min -> {a.out}")
    if a.eval_n:
        from slimm.evaluation import evaluate_synthetic

        report = evaluate_synthetic(a.out, a.eval_n, a.seed, backend="torch", progress=True)
        print(f"held-out accuracy ({a.eval_n} questions, greedy): {report['accuracy']:.4f}")
        for t, r in report["by_type"].items():
            print(f"  {t:9s} {r['accuracy']:.3f} ({r['n']})")
        record["heldout_accuracy"] = report["accuracy"]
        Path(a.out, "training.json").write_text(json.dumps({**record, "eval": report["by_type"]}, indent=1))
    if a.package:
        from slimm.trained_demo import pack

        path = pack(a.out, a.package)
        print(f"packed into {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
