"""Host-side bookkeeping in NumPy, below the model, the parts runtime and the converter: M-RoPE
position ids (`positions`) and the vision encoder's index tensors (`vision_index`). Imports no torch.
"""
