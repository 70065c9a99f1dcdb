"""Stage ``lower``: the rewritten model in the form one target runs fastest (DESIGN.md section 4):
standard ops for ONNX Runtime (:mod:`.ort`), plugin nodes for TensorRT (:mod:`.trt`, kernels
in :mod:`.plugins`), and the fp16/bf16 conversion that keeps statistics in fp32 (:mod:`.precision`)."""
