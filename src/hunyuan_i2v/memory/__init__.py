"""Memory and speed engine: quantized weight storage (:mod:`.quant`) and related helpers.

Submodules are imported explicitly (``from hunyuan_i2v.memory.quant import quantize_model``) so importing this
package stays cheap.
"""
