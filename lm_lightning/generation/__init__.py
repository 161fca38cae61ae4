"""Text generation: decoding settings, the sampling callback, and the predict writer."""
