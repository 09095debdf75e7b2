"""Bridges to other implementations (bitsandbytes). Each module imports its library lazily."""
