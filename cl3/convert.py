"""HF checkpoint → GGUF, without PyTorch, one tensor chunk at a time.

The output is what llama.cpp's convert_hf_to_gguf.py writes for Llama-architecture models (same tensor names, the
same Q/K row permutation, the same F32 norms, the same f16 rounding), with the tokenizer, chat template and rope
scaling carried over. Memory stays bounded by a few chunks of ~16 MiB whatever the model size.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from .chat_templates import KNOWN_TEMPLATES, NAME_KEY, SOURCE_KEY, TemplateChoice, family_from_vocab, template_from_spec
from .errors import InputError, OutputError, UnsupportedModelError, UsageError
from .files import atomic_output, check_new_output, is_directory_target, output_directory
from .hf import Checkpoint, TensorRef, check_architecture, open_checkpoint
from .progress import quiet_logger
from .vocab import load_vocab

OUTTYPES = ("f32", "f16", "bf16", "q8_0", "auto")
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
TENSOR_TYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
                "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
IGNORED_TENSORS = ("rotary_emb.inv_freq",)

Progress = Callable[[int, int], None]


@dataclass
class ConvertResult:
    path: Path
    outtype: str
    n_tensors: int
    n_params: int
    n_bytes: int
    template: TemplateChoice | None = None  # the chat template embedded, and where it came from


@dataclass
class _TensorPlan:
    name: str                 # GGUF name
    ref: TensorRef | None     # source tensor (None for generated tensors)
    qtype: gguf.GGMLQuantizationType
    permute_heads: int = 0    # >0: apply the Q/K rotary permutation with this many heads
    data: np.ndarray | None = None  # generated tensors (rope_freqs)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.ref.shape if self.ref is not None else self.data.shape

    @property
    def nbytes(self) -> int:
        n = int(np.prod(self.shape, dtype=np.int64))
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return n // block * size


def resolve_outtype(outtype: str, ckpt: Checkpoint) -> str:
    """llama.cpp's rule for `auto`: f16 when the weights are f16, bf16 otherwise."""
    outtype = outtype.lower()
    if outtype not in OUTTYPES:
        raise UsageError(f"unknown output type {outtype!r}; choose one of {', '.join(OUTTYPES)}", param="outtype")
    if outtype != "auto":
        return outtype
    first = next(iter(ckpt.tensors.values()))
    return "f16" if first.dtype == np.float16 else "bf16"


def default_output_name(ckpt: Checkpoint, outtype: str, n_params: int) -> str:
    """llama.cpp's file-name convention: {name}-{size}-{TYPE}.gguf."""
    meta = _metadata(ckpt, n_params)
    return gguf.naming_convention(meta.name, meta.basename, meta.finetune, meta.version, meta.size_label,
                                  outtype.upper()) + ".gguf"


@quiet_logger()
def default_name(src: str | os.PathLike, outtype: str = "auto", *, allow_pickle: bool = False) -> str:
    """The file name `convert` gives ``src`` in a folder (llama.cpp's convention), without converting."""
    ckpt = open_checkpoint(src, allow_pickle=allow_pickle)
    check_architecture(ckpt.config)
    outtype = resolve_outtype(outtype, ckpt)
    plans = _plan_tensors(ckpt, hparams(ckpt.config), outtype)
    return default_output_name(ckpt, outtype, sum(int(np.prod(p.shape)) for p in plans if p.ref is not None))


