"""Library code of the LoRA tools (tools/*.py): LoRA math, checkpoint mapping, merging, extraction."""
