"""Memory tricks as plain functions on modules, each undoable: fp8 base weights (fp8), block swapping between
CPU and GPU (block_swap), gradient checkpointing with CPU-held inputs (offload_checkpoint).

Family-independent: nothing here imports library.families or networks; a family decides where to apply them.
"""
