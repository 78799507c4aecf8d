"""The `peft-s2ft train` application: built on the S2FT tuner, not part of it, so it lives apart from the core."""
