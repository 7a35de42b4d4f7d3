"""Building blocks of the model: norms, rotary embedding."""
