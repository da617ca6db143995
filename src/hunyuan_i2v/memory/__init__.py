"""Memory and speed engine: weight residency (:mod:`.offload`), quantized weight storage (:mod:`.quant`), the
memory planner (:mod:`.planner`) and the pipeline's memory options (:mod:`.runtime`).

Submodules are imported explicitly (``from hunyuan_i2v.memory.quant import quantize_model``) so importing this
package stays cheap; the option names below are here for the command line, which must not import torch to parse.
"""

OFFLOAD_MODES = ("none", "model", "blocks")
FLOAT_WEIGHT_NAMES = ("bf16", "fp16", "fp32")
QUANTIZED_WEIGHTS = ("int8", "fp8")  # in order of preference: int8 is the more exact
WEIGHTS_DTYPES = ("auto", *FLOAT_WEIGHT_NAMES, *QUANTIZED_WEIGHTS)
ATTENTION_CHOICES = ("auto", "sdpa", "chunked", "flash", "sage")