@quiet_logger()
def convert(src: str | os.PathLike, out: str | os.PathLike, outtype: str = "auto", *, allow_pickle: bool = False,
            pre_tokenizer: str | None = None, chat_template: str | os.PathLike | None = None, force: bool = False,
            progress: Progress | None = None) -> ConvertResult:
    """Convert the HF checkpoint directory `src` to a GGUF at `out`: a file, or a folder (an existing one, or a name
    ending in a separator, created) for the default name. An existing file is replaced only with ``force``.

    chat_template: a known template name or a Jinja file, embedded instead of the checkpoint's own; without one and
    without a template in the checkpoint, the template of the family cl3 recognises from the vocabulary (if any)."""
    choice = template_from_spec(chat_template) if chat_template is not None else None
    ckpt = open_checkpoint(src, allow_pickle=allow_pickle)
    check_architecture(ckpt.config)
    hp = hparams(ckpt.config)
    outtype = resolve_outtype(outtype, ckpt)
    plans = _plan_tensors(ckpt, hp, outtype)
    vocab = load_vocab(ckpt.path, hp["vocab_size"], pre_tokenizer)
    choice = choose_template(vocab, choice)
    n_params = sum(int(np.prod(p.shape)) for p in plans if p.ref is not None)

    if is_directory_target(out):
        out = output_directory(out) / default_output_name(ckpt, outtype, n_params)
    out = Path(out)
    check_new_output(out, force)
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.MODEL)
    _metadata(ckpt, n_params).set_gguf_meta_model(writer)
    add_hparams(writer, hp, ckpt.config, outtype)
    vocab.add_to_gguf(writer)
    if choice is not None:
        writer.add_string(SOURCE_KEY, choice.source)
        if choice.name:
            writer.add_string(NAME_KEY, choice.name)
    for p in plans:
        writer.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.qtype)

    total = sum(p.nbytes for p in plans)
    with atomic_output(out) as tmp:
        try:
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            fout = writer.fout[0]
            done = 0
            for p in plans:
                writer.write_padding(fout, fout.tell())
                for chunk in _converted_chunks(p):
                    chunk.tofile(fout)
                    done += chunk.nbytes
                    if progress:
                        progress(done, total)
                writer.write_padding(fout, p.nbytes)
            writer.close()
        except OSError as ex:
            writer.close()
            if isinstance(ex, (FileNotFoundError, PermissionError)) or ex.errno in (28, 30):
                raise OutputError(f"cannot write {out}: {ex.strerror}") from None
            raise
        finally:
            writer.close()
    return ConvertResult(out, outtype, len(plans), n_params, out.stat().st_size, choice)


def choose_template(vocab, choice: TemplateChoice | None) -> TemplateChoice | None:
    """The user's template, else the checkpoint's, else the family's; set on the vocabulary's special tokens."""
    own = vocab.special.chat_template
    if choice is None and own:
        choice = TemplateChoice(own if isinstance(own, str) else "", "checkpoint", None)
    if choice is None:
        tokens = [t.decode("utf-8", "replace") if isinstance(t, bytes) else t for t in vocab.tokens]
        family = family_from_vocab(vocab.model, tokens)
        if family is None:
            return None
        choice = TemplateChoice(KNOWN_TEMPLATES[family], "family", family)
    if choice.source != "checkpoint":
        vocab.special.chat_template = choice.text
    return choice


