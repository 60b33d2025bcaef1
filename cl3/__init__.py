"""cl3: Chinese Llama-3 (and Llama-family) models on your own desktop, through llama.cpp.

Each pipeline stage is a module with a plain-Python API (``cl3.convert``, ``cl3.quantize`` …);
``cl3.cli`` is a thin Typer layer over them. Nothing runs at import time.
"""

__version__ = "0.1.0"
