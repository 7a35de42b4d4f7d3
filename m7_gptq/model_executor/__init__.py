"""Model code: the Llama family, its layers, and the weight loader."""
