"""Pure core of fedsilo: settings, schema, models, data, privacy accounting, training."""
