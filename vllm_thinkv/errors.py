"""The one exception type for bad input (unsupported model, rank, config, text).

It subclasses ValueError so vLLM reports it like its own config errors; the
`thinkv` CLI prints it as a one-line reason and exits with code 2.
"""


class ThinKVError(ValueError):
    """Bad input, with a message naming the problem and what is supported."""
