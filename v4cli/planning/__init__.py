"""Planning: what a model needs on a machine, and where each tensor goes — one vocabulary, one set of reserves.

`machine` describes the machine (memory, bandwidths, the reserves, the one bandwidth meter); `tensors` the model
(one record per tensor, from a GGUF header or a recipe); `traffic` the bytes a decoded token reads; `placement`
which tier (gpu / ram / disk) each tensor lives on; `plan` puts them together for `v4 plan`, `v4 info --plan`, the
pre-load check of chat/ask and the loader; `fit` picks the recipe for `v4 quantize --fit`.
"""
