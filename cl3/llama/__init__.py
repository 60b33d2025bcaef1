"""The one boundary between cl3 and llama.cpp: everything that touches llama-cpp-python's low-level bindings,
ctypes structures or ggml's C API lives in this package, in files named after what they hold:

- ``library``: llama.cpp loaded once (backend, bundled ggml libraries)
- ``log``: llama.cpp's log captured for error messages
- ``model``: :class:`Model` (loading) and :class:`Context` (tokens in, logits out, eval callback)
- ``tensors``: the ggml tensor mirror the imatrix callback reads; ggml type sizes; rows quantized and
  dequantized by ggml itself
- ``quantization``: ``llama_model_quantize`` (with per-tensor type patterns), file types, dry-run plans
- ``gguf_file``: GGUF metadata through ggml's C reader; the exact size of a quantized file
- ``hardware``: devices, threads, the AMX check
- ``llama_class``: what chat and serve need around llama-cpp-python's ``Llama``
"""

from .gguf_file import GgufFile, TensorInfo, check_gguf_path, quantized_file_size
from .hardware import (
    backend_info,
    backend_label,
    devices,
    gpu_offload_supported,
    physical_cpu_count,
)
from .llama_class import budgeted_chat_templates, eog_token_ids, prepare_for_llama, token_piece
from .log import log_errors_since, log_listener, mark_log
from .model import Context, EvalCallback, Model, context_memory_plan
from .quantization import FileType, file_types, quantize_file, quantize_plan
from .tensors import (
    GGML_OP_MUL_MAT,
    GGML_OP_MUL_MAT_ID,
    GGML_TYPE_F32,
    GgmlTensor,
    block_size,
    dequantize_rows,
    ggml_type_by_name,
    ggml_type_name,
    is_quantized,
    quantize_rows,
    requires_imatrix,
    tensor_array,
    tensor_at,
    tensor_name,
    tensor_nbytes,
    tensor_rows,
)

__all__ = [
    "GGML_OP_MUL_MAT", "GGML_OP_MUL_MAT_ID", "GGML_TYPE_F32", "Context", "EvalCallback", "FileType", "GgmlTensor",
    "GgufFile", "Model", "TensorInfo", "backend_info", "backend_label", "block_size", "check_gguf_path",
    "context_memory_plan", "dequantize_rows", "devices", "eog_token_ids", "file_types", "ggml_type_by_name",
    "ggml_type_name", "gpu_offload_supported", "is_quantized", "log_errors_since", "log_listener", "mark_log",
    "physical_cpu_count", "prepare_for_llama", "quantize_file", "quantize_plan", "quantize_rows",
    "quantized_file_size", "requires_imatrix", "tensor_array", "tensor_at", "tensor_name", "tensor_nbytes",
    "tensor_rows", "token_piece", "budgeted_chat_templates",
]