def hparams(config: dict) -> dict:
    try:
        hp = {
            "vocab_size": int(config["vocab_size"]),
            "hidden": int(config["hidden_size"]),
            "ffn": int(config["intermediate_size"]),
            "layers": int(config["num_hidden_layers"]),
            "heads": int(config["num_attention_heads"]),
        }
    except KeyError as ex:
        raise InputError(f"config.json lacks {ex.args[0]!r}") from None
    except (TypeError, ValueError) as ex:
        raise InputError(f"config.json has a malformed value: {ex}") from None
    for key, name in (("vocab_size", "vocab_size"), ("hidden", "hidden_size"), ("ffn", "intermediate_size"),
                      ("layers", "num_hidden_layers"), ("heads", "num_attention_heads")):
        if hp[key] <= 0:
            raise InputError(f"config.json: {name} is {hp[key]}; it must be positive")
    try:
        hp["kv_heads"] = int(config.get("num_key_value_heads") or hp["heads"])
        hp["head_dim"] = int(config.get("head_dim") or hp["hidden"] // hp["heads"])
    except (TypeError, ValueError) as ex:
        raise InputError(f"config.json has a malformed value: {ex}") from None
    if hp["kv_heads"] <= 0 or hp["head_dim"] <= 0:
        what = "num_key_value_heads" if hp["kv_heads"] <= 0 else "head_dim"
        raise InputError(f"config.json: {what} is {hp['kv_heads'] if what == 'num_key_value_heads' else hp['head_dim']}; "
                         "it must be positive")
    if not config.get("head_dim") and hp["hidden"] % hp["heads"]:
        raise InputError(f"config.json: hidden_size {hp['hidden']} is not a multiple of num_attention_heads "
                         f"{hp['heads']}")
    if hp["heads"] % hp["kv_heads"]:
        raise InputError(f"config.json: {hp['heads']} attention heads are not a multiple of {hp['kv_heads']} kv heads")
    return hp


def expected_shapes(hp: dict) -> dict[str, tuple[int, ...]]:
    h, d = hp["hidden"], hp["head_dim"]
    shapes = {"token_embd.weight": (hp["vocab_size"], h), "output_norm.weight": (h,), "output.weight": (hp["vocab_size"], h)}
    for i in range(hp["layers"]):
        b = f"blk.{i}."
        shapes |= {b + "attn_q.weight": (hp["heads"] * d, h), b + "attn_k.weight": (hp["kv_heads"] * d, h),
                   b + "attn_v.weight": (hp["kv_heads"] * d, h), b + "attn_output.weight": (h, hp["heads"] * d),
                   b + "ffn_gate.weight": (hp["ffn"], h), b + "ffn_up.weight": (hp["ffn"], h),
                   b + "ffn_down.weight": (h, hp["ffn"]), b + "attn_norm.weight": (h,), b + "ffn_norm.weight": (h,)}
    return shapes


def _plan_tensors(ckpt: Checkpoint, hp: dict, outtype: str) -> list[_TensorPlan]:
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hp["layers"])
    expected = expected_shapes(hp)
    plans: list[_TensorPlan] = []
    for hf_name, ref in ckpt.tensors.items():
        if hf_name.endswith(IGNORED_TENSORS):
            continue
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None or name not in expected:
            raise UnsupportedModelError(f"unexpected tensor {hf_name} for a {ckpt.architecture} model")
        if ref.shape != expected[name]:
            raise InputError(f"shape mismatch: {hf_name} is {list(ref.shape)} but config.json implies "
                             f"{list(expected[name])}")
        permute = hp["heads"] if name.endswith("attn_q.weight") else hp["kv_heads"] if name.endswith("attn_k.weight") else 0
        plans.append(_TensorPlan(name, ref, tensor_type(name, ref.shape, outtype), permute))
    have = {p.name for p in plans}
    missing = [n for n in expected if n not in have and n != "output.weight"]
    if missing:
        raise InputError(f"the checkpoint lacks {len(missing)} tensor(s), e.g. {missing[0]}")
    if "output.weight" not in have and not ckpt.config.get("tie_word_embeddings", False):
        raise InputError("the checkpoint has no lm_head.weight and does not tie it to the embeddings")
    if (freqs := llama3_rope_factors(ckpt.config, hp)) is not None:
        plans.append(_TensorPlan("rope_freqs.weight", None, gguf.GGMLQuantizationType.F32, data=freqs))
    order = list(expected) + ["rope_freqs.weight"]
    return sorted(plans, key=lambda p: order.index(p.name))


def tensor_type(name: str, shape: tuple[int, ...], outtype: str) -> gguf.GGMLQuantizationType:
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return gguf.GGMLQuantizationType.F32
    if outtype == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]:
        return gguf.GGMLQuantizationType.F16
    return TENSOR_TYPES[outtype]


def _converted_chunks(plan: _TensorPlan):
    if plan.data is not None:
        yield plan.data.astype(np.float32)
        return
    ref = plan.ref
    head_rows = ref.shape[0] // plan.permute_heads if plan.permute_heads else 1
    for start, stop in ref.row_chunks(align=head_rows):
        rows = ref.read_rows(start, stop)
        if plan.permute_heads:
            rows = permute_qk_rows(rows, head_rows)
        yield _encode(rows, ref.dtype, plan.qtype)


