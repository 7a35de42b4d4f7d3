"""Each stage's exercises, one module per stage (`mN.py` holds `EXERCISES`)."""
