"""INT8 conversion (``ktflow convert-int8``): BF16 routed experts -> KT's CPU INT8 layout
for sglang-kt ``--kt-weight-path``.

The quantization (symmetric per output row, packed for the AMX kernels) runs in
kt_kernel's compiled extension, which only KT can produce in the layout its
server reads; ktflow drives it, one MoE layer at a time, and checks the result.
Output: safetensors shards holding ``blk.{L}.ffn_{gate,up,down}_exps.{E}.numa.{n}.{weight,scale}``
(int8 / float32), ``ktflow_int8.json`` (the server flags to use) and provenance.json.
"""

# What the conversion writes beside the shards and the SGLang backend reads: the server flags to use.
RECORD_NAME = "ktflow_int8.json"
