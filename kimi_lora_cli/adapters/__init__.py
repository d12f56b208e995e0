"""Reading peft LoRA adapters from their headers, inspecting them, and merging them into a base model."""