def permute_qk_rows(rows: np.ndarray, head_rows: int) -> np.ndarray:
    """HF's rotate-half Q/K layout → llama.cpp's interleaved one (convert_hf_to_gguf's LlamaModel.permute)."""
    n = rows.shape[0] // head_rows
    return rows.reshape(n, 2, head_rows // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _encode(rows: np.ndarray, src_dtype: np.dtype, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    Q = gguf.GGMLQuantizationType
    if qtype == Q.BF16 and src_dtype.name == "bfloat16":
        return rows.view(np.uint16)
    if qtype == Q.F16 and src_dtype == np.float16:
        return rows
    if qtype == Q.F16:  # one rounding, like torch's bf16/f32 → f16 (ml_dtypes converts through float32 exactly)
        return rows.astype(np.float16)
    f32 = rows.astype(np.float32)
    if qtype == Q.F32:
        return f32
    if qtype == Q.F16:
        return f32.astype(np.float16)
    return gguf.quants.quantize(f32, qtype)


ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


@dataclass(frozen=True)
class RopeSettings:
    """A config's rope settings, whatever layout wrote them."""

    theta: float
    kind: str = "default"                  # one of ROPE_TYPES
    factor: float = 1.0
    original_context: int = 0              # yarn, llama3: the pre-training context
    low_freq_factor: float = 1.0           # llama3
    high_freq_factor: float = 4.0          # llama3
    attention_factor: float | None = None  # yarn: transformers' cos/sin scale when it is not 0.1·ln(factor)+1


def rope_settings(config: dict) -> RopeSettings:
    """The rope settings of a Llama/Mistral config.json, read as transformers 5 standardises them: its own layout
    (`rope_parameters` holding rope_theta, rope_type and the scaling fields) or the legacy one (top-level `rope_theta`,
    `rope_scaling` with `type` or `rope_type`); a layout or rope type cl3 cannot carry to llama.cpp is refused."""
    found = {}
    for key in ("rope_scaling", "rope_parameters"):
        value = config.get(key)
        if value is not None and not isinstance(value, dict):
            raise InputError(f"config.json: {key} is not an object")
        if value:
            found[key] = _rope_settings(value, config)
    if len(set(found.values())) > 1:  # transformers would read rope_scaling, llama.cpp's converter rope_parameters
        raise InputError("config.json has both rope_scaling and rope_parameters, and they differ")
    return next(iter(found.values()), None) or _rope_settings({}, config)


def _rope_settings(rope: dict, config: dict) -> RopeSettings:
    if nested := [k for k, v in rope.items() if isinstance(v, dict)]:
        raise UnsupportedModelError(f"config.json: per-layer rope settings ({', '.join(nested)}) are not supported")
    partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor"))
    if partial not in (None, 1):
        raise UnsupportedModelError(f"config.json: partial_rotary_factor {partial} is not supported")
    kind = str(rope.get("rope_type") or rope.get("type") or "default").lower()
    if kind not in ROPE_TYPES:
        raise UnsupportedModelError(f"rope type {kind!r} is not supported (cl3 converts {', '.join(ROPE_TYPES)})")
    theta = _rope_number(rope.get("rope_theta", config.get("rope_theta", 10000.0)), "rope_theta")
    if kind == "default":
        return RopeSettings(theta)
    if kind in ("linear", "dynamic"):
        return RopeSettings(theta, kind, _rope_number(rope.get("factor"), "factor"))
    # transformers prefers a top-level original_max_position_embeddings, then the rope object's, then the context
    max_ctx = config.get("max_position_embeddings")
    original = int(_rope_number(config.get("original_max_position_embeddings")
                                or rope.get("original_max_position_embeddings") or max_ctx,
                                "original_max_position_embeddings"))
    if kind == "llama3":
        return RopeSettings(theta, kind, _rope_number(rope.get("factor"), "factor"), original,
                            _rope_number(rope.get("low_freq_factor"), "low_freq_factor"),
                            _rope_number(rope.get("high_freq_factor"), "high_freq_factor"))
    factor = rope.get("factor")
    factor = _rope_number(factor if factor is not None or not max_ctx else max_ctx / original, "factor")
    # llama.cpp's Llama fixes these (it reads no yarn_beta_* for it and always rounds the correction range)
    for key, fixed in (("beta_fast", 32), ("beta_slow", 1), ("truncate", True)):
        if rope.get(key) not in (None, fixed):
            raise UnsupportedModelError(f"config.json: yarn {key}={rope[key]} is not supported (llama.cpp uses {fixed})")
    attention, mscale, mscale_all_dim = rope.get("attention_factor"), rope.get("mscale"), rope.get("mscale_all_dim")
    if attention is None and mscale and mscale_all_dim:
        attention = (_yarn_mscale(factor, _rope_number(mscale, "mscale"))
                     / _yarn_mscale(factor, _rope_number(mscale_all_dim, "mscale_all_dim")))
    if attention is not None:
        attention = _rope_number(attention, "attention_factor")
    return RopeSettings(theta, kind, factor, original, attention_factor=attention)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _rope_number(value, key: str) -> float:
    if value is None:
        raise InputError(f"config.json: the rope settings lack {key}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise InputError(f"config.json: rope {key} must be a positive number, not {value!r}")
    return float(value)


def llama3_rope_factors(config: dict, hp: dict) -> np.ndarray | None:
    """Llama-3.1-style frequency factors, as convert_hf_to_gguf computes them (rope_freqs.weight)."""
    rope = rope_settings(config)
    if rope.kind != "llama3":
        return None
    dim = hp["head_dim"]
    freqs = 1.0 / (rope.theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high, old_ctx = rope.factor, rope.low_freq_factor, rope.high_freq_factor, rope.original_context
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def add_hparams(writer: gguf.GGUFWriter, hp: dict, config: dict, outtype: str) -> None:
    writer.add_vocab_size(hp["vocab_size"])
    writer.add_context_length(int(config.get("max_position_embeddings") or 4096))
    writer.add_embedding_length(hp["hidden"])
    writer.add_block_count(hp["layers"])
    writer.add_feed_forward_length(hp["ffn"])
    writer.add_head_count(hp["heads"])
    writer.add_head_count_kv(hp["kv_heads"])
    writer.add_rope_dimension_count(hp["head_dim"])
    # llama.cpp's converter writes them whenever transformers' config has head_dim, which LlamaConfig and
    # MistralConfig always fill in (hidden_size / heads unless given)
    writer.add_key_length(hp["head_dim"])
    writer.add_value_length(hp["head_dim"])
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
    writer.add_file_type(FILE_TYPES[outtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)  # the converter writes it for every outtype
    rope = rope_settings(config)
    base = rope.theta
    if rope.kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope.factor)
    elif rope.kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope.factor)
        writer.add_rope_scaling_orig_ctx_len(rope.original_context)
        if rope.attention_factor is not None:
            # llama.cpp scales by 0.1·ln(factor)+1 itself, then by this
            writer.add_rope_scaling_attn_factors(rope.attention_factor / _yarn_mscale(rope.factor))
    elif rope.kind == "dynamic":
        # llama.cpp has no dynamic NTK at run time; the NTK-aware base change at the full factor is its equivalent
        base = base * rope.factor ** (hp["head_dim"] / (hp["head_dim"] - 2))
    writer.add_rope_freq_base(base)


def _metadata(ckpt: Checkpoint, n_params: int) -> gguf.Metadata:
    meta = gguf.Metadata.load(None, ckpt.path, None, n_params)
    if meta.name is None:
        meta.name = ckpt.config.get("_name_or_path", "").split("/")[-1] or ckpt.path.name
    if meta.size_label is None:
        meta.size_label = gguf.size_label(n_params, 0, 0, 0)
    return meta
